"""Generalized task arithmetic: the machinery that task-arithmetic, TIES, DARE and breadcrumbs
share, as mergekit defines it (mergekit/merge_methods/generalized_task_arithmetic.py and
mergekit/sparsify.py), in numpy and float64:

    delta_i = M_i - BASE                       (the task vectors)
    delta_i = sparsify(delta_i, density_i)     (magnitude, random or magnitude-outliers)
    mask    = sign(w_i * delta_i) == elected   (only with a sign consensus: TIES)
    merged  = sum(w_i * delta_i * mask) / divisor     (divisor only if normalize)
    result  = BASE + lambda * merged

The divisor is sum(w_i * mask) per entry with a consensus (1 where no model agrees), otherwise
sum(w_i) (1 if its magnitude is below 1e-8). Imported only when tensors are merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

# sparsify(delta, density, rng) -> delta with entries dropped (and rescaled)
Sparsify = Callable[[np.ndarray, float, "np.random.Generator | None"], np.ndarray]

_EPS_NORM = 1e-7
_EPS_DIVISOR = 1e-8


def merge_task_vectors(
    base: np.ndarray,
    tensors: Iterable[np.ndarray],
    weights: Sequence[float],
    *,
    sparsify: Sparsify | None = None,
    density: float = 1.0,
    rng: np.random.Generator | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> np.ndarray:
    """BASE + lambda * (the models' task vectors, sparsified, sign-elected, weighted)."""
    b = np.asarray(base, dtype=np.float64)
    deltas = []
    for x in tensors:
        delta = np.asarray(x, dtype=np.float64) - b
        if sparsify is not None:
            delta = sparsify(delta, density, rng)
        deltas.append(delta)
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * b.ndim)
    weighted = np.stack(deltas) * w
    if consensus:
        mask = sign_agreement(weighted)
        merged = (weighted * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1.0
    else:
        merged = weighted.sum(axis=0)
        divisor = np.asarray(w.sum(axis=0))
        divisor[np.abs(divisor) < _EPS_DIVISOR] = 1.0
    if normalize:
        merged = merged / divisor
    if lambda_ != 1.0:
        merged = merged * lambda_
    return b + merged


def sign_agreement(weighted: np.ndarray) -> np.ndarray:
    """TIES' sign election by the sum (mergekit's "sum" consensus): per entry, the sign of the
    summed weighted deltas (0 counts as positive); True where a model's delta has that sign."""
    elected = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    return np.sign(weighted) == elected


def magnitude(delta: np.ndarray, density: float, _rng: np.random.Generator | None) -> np.ndarray:
    """Keep the int(density * size) largest-magnitude entries (TIES' trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.size)
    flat = np.abs(delta).reshape(-1)
    keep = np.argpartition(flat, flat.size - k)[flat.size - k :]
    mask = np.zeros(flat.size, dtype=bool)
    mask[keep] = True
    return np.where(mask.reshape(delta.shape), delta, 0.0)


def magnitude_outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Model Breadcrumbs: drop the int(gamma * size) largest-magnitude entries, then the
    smallest, keeping int(density * size) (fewer outliers dropped if both cannot hold)."""
    if density >= 1:
        return delta
    size = delta.size
    target = int(density * size)
    n_top = int(gamma * size)
    n_bottom = size - target - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    order = np.argsort(np.abs(delta).reshape(-1), kind="stable")
    mask = np.zeros(size, dtype=bool)
    mask[order[n_bottom : size - n_top]] = True
    return np.where(mask.reshape(delta.shape), delta, 0.0)


def random_drop(
    delta: np.ndarray, density: float, rng: np.random.Generator | None, rescale: str
) -> np.ndarray:
    """DARE: keep each entry with probability `density` (drawn as rng.random(shape) < density),
    then rescale what is kept: `l1` to the task vector's L1 norm (mergekit's rescale: true),
    `density` by 1/density (the paper), `none` not at all."""
    if density >= 1:
        return delta
    assert rng is not None
    kept = np.where(rng.random(delta.shape) < density, delta, 0.0)
    if rescale == "density":
        return kept / density
    if rescale == "l1":
        before, after = np.abs(delta).sum(), np.abs(kept).sum()
        if before < _EPS_NORM or after < _EPS_NORM:
            return kept
        return kept * (before / after)
    return kept
