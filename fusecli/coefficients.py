"""Fusion weights: one number per model, checked before any model is read."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fusecli.errors import InvalidRequest


def parse_weights(text: str) -> tuple[float, ...]:
    """Parse "0.8,0.2" or "0.8 0.2" (the CLI joins `--w 0.8 0.2` into the first form)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise InvalidRequest(f"Expected at least one number. Received: weights={text!r}")
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise InvalidRequest(f"Weights must be numbers. Received: weights={text!r}") from None


def resolve_weights(
    weights: Sequence[float] | None, n_models: int, *, normalize: bool = False
) -> tuple[float, ...]:
    """Check `weights` against the number of models; default to equal weights 1/N.

    With `normalize`, rescale them to sum to 1.
    """
    if weights is None:
        return tuple(1.0 / n_models for _ in range(n_models))
    weights = tuple(float(w) for w in weights)
    if len(weights) != n_models:
        raise InvalidRequest(
            f"Expected one weight per model ({n_models} models). Received: weights={weights}"
        )
    if not all(math.isfinite(w) for w in weights):
        raise InvalidRequest(f"Weights must be finite numbers. Received: weights={weights}")
    if normalize:
        try:
            total = math.fsum(weights)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            raise InvalidRequest(
                f"Cannot normalize weights whose sum overflows. Received: weights={weights}"
            )
        if total == 0:
            raise InvalidRequest(
                f"Cannot normalize weights that sum to 0. Received: weights={weights}"
            )
        weights = tuple(w / total for w in weights)
    return weights
