"""`stack`: a learned combiner, multinomial logistic regression on the models' scores.

    fused = softmax(concat(s_1, ..., s_n) @ coef + intercept)

the stacking of scikit-learn's StackingClassifier with its default final estimator, fitted on
the validation rows (which the models did not train on). The objective is scikit-learn's
LogisticRegression's: sum of the rows' log losses + ||coef||^2 / (2C) (the intercept is not
penalised), minimised by scipy's L-BFGS-B with its exact gradient. C is chosen by stratified
5-fold cross-validation of the held-out log loss among `CANDIDATE_C` (ties: the smaller C, the
stronger penalty), unless given.

Why our own fit rather than scikit-learn: scipy is already needed (optimize), the objective is
twenty lines, and scikit-learn (with joblib, threadpoolctl) stays out of the install; the tests
compare the fit with scikit-learn's LogisticRegression.

The head goes into a fused model as Concatenate + Dense(coef, intercept) + Softmax.
"""

from __future__ import annotations

from fusecli.errors import InvalidRequest
from fusecli.lazy import LazyModule
from fusecli.scores.methods.base import Choice, Parameter, Problem, stratified_folds

# Imported on first use: the CLI reads PARAMETERS for --help without numpy.
np = LazyModule("numpy")
metrics = LazyModule("fusecli.scores.metrics")

PARAMETERS = (
    Parameter(
        "stack_c",
        float,
        0.0,
        "stack: inverse regularisation strength (scikit-learn's C); 0: chosen by 5-fold "
        "cross-validation among 0.01 to 1000",
        0,
    ),
)
CANDIDATE_C = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
_INNER_FOLDS = 5
_TOLERANCE = 1e-6


def choose(problem: Problem, *, stack_c: float = 0.0) -> Choice:
    if problem.labels.classes is None:
        raise InvalidRequest("--method stack needs class labels (it is a classifier)")
    if len(problem.row_shape) != 1:
        raise InvalidRequest(
            f"--method stack needs scores of shape (rows, classes). Received: rows of shape "
            f"{problem.row_shape}"
        )
    x = features(problem)
    y = problem.labels.classes if problem.rows is None else problem.labels.classes[problem.rows]
    classes = problem.row_shape[0]
    notes = []
    C = stack_c  # noqa: N806 - scikit-learn's name
    if C == 0.0:
        C = choose_c(x, y, classes)
        notes.append(f"stack: C={C:g} chosen by {_INNER_FOLDS}-fold cross-validation")
    coef, intercept = fit(x, y, classes, C)
    return Choice(
        "stack",
        coef=coef,
        intercept=intercept,
        regularization=C,
        evaluated=1,
        notes=notes,
    )


def features(problem: Problem) -> np.ndarray:
    """The concatenated scores of the problem's rows, (rows, n * classes)."""
    width = int(np.prod(problem.row_shape))
    x = np.empty((problem.n_rows, problem.n * width))
    for pos, index in problem.chunks(per_row=problem.n):
        for i in range(problem.n):
            x[pos, i * width : (i + 1) * width] = problem.take(i, index)
    return x


def choose_c(x: np.ndarray, y: np.ndarray, classes: int) -> float:
    """The candidate C with the lowest held-out log loss over stratified folds."""
    k = min(_INNER_FOLDS, len(y))
    folds = stratified_folds(metrics.Labels(classes=y), len(y), k)
    losses = np.zeros(len(CANDIDATE_C))
    for held in folds:
        if not len(held):
            continue
        train = np.setdiff1d(np.arange(len(y)), held)
        start = None
        for j, c in enumerate(CANDIDATE_C):  # each fit starts from the last: C grows slowly
            coef, intercept = fit(x[train], y[train], classes, c, start=start)
            start = (coef, intercept)
            p = metrics.softmax(x[held] @ coef + intercept)
            losses[j] -= float(np.sum(np.log(np.clip(p[np.arange(len(held)), y[held]], 1e-15, 1))))
    return CANDIDATE_C[int(np.argmin(np.round(losses, 6)))]


def fit(
    x: np.ndarray,
    y: np.ndarray,
    classes: int,
    C: float,  # noqa: N803 - scikit-learn's name
    *,
    tol: float = _TOLERANCE,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (features, classes) and intercept (classes,) minimising
    mean log loss + ||coef||^2 / (2 C rows), the scikit-learn objective divided by C * rows;
    from `start` (a previous solution) if given."""
    from scipy.optimize import minimize

    m, d = x.shape
    target = np.zeros((m, classes))
    target[np.arange(m), y] = 1.0
    penalty = 1.0 / (C * m)

    def fun(params: np.ndarray) -> tuple[float, np.ndarray]:
        coef = params[: d * classes].reshape(d, classes)
        intercept = params[d * classes :]
        logits = x @ coef + intercept
        top = logits.max(axis=1, keepdims=True)
        log_total = np.log(np.exp(logits - top).sum(axis=1, keepdims=True)) + top
        p = np.exp(logits - log_total)
        value = float(np.sum(log_total[:, 0] - logits[np.arange(m), y])) / m
        value += 0.5 * penalty * float(np.sum(coef * coef))
        g = (p - target) / m
        grad_coef = x.T @ g + penalty * coef
        return value, np.concatenate([grad_coef.ravel(), g.sum(axis=0)])

    initial = (
        np.zeros(d * classes + classes)
        if start is None
        else np.concatenate([start[0].ravel(), start[1]])
    )
    result = minimize(
        fun,
        initial,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": tol, "ftol": tol / 100},
    )
    coef = result.x[: d * classes].reshape(d, classes)
    intercept = result.x[d * classes :]
    return coef, intercept - intercept.mean()
