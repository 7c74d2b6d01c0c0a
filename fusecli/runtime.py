"""Importing Keras quietly.

TensorFlow writes log lines straight to file descriptor 2 from C++ (absl, oneDNN, CUDA probes),
even with TF_CPP_MIN_LOG_LEVEL=3. The command line therefore points descriptor 2 at /dev/null
while a command runs and gives Python's `sys.stderr` a private copy of the real one, so fusecli's
own messages still arrive. `-v` turns all of this off.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

# Quiet only when the command line asks for it: a library should not touch its caller's stderr.
_quiet = False


def set_verbose(verbose: bool) -> None:
    """Show (True) or hide (False) TensorFlow's and Keras' own log lines; the CLI calls this."""
    global _quiet
    _quiet = not verbose


def keras() -> ModuleType:
    """Import and return `keras`, with TensorFlow's noise silenced unless verbose."""
    if "keras" in sys.modules and "tensorflow" in sys.modules:
        return sys.modules["keras"]
    if _quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with native_stderr_silenced():
            import keras as _keras
        _hush_python_loggers()
        return _keras
    import keras as _keras

    return _keras


def _hush_python_loggers() -> None:
    import logging

    for name in ("tensorflow", "absl", "keras", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|h5py)(\.|$)")


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send whatever is written to file descriptor 2 to /dev/null; keep `sys.stderr` working."""
    try:
        fd_backed = sys.stderr.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd_backed = False
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    old_stderr = sys.stderr
    if fd_backed:
        sys.stderr = open(  # noqa: SIM115 - closed in finally
            os.dup(saved), "w", buffering=1, encoding=old_stderr.encoding, errors="replace"
        )
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        if fd_backed:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence native stderr for the duration of a command, unless verbose."""
    if not _quiet:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr_silenced():
        yield
