"""`fusecli tune`: choose fusion weights on validation data by an exhaustive simplex grid."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import click

from fusecli.cli.common import (
    FusecliCommand,
    batch_size_option,
    force_option,
    json_option,
    print_json,
    progress_bar,
    say,
    trust_option,
    verbose_option,
)
from fusecli.cli.streams import check_terminals
from fusecli.scores.options import AT_CHOICES, DEFAULT_STEP, METRICS

if TYPE_CHECKING:
    from fusecli.scores.tuning import TuneResult


@click.command(
    "tune",
    cls=FusecliCommand,
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help="Validation data (.npz/.h5/.npy) to run the models on; its array y holds the labels.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False),
    default=None,
    help="Labels (.npy, or the array y of a .npz/.h5), instead of those in --data.",
)
@click.option("--key", default=None, help="The --data array for one-input models. [default: x]")
@click.option("--labels-key", default=None, help="The array holding the labels. [default: y]")
@click.option(
    "--step",
    type=click.FloatRange(min=0, min_open=True, max=1),
    default=DEFAULT_STEP,
    show_default=True,
    help="Grid spacing of the weights; 1/step must be a whole number.",
)
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default=None,
    help="What to optimise: accuracy (top-1), top5, logloss (softmax applied to scores that are "
    "not probabilities), mse. [default: accuracy for class labels, mse for targets]",
)
@click.option(
    "--at",
    type=click.Choice(AT_CHOICES),
    default="output",
    show_default=True,
    help="output: fuse the models' outputs; logits: fuse before each model's final softmax, "
    "out = softmax(sum w_i z_i) (models only).",
)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many of the best weightings to list.",
)
@batch_size_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the fused model with the best weights here (.keras or .h5; models only).",
)
@force_option
@trust_option
@json_option
@verbose_option
def tune_command(
    inputs: tuple[str, ...],
    data: str | None,
    labels: str | None,
    key: str | None,
    labels_key: str | None,
    step: float,
    metric: str | None,
    at: str,
    top: int,
    batch_size: int,
    output: str | None,
    force: bool,
    trust: bool,
    as_json: bool,
) -> None:
    """Find the fusion weights that score best on validation data.

    INPUTS are two or more model files (.keras/.h5, run once each on --data) or score arrays
    (.npy, with --labels). Every weighting on the simplex in steps of --step is scored
    (weights >= 0 summing to 1, the single models included); ties go to the weights closest to
    uniform, then to more weight on earlier inputs. Prints a ranked table on stdout (or, with
    --json, a JSON document with `weights` and `score`); the single models' scores are listed
    beside the best weightings.

    \b
    Examples:
      fusecli tune mlp.keras cnn.keras --data val.npz
      fusecli tune mlp.npy cnn.npy --labels y_val.npy --metric logloss --json
      fusecli tune mlp.keras cnn.keras --data val.npz -o fused.keras
    """
    from fusecli.scores.tuning import tune

    check_terminals(reads_stdin="-" in inputs, writes_stdout=False)
    if trust:
        say("Warning: --trust: model files may run code while they load.")
    with progress_bar("predict") as bar:

        def progress(index: int, count: int, done: int, total: int) -> None:
            if bar is not None:
                bar(index * total + done, count * total)

        result = tune(
            list(inputs),
            data=data,
            labels=labels,
            key=key,
            labels_key=labels_key,
            step=step,
            metric=metric,
            at=at,
            keep=top,
            batch_size=batch_size,
            trust=trust,
            output=output,
            force=force,
            progress=progress,
        )
    for note in result.notes:
        say(f"Note: {note}")
    singles = ", ".join(
        f"{n} alone {c.score:.4f}" for n, c in zip(result.names, result.singles, strict=True)
    )
    weights = ", ".join(f"{w:g}" for w in result.weights)
    say(
        f"Best {result.metric}: {result.score:.4f} with weights {weights} ({singles}; "
        f"{result.grid_points} weightings scored on {result.rows} rows)."
    )
    if result.output:
        where = " at their logits" if result.at == "logits" else ""
        say(f"Wrote {result.output} (the models fused{where} with weights {weights}).")
    if as_json:
        print_json(result.as_dict())
    else:
        click.echo(format_table(result), nl=False)
        sys.stdout.flush()


def format_table(result: TuneResult) -> str:
    """The ranked table: best weightings first, then each input alone."""
    names = result.names
    widths = [max(6, len(n)) for n in names]
    header = ["rank", *names, result.metric]
    d = weight_decimals(result.step)
    rows = [
        [str(i), *(f"{w:.{d}f}" for w in c.weights), f"{c.score:.6f}"]
        for i, c in enumerate(result.ranking, start=1)
    ]
    rows += [
        ["alone", *(f"{w:.{d}f}" for w in c.weights), f"{c.score:.6f}"] for c in result.singles
    ]
    cols = [5, *widths, max(8, len(result.metric))]
    lines = ["  ".join(f"{h:>{w}}" for h, w in zip(header, cols, strict=True))]
    lines += ["  ".join(f"{v:>{w}}" for v, w in zip(r, cols, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"


def weight_decimals(step: float) -> int:
    """Decimals that show grid weights exactly: 2 for 0.1, 3 for 0.125; 1/3 has none, so 2."""
    for d in range(2, 13):
        if abs(round(step, d) - step) <= 1e-12:
            return d
    return max(2, math.ceil(-math.log10(step)) + 1)
