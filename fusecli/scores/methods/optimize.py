"""`optimize`: continuous weights on the simplex that minimise log loss (or mse), by L-BFGS.

The weights are w = softmax(theta), so every theta is a valid weighting (w_i > 0, sum 1) and the
search is unconstrained; scipy's L-BFGS-B minimises the loss with its exact gradient. Weights
below `_ZERO` are set to 0 and the rest renormalised (softmax never reaches 0 exactly).

- log loss of probabilities: the fused probability of a row's label is sum w_i p_i[label], so
  only the (rows, models) matrix of the labels' probabilities is needed;
- log loss of logits (fused at the logits, or arrays of logits): softmax(sum w_i z_i), one pass
  over the rows per evaluation;
- mse: a quadratic in w, from the models' (models, models) Gram matrix.
Accuracy is not smooth: with --metric accuracy or top5 the log loss is minimised, and said so.
"""

from __future__ import annotations

from fusecli.errors import InvalidRequest
from fusecli.lazy import LazyModule
from fusecli.scores.methods.base import Choice, Parameter, Problem

# Imported on first use: the CLI reads PARAMETERS for --help without numpy.
np = LazyModule("numpy")
metrics = LazyModule("fusecli.scores.metrics")

PARAMETERS: tuple[Parameter, ...] = ()
_ZERO = 1e-4
_EPS = 1e-15


def choose(problem: Problem) -> Choice:
    from scipy.optimize import minimize

    loss = "mse" if problem.metric == "mse" else "logloss"
    if loss == "mse" and problem.softmax:
        raise InvalidRequest("--method optimize minimises mse of weighted sums, not at the logits")
    if loss == "logloss" and problem.labels.classes is None:
        raise InvalidRequest("--method optimize with targets needs --metric mse")
    if loss == "mse":
        objective = _mse_objective(problem)
    elif problem.probabilities and not problem.softmax:
        objective = _probability_objective(problem)
    else:
        objective = _logit_objective(problem)
    evaluations = 0

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal evaluations
        evaluations += 1
        w = metrics.softmax(theta)
        value, grad_w = objective(w)
        return value, w * (grad_w - np.dot(w, grad_w))

    result = minimize(fun, np.zeros(problem.n), jac=True, method="L-BFGS-B")
    w = metrics.softmax(result.x)
    w[w < _ZERO] = 0.0
    w /= w.sum()
    notes = []
    if problem.metric in ("accuracy", "top5"):
        notes.append(f"optimize: minimised the log loss ({problem.metric} is not smooth)")
    return Choice("optimize", weights=[float(x) for x in w], evaluated=evaluations, notes=notes)


def _probability_objective(problem: Problem):
    picked = np.empty((problem.n_rows, problem.n))
    for pos, index in problem.chunks(per_row=1):
        classes = problem.labels_at(index).classes
        rows = np.arange(len(classes))
        for i in range(problem.n):
            picked[pos, i] = np.asarray(problem.scores[i][index])[rows, classes]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        q = np.maximum(picked @ w, _EPS)
        return float(-np.mean(np.log(q))), -np.mean(picked / q[:, None], axis=0)

    return objective


def _logit_objective(problem: Problem):
    m = problem.n_rows

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        value = 0.0
        grad = np.zeros(problem.n)
        for _, index in problem.chunks(per_row=problem.n + 2):
            z = [problem.take(i, index) for i in range(problem.n)]
            fused = sum(wi * zi for wi, zi in zip(w, z, strict=True))
            classes = problem.labels_at(index).classes
            rows = np.arange(len(classes))
            top = fused.max(axis=-1, keepdims=True)
            e = np.exp(fused - top)
            total = e.sum(axis=-1, keepdims=True)
            p = e / total
            value += float(np.sum(np.log(total[:, 0]) + top[:, 0] - fused[rows, classes]))
            for i, zi in enumerate(z):
                grad[i] += float(np.sum(p * zi) - np.sum(zi[rows, classes]))
        return value / m, grad / m

    return objective


def _mse_objective(problem: Problem):
    n = problem.n
    gram = np.zeros((n, n))
    cross = np.zeros(n)
    constant = 0.0
    count = 0
    for _, index in problem.chunks(per_row=n + 1):
        s = np.stack([problem.take(i, index).reshape(-1) for i in range(n)])
        labels = problem.labels_at(index)
        if labels.targets is not None:
            target = labels.targets.reshape(-1)
        else:
            target = metrics.one_hot(labels.classes, problem.take(0, index)).reshape(-1)
        gram += s @ s.T
        cross += s @ target
        constant += float(target @ target)
        count += target.size

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        value = (w @ gram @ w - 2 * cross @ w + constant) / count
        return float(value), (2 * gram @ w - 2 * cross) / count

    return objective
