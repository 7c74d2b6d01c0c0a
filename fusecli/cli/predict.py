"""`fusecli predict`: run a saved model over a data file and write its scores as .npy."""

from __future__ import annotations

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
from fusecli.cli.streams import (
    broken_pipe_is_quiet,
    check_terminals,
    stdout_binary,
)
from fusecli.errors import InvalidRequest
from fusecli.scores.options import AT_CHOICES


@click.command(
    "predict",
    cls=FusecliCommand,
)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Where to write the scores: a .npy file, a .npz file (one array per model output, "
    "named after the outputs; needed for a model with several), or - for stdout.",
)
@click.option(
    "--key",
    default=None,
    help="The array of a .npz/.h5 DATA file to feed a one-input model. [default: x]",
)
@batch_size_option
@click.option(
    "--at",
    type=click.Choice(AT_CHOICES),
    default="output",
    show_default=True,
    help="output: the model's output; logits: its scores before its final softmax.",
)
@force_option
@trust_option
@json_option
@verbose_option
def predict_command(
    model: str,
    data: str,
    output: str,
    key: str | None,
    batch_size: int,
    at: str,
    force: bool,
    trust: bool,
    as_json: bool,
) -> None:
    """Run MODEL over DATA and write its output scores, (rows, ...), as a .npy array (a .npz
    with one array per output for a model with several outputs).

    DATA is a .npy, .npz or .h5 file. A .npz/.h5 feeds its array x (or --key); a model with
    several inputs takes the arrays named after its inputs, or x0, x1, ... in input order.
    Prints the output path (or, with --json, a JSON report) on stdout, unless -o - streams the
    scores there.

    \b
    Examples:
      fusecli predict rgb.keras val.npz -o rgb_scores.npy
      fusecli predict two_heads.keras val.npz -o scores.npz   # scores.npz:NAME per output
      fusecli predict rgb.keras val.npz -o - | fusecli combine - pose.npy -o fused.npy
    """
    from fusecli.scores.prediction import predict_to_file

    if output == "-" and as_json:
        raise InvalidRequest("--json and -o - would both write to stdout; choose one")
    check_terminals(reads_stdin=False, writes_stdout=output == "-")
    if trust:
        say("Warning: --trust: model files may run code while they load.")
    with broken_pipe_is_quiet(), progress_bar("predict") as progress:
        report = predict_to_file(
            model,
            data,
            output,
            key=key,
            batch_size=batch_size,
            at=at,
            trust=trust,
            force=force,
            progress=progress,
            stdout=stdout_binary() if output == "-" else None,
        )
    where = "stdout" if output == "-" else report.output
    what = "logits" if at == "logits" else "scores"
    if report.arrays:
        arrays = ", ".join(f"{n} {tuple(shape)}" for n, shape in report.arrays.items())
        say(f"Wrote {where} ({what}, one array per output: {arrays}).")
    else:
        say(f"Wrote {where} ({what} of shape {tuple(report.shape)}, {report.dtype}).")
    if as_json:
        print_json(report.as_dict())
    elif output != "-":
        click.echo(report.output)
