"""Writes that the disk or the folder refuses: one `Error:` line naming the output and the OS's
reason, exit 1, nothing left behind, in every command that writes.

The file size limit (RLIMIT_FSIZE, EFBIG) is real in every run; a full disk (ENOSPC) and a
read-only folder (EROFS) need a small file system mounted for the test, skipped where mounting
is not allowed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from fusecli.output import sweep_stale

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow

ROWS = 20_000  # the scores of this many rows are larger than the size limit below


@pytest.fixture(scope="module")
def inputs(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "x.npy", np.random.default_rng(0).normal(size=(ROWS, 4)).astype("float32"))
    return {
        "a": model_files["a"],
        "b": model_files["b"],
        "a_h5": model_files["a_h5"],
        "b_h5": model_files["b_h5"],
        "x": d / "x.npy",
    }


def _limited(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _run(*args, limit: int | None = None, tmpdir: Path | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO)]))}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run(
        [sys.executable, "-m", "fusecli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        preexec_fn=None if limit is None else _limited(limit),
    )


def _commands(inputs, out: Path) -> dict[str, tuple]:
    return {
        "fuse": ("fuse", inputs["a"], inputs["b"], "-o", out / "fused.keras"),
        "fuse_h5": ("fuse", inputs["a"], inputs["b"], "-o", out / "fused.h5"),
        "merge": ("merge", inputs["a_h5"], inputs["b_h5"], "-o", out / "merged.h5"),
        "predict": ("predict", inputs["a"], inputs["x"], "-o", out / "scores.npy"),
        "export": ("export", inputs["a"], "-o", out / "served", "--no-verify"),
    }


def _assert_clean_failure(result, out: Path, reason: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(out) in lines[0] and reason in lines[0], lines[0]
    assert "bug in fusecli" not in lines[0]
    assert list(out.iterdir()) == [], list(out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fuse", "fuse_h5", "merge", "predict", "export"])
def test_a_file_size_limit_gives_one_error_line_and_leaves_nothing(inputs, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    biggest = max(os.path.getsize(inputs[k]) for k in ("a", "b", "a_h5", "b_h5"))
    # Room for the private copies of the inputs, not for the output (merge reads its inputs
    # where they are, and writes a file of their size).
    limit = biggest // 2 if command == "merge" else biggest + 4096
    result = _run(*_commands(inputs, out)[command], limit=limit, tmpdir=tmpdir)
    _assert_clean_failure(result, out, "File too large")
    assert list(tmpdir.iterdir()) == []


@contextlib.contextmanager
def _mounted(path: Path, options: str):
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount a small file system here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fuse", "merge", "predict", "export"])
def test_a_full_disk_gives_one_error_line_and_leaves_nothing(inputs, tmp_path, command):
    with _mounted(tmp_path / "small", "size=8k") as out:
        result = _run(*_commands(inputs, out)[command])
        _assert_clean_failure(result, out, "No space left on device")


@pytest.mark.parametrize("command", ["fuse", "predict"])
def test_a_read_only_folder_gives_one_error_line(inputs, tmp_path, command):
    with _mounted(tmp_path / "ro", "ro,size=1m") as out:
        result = _run(*_commands(inputs, out)[command])
        _assert_clean_failure(result, out, "Read-only file system")


def test_an_output_that_is_a_symbolic_link_is_refused(inputs, tmp_path):
    target = tmp_path / "elsewhere.keras"
    target.write_bytes(b"keep")
    link = tmp_path / "out.keras"
    link.symlink_to(target)
    for force in ((), ("--force",)):
        result = _run("fuse", inputs["a"], inputs["b"], "-o", link, *force)
        assert result.returncode == 1
        assert result.stderr.startswith(f"Error: {link}: is a symbolic link"), result.stderr
        assert link.is_symlink() and target.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.keras", "out.keras"]


def test_an_output_name_near_the_file_name_limit_is_written(inputs, tmp_path):
    # Its temporary name beside it (`.fusecli-<pid>-<name>.<random>.keras`) must fit too: it
    # failed with "File name too long ... a bug in fusecli".
    out = tmp_path / ("x" * 240 + ".keras")
    result = _run("fuse", inputs["a"], inputs["b"], "-o", out)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    assert out.read_bytes().startswith(b"PK")


def test_export_force_onto_a_link_to_a_saved_model_leaves_nothing(inputs, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "saved_model.pb").write_bytes(b"x")
    link = tmp_path / "sm_link"
    link.symlink_to(served)
    result = _run("export", inputs["a"], "-o", link, "--force", "--no-verify")
    assert result.returncode == 1 and "is a symbolic link" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served", "sm_link"]
    assert (served / "saved_model.pb").read_bytes() == b"x"


def test_what_a_killed_run_left_is_removed_by_the_next(inputs, tmp_path):
    """SIGKILL runs no cleanup: the next run removes temporary names of processes gone."""
    dead = _dead_pid()
    out = tmp_path / "out"
    out.mkdir()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (out / f".fusecli-{dead}-fused.abc.keras").write_bytes(b"half")
    (out / f".fusecli-{dead}-fused.scratch").mkdir()
    (tmpdir / f"fusecli-{dead}-xyz").mkdir()
    (tmpdir / f"fusecli-{dead}-xyz" / "copy.keras").write_bytes(b"copy")
    alive = out / f".fusecli-{os.getpid()}-mine.keras"
    alive.write_bytes(b"in use")
    unrelated = out / ".fusecli-notes"
    unrelated.write_bytes(b"not ours")
    result = _run(*_commands(inputs, out)["fuse"], tmpdir=tmpdir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["fused.keras", alive.name, unrelated.name]
    )
    assert list(tmpdir.iterdir()) == []


def test_sweep_keeps_what_live_processes_own(tmp_path):
    mine = tmp_path / f".fusecli-{os.getpid()}-x.keras"
    parent = tmp_path / f"fusecli-{os.getppid()}-copy"
    gone = tmp_path / f"fusecli-{_dead_pid()}-copy"
    for p in (mine, parent, gone):
        p.write_bytes(b"")
    sweep_stale(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted([mine, parent])


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid
