"""dare-ties: DARE's random drops with TIES' sign election, as mergekit defines it
(mergekit/merge_methods/generalized_task_arithmetic.py, registered as "dare_ties" in
mergekit/merge_methods/registry.py; the drop is `bernoulli` in mergekit/sparsify.py):

    delta_i = M_i - BASE, randomly dropped and rescaled as in dare-linear
    elected = sign(sum_i w_i * delta_i); agree_i = sign(w_i * delta_i) == elected
    result  = BASE + lambda * sum_i(w_i * delta_i * agree_i)   (/ sum_i(w_i * agree_i) with
                                                              normalize, off by default)

The drops are seeded exactly as dare-linear's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.dare_linear import dare
from fusecli.merging.methods.parameters import (
    DENSITY,
    LAMBDA,
    NORMALIZE,
    RESCALE,
    SEED,
    WEIGHTS,
    too_sparse,
)

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray],
    base: np.ndarray | None,
    values: Mapping[str, Any],
    rng: np.random.Generator | None,
) -> np.ndarray:
    return dare(tensors, base, values, rng, consensus=True)


METHOD = Method(
    name="dare-ties",
    formula="BASE + lambda * sign-elected sum of randomly dropped, rescaled task vectors",
    parameters=(WEIGHTS, DENSITY, RESCALE, SEED, NORMALIZE, LAMBDA),
    combine=combine,
    needs_base=True,
    min_models=1,
    reference="mergekit/merge_methods/generalized_task_arithmetic.py",
    check_tensor=too_sparse,
)
