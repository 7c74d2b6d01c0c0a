"""`fusecli merge`: weight-space merging of same-architecture models, streamed from the files.

The method options are made from the methods' parameter declarations
(`fusecli.merging.methods`): a new method's parameters appear here without an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from fusecli.cli.common import (
    WeightsCommand,
    force_option,
    json_option,
    print_json,
    progress_bar,
    say,
    say_rescaled,
    trust_option,
    verbose_option,
)
from fusecli.merging.methods import METHODS, all_parameters, methods_taking, parse_weight_list
from fusecli.merging.methods.parameters import Parameter

# Below this many bytes of weights a merge is over before a bar would be worth drawing.
_BAR_MIN_BYTES = 32 * 2**20
_DTYPES = ("float32", "float16", "bfloat16")


class _Weights(click.ParamType):
    name = "W..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from fusecli.errors import InvalidRequest

        try:
            return parse_weight_list(value)
        except InvalidRequest as e:
            self.fail(str(e), param, ctx)


def _parameter_options(f: Callable) -> Callable:
    """One option per declared parameter (weights have their own, --w)."""
    for p in reversed(all_parameters()):
        if p.name == "weights":
            continue
        help = _help(p)
        if p.kind == "bool":
            option = click.option(f"{p.flag}/--no-{p.flag[2:]}", p.keyword, default=None, help=help)
        elif p.kind == "choice":
            option = click.option(p.flag, p.keyword, type=click.Choice(p.choices), help=help)
        else:
            metavar = "X[,X...]" if p.per_layer else p.kind.upper()
            option = click.option(p.flag, p.keyword, metavar=metavar, default=None, help=help)
        f = option(f)
    return f


def _help(p: Parameter) -> str:
    methods = methods_taking(p.name)
    defaults = {m.parameter(p.name).describe_default() for m in methods}  # type: ignore[union-attr]
    if len(defaults) == 1:
        where = f"{', '.join(m.name for m in methods)}; default {defaults.pop()}"
    else:
        where = ", ".join(
            f"{m.name} {m.parameter(p.name).describe_default()}"  # type: ignore[union-attr]
            for m in methods
        )
        where = f"default: {where}"
    numeric = p.kind in ("float", "int") and (p.low is not None or p.high is not None)
    values = f" In {p.range_text()}." if numeric else ""
    gradient = " A list varies over the layers." if p.per_layer else ""
    return f"{p.help}{gradient}{values} [{where}]"


def _method_help() -> str:
    return "; ".join(f"{m.name}: {m.formula}" for m in METHODS.values()) + "."


@click.command("merge", cls=WeightsCommand)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the merged model; .keras or .h5 picks the format.",
)
@click.option(
    "--method",
    type=click.Choice(tuple(METHODS)),
    default="linear",
    show_default=True,
    help=_method_help(),
)
@click.option(
    "--w",
    "--weights",
    "weights",
    type=_Weights(),
    default=None,
    help="One weight per model: --w 0.5 0.3 0.2 or --w 0.5,0.3,0.2; a model's weight may vary "
    "over the layers, its points joined by ':' (--w 0.2:0.8 0.5). "
    "[default: 1/N each for linear, 1 each for the methods with --base]",
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False),
    default=None,
    help="The model the others were fine-tuned from (task-arithmetic, ties, dare-*, "
    "breadcrumbs, model-stock).",
)
@_parameter_options
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PATTERN:NAME=VALUE",
    help="A parameter for the layers whose path matches PATTERN (shell-style: 'conv*', "
    "'block/*'); the most specific pattern wins. Repeatable.",
)
@click.option(
    "--dtype",
    type=click.Choice(_DTYPES),
    default=None,
    help="dtype of the merged tensors. [default: each keeps its own; integer and boolean "
    "variables are never cast]",
)
@click.option(
    "--verify/--no-verify",
    "verify",
    default=None,
    hidden=True,  # merge always reads its output back; --verify is fuse's numeric check
)
@force_option
@trust_option
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No progress bar and no closing message on stderr (warnings are still shown).",
)
@json_option
@verbose_option
def merge_command(
    models: tuple[str, ...],
    output: str,
    method: str,
    weights: tuple[Any, ...] | None,
    base: str | None,
    overrides: tuple[str, ...],
    dtype: str | None,
    verify: bool | None,
    force: bool,
    trust: bool,
    quiet: bool,
    as_json: bool,
    **parameters: Any,
) -> None:
    """Merge the weights of models that share one architecture into one model.

    MODELS are .keras or .h5 files (mixed is fine) of the same architecture and the same
    starting point: checkpoints of one run, fine-tunes of one base model. Models trained from
    different random initialisations do not merge (a warning says so). Every parameter,
    pattern and architecture is checked before any weight is read; then tensors are read,
    merged and written one at a time, without TensorFlow. The result loads with a plain
    keras.models.load_model. Prints the output path (or, with --json, a JSON report) on stdout.

    \b
    Examples:
      fusecli merge ckpt1.keras ckpt2.keras ckpt3.keras -o soup.keras
      fusecli merge a.keras b.keras --method slerp --t 0.5 -o slerp.keras
      fusecli merge ft1.keras ft2.keras --method ties --base base.keras --density 0.5 -o m.keras
      fusecli merge ft1.keras ft2.keras --method dare-ties --base base.keras --density 0.2,0.8 \\
          --set 'head*:density=1' --seed 7 -o m.keras
    """
    from fusecli.merging.merge import merge

    if verify is not None:
        say(
            "Note: merge always reads the written file back and checks every tensor; "
            f"--{'' if verify else 'no-'}verify is ignored (in fuse and export, --verify is the "
            "numeric check of what the file computes)."
        )
    with progress_bar("Merging", enabled=not quiet, min_total=_BAR_MIN_BYTES) as progress:
        report = merge(
            list(models),
            output,
            weights,
            method=method,
            base=base,
            overrides=overrides,
            dtype=dtype,
            force=force,
            verify=True,
            trust=trust,
            progress=progress,
            **parameters,
        )
    plain = weights is not None and all(isinstance(w, int | float) for w in weights)
    if report.method == "linear" and plain and report.weights is not None:
        say_rescaled(weights, report.weights, parameters.get("normalize"))
    for warning in report.warnings:
        say(f"Warning: {warning}")
    if not quiet:
        say(f"Wrote {report.output} ({_describe(report)}).")
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(report.output)


def _describe(report: Any) -> str:
    if report.method == "slerp" and report.t is not None:
        how = f"slerp, t={report.t:g}"
    else:
        parts = [report.method]
        if report.weights is not None:
            parts.append("weights " + ", ".join(f"{w:g}" for w in report.weights))
        for name, value in report.settings.items():
            if name == "weights" and report.weights is not None:
                continue
            if name == "normalize" and report.method in ("linear", "task-arithmetic"):
                continue
            if name == "set":
                parts.append("set " + " ".join(value))
            elif isinstance(value, dict):
                parts.append(f"{name} {_num(value['min'])} to {_num(value['max'])} over the layers")
            else:
                parts.append(f"{name} {_num(value)}")
        how = ", ".join(parts)
    if report.dtype:
        how += f"; written as {report.dtype}"
    copied = f", {report.copied} copied from the first model" if report.copied else ""
    checked = "read back and checked" if report.verified else "not verified"
    return (
        f"{how}; {report.merged} tensors merged{copied}; {report.parameters:,} parameters; "
        f"{checked}"
    )


def _num(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_num(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
