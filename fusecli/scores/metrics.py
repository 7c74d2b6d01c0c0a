"""How good scores are against labels: top-1/top-5 accuracy, log loss, mean squared error.

Labels come in two kinds:
- class labels: integer class ids of shape (N,), or one-hot rows of shape (N, classes) (0/1 with
  a single 1 per row, any numeric dtype); scores are then (N, classes);
- targets: any other numeric array with the scores' shape (regression); only `mse` applies.

Every function takes scores with leading batch axes, (..., N, classes), so `tuning` can score
many weightings at once. Top-k breaks ties between equal scores by class index, like a stable sort
by descending score: for k=1 that is exactly `argmax(scores) == label`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.options import METRICS

HIGHER_IS_BETTER = {"accuracy": True, "top5": True, "logloss": False, "mse": False}
# Rows whose sum is this close to 1 (and non-negative) are read as probabilities by `logloss`.
PROBABILITY_TOLERANCE = 1e-3
# log(0) guard for log loss, as scikit-learn does for float64.
_EPS = 1e-15


@dataclass
class Labels:
    """Labels checked against the scores' shape: `classes` (N,) int, or `targets`."""

    classes: np.ndarray | None = None
    targets: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "classes" if self.classes is not None else "targets"

    @property
    def default_metric(self) -> str:
        return "accuracy" if self.classes is not None else "mse"

    def __len__(self) -> int:
        return len(self.classes if self.classes is not None else self.targets)


def parse_labels(raw: np.ndarray, scores_shape: Sequence[int], *, source: str) -> Labels:
    """Read `raw` as class labels if it looks like them (see the module doc), else as targets."""
    raw = np.asarray(raw)
    if raw.dtype.hasobject or raw.dtype.kind not in "biuf":
        raise FusecliError(f"{source}: labels hold values of dtype {raw.dtype}, not numbers")
    if raw.ndim == 0:
        raise FusecliError(f"{source}: labels are a single number, expected one per row")
    n = scores_shape[0]
    if len(raw) != n:
        raise FusecliError(
            f"{source}: expected one label per row of the scores ({n} rows). "
            f"Received: {len(raw)} labels"
        )
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise FusecliError(f"{source}: labels hold NaN or infinite values")
    if raw.ndim == 1 and raw.dtype.kind in "iu":
        if raw.dtype.kind == "u" and raw.size and int(raw.max()) > np.iinfo(np.int64).max:
            # astype(int64) would wrap these around to negative classes
            _check_classes(np.zeros(0, np.int64), scores_shape, source)
            raise FusecliError(
                f"{source}: holds class {int(raw.max())}, but the scores have {scores_shape[1]} "
                f"classes (0 to {scores_shape[1] - 1})"
            )
        return Labels(classes=_check_classes(raw.astype(np.int64), scores_shape, source))
    if raw.ndim == 2 and _is_one_hot(raw):
        if tuple(raw.shape) != tuple(scores_shape):
            raise FusecliError(
                f"{source}: one-hot labels of shape {raw.shape} do not match scores of shape "
                f"{tuple(scores_shape)}"
            )
        return Labels(classes=np.argmax(raw, axis=1).astype(np.int64))
    targets = raw.astype(np.float64)
    if targets.shape != tuple(scores_shape):
        if targets.size == n * int(np.prod(scores_shape[1:])):
            targets = targets.reshape(tuple(scores_shape))  # (N,) against (N, 1)
        elif raw.ndim == 1 and len(scores_shape) == 2:
            raise FusecliError(
                f"{source}: class ids must be integers. Received: labels of dtype {raw.dtype} "
                f"(save them with .astype(int))"
            )
        else:
            raise FusecliError(
                f"{source}: labels of shape {raw.shape} are neither class ids (integers, "
                f"shape ({n},)) nor one-hot rows, nor targets of the scores' shape "
                f"{tuple(scores_shape)}"
            )
    return Labels(targets=targets)


def class_labels(raw: np.ndarray, scores_shape: Sequence[int], *, source: str) -> np.ndarray:
    """Class ids (N,) from `raw`, for accuracy; an error for anything else."""
    labels = parse_labels(raw, scores_shape, source=source)
    if labels.classes is None:
        raise FusecliError(
            f"{source}: accuracy needs class labels: integer class ids of shape "
            f"({scores_shape[0]},) or one-hot rows. Received: {np.asarray(raw).dtype} labels of "
            f"shape {np.asarray(raw).shape}"
        )
    return labels.classes


def accuracy_ks(scores_shape: Sequence[int]) -> tuple[int, ...]:
    """Which top-k accuracies are meaningful: top-1, plus top-5 with 5 or more classes."""
    return (1, 5) if len(scores_shape) == 2 and scores_shape[1] >= 5 else (1,)


