"""Run a command as a child process and measure its wall time and peak memory (RSS)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Measurement:
    label: str
    seconds: float
    peak_mb: float


def measure(label: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Measurement:
    """Run `argv` to completion; peak RSS is that child's own (os.wait4), not the sum of all."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{stderr}")
    return Measurement(label, seconds, usage.ru_maxrss / 1024)


def report(ours: Measurement, theirs: Measurement) -> str:
    return (
        f"{ours.label:<40} {ours.seconds:7.2f} s {ours.peak_mb:8.0f} MB\n"
        f"{theirs.label:<40} {theirs.seconds:7.2f} s {theirs.peak_mb:8.0f} MB\n"
        f"{'ratio (ours / by hand)':<40} {ours.seconds / theirs.seconds:7.2f} x "
        f"{ours.peak_mb / theirs.peak_mb:8.2f} x"
    )
