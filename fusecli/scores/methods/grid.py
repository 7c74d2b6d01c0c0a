"""`grid`: every weighting on the simplex in steps of `step`, scored exactly (for few models).

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

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.lazy import LazyModule
from fusecli.scores.methods.base import Choice, Parameter, Problem
from fusecli.scores.methods.greedy import _quantize
from fusecli.scores.options import DEFAULT_STEP

# Imported on first use: the CLI reads PARAMETERS for --help without numpy.
np = LazyModule("numpy")
metrics = LazyModule("fusecli.scores.metrics")

PARAMETERS = (
    Parameter(
        "step", float, DEFAULT_STEP, "grid: spacing of the weights; 1/step must be a whole number"
    ),
)
MAX_GRID_POINTS = 1_000_000
KEEP = 1000  # the best points listed; tune shows its --top of them
# Memory for the fused scores of one chunk of grid points.
_CHUNK_BYTES = 64 * 1024 * 1024


def choose(problem: Problem, *, step: float = DEFAULT_STEP, keep: int = KEEP) -> Choice:
    n = problem.n
    grid = simplex_grid(n, step)
    k = divisions(step)
    index = slice(None) if problem.rows is None else problem.rows
    stack = np.stack([problem.take(i, index) for i in range(n)])
    labels = problem.labels_at(index)
    options = dict(probabilities=problem.fused_probabilities, softmax=problem.softmax)
    # Overflow shows as non-finite metric values, refused below rather than warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        values = evaluate_grid(stack, grid / k, labels, problem.metric, **options)
    if not np.isfinite(values).all():
        biggest = float(np.max(np.abs(stack)))
        raise FusecliError(
            f"The {problem.metric} of the fused scores overflows to a non-finite value; the "
            f"scores are too large (up to {biggest:.4g} in absolute value): rescale them"
        )
    higher = metrics.HIGHER_IS_BETTER[problem.metric]
    order = rank_grid(grid, values, k, higher_is_better=higher)
    return Choice(
        "grid",
        weights=_weights(grid[order[0]], k),
        evaluated=len(grid),
        ranking=[(_weights(grid[i], k), float(values[i])) for i in order[:keep]],
    )


def grid_size(n: int, step: float) -> int:
    """How many points the grid for `n` weights in steps of `step` has."""
    return math.comb(divisions(step) + n - 1, n - 1)


def check_grid_size(n: int, step: float) -> int:
    """The grid's size, or a usage error if it is beyond `MAX_GRID_POINTS`."""
    size = grid_size(n, step)
    if size > MAX_GRID_POINTS:
        raise InvalidRequest(
            f"The weight grid for {n} models in steps of {step} has {size:,} points, more than "
            f"the limit of {MAX_GRID_POINTS:,}; use a coarser --step, fewer models, or "
            "--method greedy"
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


def rank_grid(
    grid: np.ndarray, values: np.ndarray, k: int, *, higher_is_better: bool
) -> np.ndarray:
    """Indices of grid points, best first, with the tie-breaks of the module doc."""
    n = grid.shape[1]
    spread = np.sum(np.square(n * grid - k), axis=1)  # n^2 * squared distance to uniform
    primary = _quantize(-values if higher_is_better else values)
    keys = [-grid[:, i] for i in reversed(range(n))] + [spread, primary]
    return np.lexsort(keys)


def evaluate_grid(
    stack: np.ndarray,
    weights: np.ndarray,
    labels: metrics.Labels,
    metric: str,
    *,
    probabilities: bool,
    softmax: bool = False,
) -> np.ndarray:
    """`metric` of sum_i weights[g, i] * stack[i] for every row g of `weights`."""
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


def _weights(row: np.ndarray, k: int) -> list[float]:
    return [round(int(x) / k, 12) for x in row]
