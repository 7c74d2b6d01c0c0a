"""breadcrumbs: Model Breadcrumbs (Davari & Belilovsky, 2023) as mergekit defines it
(mergekit/merge_methods/generalized_task_arithmetic.py, registered as "breadcrumbs" in
mergekit/merge_methods/registry.py; the mask is `magnitude_outliers` in mergekit/sparsify.py):

    delta_i = M_i - BASE without its int(gamma * size) largest-magnitude entries and its
              smallest ones, int(density * size) entries kept (fewer outliers dropped when
              both cannot hold)
    result  = BASE + lambda * sum(w_i * delta_i)      (/ sum(w_i) with normalize)

One difference: mergekit keeps `sorted[n_bottom:-n_top]`, which is empty when n_top is 0 (a
tensor under 1/gamma entries loses its whole task vector); here the largest n_top = 0 entries
are dropped, i.e. none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import (
    DENSITY,
    GAMMA,
    LAMBDA,
    NORMALIZE,
    WEIGHTS,
    too_sparse,
)

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray], base: np.ndarray | None, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    from fusecli.merging.methods import gta

    assert base is not None
    gamma = values["gamma"]
    return gta.merge_task_vectors(
        base,
        tensors,
        values["weights"],
        sparsify=lambda delta, density, _rng: gta.magnitude_outliers(delta, density, gamma),
        density=values["density"],
        normalize=values["normalize"],
        lambda_=values["lambda"],
    )


METHOD = Method(
    name="breadcrumbs",
    formula="BASE + lambda * sum(w_i * task vector i without its smallest and largest entries)",
    parameters=(WEIGHTS, DENSITY, GAMMA, NORMALIZE, LAMBDA),
    combine=combine,
    needs_base=True,
    min_models=1,
    reference="mergekit/merge_methods/generalized_task_arithmetic.py",
    check_tensor=too_sparse,
)
