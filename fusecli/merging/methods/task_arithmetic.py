"""task-arithmetic: BASE + lambda * sum(w_i * (M_i - BASE)), adding the models' task vectors to
the base they were fine-tuned from; with normalize, the sum is divided by sum(w_i).

As mergekit defines it: mergekit/merge_methods/generalized_task_arithmetic.py with no
sparsification and no sign consensus (registry.py, "task_arithmetic").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import LAMBDA, NORMALIZE, WEIGHTS

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray], base: np.ndarray | None, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    from fusecli.merging.methods.gta import merge_task_vectors

    assert base is not None
    return merge_task_vectors(
        base,
        tensors,
        values["weights"],
        normalize=values["normalize"],
        lambda_=values["lambda"],
    )


def task_arithmetic(
    base: np.ndarray, tensors: Iterable[np.ndarray], weights: Sequence[float]
) -> np.ndarray:
    """base + sum(w_i * (x_i - base)) in float64, reading one model's tensor at a time."""
    import numpy as np

    b = np.asarray(base, dtype=np.float64)
    total = b.copy()
    for w, x in zip(weights, tensors, strict=True):
        total += w * (np.asarray(x, dtype=np.float64) - b)
    return total


METHOD = Method(
    name="task-arithmetic",
    formula="BASE + lambda * sum(w_i * (M_i - BASE))",
    parameters=(WEIGHTS, NORMALIZE, LAMBDA),
    combine=combine,
    needs_base=True,
    min_models=1,
    reference="mergekit/merge_methods/generalized_task_arithmetic.py",
)
