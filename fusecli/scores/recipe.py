"""A tune recipe: what was chosen on validation rows, as JSON, to apply to any other rows.

    tune val_*.npy --labels y_val.npy --save-recipe r.json      # choose
    combine test_*.npy --recipe r.json -o fused.npy             # apply to score arrays
    fuse a.keras b.keras ... --recipe r.json -o fused.keras     # a model computing it

A recipe holds the inputs' names (in order), the row shape, where the scores were taken (`at`),
the temperatures of `--calibrate` (if any), and either simplex weights (with greedy's selection
counts) or a stacking head (coef, intercept); plus the metric and the estimates, for the record.
What it computes on rows of the n score arrays s_i:

    p_i = softmax(s_i / T_i) with temperatures, else s_i
    sum_i w_i p_i  (softmax of it when `softmax`: fused at the logits)  |  stack head on the p_i
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.calibration import apply_temperature
from fusecli.scores.methods.base import combine_rows

FORMAT = "fusecli-recipe"
VERSION = 1


@dataclass
class Recipe:
    method: str
    inputs: list[str]
    row_shape: list[int]
    at: str = "output"
    softmax: bool = False
    weights: list[float] | None = None
    counts: list[int] | None = None
    coef: list[list[float]] | None = None
    intercept: list[float] | None = None
    temperatures: list[float] | None = None
    metric: str | None = None
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def is_stack(self) -> bool:
        return self.coef is not None

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.__dict__}

    def compute(self, chunks: Sequence[np.ndarray]) -> np.ndarray:
        """The fused rows for rows of each input (float64)."""
        if len(chunks) != len(self.inputs):
            raise InvalidRequest(
                f"The recipe fuses {len(self.inputs)} inputs ({', '.join(self.inputs)}). "
                f"Received: {len(chunks)} inputs"
            )
        if list(chunks[0].shape[1:]) != list(self.row_shape):
            raise FusecliError(
                f"The recipe was tuned on rows of shape {tuple(self.row_shape)}. Received: rows "
                f"of shape {tuple(chunks[0].shape[1:])}"
            )
        if self.temperatures is not None:
            chunks = [
                apply_temperature(c, t) for c, t in zip(chunks, self.temperatures, strict=True)
            ]
        if self.is_stack:
            return combine_rows(
                chunks, coef=np.asarray(self.coef), intercept=np.asarray(self.intercept)
            )
        return combine_rows(chunks, weights=self.weights, softmax=self.softmax)

    def check_shape(self, names: Sequence[str], shape: Sequence[int]) -> None:
        if len(names) != len(self.inputs):
            raise InvalidRequest(
                f"The recipe fuses {len(self.inputs)} inputs ({', '.join(self.inputs)}). "
                f"Received: {len(names)} inputs"
            )
        if list(shape[1:]) != list(self.row_shape):
            raise FusecliError(
                f"The recipe was tuned on rows of shape {tuple(self.row_shape)}. Received: "
                f"{names[0]} has rows of shape {tuple(shape[1:])}"
            )


def apply_recipe(
    inputs: Sequence[str | os.PathLike[str]],
    recipe: Recipe | str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    **options: Any,
) -> Any:
    """Write what `recipe` computes on the score arrays `inputs` (in the recipe's order) to
    `output`, chunk by chunk; `options` as `combine_scores` (labels, force, stdin, stdout...)."""
    from fusecli.scores.arrays import combine_scores

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if len(inputs) != len(recipe.inputs):
        raise InvalidRequest(
            f"The recipe fuses {len(recipe.inputs)} inputs ({', '.join(recipe.inputs)}). "
            f"Received: {len(inputs)} inputs"
        )
    report = combine_scores(inputs, output, fuse_rows=recipe.compute, **options)
    report.weights = recipe.weights if recipe.weights is not None else []
    return report


def vote_scores(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None,
    weights: Sequence[float] | None = None,
    **options: Any,
) -> Any:
    """Hard voting: each row's votes per class (sum of w_i over the models whose top-1 class it
    is; argmax: the voted class, ties to the lowest class id), written as `combine` writes."""
    from fusecli.coefficients import resolve_weights
    from fusecli.scores.arrays import combine_scores
    from fusecli.scores.methods.base import hard_vote

    if not inputs:
        raise InvalidRequest("Expected at least one score array. Received: none")
    weights = resolve_weights(weights, len(inputs))

    def fuse_rows(chunks: list[np.ndarray]) -> np.ndarray:
        if chunks[0].ndim != 2:
            raise FusecliError(
                f"Hard voting needs scores of shape (rows, classes). Received: rows of shape "
                f"{chunks[0].shape[1:]}"
            )
        return hard_vote(chunks, weights)

    report = combine_scores(inputs, output, fuse_rows=fuse_rows, **options)
    report.weights = list(weights)
    return report


def save_recipe(recipe: Recipe, path: str | os.PathLike[str], *, force: bool = False) -> None:
    from fusecli.output import atomic_output

    with atomic_output(path, force=force) as tmp:
        Path(tmp).write_text(json.dumps(recipe.as_dict(), indent=2, allow_nan=False) + "\n")


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file; every flaw is one `FusecliError` naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FusecliError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FusecliError(f"{path}: is not a fusecli recipe (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FusecliError(f'{path}: is not a fusecli recipe (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise FusecliError(
            f"{path}: is a recipe of version {doc.get('version')!r}; this fusecli reads {VERSION}"
        )
    names = [f for f in Recipe.__dataclass_fields__]
    try:
        recipe = Recipe(**{k: doc[k] for k in names if k in doc})
        _check(recipe)
    except (TypeError, ValueError) as e:
        raise FusecliError(f"{path}: is a broken recipe ({e})") from None
    return recipe


def _check(recipe: Recipe) -> None:
    n = len(recipe.inputs)
    if n < 2 or not all(isinstance(s, str) for s in recipe.inputs):
        raise ValueError("inputs: expected two or more names")
    if not all(isinstance(d, int) and d > 0 for d in recipe.row_shape):
        raise ValueError(f"row_shape: expected positive sizes, got {recipe.row_shape}")
    if recipe.at not in ("output", "logits"):
        raise ValueError(f"at: expected 'output' or 'logits', got {recipe.at!r}")
    if recipe.temperatures is not None:
        _check_numbers("temperatures", recipe.temperatures, n, positive=True)
    if recipe.coef is None:
        _check_numbers("weights", recipe.weights, n)
        return
    classes = recipe.row_shape[-1]
    coef = np.asarray(recipe.coef, dtype=np.float64)
    intercept = np.asarray(recipe.intercept, dtype=np.float64)
    if len(recipe.row_shape) != 1 or coef.shape != (n * classes, classes):
        raise ValueError(f"coef: expected shape {(n * classes, classes)}, got {coef.shape}")
    if intercept.shape != (classes,):
        raise ValueError(f"intercept: expected shape {(classes,)}, got {intercept.shape}")
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise ValueError("coef and intercept must be finite")


def _check_numbers(what: str, values: Any, n: int, *, positive: bool = False) -> None:
    if not isinstance(values, list) or len(values) != n:
        raise ValueError(f"{what}: expected {n} numbers, one per input")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{what}: expected finite numbers, got {v!r}")
        if positive and v <= 0:
            raise ValueError(f"{what}: expected positive numbers, got {v!r}")
