"""Do these models look like relatives? Evidence gathered while the tensors stream past.

Weight-space merging needs a shared starting point: networks initialised independently learn
their features in different units and orders, and their average is a broken model even when
each alone is good. Fine-tunes of one model stay close to it, so their kernels point the same
way. For every kernel (a float tensor of two or more dimensions) the cosine similarity of each
model's values to the reference's is taken: the base's if there is one, else the first
model's. A model whose median cosine is below `RELATED_COSINE` does not look related.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Fine-tunes of one model measure about 0.9 and more; independent initialisations about 0.
RELATED_COSINE = 0.5
# A kernel's cosine is taken on at most this many of its entries, evenly strided (the same
# entries in every model): plenty for a cosine near 0 or near 1, and cheap beside the merge.
_SAMPLE = 1 << 16


@dataclass
class Relatedness:
    """Cosines of each model's kernels to the reference's, one list per model."""

    names: list[str]
    reference: str
    cosines: list[list[float]] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    def add(self, layer: str, reference: np.ndarray, values: list[np.ndarray]) -> None:
        if reference.ndim < 2:
            return
        step = max(1, reference.size // _SAMPLE)
        r = _sample(reference, step)
        r_norm = math.sqrt(_dot(r, r))
        row = []
        for x in values:
            v = _sample(x, step)
            norm = r_norm * math.sqrt(_dot(v, v))
            row.append(_dot(r, v) / norm if norm > 0 else 1.0)
        self.cosines.append(row)
        self.layers.append(layer)

    def as_dict(self) -> dict[str, Any]:
        models = []
        for i, name in enumerate(self.names):
            column = [row[i] for row in self.cosines]
            if not column:
                continue
            lowest = min(range(len(column)), key=column.__getitem__)
            models.append(
                {
                    "model": name,
                    "median_cosine": round(statistics.median(column), 6),
                    "lowest_cosine": round(column[lowest], 6),
                    "lowest_layer": self.layers[lowest],
                }
            )
        return {
            "measure": "cosine similarity of each model's kernels to the reference's",
            "reference": self.reference,
            "kernels": len(self.cosines),
            "threshold": RELATED_COSINE,
            "models": models,
        }


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """Without BLAS, whose threads wake for every call and cost more than the sum."""
    return float(np.einsum("i,i->", a, b))


def _sample(values: np.ndarray, step: int) -> np.ndarray:
    return np.ascontiguousarray(values.reshape(-1)[::step], dtype=np.float64)


def warnings_from(report: dict[str, Any]) -> list[str]:
    """One warning per model that does not look like a relative of the reference."""
    out = []
    for m in report["models"]:
        if m["median_cosine"] < RELATED_COSINE:
            out.append(
                f"{m['model']} does not look like a relative of {report['reference']}: the "
                f"median cosine similarity of its kernels to {report['reference']}'s is "
                f"{m['median_cosine']:.2f} over {report['kernels']} kernels (lowest "
                f"{m['lowest_cosine']:.2f}, layer {m['lowest_layer']!r}; fine-tunes of one "
                f"model measure about 0.9 or more). Weight-space merging needs a shared "
                f"starting point: models trained from different random initialisations "
                f"average into a broken model"
            )
    return out
