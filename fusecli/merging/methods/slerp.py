"""slerp: spherical interpolation between two models, per tensor, as mergekit defines it.

Both flattened tensors are normalized (unless their norm is below 1e-8); if the cosine between
them exceeds 0.9995 in absolute value they are nearly parallel and plain linear interpolation is
used, otherwise, with theta = arccos(dot):

    s0 = sin((1 - t) * theta) / sin(theta),  s1 = sin(t * theta) / sin(theta)
    result = s0 * v0 + s1 * v1        (on the original, unnormalized tensors)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from fusecli.errors import InvalidRequest
from fusecli.merging.methods.base import MergePlan

NAME = "slerp"
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def plan(
    n_models: int,
    *,
    weights: Sequence[float] | None,
    t: float | None,
    has_base: bool,
    normalize: bool | None,
) -> MergePlan:
    """Exactly two models and an interpolation factor 0 <= t <= 1 (0 gives the first model)."""
    if n_models != 2:
        raise InvalidRequest(f"slerp merges exactly two models. Received: {n_models} models")
    if t is None:
        raise InvalidRequest("slerp needs the interpolation factor --t (0 <= t <= 1)")
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise InvalidRequest(f"Expected 0 <= t <= 1 for slerp. Received: t={t}")
    if weights is not None:
        raise InvalidRequest(f"slerp takes --t, not weights. Received: weights={tuple(weights)}")
    if has_base:
        raise InvalidRequest("A base model is only for --method task-arithmetic")
    if normalize:
        raise InvalidRequest("--normalize applies to weights; slerp takes none")

    def combine(tensors: Iterable[np.ndarray], _base: np.ndarray | None) -> np.ndarray:
        v0, v1 = tensors
        return slerp(t, v0, v1)

    return MergePlan(NAME, None, float(t), False, False, combine)


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), in float64."""
    a = np.asarray(v0, dtype=np.float64)
    b = np.asarray(v1, dtype=np.float64)
    dot = float(np.sum(_unit(a) * _unit(b)))
    if abs(dot) > DOT_THRESHOLD:
        return (1.0 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - t) * theta) / sin_theta
    s1 = math.sin(t * theta) / sin_theta
    return s0 * a + s1 * b


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v.reshape(-1)))
    return v / norm if norm > EPS else v
