"""slerp: spherical interpolation between two models, per tensor, as mergekit defines it
(mergekit/merge_methods/slerp.py).

Both flattened tensors are normalized (unless their norm is below 1e-8); if the cosine between
them exceeds 0.9995 in absolute value they are nearly parallel and plain linear interpolation is
used, otherwise, with theta = arccos(dot):

    s0 = sin((1 - t) * theta) / sin(theta),  s1 = sin(t * theta) / sin(theta)
    result = s0 * v0 + s1 * v1        (on the original, unnormalized tensors)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import T

if TYPE_CHECKING:
    import numpy as np

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def combine(
    tensors: Iterable[np.ndarray], _base: Any, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    v0, v1 = tensors
    return slerp(values["t"], v0, v1)


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Spherical interpolation from v0 (t=0) to v1 (t=1), in float64."""
    import numpy as np

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
    import numpy as np

    norm = float(np.linalg.norm(v.reshape(-1)))
    return v / norm if norm > EPS else v


METHOD = Method(
    name="slerp",
    formula="spherical interpolation of two models, per tensor",
    parameters=(T.as_required(),),
    combine=combine,
    min_models=2,
    max_models=2,
    reference="mergekit/merge_methods/slerp.py",
)
