"""`fuse MODELS --recipe R.json`: the model that computes what `tune` chose.

A recipe of plain weights (grid, greedy, optimize, uniform; at the outputs or the logits) is
fused as any `fuse --w` is: file to file, proved (models with weight 0 are left out). A recipe
with temperatures (`tune --calibrate`) or a stacking head is built in Keras, its graph decided by
`fusecli.fusion.graph` (a `Head`) from ordinary layers on top of the branches, so the file loads
with safe_mode and no custom code:

    temperatures:  z_i -> Rescaling(1 / T_i) -> Softmax                    (each branch)
    weights:       p_i -> Rescaling(w_i) -> Add (-> Softmax at the logits)
    stack:         Concatenate(p_1..p_n) -> Dense(coef, intercept) -> Softmax

and checked after writing: loaded with safe_mode, its output on a random batch must equal the
recipe applied to the branches' outputs (`Recipe.compute`, what `combine --recipe` computes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusecli import runtime
from fusecli.errors import FusecliError, InvalidRequest, VerificationError
from fusecli.fusion.fuse import FusionReport, _build, _call, fuse_to_file, random_batch
from fusecli.fusion.graph import Head
from fusecli.output import atomic_output, check_output_path, model_format
from fusecli.scores.recipe import Recipe

# float32 Keras against the float64 recipe, on probabilities.
_TOLERANCE = 1e-5


def fuse_recipe_file(
    models: Sequence[str | os.PathLike[str]],
    recipe: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    trust: bool = False,
    force: bool = False,
) -> FusionReport:
    """`fuse_recipe_to_file` with the recipe read from a file (`tune --save-recipe`)."""
    from fusecli.scores.recipe import load_recipe

    return fuse_recipe_to_file(models, load_recipe(recipe), output, trust=trust, force=force)


def fuse_recipe_to_file(
    models: Sequence[str | os.PathLike[str]],
    recipe: Recipe,
    output: str | os.PathLike[str],
    *,
    trust: bool = False,
    force: bool = False,
) -> FusionReport:
    """Write the model computing `recipe` on `models` (in the recipe's input order) to `output`."""
    if len(models) != len(recipe.inputs):
        raise InvalidRequest(
            f"The recipe fuses {len(recipe.inputs)} models ({', '.join(recipe.inputs)}). "
            f"Received: {len(models)} models"
        )
    at = recipe.at
    if recipe.temperatures is None and not recipe.is_stack:
        kept = [i for i, w in enumerate(recipe.weights) if w != 0]
        if len(kept) == 1:
            kept = sorted({kept[0], 0 if kept[0] else 1})  # fuse needs two models
        return fuse_to_file(
            [models[i] for i in kept],
            output,
            [recipe.weights[i] for i in kept],
            at=at,
            activation="softmax" if recipe.softmax else "none",
            trust=trust,
            force=force,
        )
    fmt = model_format(output)
    output = check_output_path(output, inputs=list(models), force=force)
    head = Head(
        temperatures=None if recipe.temperatures is None else list(recipe.temperatures),
        stack_units=len(recipe.intercept) if recipe.is_stack else None,
    )
    fusion = _build(
        list(models),
        tuple(recipe.weights or [1.0] * len(models)),
        scale="rescaling",
        inputs="auto",
        at=at,
        activation="softmax" if recipe.softmax and not recipe.is_stack else "none",
        trust=trust,
        head=head,
    )
    classes = fusion.model.outputs[0].shape[-1]
    if len(fusion.model.outputs) != 1 or [classes] != list(recipe.row_shape):
        raise FusecliError(
            f"The recipe was tuned on rows of shape {tuple(recipe.row_shape)}. Received: models "
            f"whose fused output has shape {fusion.model.outputs[0].shape}"
        )
    if recipe.is_stack:  # the stacking Dense, the one Dense outside the branches
        keras = runtime.keras()
        (dense,) = [x for x in fusion.model.layers if isinstance(x, keras.layers.Dense)]
        dense.set_weights(
            [np.asarray(recipe.coef, np.float32), np.asarray(recipe.intercept, np.float32)]
        )
    with atomic_output(output, force=force) as tmp:
        fusion.model.save(tmp)
        difference = _check(fusion, recipe, tmp)
    return FusionReport(
        output=str(output),
        format=fmt,
        models=[str(m) for m in models],
        branches=fusion.branches,
        weights=list(recipe.weights or []),
        scale="rescaling",
        at=at,
        activation="softmax",
        formula=_formula(recipe),
        inputs_mode=fusion.inputs_mode,
        inputs_reason=fusion.inputs_reason,
        inputs=fusion.assembly.inputs,
        outputs=fusion.assembly.outputs,
        params=int(fusion.model.count_params()),
        max_abs_diff=difference,
        verify={"result": "passed", "max_abs_diff": difference},
    )


def _check(fusion: Any, recipe: Recipe, path: Any) -> float:
    """Load the written file with safe_mode; its output must be the recipe's on a random batch."""
    keras = runtime.keras()
    try:
        loaded = keras.saving.load_model(path, safe_mode=True)
    except Exception as e:
        raise VerificationError(f"The written model does not load back: {e}") from e
    batch = random_batch(fusion.model.inputs)
    got = np.asarray(loaded(batch if len(batch) > 1 else batch[0], training=False), np.float64)
    branch_outputs = []
    for source, slot in zip(fusion.sources, fusion.input_slots, strict=True):
        raw = _call(source, [batch[i] for i in slot], keras)
        branch_outputs.append(np.asarray(raw[0], dtype=np.float64))
    expected = recipe.compute(branch_outputs)
    difference = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not np.isfinite(got).all() or difference > _TOLERANCE:
        raise VerificationError(
            f"The written model does not compute the recipe (largest difference "
            f"{difference:.3g}); it has been deleted"
        )
    return difference


def _formula(recipe: Recipe) -> str:
    inner = "softmax(z_i / T_i)" if recipe.temperatures is not None else "M_i(x)"
    if recipe.is_stack:
        return f"softmax(Dense(concat({inner})))"
    return f"sum(w_i * {inner})"
