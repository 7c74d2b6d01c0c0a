"""Weight-space merge methods, one module each (as in mergekit).

Adding a method: a new module with `NAME` and `plan(...) -> MergePlan`, and one line below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fusecli.errors import InvalidRequest
from fusecli.merging.methods import linear, slerp, task_arithmetic
from fusecli.merging.methods.base import MergePlan

METHODS: dict[str, Callable[..., MergePlan]] = {
    linear.NAME: linear.plan,
    slerp.NAME: slerp.plan,
    task_arithmetic.NAME: task_arithmetic.plan,
}

__all__ = ["METHODS", "MergePlan", "plan_merge"]


def plan_merge(
    method: str,
    n_models: int,
    *,
    weights: Sequence[float] | None = None,
    t: float | None = None,
    has_base: bool = False,
    normalize: bool | None = None,
) -> MergePlan:
    """Check a merge request against its method before any file is opened."""
    if method not in METHODS:
        raise InvalidRequest(
            f"Expected method to be one of {tuple(METHODS)}. Received: method={method!r}"
        )
    return METHODS[method](n_models, weights=weights, t=t, has_base=has_base, normalize=normalize)
