"""Choosing fusion weights on validation data: an exhaustive grid on the simplex.

Weights are non-negative and sum to 1, in steps of `step` (0.1: 0, 0.1, ..., 1), vertices (the
single models) included. Every point is scored, in chunks of weightings at once:

    fused[g] = sum_i W[g, i] * scores_i        metric(fused[g], labels)

The best point wins (compared to 12 significant digits, so that ties in exact arithmetic are
not settled by float rounding); ties go to the weights closest to uniform (smallest squared
distance), then to the most weight on the earlier models (lexical order), so the answer is
deterministic.
There are C(1/step + n - 1, n - 1) points: 66 for 3 models at 0.1, 10^6 is the limit.
"""

from __future__ import annotations

import itertools
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.formats.modelfile import MODEL_SUFFIXES
from fusecli.scores import metrics
from fusecli.scores.arrays import check_finite
from fusecli.scores.options import DEFAULT_STEP

MAX_GRID_POINTS = 1_000_000
# Memory for the fused scores of one chunk of grid points.
_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class Candidate:
    weights: list[float]
    score: float


@dataclass
class TuneResult:
    """The best weights and how the others fared; `as_dict()` is the CLI's `--json` document."""

    names: list[str]
    metric: str
    step: float
    weights: list[float]
    score: float
    singles: list[Candidate]
    ranking: list[Candidate]  # the best `keep` grid points, best first
    grid_points: int
    rows: int
    at: str = "output"
    output: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "metric": self.metric,
            "higher_is_better": metrics.HIGHER_IS_BETTER[self.metric],
            "step": self.step,
            "weights": self.weights,
            "score": self.score,
            "singles": [
                {"name": n, "score": c.score} for n, c in zip(self.names, self.singles, strict=True)
            ],
            "ranking": [{"weights": c.weights, "score": c.score} for c in self.ranking],
            "grid_points": self.grid_points,
            "rows": self.rows,
            "at": self.at,
            "output": self.output,
            "notes": self.notes,
        }


def grid_size(n: int, step: float) -> int:
    """How many points the grid for `n` weights in steps of `step` has."""
    return math.comb(divisions(step) + n - 1, n - 1)


def check_grid_size(n: int, step: float) -> int:
    """The grid's size, or a usage error if it is beyond `MAX_GRID_POINTS`."""
    size = grid_size(n, step)
    if size > MAX_GRID_POINTS:
        raise InvalidRequest(
            f"The weight grid for {n} models in steps of {step} has {size:,} points, more than "
            f"the limit of {MAX_GRID_POINTS:,}; use a coarser --step or fewer models"
        )
    return size


def divisions(step: float) -> int:
    """1/step, which must be a whole number so that the grid reaches every vertex exactly."""
    if not (0 < step <= 1):
        raise InvalidRequest(f"Expected a step between 0 and 1. Received: step={step}")
    if not math.isfinite(1 / step):
        raise InvalidRequest(
            f"The step is too small to divide 1 into a grid of weights. Received: step={step}"
        )
    k = round(1 / step)
    if abs(k * step - 1) > 1e-9:
        raise InvalidRequest(
            "The step must divide 1 into equal parts (0.5, 0.25, 0.2, 0.1, 0.05, ...). "
            f"Received: step={step}"
        )
    return k


def simplex_grid(n: int, step: float) -> np.ndarray:
    """All weightings k/K with integer k_i >= 0 summing to K = 1/step, as integers k, (G, n).

    Ordered lexically from the most weight on the first model down.
    """
    k = divisions(step)
    size = check_grid_size(n, step)
    grid = np.empty((size, n), dtype=np.int64)
    # Stars and bars: k stars and n - 1 bars; the gaps between bars are the weights.
    for row, bars in enumerate(itertools.combinations(range(k + n - 1), n - 1)):
        edges = (-1, *bars, k + n - 1)
        grid[row] = [edges[i + 1] - edges[i] - 1 for i in range(n)]
    return grid[::-1].copy()


