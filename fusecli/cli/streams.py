"""Binary stdin/stdout, progress bars and broken pipes: the shell-facing side of score commands."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

import click

from fusecli.cli.common import is_tty
from fusecli.errors import InvalidRequest


def stdin_binary() -> BinaryIO:
    return getattr(sys.stdin, "buffer", sys.stdin)


def stdout_binary() -> BinaryIO:
    return getattr(sys.stdout, "buffer", sys.stdout)


def check_terminals(*, reads_stdin: bool, writes_stdout: bool) -> None:
    """Binary .npy data does not come from, or go to, a terminal: say so instead of hanging."""
    if reads_stdin and is_tty(sys.stdin):
        raise InvalidRequest("stdin ('-') is a terminal; pipe or redirect a .npy array into it")
    if writes_stdout and is_tty(sys.stdout):
        raise InvalidRequest(
            "-o - would write binary .npy data to the terminal; pipe or redirect it"
        )


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
