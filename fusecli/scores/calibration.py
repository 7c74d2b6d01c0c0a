"""Temperature scaling (Guo et al., 2017): one scalar T per model, p = softmax(z / T).

T is fitted on the validation rows to minimise the log loss of each model's logits z alone
(bounded scalar search on log T, scipy). Calibrated probabilities fuse better by weights: a model
that is over-confident no longer outvotes the others by the size of its logits. The fused model
applies 1/T as a `Rescaling` of each branch's logits, then a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores import metrics

# T between e^-6 and e^6: beyond, a model's scores are constant or one-hot anyway.
_LOG_T_BOUNDS = (-6.0, 6.0)


def fit_temperature(logits: np.ndarray, classes: np.ndarray) -> float:
    """The T minimising the mean log loss of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    picked = z[np.arange(len(z)), classes]

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        top = scaled.max(axis=1)
        total = np.log(np.exp(scaled - top[:, None]).sum(axis=1)) + top
        return float(np.mean(total - picked / np.exp(log_t)))

    result = minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def calibrate(
    scores: Sequence[np.ndarray], labels: metrics.Labels, names: Sequence[str]
) -> tuple[list[np.ndarray], list[float]]:
    """Each model's calibrated probabilities softmax(z_i / T_i) and its T_i."""
    if labels.classes is None:
        raise InvalidRequest("--calibrate needs class labels (it calibrates probabilities)")
    out, temperatures = [], []
    for name, z in zip(names, scores, strict=True):
        if metrics.looks_like_probabilities(np.asarray(z)):
            raise FusecliError(
                f"{name}: --calibrate needs logits (scores before the softmax), and these rows "
                "are probabilities; write them with `fusecli predict --at logits`"
            )
        t = fit_temperature(z, labels.classes)
        temperatures.append(t)
        out.append(apply_temperature(z, t))
    return out, temperatures


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    return metrics.softmax(np.asarray(logits, dtype=np.float64) / temperature)