def tune_scores(
    scores: Sequence[np.ndarray],
    labels: np.ndarray | metrics.Labels,
    *,
    step: float = DEFAULT_STEP,
    metric: str | None = None,
    names: Sequence[str] | None = None,
    keep: int = 10,
    activation: str | None = None,
) -> TuneResult:
    """Find the weights on the simplex grid whose weighted sum of `scores` scores best.

    `labels`: class ids (N,), one-hot rows, or targets of the scores' shape (see `metrics`);
    `metric` defaults to accuracy for class labels and mse for targets. `activation="softmax"`
    scores softmax(sum w_i s_i) instead, as a model fused at its logits computes.
    """
    if activation not in (None, "softmax"):
        raise InvalidRequest(
            f"Expected activation to be None or 'softmax'. Received: activation={activation!r}"
        )
    n = len(scores)
    if n < 2:
        raise InvalidRequest(f"Expected two or more score arrays to tune. Received: {n}")
    names = list(names) if names is not None else [f"scores{i}" for i in range(n)]
    for name, s in zip(names[1:], scores[1:], strict=True):
        if s.shape != scores[0].shape:
            raise FusecliError(
                "Scores must have the same shape to be fused. "
                f"Received: {names[0]} has shape {scores[0].shape}, {name} has shape {s.shape}"
            )
    for name, s in zip(names, scores, strict=True):
        check_finite(np.asarray(s), name)
    shape = scores[0].shape
    if len(shape) == 0 or shape[0] == 0:
        raise FusecliError(
            f"Expected scores with at least one row to tune on. Received: {names[0]} has shape "
            f"{tuple(shape)}"
        )
    if not isinstance(labels, metrics.Labels):
        labels = metrics.parse_labels(labels, shape, source="labels")
    metric = metric or labels.default_metric
    if metric not in metrics.METRICS:
        raise InvalidRequest(
            f"Expected metric to be one of {metrics.METRICS}. Received: {metric!r}"
        )
    grid = simplex_grid(n, step)
    k = divisions(step)
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in scores])
    notes = []
    probabilities = activation == "softmax" or all(
        metrics.looks_like_probabilities(s) for s in stack
    )
    if metric == "logloss" and not probabilities:
        notes.append("logloss: the scores are not all probabilities, so softmax(fused) is scored")

    options = dict(probabilities=probabilities, softmax=activation == "softmax")
    # Overflow shows as non-finite metric values, refused below rather than warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        values = _evaluate_grid(stack, grid / k, labels, metric, **options)
        singles = _evaluate_grid(stack, np.eye(n), labels, metric, **options)
    if not (np.isfinite(values).all() and np.isfinite(singles).all()):
        biggest = float(np.max(np.abs(stack)))
        raise FusecliError(
            f"The {metric} of the fused scores overflows to a non-finite value; the scores are "
            f"too large (up to {biggest:.4g} in absolute value): rescale them"
        )
    order = rank_grid(grid, values, k, higher_is_better=metrics.HIGHER_IS_BETTER[metric])
    ranking = [Candidate(_weights(grid[i], k), float(values[i])) for i in order[:keep]]
    best = order[0]
    return TuneResult(
        names=names,
        metric=metric,
        step=step,
        weights=_weights(grid[best], k),
        score=float(values[best]),
        singles=[
            Candidate([float(x) for x in row], float(v))
            for row, v in zip(np.eye(n), singles, strict=True)
        ],
        ranking=ranking,
        grid_points=len(grid),
        rows=int(shape[0]),
        notes=notes,
    )


def rank_grid(
    grid: np.ndarray, values: np.ndarray, k: int, *, higher_is_better: bool
) -> np.ndarray:
    """Indices of grid points, best first, with the tie-breaks of the module doc."""
    n = grid.shape[1]
    spread = np.sum(np.square(n * grid - k), axis=1)  # n^2 * squared distance to uniform
    primary = _quantize(-values if higher_is_better else values)
    keys = [-grid[:, i] for i in reversed(range(n))] + [spread, primary]
    return np.lexsort(keys)


