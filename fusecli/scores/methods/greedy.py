"""`greedy`: Caruana's ensemble selection with replacement (Caruana et al., ICML 2004).

Each round adds to the ensemble the model whose addition scores best on the metric (a model can
be added again: its count grows); the weights are the counts over the rounds. Ties on the metric
go to the lower log loss when the metric is accuracy or top5 (as AutoGluon does), then to the
earlier model. The round that scored best is kept, not the last (auto-sklearn's `use_best`);
among equal rounds, the earliest (the smaller ensemble).

With `bags` > 0, the selection runs on that many random halves of the models (seeded) and the
weights are the average of the bags' weights, which resists overfitting a small validation set.

Cost: rounds x models passes over the rows, each in cache-sized chunks; memory: the running sum
of the ensemble (rows x classes, float64) beside the inputs, which are read where they lie
(memory maps of .npy files).
"""

from __future__ import annotations

import math

from fusecli.lazy import LazyModule
from fusecli.scores.methods.base import Choice, Parameter, Problem

# Imported on first use: the CLI reads PARAMETERS for --help without numpy.
np = LazyModule("numpy")
metrics = LazyModule("fusecli.scores.metrics")

PARAMETERS = (
    Parameter("rounds", int, 50, "greedy: rounds of selection (models added, with replacement)", 1),
    Parameter(
        "bags",
        int,
        0,
        "greedy: repeat the selection on this many random halves of the models and average "
        "(0: no bagging)",
        0,
    ),
)
_SEED = 0


def choose(problem: Problem, *, rounds: int = 50, bags: int = 0) -> Choice:
    n = problem.n
    if bags == 0:
        selected, history, best = select(problem, list(range(n)), rounds)
        counts = np.bincount(selected[:best], minlength=n)
        return Choice(
            "greedy",
            weights=[float(c) / best for c in counts],
            counts=[int(c) for c in counts],
            history=history,
            best_round=best,
            evaluated=rounds * n,
        )
    rng = np.random.default_rng(_SEED)
    weights = np.zeros(n)
    counts = np.zeros(n, dtype=np.int64)
    size = max(1, math.ceil(n / 2))
    for _ in range(bags):
        models = sorted(int(i) for i in rng.choice(n, size=size, replace=False))
        selected, _, best = select(problem, models, rounds)
        bag = np.bincount(selected[:best], minlength=n)
        counts += bag
        weights += bag / best
    return Choice(
        "greedy",
        weights=[float(w) for w in weights / bags],
        counts=[int(c) for c in counts],
        evaluated=bags * rounds * size,
        notes=[f"greedy: {bags} bags of {size} of the {n} models, weights averaged"],
    )


def select(problem: Problem, models: list[int], rounds: int) -> tuple[list[int], list[float], int]:
    """The model added at each round, the metric after each round, and the best round (1-based)."""
    metric = problem.metric
    higher = metrics.HIGHER_IS_BETTER[metric]
    classes = problem.labels.classes is not None
    second = "logloss" if metric in ("accuracy", "top5") and classes else None
    total = np.zeros((problem.n_rows, *problem.row_shape), dtype=np.float64)
    selected: list[int] = []
    primary_history: list[float] = []
    second_history: list[float] = []
    m = problem.n_rows
    for r in range(1, rounds + 1):
        primary = np.zeros(len(models))
        secondary = np.zeros(len(models))
        for pos, index in problem.chunks(per_row=3):
            part = total[pos]
            labels = problem.labels_at(index)
            buffer = np.empty_like(part)
            for j, i in enumerate(models):
                np.add(part, problem.scores[i][index], out=buffer)
                primary[j] += _row_sum(metric, buffer, r, labels, problem)
                if second is not None:
                    secondary[j] += _row_sum(second, buffer, r, labels, problem)
        keys = [np.arange(len(models)), secondary, _quantize(-primary if higher else primary)]
        j = int(np.lexsort(keys)[0])
        chosen = models[j]
        for pos, index in problem.chunks(per_row=1):
            total[pos] += problem.scores[chosen][index]
        selected.append(chosen)
        primary_history.append(float(primary[j]) / m)
        second_history.append(float(secondary[j]) / m)
        problem.report(r, rounds)
    values = np.asarray(primary_history)
    keys = [
        np.arange(rounds),
        np.asarray(second_history),
        _quantize(-values if higher else values),
    ]
    best = int(np.lexsort(keys)[0]) + 1
    return selected, primary_history, best


def _row_sum(
    metric: str, total: np.ndarray, count: int, labels: metrics.Labels, problem: Problem
) -> float:
    """Sum over rows of `metric` for the ensemble whose scores add up to `total` over `count`
    models (its scores are total / count)."""
    if metric == "accuracy":
        return float(np.count_nonzero(np.argmax(total, axis=-1) == labels.classes))
    if metric == "logloss" and problem.probabilities and not problem.softmax:
        picked = total[np.arange(len(total)), labels.classes] / count
        return float(-np.sum(np.log(np.clip(picked, 1e-15, 1.0))))
    fused = total / count
    if problem.softmax:
        fused = metrics.softmax(fused)
    values = metrics.per_row(metric, fused, labels, probabilities=problem.fused_probabilities)
    return float(np.sum(values))


def _quantize(values: np.ndarray, digits: int = 12) -> np.ndarray:
    """Equal in exact arithmetic, equal here: round to `digits` significant digits of the
    largest, so that float round-off does not decide ties."""
    top = float(np.max(np.abs(values))) if values.size else 0.0
    if top == 0 or not math.isfinite(top):
        return values
    unit = 10.0 ** (math.floor(math.log10(top)) - digits + 1)
    return np.round(values / unit)
