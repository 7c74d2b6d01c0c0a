"""`fusecli tune`: choose how to fuse models on validation data, and say how sure the choice is."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from fusecli.scores.options import AT_CHOICES, DEFAULT_FOLDS, METHOD_CHOICES, METRICS

if TYPE_CHECKING:
    from fusecli.scores.tuning import TuneResult


def method_options(f: Callable) -> Callable:
    """The methods' parameters as options, from their declarations (`scores.methods`)."""
    from fusecli.scores.methods import parameters

    for p in reversed(parameters()):
        kind = click.IntRange(min=p.min) if p.type is int else float
        if p.type is float and p.min is not None:
            kind = click.FloatRange(min=p.min)
        f = click.option(
            p.option, p.name, type=kind, default=None, help=f"{p.help} [default: {p.default}]"
        )(f)
    return f


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
    "--metric",
    type=click.Choice(METRICS),
    default=None,
    help="What to optimise: accuracy (top-1), top5, logloss (softmax applied to scores that are "
    "not probabilities), mse. [default: accuracy for class labels, mse for targets]",
)
@click.option(
    "--method",
    type=click.Choice(METHOD_CHOICES),
    default="auto",
    show_default=True,
    help="grid: every weighting in steps of --step (few models); greedy: Caruana's ensemble "
    "selection; optimize: continuous weights minimising log loss; stack: a logistic "
    "regression on the scores; auto: the best of these by cross-validated estimate.",
)
@method_options
@click.option(
    "--folds",
    type=click.IntRange(min=0),
    default=DEFAULT_FOLDS,
    show_default=True,
    help="k of the cross-validated estimate (choose on k-1 folds, score on the held-out one); "
    "0: none.",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds --method auto may spend estimating methods. [default: 10 + 2 per model]",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="Fit one temperature per model on the validation rows (scores taken at the logits) "
    "before choosing; the fused model applies it.",
)
@click.option(
    "--save-recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the choice (weights, counts, stacking head, temperatures, estimates) to this "
    ".json, for combine --recipe and fuse --recipe.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw the choice to this .png (needs: pip install 'fusecli[plot]').",
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
    help="Write the fused model computing the choice here (.keras or .h5; models only).",
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
    method: str,
    folds: int,
    budget: float | None,
    calibrate: bool,
    save_recipe: str | None,
    plot: str | None,
    metric: str | None,
    at: str,
    top: int,
    batch_size: int,
    output: str | None,
    force: bool,
    trust: bool,
    as_json: bool,
    **parameters: Any,
) -> None:
    """Choose how to fuse models, on validation data, and say how sure the choice is.

    INPUTS are two or more model files (.keras/.h5, run once each on --data) or score arrays
    (.npy, memory-mapped, or scores.npz:NAME; with --labels). --method auto (the default) scores
    grid (few models), greedy, optimize and stack by k-fold cross-validation within a time
    budget and keeps the best; it says what it chose and why. The choice's validation score and
    cross-validated estimate are reported beside each model alone, the uniform average and the
    hard vote, and differences within the noise are said to be. Prints a table on stdout (or,
    with --json, one JSON document); messages go to stderr.

    \b
    Examples:
      fusecli tune val_*.npy --labels y_val.npy --save-recipe r.json
      fusecli combine test_*.npy --recipe r.json -o fused.npy
      fusecli tune mlp.keras cnn.keras --data val.npz --method stack -o fused.keras
      fusecli tune a.keras b.keras c.keras --data val.npz --calibrate --plot tune.png
    """
    from fusecli.scores.tuning import tune

    check_terminals(reads_stdin="-" in inputs, writes_stdout=False)
    if trust:
        say("Warning: --trust: model files may run code while they load.")
    given = {k: v for k, v in parameters.items() if v is not None}
    with progress_bar("predict") as bar, progress_bar(method, min_total=2) as tune_bar:

        def progress(index: int, count: int, done: int, total: int) -> None:
            if bar is not None:
                bar(index * total + done, count * total)

        result = tune(
            list(inputs),
            data=data,
            labels=labels,
            key=key,
            labels_key=labels_key,
            method=method,
            metric=metric,
            at=at,
            keep=top,
            batch_size=batch_size,
            trust=trust,
            output=output,
            save_recipe=save_recipe,
            plot=plot,
            force=force,
            folds=folds,
            calibrate=calibrate,
            budget=budget,
            progress=progress,
            method_progress=tune_bar,
            **given,
        )
    for note in result.notes:
        say(f"Note: {note}")
    for line in summary(result):
        say(line)
    if result.recipe_path:
        say(f"Wrote {result.recipe_path} (the recipe: combine --recipe, fuse --recipe).")
    if plot:
        say(f"Wrote {plot}.")
    if result.output:
        say(f"Wrote {result.output} (the models fused as chosen).")
    if as_json:
        print_json(result.as_dict())
    else:
        click.echo(format_table(result), nl=False)
        sys.stdout.flush()