def tune(
    sources: Sequence[str | os.PathLike[str]],
    *,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    key: str | None = None,
    labels_key: str | None = None,
    step: float = DEFAULT_STEP,
    metric: str | None = None,
    at: str = "output",
    keep: int = 10,
    batch_size: int = 256,
    trust: bool = False,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Any = None,
) -> TuneResult:
    """Tune fusion weights for model files (run once each on `data`) or .npy score arrays.

    Labels come from `labels` (a .npy, or the `labels_key` array of a .npz/.h5), else from the
    `y` array of `data`. With `output` (models only), writes the fused model with the best weights
    through `fusion.fuse_to_file`. `at="logits"` (models only) tunes softmax(sum w_i z_i) over the
    models' logits z_i, and writes the model fused at its logits.
    """
    from fusecli.scores.datafile import read_labels

    kind = source_kind(sources)
    if len(sources) < 2:
        raise InvalidRequest(f"Expected two or more inputs to tune. Received: {len(sources)}")
    check_grid_size(len(sources), step)  # refuse a huge grid before any model runs
    if metric is not None and metric not in metrics.METRICS:
        raise InvalidRequest(
            f"Expected metric to be one of {metrics.METRICS}. Received: {metric!r}"
        )
    if at not in ("output", "logits"):
        raise InvalidRequest(f"Expected at to be 'output' or 'logits'. Received: at={at!r}")
    if at == "logits" and kind != "models":
        raise InvalidRequest(
            "--at logits runs models up to their logits; score arrays are used as they are "
            "(tune arrays of logits with --metric logloss, or combine them)"
        )
    if kind == "models" and data is None:
        raise InvalidRequest("Tuning models needs --data: the validation inputs to run them on")
    if labels is None and data is None:
        raise InvalidRequest("Tuning score arrays needs --labels (or --data holding 'y')")
    if output is not None:
        if kind != "models":
            raise InvalidRequest(
                "-o writes a fused model, so it needs model files, not score arrays"
            )
        from fusecli.output import check_output_path, model_format

        model_format(output)
        extra = [p for p in (data, labels) if p is not None]
        check_output_path(output, inputs=[*sources, *extra], force=force)

    if labels is not None:
        raw_labels = read_labels(labels, key=labels_key)
    else:
        raw_labels = read_labels(data, key=labels_key, in_data=True)
    if kind == "models":
        from fusecli.scores.prediction import predict_array

        scores = []
        for i, source in enumerate(sources):
            report = None if progress is None else _progress_for(progress, i, len(sources))
            scores.append(
                predict_array(
                    source,
                    data,
                    key=key,
                    batch_size=batch_size,
                    at=at,
                    trust=trust,
                    progress=report,
                )
            )
    else:
        from fusecli.scores.arrays import read_scores

        if sum(str(s) == "-" for s in sources) > 1:
            raise InvalidRequest("Only one input can be read from stdin ('-')")
        scores = [read_scores(s) for s in sources]
    labels_name = str(labels if labels is not None else data)
    parsed = metrics.parse_labels(raw_labels, scores[0].shape, source=labels_name)
    result = tune_scores(
        scores,
        parsed,
        step=step,
        metric=metric,
        names=[str(s) for s in sources],
        keep=keep,
        activation="softmax" if at == "logits" else None,
    )
    result.at = at
    if output is not None:
        from fusecli.fusion.fuse import fuse_to_file

        extra = {"at": "logits"} if at == "logits" else {}
        report = fuse_to_file(
            list(sources), output, result.weights, trust=trust, force=force, **extra
        )
        result.output = report.output
    return result


def source_kind(sources: Sequence[str | os.PathLike[str]]) -> str:
    """'models' (.keras/.h5 files) or 'scores' (.npy files or -); a mix is an error."""
    kinds = {"models" if Path(s).suffix.lower() in MODEL_SUFFIXES else "scores" for s in sources}
    if len(kinds) > 1:
        raise InvalidRequest(
            "Expected either model files (.keras, .h5) or score arrays (.npy), not a mix. "
            f"Received: {tuple(str(s) for s in sources)}"
        )
    for s in sources:
        if (
            "scores" in kinds
            and str(s) != "-"
            and Path(s).suffix.lower() != ".npy"
            and not _is_pipe(s)
        ):
            raise InvalidRequest(
                f"Expected model files (.keras, .h5) or score arrays (.npy). Received: {str(s)!r}"
            )
    return kinds.pop() if kinds else "scores"


# -- helpers ---------------------------------------------------------------------------------


def _evaluate_grid(
    stack: np.ndarray,
    weights: np.ndarray,
    labels: metrics.Labels,
    metric: str,
    *,
    probabilities: bool,
    softmax: bool = False,
) -> np.ndarray:
    n, rows = stack.shape[:2]
    flat = stack.reshape(n, rows, -1)
    per_point = max(1, flat[0].size * 8 * (3 if metric == "logloss" else 2))
    chunk = max(1, _CHUNK_BYTES // per_point)
    out = np.empty(len(weights), dtype=np.float64)
    for start in range(0, len(weights), chunk):
        w = weights[start : start + chunk]
        fused = np.tensordot(w, flat, axes=1).reshape((len(w), *stack.shape[1:]))
        if softmax:
            fused = metrics.softmax(fused)
        out[start : start + len(w)] = metrics.evaluate(
            metric, fused, labels, probabilities=probabilities
        )
    return out


def _quantize(values: np.ndarray, digits: int = 12) -> np.ndarray:
    """`values` to `digits` significant digits of the largest, so that ties in exact arithmetic
    are not settled by float rounding (identical inputs: 0.7 a + 0.3 a is not quite a)."""
    values = np.asarray(values, dtype=np.float64)
    top = float(np.max(np.abs(values))) if values.size else 0.0
    if top == 0 or not math.isfinite(top):
        return values
    unit = 10.0 ** (math.floor(math.log10(top)) - digits + 1)
    return np.round(values / unit)


def _is_pipe(path: str | os.PathLike[str]) -> bool:
    """A named pipe or process substitution (/dev/fd/63) carries a .npy stream without a suffix."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _weights(row: np.ndarray, k: int) -> list[float]:
    return [round(int(x) / k, 12) for x in row]


def _progress_for(progress: Any, index: int, count: int) -> Any:
    def report(done: int, total: int) -> None:
        progress(index, count, done, total)

    return report
