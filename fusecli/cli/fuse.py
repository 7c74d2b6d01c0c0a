"""`fusecli fuse`: weighted output fusion of saved models."""

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
    trust_option,
    verbose_option,
    weights_option,
)
from fusecli.errors import InvalidRequest
from fusecli.fusion.loaders import loaded_by
from fusecli.fusion.options import (
    ACTIVATIONS,
    FUSE_AT,
    INPUT_MODES,
    SCALE_MODES,
    default_output,
)


@click.command(
    "fuse",
    cls=WeightsCommand,
)
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=True))
@weights_option("One weight per model, in order: --w 0.8 0.2 or --w 0.8,0.2. [default: 1/N each]")
@normalize_option
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(dir_okay=False),
    help="Where to write the fused model; .keras or .h5 picks the format. [default: fused.h5 "
    "when every model is a .h5 file, else fused.keras]",
)
@click.option(
    "--inputs",
    "inputs_mode",
    type=click.Choice(INPUT_MODES),
    default="auto",
    show_default=True,
    help="shared: one set of inputs feeds every model; separate: each model keeps its own; "
    "auto: shared when all models' inputs match.",
)
@click.option(
    "--scale",
    type=click.Choice(SCALE_MODES),
    default="rescaling",
    show_default=True,
    help="How each branch is scaled: a Rescaling layer (loads anywhere, safely), or "
    "Lambda(lambda x: x*w) (needs safe_mode=False to load).",
)
@click.option(
    "--at",
    type=click.Choice(FUSE_AT),
    default="output",
    show_default=True,
    help="output: add the models' outputs; logits: add them before each model's final softmax.",
)
@click.option(
    "--activation",
    type=click.Choice(ACTIVATIONS),
    default=None,
    help="Applied after the Add. [default: softmax with --at logits, else none]",
)
@click.option(
    "--verify/--no-verify",
    default=False,
    show_default=True,
    help="Also load the written file in Keras and compare its output on random input with "
    "sum(w_i * M_i(x)). The file is always checked without Keras: configs, head, every tensor.",
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="Build the model computing what tune --save-recipe chose (weights, temperatures, a "
    "stacking head) instead of --w.",
)
@force_option
@trust_option
@json_option
@verbose_option
def fuse_command(
    models: tuple[str, ...],
    weights: tuple[float, ...] | None,
    normalize: bool | None,
    output: str | None,
    inputs_mode: str,
    scale: str,
    at: str,
    activation: str | None,
    verify: bool,
    recipe: str | None,
    force: bool,
    trust: bool,
    as_json: bool,
) -> None:
    """Fuse saved Keras models: out = w1*A(x) + w2*B(x) + ...

    MODELS are two or more .keras or .h5 files. The fused model scales each model's output by
    its weight and adds them up; it is written to OUTPUT straight from the input files, checked
    (configs, head, every tensor bit for bit) and loads with a plain keras.models.load_model.
    Prints the output path (or, with --json, a JSON report) on stdout.

    \b
    Examples:
      fusecli fuse rgb.h5 pose.h5 --w 0.8 0.2                  # writes fused.h5
      fusecli fuse rgb.h5 pose.h5 --w 0.8 0.2 -o fused.keras
      fusecli fuse a.keras b.keras c.keras -o three.h5 --json
      fusecli fuse rgb.keras flow.keras --w 1 1.5 --at logits    # softmax(z_rgb + 1.5 z_flow)
    """
    from fusecli.fusion.fuse import fuse_to_file

    if trust:
        say("Warning: --trust: model files may run code while they load.")
    output = output or default_output(list(models))
    if recipe is not None:
        from fusecli.fusion.recipe_head import fuse_recipe_file

        if (
            weights is not None
            or normalize is not None
            or at != "output"
            or activation
            or scale != "rescaling"
        ):
            raise InvalidRequest(
                "--recipe says how to fuse: give it without --w, --normalize, --at, --activation "
                "or --scale"
            )
        report = fuse_recipe_file(list(models), recipe, output, trust=trust, force=force)
    else:
        report = fuse_to_file(
            list(models),
            output,
            weights,
            normalize=normalize is not False,
            scale=scale,
            inputs=inputs_mode,
            at=at,
            activation=activation,
            trust=trust,
            force=force,
            verify=verify,
        )
    say_rescaled(weights, report.weights, normalize)
    say(f"Inputs: {report.inputs_mode} ({report.inputs_reason}).")
    if scale == "lambda":
        say(
            "Note: --scale lambda stores Python bytecode in the file; loading it needs "
            "keras.models.load_model(path, safe_mode=False), on the same Python version."
        )
    weights_text = (
        ", ".join(f"{b}={w:g}" for b, w in zip(report.branches, report.weights, strict=True))
        if report.weights
        else report.formula
    )
    checked = []
    if report.check is not None:
        checked.append(f"checked: {report.check['tensors']} tensors bit for bit, config and head")
    if report.verify is not None:
        checked.append(f"largest difference from {report.formula}: {report.max_abs_diff:.3g}")
    if not checked:
        checked.append("not verified")
    details = "; ".join([weights_text, f"{report.params:,} parameters", *checked])
    say(f"Wrote {report.output} ({details}).")
    say(loaded_by(report.output, report.format, scale))
    if report.verify is not None and report.verify["result"] == "inconclusive":
        say(f"Warning: the numeric check is inconclusive: {report.verify['reason']}.")

    if as_json:
        print_json(report.as_dict())
    else:
        click.echo(report.output)
