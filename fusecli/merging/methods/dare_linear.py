"""dare-linear: DARE (Yu et al., 2023) merged linearly, as mergekit defines it
(mergekit/merge_methods/generalized_task_arithmetic.py, registered as "dare_linear" in
mergekit/merge_methods/registry.py; the drop is `bernoulli` in mergekit/sparsify.py):

    delta_i = M_i - BASE, each entry kept with probability density, the rest zeroed,
              what is kept rescaled (l1: to delta_i's L1 norm, as mergekit; density: / density)
    result  = BASE + lambda * sum(w_i * delta_i)      (/ sum(w_i) with normalize)

The drops come from numpy's default generator seeded with (seed, tensor index): for each tensor,
one `rng.random(shape) < density` per model, in model order. The same seed gives the same file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
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
    return dare(tensors, base, values, rng, consensus=False)


def dare(
    tensors: Iterable[np.ndarray],
    base: np.ndarray | None,
    values: Mapping[str, Any],
    rng: np.random.Generator | None,
    *,
    consensus: bool,
) -> np.ndarray:
    """Both DARE variants: random drops, then a linear or a sign-elected sum."""
    from fusecli.merging.methods import gta

    assert base is not None
    rescale = values["rescale"]
    return gta.merge_task_vectors(
        base,
        tensors,
        values["weights"],
        sparsify=lambda delta, density, rng: gta.random_drop(delta, density, rng, rescale),
        density=values["density"],
        rng=rng,
        consensus=consensus,
        normalize=values["normalize"],
        lambda_=values["lambda"],
    )


METHOD = Method(
    name="dare-linear",
    formula="BASE + lambda * sum(w_i * randomly dropped, rescaled task vector i)",
    parameters=(WEIGHTS, DENSITY, RESCALE, SEED, NORMALIZE, LAMBDA),
    combine=combine,
    needs_base=True,
    min_models=1,
    reference="mergekit/merge_methods/generalized_task_arithmetic.py",
    check_tensor=too_sparse,
)
