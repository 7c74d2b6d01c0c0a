"""linear: each tensor the weighted sum of the models' tensors (a model soup).

As mergekit/merge_methods/linear.py defines it: sum(w_i * M_i), divided by sum(w_i) when
normalizing (the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import NORMALIZE, WEIGHTS

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray], _base: Any, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    weights = values["weights"]
    if values["normalize"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    return linear(tensors, weights)


def linear(tensors: Iterable[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum(w_i * x_i) in float64, reading one model's tensor at a time."""
    import numpy as np

    total: np.ndarray | None = None
    for w, x in zip(weights, tensors, strict=True):
        term = np.multiply(x, w, dtype=np.float64)
        if total is None:
            total = term
        else:
            total += term
    assert total is not None
    return total


def _check(values: Mapping[str, Any], _shape: tuple[int, ...]) -> str | None:
    if values["normalize"] and sum(values["weights"]) == 0:
        return (
            f"cannot normalize weights that sum to 0. Received: weights={tuple(values['weights'])}"
        )
    return None


METHOD = Method(
    name="linear",
    formula="sum(w_i * M_i) / sum(w_i)",
    parameters=(
        WEIGHTS.with_default(None, "1/N each"),
        NORMALIZE.with_default(True),
    ),
    combine=combine,
    reference="mergekit/merge_methods/linear.py",
    check_tensor=_check,
)
