"""What every command shares: error reporting, the variadic `--w`, and the common options.

Errors become output in exactly one place, `FusecliCommand.invoke`: `InvalidRequest` -> usage
error (exit 2); any other `FusecliError` -> one line `Error: ...` (exit 1); anything unexpected ->
`Error: ...` too, as a bug, never with a Python exception's class name (whatever a file can do is
a `FusecliError` by the time it gets here). A traceback is printed only under `-v`. SIGTERM and
SIGHUP unwind the command like an error, so its temporary files go, then end the process by
that signal (`fusecli.termination`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click

from fusecli import runtime
from fusecli.coefficients import parse_weights
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.options import DEFAULT_BATCH_SIZE
from fusecli.termination import cleanup_on_termination

WEIGHT_FLAGS = ("--w", "--weights")


class FusecliCommand(click.Command):
    """A command that reports fusecli's errors the way click users expect."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cleanup_on_termination(), runtime.quiet():
                return super().invoke(ctx)
        except InvalidRequest as e:
            raise click.UsageError(_one_line(e), ctx) from None
        except FusecliError as e:
            _traceback_if_verbose(ctx)
            raise click.ClickException(_one_line(e)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # a bug: something we did not anticipate
            _traceback_if_verbose(ctx)
            raise click.ClickException(
                f"{_one_line(e) or 'an unexpected error'} (a bug in fusecli; run with -v for "
                "the traceback, and please report it)"
            ) from None


def _traceback_if_verbose(ctx: click.Context) -> None:
    if ctx.meta.get("fusecli.verbose"):
        traceback.print_exc()


def _one_line(e: BaseException) -> str:
    return printable(" ".join(str(e).split()))


# C0 and C1 controls (ESC, CSI...), DEL, and the format characters that reorder or hide text
# (bidirectional overrides and isolates, zero-width characters).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def printable(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them) with every control character escaped as
    Python writes it (`\\x1b`), so that text from a file (a model name holding `\\x1b[8m`)
    cannot drive the terminal, hiding or rewriting what follows."""
    if isinstance(value, str):
        return _CONTROLS.sub(_escape, value)
    if isinstance(value, list | tuple):
        return [printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    return value


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class WeightsCommand(FusecliCommand):
    """A command whose `--w` takes one number per model: `--w 0.8 0.2` or `--w 0.8,0.2`.

    click options take a fixed number of values, so the numbers after `--w` are joined into one
    comma-separated value before click parses the line. This also lets negative weights through,
    which click would otherwise read as options.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, join_weight_values(args))


def join_weight_values(args: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg in WEIGHT_FLAGS:
            values = []
            i += 1
            while i < len(args) and _is_number_list(args[i]):
                values.append(args[i])
                i += 1
            out.append(arg)
            if values:
                out.append(",".join(values))
            continue
        out.append(arg)
        i += 1
    return out


def _is_number_list(token: str) -> bool:
    """Numbers, comma-separated; `merge` also takes a gradient's points joined by ':'."""
    try:
        parse_weights(token.replace(":", " "))
    except InvalidRequest:
        return False
    return True


class WeightsType(click.ParamType):
    name = "W..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_weights(value)
        except InvalidRequest as e:
            self.fail(str(e), param, ctx)


def weights_option(help: str) -> Callable:
    return click.option("--w", "--weights", "weights", type=WeightsType(), default=None, help=help)


def normalize_option(f: Callable) -> Callable:
    """One meaning in every command that takes weights: rescaled to sum to 1 unless told not to
    (`--w 1 1` averages; `--no-normalize --w 1 1` sums)."""
    return click.option(
        "--normalize/--no-normalize",
        default=None,
        help="Rescale the weights to sum to 1 (--w 1 1 averages), or keep them as given "
        "(--no-normalize: --w 1 1 sums). [default: normalize]",
    )(f)


def say_rescaled(
    given: Sequence[float] | None, used: Sequence[float] | None, normalize: bool | None
) -> None:
    """Say on stderr when the weights given were rescaled, and how to keep them."""
    if given is None or not used or normalize is False:
        return
    if all(
        math.isclose(g, u, rel_tol=1e-12, abs_tol=0.0) for g, u in zip(given, used, strict=False)
    ):
        return
    shown = ", ".join(f"{w:g}" for w in given)
    scaled = ", ".join(f"{w:g}" for w in used)
    say(f"Weights {shown} rescaled to sum to 1: {scaled} (--no-normalize keeps them as given).")


def batch_size_option(f: Callable) -> Callable:
    return click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="Rows run through a model at once.",
    )(f)


def _set_verbose(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["fusecli.verbose"] = ctx.meta.get("fusecli.verbose", False) or value
    runtime.set_verbose(ctx.meta["fusecli.verbose"])
    return value


def verbose_option(f: Callable) -> Callable:
    return click.option(
        "-v",
        "--verbose",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbose,
        help="Show TensorFlow's own log lines, and a traceback on errors.",
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
    )(f)


def trust_option(f: Callable) -> Callable:
    return click.option(
        "--trust",
        is_flag=True,
        help="Load model files even if they hold code (Lambda layers...). "
        "Only for files you trust.",
    )(f)


def force_option(f: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")(f)


def print_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def say(message: str) -> None:
    """A message for the human: stderr, never stdout (control characters escaped)."""
    click.echo(printable(message), err=True)


Progress = Callable[[int, int], None]


@contextlib.contextmanager
def progress_bar(
    label: str, *, enabled: bool = True, min_total: int = 0
) -> Iterator[Progress | None]:
    """A callback (done, total) that draws a bar on stderr, or None when there is nowhere to draw
    it (disabled, or stderr is not a terminal). No bar for jobs whose total is under `min_total`."""
    if not enabled or not is_tty(sys.stderr):
        yield None
        return
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if total < min_total:
                return
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
