"""What every merge method provides: a checked plan that combines one tensor at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

# Combines the models' values of one variable (read lazily, in model order) and, for methods
# that take one, the base model's; returns float64 values of the same shape.
Combine = Callable[[Iterable[np.ndarray], "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class MergePlan:
    """A merge method with its options checked and resolved, ready to run tensor by tensor."""

    method: str
    weights: tuple[float, ...] | None
    t: float | None
    normalize: bool
    needs_base: bool
    combine: Combine
