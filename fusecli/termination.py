"""SIGTERM and SIGHUP as an exception, so that temporary files are removed before the end.

By default those signals end a Python process at once: no `finally` block runs, and a
half-written output (`.out.x1y2.keras`, its `.weights.h5`) or a private copy of an input stays on
disk. Inside `cleanup_on_termination()` they raise `Terminated` instead; when that has unwound
the stack (every `finally` has run), the process ends by the same signal, as it would have
without the block (exit status 128 + signal number in a shell). SIGINT needs nothing of this:
Python already raises `KeyboardInterrupt` for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, its sibling
    """A termination signal arrived; raised so that cleanup runs. Not an `Exception`: handlers
    of errors must not catch it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise `Terminated`; leaving the block by it ends the
    process by that signal.

    Signals whose handler is not the default one are left alone (the caller has its own plan),
    and so is everything outside the main thread (where Python cannot install handlers). Nested
    blocks are free: the outermost one ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for signum in _SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            installed[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    except Terminated as e:
        if e.signum not in installed:
            raise
        _restore(installed)
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)  # ends the process here
        raise  # only if the signal was blocked
    finally:
        _restore(installed)


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    # Cleanup must not be interrupted by a second signal: it is ignored until the end.
    for other in _SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(signum)


def _restore(installed: dict[int, object]) -> None:
    for signum, previous in installed.items():
        signal.signal(signum, previous)  # type: ignore[arg-type]
