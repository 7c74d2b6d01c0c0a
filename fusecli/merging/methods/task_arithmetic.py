"""task-arithmetic: BASE + sum(w_i * (M_i - BASE)), adding the models' task vectors to a base."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from fusecli.coefficients import resolve_weights
from fusecli.errors import InvalidRequest
from fusecli.merging.methods.base import MergePlan

NAME = "task-arithmetic"


def plan(
    n_models: int,
    *,
    weights: Sequence[float] | None,
    t: float | None,
    has_base: bool,
    normalize: bool | None,
) -> MergePlan:
    """One or more models and a base; weights default to 1 each and are not normalized."""
    if n_models < 1:
        raise InvalidRequest(f"Expected one or more models to merge. Received: {n_models}")
    if not has_base:
        raise InvalidRequest("task-arithmetic needs the model the others were tuned from: --base")
    if t is not None:
        raise InvalidRequest(f"t is only for --method slerp. Received: t={t}")
    normalize = bool(normalize)
    resolved = resolve_weights(
        weights if weights is not None else (1.0,) * n_models, n_models, normalize=normalize
    )

    def combine(tensors: Iterable[np.ndarray], base: np.ndarray | None) -> np.ndarray:
        assert base is not None
        return task_arithmetic(base, tensors, resolved)

    return MergePlan(NAME, resolved, None, normalize, True, combine)


def task_arithmetic(
    base: np.ndarray, tensors: Iterable[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """base + sum(w_i * (x_i - base)) in float64, reading one model's tensor at a time."""
    b = np.asarray(base, dtype=np.float64)
    total = b.copy()
    for w, x in zip(weights, tensors, strict=True):
        total += w * (np.asarray(x, dtype=np.float64) - b)
    return total
