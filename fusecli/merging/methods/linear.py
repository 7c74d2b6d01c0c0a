"""linear: each tensor the weighted sum of the models' tensors (a model soup)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fusecli.coefficients import resolve_weights
from fusecli.errors import InvalidRequest
from fusecli.merging.methods.base import MergePlan

NAME = "linear"


def plan(
    n_models: int,
    *,
    weights: Sequence[float] | None,
    t: float | None,
    has_base: bool,
    normalize: bool | None,
) -> MergePlan:
    """Equal weights by default; weights are rescaled to sum to 1 unless `normalize` is False."""
    if n_models < 2:
        raise InvalidRequest(f"Expected two or more models to merge. Received: {n_models}")
    if t is not None:
        raise InvalidRequest(f"t is only for --method slerp. Received: t={t}")
    if has_base:
        raise InvalidRequest("A base model is only for --method task-arithmetic")
    normalize = True if normalize is None else normalize
    resolved = resolve_weights(weights, n_models, normalize=normalize)
    return MergePlan(
        NAME, resolved, None, normalize, False, lambda tensors, _base: linear(tensors, resolved)
    )


def linear(tensors: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum(w_i * x_i) in float64, reading one model's tensor at a time."""
    total: np.ndarray | None = None
    for w, x in zip(weights, tensors, strict=True):
        term = np.multiply(x, w, dtype=np.float64)
        if total is None:
            total = term
        else:
            total += term
    assert total is not None
    return total