def summary(result: TuneResult) -> list[str]:
    """The human account on stderr: what was chosen, why, and how sure."""
    est = result.estimates
    metric = result.metric
    lines = [f"Method: {result.method} ({result.reason})."]
    if result.weights is not None:
        weights = ", ".join(f"{w:.4g}" for w in result.weights)
        lines.append(f"Weights: {weights}.")
    cv = result.cv
    cv_text = f", {cv:.4f} cross-validated ({est['folds']} folds)" if cv is not None else ""
    best = max(result.singles, key=lambda c: c.score if _higher(metric) else -c.score)
    best_name = result.names[result.singles.index(best)]
    lines.append(
        f"{metric}: {result.score:.4f} on the {result.rows} validation rows{cv_text}; "
        f"best model alone {best.score:.4f} ({best_name}), uniform average "
        f"{est['uniform']['validation']:.4f}"
        + (
            f", hard vote accuracy {est['hard_vote_accuracy']:.4f}"
            if "hard_vote_accuracy" in est
            else ""
        )
        + "."
    )
    for c in est["comparisons"]:
        against = "the best model alone" if c["against"] == est["best_single"] else c["against"]
        lines.append(
            f"  against {against}: {c['difference']:+.4f} ± {c['standard_error']:.4f} "
            f"({c['verdict']})"
        )
    return lines


def _higher(metric: str) -> bool:
    return metric in ("accuracy", "top5")


def format_table(result: TuneResult) -> str:
    """The ranked table: best weightings first, then each input alone (a stacking head has no
    weights: each input alone, then the head's score)."""
    names = result.names
    widths = [max(6, len(n)) for n in names]
    header = ["rank", *names, result.metric]
    grid = result.method == "grid"
    d = weight_decimals(result.step) if grid else 4
    rows = [
        [str(i) if grid else result.method, *(f"{w:.{d}f}" for w in c.weights), f"{c.score:.6f}"]
        for i, c in enumerate(result.ranking, start=1)
    ]
    if result.weights is None:
        rows.append([result.method, *("-" for _ in names), f"{result.score:.6f}"])
    rows += [
        ["alone", *(f"{w:.{d}f}" for w in c.weights), f"{c.score:.6f}"] for c in result.singles
    ]
    cols = [max(5, len(result.method)), *widths, max(8, len(result.metric))]
    lines = ["  ".join(f"{h:>{w}}" for h, w in zip(header, cols, strict=True))]
    lines += ["  ".join(f"{v:>{w}}" for v, w in zip(r, cols, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"


def weight_decimals(step: float) -> int:
    """Decimals that show grid weights exactly: 2 for 0.1, 3 for 0.125; 1/3 has none, so 2."""
    for d in range(2, 13):
        if abs(round(step, d) - step) <= 1e-12:
            return d
    return max(2, math.ceil(-math.log10(step)) + 1)
