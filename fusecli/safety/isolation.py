"""Reading untrusted files in a child process: always, with a time limit.

A file crafted (or corrupted) to crash the HDF5 C library kills the process that reads it, and one
changed byte can make HDF5 loop forever; neither raises a Python exception. So every read of an
untrusted file runs in a child process: a crash becomes a `ModelFileError` naming the file, and a
read that outlives the time limit (`FUSECLI_READ_TIMEOUT` seconds, 10 by default, plus 1 s per
4 MiB of the file) is killed and
becomes one too.

The child is a fork: of the caller itself while that is safe (no machine-learning framework
imported, no other Python thread: the CLI before it imports TensorFlow), which costs a few
milliseconds; otherwise of a helper process started once from a fresh interpreter, which imports
only what reading needs and runs no other thread (a fork of a process running TensorFlow's
threads is unsafe). Starting the helper costs the start of an interpreter that imports h5py,
once per process. Children and helper die with the process that started them (Linux's
PR_SET_PDEATHSIG), so killing the CLI leaves nothing spinning.

Writing a result from untrusted inputs reads their tensors, which the scan never touched (a
corrupt chunk index or filter pipeline crashes HDF5 only then): `call_isolated_write` runs that
work the same way, with a time limit that grows with the bytes to copy, progress reported back
over the pipe, and the work's own errors re-raised here as they were raised there. The caller
keeps the temporary output and alone removes it or moves it into place.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fusecli.errors import FusecliError, ModelFileError

T = TypeVar("T")
Progress = Callable[[int, int], None]

TIMEOUT_VARIABLE = "FUSECLI_READ_TIMEOUT"
DEFAULT_TIMEOUT = 10.0

_FRAME = struct.Struct("<Q")  # every message: its length, then a pickle
_PR_SET_PDEATHSIG = 1
# The helper is started with `python -c`; it learns the caller's sys.path from its first message.
_BOOT = "from fusecli.safety.isolation import _serve; _serve()"
# Libraries that would start thread pools in the helper, which must stay single-threaded.
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Pickling a deeply nested config recurses once per level; the reading child allows that much.
_PICKLE_RECURSION_LIMIT = 100_000
# Starting the helper is not part of a read's time limit; this bounds it on its own.
_START_TIMEOUT = 120.0

# A write may take longer than a read: this many input bytes per second more than the read
# limit (a slow disk reads each byte several times: copy, check, read back).
WRITE_BYTES_PER_SECOND = 4 << 20
# A progress frame: this byte, then (done, total); every other frame is a pickle (b"\x80"...).
_PROGRESS = b"P"
_COUNTS = struct.Struct("<QQ")

# glibc's mallopt: blocks up to 32 MiB (its largest threshold) from the heap, and the heap's
# free top kept up to 1 GiB (see `_keep_freed_memory`).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_TRIM_THRESHOLD = 1 << 30

# Held back while os.fork runs (see `_fork`).
_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
# Imported, they run threads of their own: the caller is then no longer safe to fork.
_THREADED_FRAMEWORKS = ("tensorflow", "jax", "torch")

_lock = threading.Lock()
_helper: _Helper | None = None


def call_isolated(fn: Callable[[Path], T], path: Path, *, timeout: float | None = None) -> T:
    """`fn(path)`, run in a child process; its result or its `ModelFileError` come back here.

    `fn` must be a module-level function (it is sent by name). A crash of the child, or a read
    longer than `timeout` seconds (default: `write_timeout` of the file's size), becomes a
    `ModelFileError` naming
    `path`; so does any other exception `fn` raises, since the file caused it.
    """
    path = Path(path)
    limit = write_timeout(_size(path)) if timeout is None else timeout
    try:
        reply = _run(("read", fn, path), limit, None)
    except _TimedOut:
        raise _timed_out(path, limit) from None
    except _HelperGone:
        raise ModelFileError(
            path, "could not be read: the process reading it ended unexpectedly"
        ) from None
    return _unpack(reply, path)


def call_isolated_each(
    fn: Callable[[Path], T], paths: Sequence[Path], *, timeout: float | None = None
) -> list[T]:
    """`call_isolated(fn, path)` for every path, the children running side by side when this
    process can fork (one per path, on as many cores as there are); else one after another.
    Errors are raised as `call_isolated` raises them, the first path's first."""
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    limit = max(write_timeout(_size(p)) for p in paths) if timeout is None else timeout
    with _lock:
        parallel = len(paths) > 1 and _fork_is_safe()
        if parallel:
            deadline = time.monotonic() + limit
            started: list[tuple[int, int]] = []
            replies: list[bytes | BaseException] = []
            waited = 0  # children handed to _reply, which reaps its child even when it raises
            try:
                for path in paths:
                    started.append(_fork(("read", fn, path)))
                for pid, receiver in started:
                    waited += 1
                    try:
                        replies.append(_reply(pid, receiver, deadline, None))
                    except _TimedOut as e:
                        replies.append(e)
            except BaseException:  # a signal while waiting: no child outlives the wait
                _abandon(started[waited:])
                raise
    if not parallel:
        return [call_isolated(fn, path, timeout=timeout) for path in paths]
    results = []
    for path, reply in zip(paths, replies, strict=True):
        if isinstance(reply, BaseException):
            raise _timed_out(path, limit) from None
        results.append(_unpack(reply, path))
    return results


@contextlib.contextmanager
def meanwhile(fn: Callable[[Path], T], path: Path) -> Iterator[Callable[[], T]]:
    """`call_isolated(fn, path)` started now, while the block does other work on another core:
    the block gets a function that waits for the child and returns (or raises) what
    `call_isolated` would. Where this process cannot fork, that function makes the call then.
    A child still running when the block ends is killed."""
    path = Path(path)
    limit = write_timeout(_size(path))
    deadline = time.monotonic() + limit
    with _lock:
        started = [_fork(("read", fn, path))] if _fork_is_safe() else []
    replies: list[bytes] = []

    def result() -> T:
        if not replies:
            if not started:
                return call_isolated(fn, path, timeout=limit)
            child = started.pop()  # waited for once, and gone after: never killed again
            try:
                replies.append(_reply(*child, deadline, None))
            except _TimedOut:
                raise _timed_out(path, limit) from None
        return _unpack(replies[0], path)

    try:
        yield result
    finally:
        _abandon(started)  # not waited for: the block failed


def call_isolated_write(
    fn: Callable[..., T],
    *args: Any,
    inputs: Sequence[Path],
    nbytes: int,
    progress: Progress | None = None,
) -> T:
    """`fn(*args, report)` in a child process, for work that reads untrusted inputs' tensors.

    `report(done, total)` reaches `progress` here (it is None without `progress`). Whatever `fn`
    raises is raised here with its type and message (a `FusecliError` as it is); a crash of the
    child, or work longer than `write_timeout(nbytes)`, is a `FusecliError` naming `inputs`.
    `fn` must be a module-level function, `args` picklable (they are sent to the helper when
    this process cannot fork).
    """
    limit = write_timeout(nbytes)
    named = ", ".join(str(p) for p in inputs)
    try:
        reply = _run(("write", fn, (args, progress is not None)), limit, progress)
    except _TimedOut:
        raise FusecliError(
            f"Reading the inputs' tensors was still going on after {limit:g} s, the limit set "
            f"by {TIMEOUT_VARIABLE} plus 1 s per {WRITE_BYTES_PER_SECOND >> 20} MiB of input; "
            f"an input is corrupt or hostile (or the disk slower than that limit allows). "
            f"Received: {named}"
        ) from None
    except _HelperGone:
        raise FusecliError(
            f"The process reading the inputs' tensors ended unexpectedly. Received: {named}"
        ) from None
    kind, value = pickle.loads(reply)
    if kind in ("ok", "error"):
        if kind == "error":
            raise value
        return value
    if kind == "crashed":
        reason = f"crashed the HDF5 library (exit code {value})"
    else:
        type_name, message, _details = value
        reason = f"failed ({type_name}: {' '.join(message.split())})"
    raise FusecliError(
        f"Reading the inputs' tensors {reason}; an input is corrupt or hostile. Received: {named}"
    )


def write_timeout(nbytes: int) -> float:
    """Seconds `call_isolated_write` allows for `nbytes` of input: the read limit, plus 1 s per
    `WRITE_BYTES_PER_SECOND` bytes."""
    return read_timeout() + max(nbytes, 0) / WRITE_BYTES_PER_SECOND


def _run(
    job: tuple[str, Callable[..., Any], Any], limit: float, progress: Progress | None
) -> bytes:
    """Run `job` in a fork of this process or of the helper: its reply frame. Raises _TimedOut,
    or _HelperGone when the helper died twice."""
    global _helper
    on_progress = None if progress is None else _progress_receiver(progress)
    with _lock:
        if _fork_is_safe():
            return _forked(job, time.monotonic() + limit, on_progress)
        request = _pickle_deep(job)
        for attempt in range(2):
            if _helper is None or not _helper.usable():
                _helper = _Helper.start()
            helper = _helper
            try:
                return helper.call(request, limit, on_progress)
            except _HelperGone:
                helper.stop()
                _helper = None
                if attempt == 0:
                    continue  # the helper died between two reads (killed, or its thread ended)
                raise
            except BaseException:  # out of time, or a signal while waiting: the child must go
                helper.stop()
                _helper = None
                raise
    raise AssertionError("unreachable")


def _pickle_deep(value: Any) -> bytes:
    """A request for the helper: configs as deep as a file may hold (json parsed them) need more
    depth to pickle than the usual limit leaves once they sit inside a fusion's assembly."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, _PICKLE_RECURSION_LIMIT))
    try:
        return pickle.dumps(value)
    finally:
        sys.setrecursionlimit(previous)


def _progress_receiver(progress: Progress) -> Callable[[bytes], None]:
    def receive(frame: bytes) -> None:
        progress(*_COUNTS.unpack(frame[len(_PROGRESS) :]))

    return receive


def read_timeout() -> float:
    """Seconds any isolated work may take before the bytes it reads count:
    `FUSECLI_READ_TIMEOUT`, or 10."""
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
        f"was still being read after {limit:.3g} s, the limit set by {TIMEOUT_VARIABLE} plus 1 s "
        f"per {WRITE_BYTES_PER_SECOND >> 20} MiB of the file; the file is corrupt or hostile (or "
        "the disk slower than that limit allows)",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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

    def call(
        self, request: bytes, limit: float, on_progress: Callable[[bytes], None] | None
    ) -> bytes:
        self.send(request)
        deadline = time.monotonic() + limit
        while True:
            reply = self.receive(deadline)
            if not reply.startswith(_PROGRESS):
                return reply
            if on_progress is not None:
                on_progress(reply)

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
        _write_frame(replies, _run_in_child(request, replies))


def _private_channels() -> tuple[int, int]:
    """The pipes to the caller, moved off stdin/stdout: whatever a reader prints must not
    corrupt a reply."""
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return requests, replies


def _run_in_child(request: bytes, replies: int) -> bytes:
    job = pickle.loads(request)  # imports fn's module here, once, for every later child
    return _forked(job, None, lambda frame: _write_frame(replies, frame))


def _fork_is_safe() -> bool:
    """A fork of this process is safe while it runs no thread a fork would break."""
    return (
        hasattr(os, "fork")
        and threading.active_count() == 1
        and not any(name in sys.modules for name in _THREADED_FRAMEWORKS)
    )


def _forked(
    job: tuple[str, Callable[..., Any], Any],
    deadline: float | None,
    on_progress: Callable[[bytes], None] | None,
) -> bytes:
    """`job` in a fork of this process: its pickled reply, or a pickled "crashed". Progress
    frames the child sends on the way go to `on_progress`."""
    return _reply(*_fork(job), deadline, on_progress)


def _fork(job: tuple[str, Callable[..., Any], Any]) -> tuple[int, int]:
    """Start `job` in a fork of this process: (its pid, the pipe its reply comes on).

    A signal handled while `os.fork` runs is handled in its after-fork hooks, where Python
    drops what the handler raises: a SIGTERM or Ctrl-C would be lost and the run go on. They
    wait (blocked) until the fork has returned, in the parent and in the child."""
    receiver, sender = os.pipe()
    parent = os.getpid()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:  # the child
        try:
            os.close(receiver)
            _die_with(parent)
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            _quiet_stderr()
            _forget_parent_state()
            _write_frame(sender, _perform(job, sender))
        finally:
            os._exit(0)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(sender)
    return pid, receiver


def _abandon(children: Sequence[tuple[int, int]]) -> None:
    """Kill and reap forked children nobody will wait for, and close their pipes."""
    for pid, receiver in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        with contextlib.suppress(OSError):
            os.close(receiver)


def _reply(
    pid: int,
    receiver: int,
    deadline: float | None,
    on_progress: Callable[[bytes], None] | None,
) -> bytes:
    """Wait for a forked job's reply (see `_forked`); the child is gone when this returns."""
    try:
        while True:
            reply = _read_frame(receiver, deadline)
            if not reply.startswith(_PROGRESS):
                break
            if on_progress is not None:
                on_progress(reply)
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


def _quiet_stderr() -> None:
    """What libraries print while failing on a file (HDF5's error stack, h5py's messages from
    objects freed after a failed write) is not for the user: the reply says what went wrong."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        sys.stderr = open(devnull, "w")  # noqa: SIM115 - the child ends with os._exit


def _forget_parent_state() -> None:
    """In a fresh child: the lock (held by the parent while it forked) and the helper are the
    parent's; an isolated call from the child starts its own."""
    global _lock, _helper
    _lock = threading.Lock()
    _helper = None


def _perform(job: tuple[str, Callable[..., Any], Any], sender: int) -> bytes:
    kind, fn, argument = job
    if kind == "read":
        return _call(fn, argument)
    args, wants_progress = argument
    _keep_freed_memory()

    def report(done: int, total: int) -> None:
        _write_frame(sender, _PROGRESS + _COUNTS.pack(done, total))

    return _call_write(fn, (*args, report if wants_progress else None))


def _keep_freed_memory() -> None:
    """A write streams tensors one after another, each in fresh buffers: glibc would map each
    large one anew and hand it back when freed, and the kernel zero a new page for every 4 KiB
    of every tensor. Freed memory is kept for the next tensor instead (this child is short-lived;
    its peak is what it holds at once)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


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


def _call_write(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The work's value, or the exception it raised, as it was raised (when it pickles)."""
    try:
        value = fn(*args)
        sys.setrecursionlimit(max(sys.getrecursionlimit(), _PICKLE_RECURSION_LIMIT))
        return pickle.dumps(("ok", value))
    except BaseException as e:
        details = traceback.format_exc(limit=-8)
        with contextlib.suppress(Exception):
            if not isinstance(e, FusecliError):
                e.add_note(f"In the process that read the inputs:\n{details}")
            reply = pickle.dumps(("error", e))
            pickle.loads(reply)  # it must come back as it left
            return reply
        return pickle.dumps(("failed", (type(e).__name__, str(e)[:2000], details)))


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
