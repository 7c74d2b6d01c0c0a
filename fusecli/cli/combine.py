"""`fusecli combine`: the weighted sum of score arrays, in bounded memory, pipe-friendly."""

from __future__ import annotations

import click

from fusecli.cli.common import (
    WeightsCommand,
    force_option,
    json_option,
    normalize_option,
    print_json,
    say,
    say_rescaled,
    verbose_option,
    weights_option,
)
from fusecli.cli.streams import (
    broken_pipe_is_quiet,
    check_terminals,
    stdin_binary,
    stdout_binary,
)
from fusecli.errors import InvalidRequest


@click.command(
    "combine",
    cls=WeightsCommand,
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=True))
@weights_option("One weight per input, in order: --w 1 1.5 or --w 1,1.5. [default: 1/N each]")
@normalize_option
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Where to write the fused scores: a .npy file, or - for stdout.",
)
@click.option(
    "--labels",
    default=None,
    type=click.Path(dir_okay=False),
    help="True classes (.npy of class ids or one-hot rows, or a .npz/.h5 with array y): report "
    "top-1 (and top-5) accuracy of each input and of the fused scores on stderr.",
)
@click.option(
    "--labels-key",
    default=None,
    help="The array of a .npz/.h5 --labels file holding the labels. [default: y]",
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="Apply what tune --save-recipe chose (weights, stacking head, temperatures) instead "
    "of --w.",
)
@click.option(
    "--vote",
    type=click.Choice(["hard"]),
    default=None,
    help="hard: each row's votes per class (the --w of the models whose top-1 class it is); "
    "their argmax is the voted class.",
)
@force_option
@json_option
@verbose_option
def combine_command(
    inputs: tuple[str, ...],
    weights: tuple[float, ...] | None,
    normalize: bool | None,
    output: str | None,
    labels: str | None,
    labels_key: str | None,
    recipe: str | None,
    vote: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Combine score arrays: out = w1*A + w2*B + ...

    INPUTS are .npy arrays of the same shape (rows first), or arrays of a .npz named as
    scores.npz:NAME (a .npz holding one array: its name); one of them may be - (stdin). They are
    read in chunks, so arrays larger than memory work. The result is float32 (float64 if an
    input is). Prints the output path (or, with --json, a JSON report) on stdout, unless -o -
    streams the scores there.

    \b
    Examples:
      fusecli combine rgb.npy flow.npy --w 1 1.5 -o fused.npy
      fusecli predict rgb.keras val.npz -o - | fusecli combine - flow.npy --labels y.npy -o -
    """
    from fusecli.scores.arrays import combine_scores

    if output is None and labels is None:
        raise InvalidRequest("Nothing to do: give -o OUTPUT (- for stdout), --labels, or both")
    if output == "-" and as_json:
        raise InvalidRequest("--json and -o - would both write to stdout; choose one")
    check_terminals(reads_stdin="-" in inputs, writes_stdout=output == "-")
    if recipe is not None and (weights is not None or normalize is not None or vote):
        raise InvalidRequest("--recipe holds the weights: give it without --w, --normalize, --vote")
    with broken_pipe_is_quiet():
        streams = {
            "labels": labels,
            "labels_key": labels_key,
            "force": force,
            "stdin": stdin_binary() if "-" in inputs else None,
            "stdout": stdout_binary() if output == "-" else None,
        }
        if recipe is not None:
            from fusecli.scores.recipe import apply_recipe

            report = apply_recipe(list(inputs), recipe, output, **streams)
        elif vote is not None:
            from fusecli.scores.recipe import vote_scores

            report = vote_scores(list(inputs), output, weights, **streams)
        else:
            report = combine_scores(
                list(inputs), output, weights, normalize=normalize is not False, **streams
            )
            say_rescaled(weights, report.weights, normalize)
    weights_text = (
        ", ".join(f"{_shown(n)}={w:g}" for n, w in zip(report.inputs, report.weights, strict=True))
        if report.weights
        else f"the stacking head of {recipe}"
    )
    if report.accuracy:
        ks = list(next(iter(report.accuracy.values())))
        width = max(len(_shown(n)) for n in report.accuracy)
        say(f"Accuracy on {report.shape[0]} rows:")
        say(f"  {'':{width}}  " + "  ".join(f"{k:>6}" for k in ks))
        for name, acc in report.accuracy.items():
            say(f"  {_shown(name):{width}}  " + "  ".join(f"{acc[k]:6.4f}" for k in ks))
    if output is not None:
        where = "stdout" if output == "-" else report.output
        say(f"Wrote {where} ({weights_text}; shape {tuple(report.shape)}, {report.dtype}).")
    if as_json:
        print_json(report.as_dict())
    elif output not in (None, "-"):
        click.echo(report.output)


def _shown(name: str) -> str:
    return "- (stdin)" if name == "-" else name
