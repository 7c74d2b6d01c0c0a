"""Binary stdin/stdout, progress bars and broken pipes: the shell-facing side of score commands."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import click

from fusecli.errors import InvalidRequest


def stdin_binary() -> BinaryIO:
    return getattr(sys.stdin, "buffer", sys.stdin)


def stdout_binary() -> BinaryIO:
    return getattr(sys.stdout, "buffer", sys.stdout)


def check_terminals(*, reads_stdin: bool, writes_stdout: bool) -> None:
    """Binary .npy data does not come from, or go to, a terminal: say so instead of hanging."""
    if reads_stdin and _isatty(sys.stdin):
        raise InvalidRequest("stdin ('-') is a terminal; pipe or redirect a .npy array into it")
    if writes_stdout and _isatty(sys.stdout):
        raise InvalidRequest(
            "-o - would write binary .npy data to the terminal; pipe or redirect it"
        )


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A callback (done, total) drawing a bar on stderr, or doing nothing if stderr is no tty."""
    if not _isatty(sys.stderr):
        yield lambda done, total: None
        return
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            state["bar"].__enter__()
        bar = state["bar"]
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


@contextlib.contextmanager
def broken_pipe_is_quiet() -> Iterator[None]:
    """A reader that stops early (`| head`) ends the command quietly, exit 1, as click does."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise click.exceptions.Exit(1) from None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
