"""ties: TIES-merging (Yadav et al., 2023) as mergekit defines it
(mergekit/merge_methods/generalized_task_arithmetic.py, registered as "ties" in
mergekit/merge_methods/registry.py; the trim is `magnitude` in mergekit/sparsify.py):

    delta_i  = M_i - BASE, keeping its int(density * size) largest-magnitude entries
    elected  = sign(sum_i w_i * delta_i)            (0 counts as +; the "sum" consensus)
    agree_i  = sign(w_i * delta_i) == elected
    merged   = sum_i(w_i * delta_i * agree_i) / sum_i(w_i * agree_i)    (normalize, default on;
                                                                      1 where none agrees)
    result   = BASE + lambda * merged
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import DENSITY, LAMBDA, NORMALIZE, WEIGHTS, too_sparse

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray], base: np.ndarray | None, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    from fusecli.merging.methods import gta

    assert base is not None
    return gta.merge_task_vectors(
        base,
        tensors,
        values["weights"],
        sparsify=gta.magnitude,
        density=values["density"],
        consensus=True,
        normalize=values["normalize"],
        lambda_=values["lambda"],
    )


METHOD = Method(
    name="ties",
    formula="BASE + lambda * sign-elected mean of the trimmed task vectors",
    parameters=(WEIGHTS, DENSITY, NORMALIZE.with_default(True), LAMBDA),
    combine=combine,
    needs_base=True,
    min_models=1,
    reference="mergekit/merge_methods/generalized_task_arithmetic.py",
    check_tensor=too_sparse,
)
