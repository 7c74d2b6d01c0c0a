"""Run commands as child processes and compare their wall time and peak memory (RSS).

Each variant runs in its own process, `repeat` times, interleaved with the others so that a busy
machine hurts every variant alike; the best wall time counts, and the largest peak RSS.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# An installed fusecli has its bytecode (pip compiles it at install), as Keras and numpy have
# theirs here; run from the checkout under PYTHONDONTWRITEBYTECODE (as this repository's
# environment sets it), every measured run would compile fusecli's source again. So the children
# run a copy of the checkout's package, compiled once, in a temporary folder (`_package`).
_compiled: list[str] = []

_MAKE_RESNET50 = """
import sys, keras
for seed, path in enumerate(sys.argv[1:]):
    keras.utils.set_random_seed(seed)
    keras.applications.ResNet50(weights=None).save(path)
"""


@dataclass
class Measurement:
    label: str
    seconds: float
    peak_mb: float
    returncode: int = 0
    stderr: str = ""


def measure(
    label: str,
    argv: Sequence[object],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> Measurement:
    """Run `argv` once to completion; peak RSS is that child's own (os.wait4), not a sum.

    The child runs this checkout's fusecli (PYTHONPATH: a compiled copy of it, see `_package`),
    with TensorFlow's C++ logs off. Keep
    the calling process small: a child's peak RSS starts from its parent's at fork time.
    """
    pythonpath = os.pathsep.join(filter(None, [_package(), os.environ.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": pythonpath, **(env or {})},
    )
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    returncode = os.waitstatus_to_exitcode(status)
    if check and returncode != 0:
        sys.exit(f"{label} failed ({returncode}):\n{stderr[-2000:]}")
    return Measurement(label, seconds, usage.ru_maxrss / 1024, returncode, stderr)


def _package() -> str:
    """A folder holding a copy of this checkout's `fusecli` package with its bytecode, made on
    the first call (removed at exit)."""
    if not _compiled:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="bench-fusecli-")
        atexit.register(shutil.rmtree, folder, True)
        shutil.copytree(REPO / "fusecli", Path(folder) / "fusecli")
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", str(Path(folder) / "fusecli")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _compiled.append(folder)
    return _compiled[0]


def best_of(
    variants: dict[str, Sequence[object]],
    *,
    repeat: int = 3,
    env: dict[str, str] | None = None,
    fresh: Sequence[Path] = (),
) -> dict[str, Measurement]:
    """Each variant `repeat` times, interleaved: its best wall time and its largest peak RSS.

    The files in `fresh` (the variants' outputs, one each) are removed before every round,
    untimed: each run writes a new file, as a first run does, and the last round's are left.
    Replacing a file instead (truncating it, or renaming over it) makes ext4 write the new one
    back to disk as it is closed or renamed: a cost of the replacing, not of the job, which fell
    on some variants and not others. For the same reason every run starts once the disk has
    taken what earlier runs wrote (`os.sync`, untimed): gigabytes still being written back
    slow down whichever variant writes next.
    """
    best: dict[str, Measurement] = {}
    for _ in range(repeat):
        for path in fresh:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for label, argv in variants.items():
            os.sync()
            m = measure(label, argv, env=env)
            if label in best:
                m.seconds = min(m.seconds, best[label].seconds)
                m.peak_mb = max(m.peak_mb, best[label].peak_mb)
            best[label] = m
    return best


def table(results: dict[str, Measurement], baseline: str) -> str:
    """One line per variant, with its time and memory as ratios to `baseline`'s."""
    base = results[baseline]
    width = max(len(label) for label in results) + 2
    lines = [f"{'variant':<{width}} {'wall s':>8} {'peak MB':>8} {'time x':>7} {'mem x':>7}"]
    for label, m in results.items():
        lines.append(
            f"{label:<{width}} {m.seconds:8.2f} {m.peak_mb:8.0f} "
            f"{m.seconds / base.seconds:7.2f} {m.peak_mb / base.peak_mb:7.2f}"
        )
    return "\n".join(lines)


def make_resnet50s(*paths: Path) -> None:
    """Save a ResNet50 (random weights, one seed each) at each path, in a child process so that
    this one stays small (see `measure`)."""
    subprocess.run(
        [sys.executable, "-c", _MAKE_RESNET50, *map(str, paths)],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def save_results(name: str, text: str, argv: Sequence[str] | None = None) -> Path:
    """Write `text` (the printed tables) to bench/results/NAME.txt, headed by the date, the
    machine and the command that produced it, so that every figure quoted in the README and
    docs/ can be traced to a committed run."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    command = " ".join(argv if argv is not None else [Path(sys.argv[0]).name, *sys.argv[1:]])
    header = (
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}\n"
        f"command: python bench/{command}\n\n"
    )
    path = REPO / "bench" / "results" / f"{name}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(header + text.rstrip() + "\n")
    return path
