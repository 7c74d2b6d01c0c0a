"""`fusecli merge`: weight-space merging of same-architecture models, streamed from the files."""

from __future__ import annotations

from typing import Any

import click

from fusecli.cli.common import (
    WeightsCommand,
    force_option,
    json_option,
    print_json,
    progress_bar,
    say,
    trust_option,
    verbose_option,
    weights_option,
)

METHOD_NAMES = ("linear", "slerp", "task-arithmetic")
# Below this many bytes of weights a merge is over before a bar would be worth drawing.
_BAR_MIN_BYTES = 32 * 2**20


@click.command(
    "merge",
    cls=WeightsCommand,
)
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
    type=click.Choice(METHOD_NAMES),
    default="linear",
    show_default=True,
    help="linear: sum(w_i * M_i); slerp: spherical interpolation of two models (--t); "
    "task-arithmetic: BASE + sum(w_i * (M_i - BASE)) (--base).",
)
@weights_option(
    "One weight per model: --w 0.5 0.3 0.2 or --w 0.5,0.3,0.2. "
    "[default: 1/N each for linear, 1 each for task-arithmetic]"
)
@click.option(
    "--normalize/--no-normalize",
    default=None,
    help="Rescale the weights to sum to 1. [default: on for linear, off for task-arithmetic]",
)
@click.option(
    "--t", "t", type=float, default=None, help="slerp: 0 gives the first model, 1 the second."
)
@click.option(
    "--base",
    type=click.Path(dir_okay=False),
    default=None,
    help="task-arithmetic: the model the others were fine-tuned from.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the written file back and check every tensor against what was computed.",
)
@force_option
@trust_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no messages on stderr.")
@json_option
@verbose_option
def merge_command(
    models: tuple[str, ...],
    output: str,
    method: str,
    weights: tuple[float, ...] | None,
    normalize: bool | None,
    t: float | None,
    base: str | None,
    verify: bool,
    force: bool,
    trust: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge the weights of models that share one architecture into one model.

    MODELS are .keras or .h5 files (mixed is fine) of the same architecture: checkpoints of one
    run, fine-tunes of one start, seeds of one recipe. Their architectures are compared before
    any weight is read; then tensors are read, merged and written one at a time, without
    TensorFlow. Integer and boolean variables are copied from the first model. The result loads
    with a plain keras.models.load_model. Prints the output path (or, with --json, a JSON
    report) on stdout.

    \b
    Examples:
      fusecli merge ckpt1.keras ckpt2.keras ckpt3.keras -o soup.keras
      fusecli merge a.keras b.keras --w 0.7 0.3 -o merged.keras
      fusecli merge a.keras b.keras --method slerp --t 0.5 -o slerp.keras
      fusecli merge ft1.h5 ft2.h5 --method task-arithmetic --base pre.h5 --w 0.5 0.5 -o ta.h5
    """
    from fusecli.merging.merge import merge

    with progress_bar("Merging", enabled=not quiet, min_total=_BAR_MIN_BYTES) as progress:
        report = merge(
            list(models),
            output,
            weights,
            method=method,
            t=t,
            base=base,
            normalize=normalize,
            force=force,
            verify=verify,
            trust=trust,
            progress=progress,
        )
    if not quiet:
        say(f"Wrote {report.output} ({_describe(report)}).")
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(report.output)


def _describe(report: Any) -> str:
    if report.method == "slerp":
        how = f"slerp, t={report.t:g}"
    else:
        how = f"{report.method}, weights " + ", ".join(f"{w:g}" for w in report.weights)
    copied = f", {report.copied} copied from the first model" if report.copied else ""
    checked = "read back and checked" if report.verified else "not verified"
    return (
        f"{how}; {report.merged} tensors merged{copied}; {report.parameters:,} parameters; "
        f"{checked}"
    )
