"""Reading untrusted files in a forked child process.

A file crafted (or corrupted) to crash the HDF5 C library kills the process that reads it; no
Python exception is raised. Reading it in a child first turns that crash into one error line.
A fork is cheap before TensorFlow is imported, and unsafe after (its threads do not survive a
fork), so after that import the work runs in this process.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fusecli.errors import ModelFileError

T = TypeVar("T")


def call_isolated(fn: Callable[[Path], T], path: Path) -> T:
    """`fn(path)`, run in a forked child when that is safe; its result or its `ModelFileError`
    come back to this process, and a crash becomes a `ModelFileError` naming the file."""
    if "tensorflow" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return fn(path)
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(fn, path, sender), daemon=True)
    child.start()
    sender.close()
    try:
        kind, value = receiver.recv()
    except EOFError:
        child.join()
        raise ModelFileError(
            path,
            f"crashed the HDF5 library while being read (exit code {child.exitcode}); the file "
            "is corrupt or hostile",
        ) from None
    finally:
        receiver.close()
    child.join()
    if kind == "ok":
        return value
    if kind == "error":
        raise value
    raise RuntimeError(value)  # a bug in fn, reported where the user's stderr is


def _child(fn: Callable[[Path], Any], path: Path, sender: Any) -> None:
    try:
        sender.send(("ok", fn(path)))
    except ModelFileError as e:
        sender.send(("error", e))
    except Exception as e:
        sender.send(("bug", f"{type(e).__name__}: {e}"))
    finally:
        sender.close()