def topk_correct(scores: np.ndarray, classes: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """For each k, how many rows have their label among the k best scores; shape (..., len(ks))."""
    rank = _label_rank(scores, classes)
    return np.stack([(rank < k).sum(axis=-1) for k in ks], axis=-1)


def evaluate(metric: str, scores: np.ndarray, labels: Labels, *, probabilities: bool) -> np.ndarray:
    """`metric` of scores (..., N, ...) against labels; one number per leading index.

    `probabilities` says whether scores are already probabilities; if not, `logloss` applies a
    softmax over the last axis first.
    """
    if metric not in METRICS:
        raise InvalidRequest(f"Expected metric to be one of {METRICS}. Received: {metric!r}")
    if metric == "mse":
        target = labels.targets if labels.targets is not None else one_hot(labels.classes, scores)
        axes = tuple(range(scores.ndim - target.ndim, scores.ndim))
        return np.mean(np.square(scores - target), axis=axes)
    if labels.classes is None:
        raise InvalidRequest(
            f"--metric {metric} needs class labels (integer class ids or one-hot rows); "
            "these labels are targets: use --metric mse"
        )
    n = len(labels.classes)
    if metric == "accuracy":
        return topk_correct(scores, labels.classes, (1,))[..., 0] / n
    if metric == "top5":
        if scores.shape[-1] < 5:
            raise InvalidRequest(
                f"--metric top5 needs 5 or more classes. Received: {scores.shape[-1]} classes"
            )
        return topk_correct(scores, labels.classes, (5,))[..., 0] / n
    probs = scores if probabilities else softmax(scores)
    picked = np.take_along_axis(probs, _label_index(labels.classes, probs), axis=-1)[..., 0]
    return -np.mean(np.log(np.clip(picked, _EPS, 1.0)), axis=-1)


def per_row(metric: str, scores: np.ndarray, labels: Labels, *, probabilities: bool) -> np.ndarray:
    """`metric` of each row of scores (N, ...), whose mean is `evaluate`'s number: 0/1 for
    accuracy and top5, -log p(label) for logloss, the row's mean squared error for mse.

    Per-row values let estimates compare two fusions row by row (paired differences).
    """
    if metric not in METRICS:
        raise InvalidRequest(f"Expected metric to be one of {METRICS}. Received: {metric!r}")
    if metric == "mse":
        target = labels.targets if labels.targets is not None else one_hot(labels.classes, scores)
        return np.mean(np.square(scores - target).reshape(len(scores), -1), axis=1)
    if labels.classes is None:
        raise InvalidRequest(
            f"--metric {metric} needs class labels (integer class ids or one-hot rows); "
            "these labels are targets: use --metric mse"
        )
    if metric == "accuracy":
        return (np.argmax(scores, axis=-1) == labels.classes).astype(np.float64)
    if metric == "top5":
        if scores.shape[-1] < 5:
            raise InvalidRequest(
                f"--metric top5 needs 5 or more classes. Received: {scores.shape[-1]} classes"
            )
        return (_label_rank(scores, labels.classes) < 5).astype(np.float64)
    probs = scores if probabilities else softmax(scores)
    picked = probs[np.arange(len(probs)), labels.classes]
    return -np.log(np.clip(picked, _EPS, 1.0))


def subset(labels: Labels, rows: np.ndarray | slice) -> Labels:
    """The labels of some rows (a fold of cross-validation, a chunk)."""
    if labels.classes is not None:
        return Labels(classes=labels.classes[rows])
    return Labels(targets=labels.targets[rows])


def is_better(metric: str, a: float, b: float) -> bool:
    return a > b if HIGHER_IS_BETTER[metric] else a < b


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """Non-negative rows summing to 1 (within `PROBABILITY_TOLERANCE`)."""
    if scores.ndim < 2 or scores.size == 0:
        return False
    sums = scores.sum(axis=-1)
    return bool((scores >= 0).all() and np.all(np.abs(sums - 1.0) <= PROBABILITY_TOLERANCE))


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - np.max(scores, axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=-1, keepdims=True)


def one_hot(classes: np.ndarray, like: np.ndarray) -> np.ndarray:
    out = np.zeros(like.shape[-2:], dtype=np.float64)
    out[np.arange(len(classes)), classes] = 1.0
    return out


# -- helpers ---------------------------------------------------------------------------------


def _label_rank(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Position of each row's label in a stable descending sort of its scores, (..., N)."""
    true = np.take_along_axis(scores, _label_index(classes, scores), axis=-1)
    cols = np.arange(scores.shape[-1])
    before = cols < classes[:, None]
    return (scores > true).sum(axis=-1) + ((scores == true) & before).sum(axis=-1)


def _label_index(classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    index = classes.reshape((1,) * (scores.ndim - 2) + (len(classes), 1))
    return np.broadcast_to(index, (*scores.shape[:-1], 1))


def _check_classes(classes: np.ndarray, scores_shape: Sequence[int], source: str) -> np.ndarray:
    if len(scores_shape) != 2:
        raise FusecliError(
            f"{source}: class labels need scores of shape (rows, classes). "
            f"Received: scores of shape {tuple(scores_shape)}"
        )
    if classes.size and (classes.min() < 0 or classes.max() >= scores_shape[1]):
        bad = int(classes.min()) if classes.min() < 0 else int(classes.max())
        raise FusecliError(
            f"{source}: holds class {bad}, but the scores have {scores_shape[1]} classes "
            f"(0 to {scores_shape[1] - 1})"
        )
    return classes


def _is_one_hot(raw: np.ndarray) -> bool:
    return bool(raw.size and np.isin(raw, (0, 1)).all() and np.all(raw.sum(axis=1) == 1))
