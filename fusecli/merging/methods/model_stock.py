"""model-stock: Model Stock (Jang et al., 2024) as mergekit defines it
(mergekit/merge_methods/model_stock.py):

    d_i       = M_i - BASE, flattened (or per row, with filter_wise; a vector is one row)
    cos       = the mean over pairs i < j of d_i . d_j / max(|d_i| |d_j|, 1e-6), clipped to
                [-1, 1]
    t         = N * cos / (1 + (N - 1) * cos)
    result    = t * mean_i(M_i) + (1 - t) * BASE

Needs a base and two or more fine-tunes of it; takes no weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.base import Method
from fusecli.merging.methods.parameters import FILTER_WISE

if TYPE_CHECKING:
    import numpy as np


def combine(
    tensors: Iterable[np.ndarray], base: np.ndarray | None, values: Mapping[str, Any], _rng: Any
) -> np.ndarray:
    assert base is not None
    return model_stock(base, list(tensors), filter_wise=values["filter_wise"])


def model_stock(
    base: np.ndarray, tensors: list[np.ndarray], *, filter_wise: bool = False
) -> np.ndarray:
    """The Model Stock interpolation between the models' average and the base, in float64."""
    import numpy as np

    w0 = np.asarray(base, dtype=np.float64)
    shape = w0.shape
    if filter_wise:
        rows = w0.reshape(1, -1) if w0.ndim <= 1 else w0
        ws = [np.asarray(w, dtype=np.float64).reshape(rows.shape) for w in tensors]
    else:
        rows = w0.reshape(-1)
        ws = [np.asarray(w, dtype=np.float64).reshape(-1) for w in tensors]
    offsets = [w - rows for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
            cosines.append(np.clip((a * b).sum(axis=-1) / np.maximum(norms, 1e-6), -1.0, 1.0))
    cos = np.expand_dims(np.mean(cosines, axis=0), -1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    average = sum(ws) / n
    return (t * average + (1 - t) * rows).reshape(shape)


METHOD = Method(
    name="model-stock",
    formula="t * mean(M_i) + (1 - t) * BASE, t from the task vectors' mean cosine",
    parameters=(FILTER_WISE,),
    combine=combine,
    needs_base=True,
    min_models=2,
    reference="mergekit/merge_methods/model_stock.py",
)
