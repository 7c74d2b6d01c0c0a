"""`fusecli export`: a model as a SavedModel, TFLite or ONNX file, checked in its own runtime."""

from __future__ import annotations

from typing import Any

import click

from fusecli.cli.common import (
    FusecliCommand,
    force_option,
    json_option,
    print_json,
    say,
    trust_option,
    verbose_option,
)
from fusecli.exporting.formats import FORMAT_NAMES, FORMATS


@click.command("export", cls=FusecliCommand)
@click.argument("model", type=click.Path(dir_okay=True))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write: a directory for a SavedModel, .tflite for TFLite, .onnx for ONNX.",
)
@click.option(
    "--format",
    "format_name",
    type=click.Choice(FORMAT_NAMES),
    default=None,
    help="The format, when OUTPUT's name does not say it (a SavedModel directory named x.v2).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Fix the batch dimension to N (TFLite needs it for GRU/LSTM layers). [default: free]",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Run the export in its own runtime on a random batch and compare with the Keras model.",
)
@force_option
@trust_option
@json_option
@verbose_option
def export_command(
    model: str,
    output: str,
    format_name: str | None,
    batch_size: int | None,
    verify: bool,
    force: bool,
    trust: bool,
    as_json: bool,
) -> None:
    """Export MODEL (.keras or .h5: fused, merged or plain) for serving.

    The served inputs and outputs keep the model's own names (fused, fused_<head>). Unless
    --no-verify, the export is run in its runtime (the SavedModel's serving_default signature,
    the TFLite interpreter, onnxruntime) and compared with the Keras model; if it differs beyond
    the format's round-off it is deleted (exit 1). ONNX needs: pip install 'fusecli[onnx]'.
    Prints the output path (or, with --json, a JSON report) on stdout.

    \b
    Examples:
      fusecli export fused.keras -o fused_savedmodel
      fusecli export fused.keras -o fused.tflite --batch-size 1
      fusecli export fused.keras -o fused.onnx --json
    """
    from fusecli.exporting.export import export

    if trust:
        say("Warning: --trust: model files may run code while they load.")
    report = export(
        model,
        output,
        format=format_name,
        batch_size=batch_size,
        verify=verify,
        force=force,
        trust=trust,
    )
    for kind, tensors in (("Input", report.inputs), ("Output", report.outputs)):
        for t in tensors:
            say(f"{kind} {t['name']}: {t['dtype']} {_shape(t['shape'])}")
    if not report.outputs_vary and report.verified:
        say(
            "Note: the model's outputs barely vary with its input on random data, so the check "
            "compared near-constant outputs."
        )
    say(f"Wrote {report.output} ({_describe(report)}).")
    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(report.output)


def _shape(shape: list[Any]) -> str:
    dims = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({dims}{',' if len(shape) == 1 else ''})"


def _describe(report: Any) -> str:
    title = FORMATS[report.format].title
    if not report.verified:
        return f"{title}; not verified"
    return (
        f"{title}; checked in {report.runtime} on {report.rows} random rows: largest difference "
        f"from Keras {report.max_abs_diff:.3g}, tolerance {report.tolerance:.3g}"
    )
