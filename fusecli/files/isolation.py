"""Reading untrusted files in a child process: always, with a time limit.

A file crafted (or corrupted) to crash the HDF5 C library kills the process that reads it, and one
changed byte can make HDF5 loop forever; neither raises a Python exception. So every read of an
untrusted file runs in a child process: a crash becomes a `ModelFileError` naming the file, and a
read that outlives the time limit (`FUSECLI_READ_TIMEOUT` seconds, 60 by default) is killed and
becomes one too.

The child is a fork: of the caller itself while that is safe (no machine-learning framework
imported, no other Python thread: the CLI before it imports TensorFlow), which costs a few
milliseconds; otherwise of a helper process started once from a fresh interpreter, which imports
only what reading needs and runs no other thread (a fork of a process running TensorFlow's
threads is unsafe). Starting the helper costs the start of an interpreter that imports h5py,
once per process. Children and helper die with the process that started them (Linux's
PR_SET_PDEATHSIG), so killing the CLI leaves nothing spinning.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fusecli.errors import FusecliError, ModelFileError

T = TypeVar("T")

TIMEOUT_VARIABLE = "FUSECLI_READ_TIMEOUT"
DEFAULT_TIMEOUT = 60.0

_FRAME = struct.Struct("<Q")  # every message: its length, then a pickle
_PR_SET_PDEATHSIG = 1
# The helper is started with `python -c`; it learns the caller's sys.path from its first message.
_BOOT = "from fusecli.files.isolation import _serve; _serve()"
# Libraries that would start thread pools in the helper, which must stay single-threaded.
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Pickling a deeply nested config recurses once per level; the reading child allows that much.
_PICKLE_RECURSION_LIMIT = 100_000
# Starting the helper is not part of a read's time limit; this bounds it on its own.
_START_TIMEOUT = 120.0

# Imported, they run threads of their own: the caller is then no longer safe to fork.
_THREADED_FRAMEWORKS = ("tensorflow", "jax", "torch")

_lock = threading.Lock()
_helper: _Helper | None = None


def call_isolated(fn: Callable[[Path], T], path: Path, *, timeout: float | None = None) -> T:
    """`fn(path)`, run in a child process; its result or its `ModelFileError` come back here.

    `fn` must be a module-level function (it is sent by name). A crash of the child, or a read
    longer than `timeout` seconds (default: `read_timeout()`), becomes a `ModelFileError` naming
    `path`; so does any other exception `fn` raises, since the file caused it.
    """
    global _helper
    limit = read_timeout() if timeout is None else timeout
    path = Path(path)
    with _lock:
        if _fork_is_safe():
            try:
                return _unpack(_forked(fn, path, time.monotonic() + limit), path)
            except _TimedOut:
                raise _timed_out(path, limit) from None
        for attempt in range(2):
            if _helper is None or not _helper.usable():
                _helper = _Helper.start()
            helper = _helper
            try:
                reply = helper.call(pickle.dumps((fn, path)), limit)
            except _HelperGone:
                helper.stop()
                _helper = None
                if attempt == 0:
                    continue  # the helper died between two reads (killed, or its thread ended)
                raise ModelFileError(
                    path, "could not be read: the process reading it ended unexpectedly"
                ) from None
            except _TimedOut:
                helper.stop()  # and with it the child still reading
                _helper = None
                raise _timed_out(path, limit) from None
            except BaseException:  # a signal while waiting (Ctrl-C, SIGTERM): the child must go
                helper.stop()
                _helper = None
                raise
            return _unpack(reply, path)
    raise AssertionError("unreachable")


def read_timeout() -> float:
    """Seconds one isolated read may take: `FUSECLI_READ_TIMEOUT`, or 60."""
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise FusecliError(
            f"{TIMEOUT_VARIABLE} must be a positive number of seconds. "
            f"Received: {TIMEOUT_VARIABLE}={text!r}"
        )
    return value


def stop_helper() -> None:
    """End the helper process now (it is started again when needed)."""
    global _helper
    with _lock:
        if _helper is not None:
            _helper.stop()
            _helper = None


# -- the caller's side -----------------------------------------------------------------------


class _HelperGone(Exception):
    """The helper process ended before answering."""


class _TimedOut(Exception):
    """No reply within the time limit."""


def _timed_out(path: Path, limit: float) -> ModelFileError:
    return ModelFileError(
        path,
        f"was still being read after {limit:g} s, the limit set by {TIMEOUT_VARIABLE}; the file "
        "is corrupt or hostile (or larger than that limit allows)",
    )


class _Helper:
    """The helper process as seen from the caller: requests go to its stdin, replies come from
    its stdout."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.owner = os.getpid()

    @classmethod
    def start(cls) -> _Helper:
        try:
            process = subprocess.Popen(
                [sys.executable or "python3", "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, **_ONE_THREAD, "PYTHONPATH": _package_root()},
                close_fds=True,
            )
        except OSError as e:
            raise FusecliError(
                f"Cannot start the process that reads model files ({e.strerror or e}). "
                f"Received: sys.executable={sys.executable!r}"
            ) from None
        helper = cls(process)
        try:
            helper.send(pickle.dumps((list(sys.path), os.getpid())))
            helper.receive(time.monotonic() + _START_TIMEOUT)  # ready: h5py imported
        except (_HelperGone, _TimedOut):
            helper.stop()  # the first call finds it gone, tries once more, then says so
        except BaseException:
            helper.stop()
            raise
        return helper

    def usable(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def call(self, request: bytes, limit: float) -> bytes:
        self.send(request)
        return self.receive(time.monotonic() + limit)

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(_FRAME.pack(len(data)) + data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise _HelperGone from None

    def receive(self, deadline: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        try:
            return _read_frame(fd, deadline)
        except EOFError:
            raise _HelperGone from None

    def stop(self) -> None:
        if self.owner != os.getpid():
            return  # a forked copy of the caller: the helper is its parent's
        with contextlib.suppress(OSError):
            self.process.kill()  # its child, if any, follows (PR_SET_PDEATHSIG)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


def _unpack(reply: bytes, path: Path) -> Any:
    kind, value = pickle.loads(reply)
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    if kind == "crashed":
        raise ModelFileError(
            path,
            f"crashed the HDF5 library while being read (exit code {value}); the file is "
            "corrupt or hostile",
        )
    # "failed": an exception no reader anticipated; the file caused it, so it is the file's error
    type_name, message, details = value
    error = ModelFileError(path, _failure_reason(type_name, message))
    error.add_note(f"In the process that read the file:\n{details}")
    raise error


def _failure_reason(type_name: str, message: str) -> str:
    if type_name == "RecursionError":
        return "is nested too deeply to be read (Python's recursion limit was reached)"
    if type_name == "MemoryError":
        return "cannot be read: it needs more memory than there is"
    detail = " ".join(message.split()) or type_name
    return f"cannot be read as a model file ({detail})"


def _package_root() -> str:
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))


@atexit.register
def _stop_at_exit() -> None:
    if _helper is not None:
        _helper.stop()


# -- the helper's side -----------------------------------------------------------------------


def _serve() -> None:
    """The helper's loop: one request at a time, each run in a fresh fork of this process."""
    requests, replies = _private_channels()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, who kills us
    paths, parent = pickle.loads(_read_frame(requests))
    _die_with(parent)
    sys.path[:] = [p for p in paths if p] + [p for p in sys.path if p not in paths]
    import h5py  # noqa: F401 - once here, rather than in every child

    _write_frame(replies, pickle.dumps("ready"))
    while True:
        try:
            request = _read_frame(requests)
        except EOFError:
            return
        _write_frame(replies, _run_in_child(request))


def _private_channels() -> tuple[int, int]:
    """The pipes to the caller, moved off stdin/stdout: whatever a reader prints must not
    corrupt a reply."""
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return requests, replies


def _run_in_child(request: bytes) -> bytes:
    fn, path = pickle.loads(request)  # imports fn's module here, once, for every later child
    return _forked(fn, path, None)


def _fork_is_safe() -> bool:
    """A fork of this process is safe while it runs no thread a fork would break."""
    return (
        hasattr(os, "fork")
        and threading.active_count() == 1
        and not any(name in sys.modules for name in _THREADED_FRAMEWORKS)
    )


def _forked(fn: Callable[[Path], Any], path: Path, deadline: float | None) -> bytes:
    """`fn(path)` in a fork of this process: its pickled reply, or a pickled "crashed"."""
    receiver, sender = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(receiver)
            _die_with(parent)
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent
            _write_frame(sender, _call(fn, path))
        finally:
            os._exit(0)
    os.close(sender)
    try:
        reply = _read_frame(receiver, deadline)
    except EOFError:
        reply = None
    except BaseException:  # out of time, or a signal: the child must not outlive the wait
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(receiver)
    _, status = os.waitpid(pid, 0)
    if reply is None:
        return pickle.dumps(("crashed", os.waitstatus_to_exitcode(status)))
    return reply


def _call(fn: Callable[[Path], Any], path: Path) -> bytes:
    try:
        try:
            value = fn(path)
        except ModelFileError as e:
            return pickle.dumps(("error", e))
        # What fn could build (with the usual limit), pickle can write: it needs more depth.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), _PICKLE_RECURSION_LIMIT))
        return pickle.dumps(("ok", value))
    except BaseException as e:  # anything else the file made happen, told by name and message
        failure = (type(e).__name__, str(e)[:2000], traceback.format_exc(limit=-8))
        return pickle.dumps(("failed", failure))


def _die_with(parent: int) -> None:
    """Ask Linux to kill this process when its parent ends; end now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _read_frame(fd: int, deadline: float | None = None) -> bytes:
    """One message; EOFError if the writer ends before it is whole, _TimedOut past
    `deadline` (a time.monotonic() value; None: no limit)."""
    header = _read_exactly(fd, _FRAME.size, deadline)
    return _read_exactly(fd, _FRAME.unpack(header)[0], deadline)


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    chunks, missing = [], size
    while missing:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _TimedOut
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def _write_frame(fd: int, data: bytes) -> None:
    view = memoryview(_FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]
