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
    """sum(w_i * x_i) in float64, in blocks that stay in the CPU's cache."""
    import numpy as np

    arrays = [np.asarray(x) for x in tensors]
    shape = arrays[0].shape
    xs = [np.ascontiguousarray(x).reshape(-1) for x in arrays]
    if len(xs) != len(weights):
        raise ValueError(f"{len(xs)} tensors for {len(weights)} weights")
    total = np.empty(xs[0].shape, dtype=np.float64)
    term = np.empty(min(_BLOCK, total.size), dtype=np.float64)
    for start in range(0, total.size, _BLOCK):
        out = total[start : start + _BLOCK]
        scratch = term[: out.size]
        np.multiply(xs[0][start : start + _BLOCK], weights[0], out=out, dtype=np.float64)
        for w, x in zip(weights[1:], xs[1:], strict=True):
            np.multiply(x[start : start + _BLOCK], w, out=scratch, dtype=np.float64)
            out += scratch
    return total.reshape(shape)


_BLOCK = 1 << 15  # float64 values: 256 KB, a block and its scratch fit in a core's L2 cache


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
