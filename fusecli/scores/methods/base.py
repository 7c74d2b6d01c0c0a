"""What every tune method works on (`Problem`) and returns (`Choice`), and what a choice computes.

A method sees the validation scores as a `Problem`: n score arrays (N, classes) of the same shape
(memory maps are fine: rows are read chunk by chunk), their labels, the metric, and `rows`, the
rows it may look at (a cross-validation fold: the other rows are held out from it). It returns a
`Choice`: simplex weights (grid, greedy, optimize, uniform) or a stacking head (coefficients and
intercept of a multinomial logistic regression on the concatenated scores).

`combine_rows` is the one definition of what a choice computes on score rows; tune scores with it,
`combine --recipe` writes it, and `fuse --recipe` builds a model computing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fusecli.lazy import LazyModule

# Imported on first use: the CLI reads PARAMETERS for --help without numpy.
np = LazyModule("numpy")
metrics = LazyModule("fusecli.scores.metrics")

# Float64 elements of one working chunk (4 MB): small enough for the caches, large enough that
# numpy's per-call overhead does not show.
CHUNK_ELEMENTS = 1 << 19

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Parameter:
    """A method's parameter, declared once: the CLI option, the API's check and the docs table."""

    name: str  # a Python name; the CLI option is --name-with-dashes
    type: type
    default: Any
    help: str
    min: float | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        from fusecli.errors import InvalidRequest

        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise InvalidRequest(
                f"Expected {self.name} to be a {self.type.__name__}. Received: {value!r}"
            ) from None
        if self.min is not None and not value >= self.min:
            raise InvalidRequest(
                f"Expected {self.name} >= {self.min:g}. Received: {self.name}={value!r}"
            )
        return value


@dataclass
class Problem:
    """Validation scores, labels and metric, restricted to `rows` (None: all rows)."""

    scores: Sequence[np.ndarray]
    labels: metrics.Labels
    metric: str
    probabilities: bool  # every input's rows are probabilities
    softmax: bool = False  # the fused scores are softmax(sum w_i s_i): fused at the logits
    rows: np.ndarray | None = None
    progress: Progress | None = None

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def n_rows(self) -> int:
        return len(self.scores[0]) if self.rows is None else len(self.rows)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.scores[0].shape[1:])

    @property
    def fused_probabilities(self) -> bool:
        """Whether weighted sums (weights summing to 1) of the scores are probabilities."""
        return self.softmax or self.probabilities

    def restrict(self, rows: np.ndarray) -> Problem:
        """The same problem on some of its rows (`rows` index the full arrays)."""
        return Problem(
            self.scores, self.labels, self.metric, self.probabilities, self.softmax, rows, None
        )

    def index(self, start: int, stop: int) -> slice | np.ndarray:
        """Where rows start..stop of this problem are in the full arrays."""
        return slice(start, stop) if self.rows is None else self.rows[start:stop]

    def chunks(self, per_row: int = 1) -> Iterator[tuple[slice, slice | np.ndarray]]:
        """(positions in this problem, index in the full arrays) of chunks of rows, sized so that
        `per_row` float64 arrays of a chunk fit in `CHUNK_ELEMENTS`."""
        width = max(1, int(np.prod(self.row_shape)) * per_row)
        step = max(1, CHUNK_ELEMENTS // width)
        for start in range(0, self.n_rows, step):
            stop = min(self.n_rows, start + step)
            yield slice(start, stop), self.index(start, stop)

    def take(self, i: int, index: slice | np.ndarray) -> np.ndarray:
        return np.asarray(self.scores[i][index], dtype=np.float64)

    def labels_at(self, index: slice | np.ndarray) -> metrics.Labels:
        return metrics.subset(self.labels, index)

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


@dataclass
class Choice:
    """What a method chose: simplex `weights`, or a stacking head (`coef`, `intercept`)."""

    method: str
    weights: list[float] | None = None
    counts: list[int] | None = None  # greedy: how often each model was selected
    coef: np.ndarray | None = None  # stack: (n * classes, classes)
    intercept: np.ndarray | None = None  # stack: (classes,)
    regularization: float | None = None  # stack: the C chosen
    history: list[float] = field(default_factory=list)  # greedy: the metric after each round
    best_round: int | None = None
    evaluated: int = 0  # how many combinations were scored
    ranking: list[tuple[list[float], float]] = field(default_factory=list)  # grid: the best few
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "weights": self.weights}
        if self.counts is not None:
            out["counts"] = self.counts
            out["rounds"] = len(self.history)
            out["best_round"] = self.best_round
            out["history"] = self.history
        if self.coef is not None:
            out["stack"] = {
                "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist(),
                "C": self.regularization,
            }
        return out


def combine_rows(
    chunks: Sequence[np.ndarray],
    *,
    weights: Sequence[float] | None = None,
    coef: np.ndarray | None = None,
    intercept: np.ndarray | None = None,
    softmax: bool = False,
) -> np.ndarray:
    """What a choice computes on rows of the n score arrays: sum w_i s_i (softmax of it when
    fused at the logits), or softmax(concat(s_i) @ coef + intercept) for a stacking head."""
    if coef is not None:
        features = np.concatenate([np.asarray(c, np.float64) for c in chunks], axis=-1)
        return metrics.softmax(features @ coef + intercept)
    fused = np.zeros(chunks[0].shape, dtype=np.float64)
    for w, c in zip(weights, chunks, strict=True):
        if w:
            fused += w * np.asarray(c, np.float64)
    return metrics.softmax(fused) if softmax else fused


def row_values(choice: Choice, problem: Problem, positions: np.ndarray | None = None) -> np.ndarray:
    """The metric of each row `positions` (of the problem's rows; None: all) under `choice`."""
    sub = problem if positions is None else problem.restrict(_absolute(problem, positions))
    out = np.empty(sub.n_rows, dtype=np.float64)
    probabilities = choice.coef is not None or sub.fused_probabilities
    for pos, index in sub.chunks(per_row=sub.n + 2):
        fused = combine_rows(
            [sub.scores[i][index] for i in range(sub.n)],
            weights=choice.weights,
            coef=choice.coef,
            intercept=choice.intercept,
            softmax=sub.softmax and choice.coef is None,
        )
        out[pos] = metrics.per_row(
            sub.metric, fused, sub.labels_at(index), probabilities=probabilities
        )
    return out


def uniform(problem: Problem) -> Choice:
    """The plain average: the baseline every method must beat."""
    return Choice("uniform", weights=[1.0 / problem.n] * problem.n, evaluated=1)


def single(problem: Problem, i: int) -> Choice:
    weights = [0.0] * problem.n
    weights[i] = 1.0
    return Choice("single", weights=weights, evaluated=1)


def hard_vote(chunks: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Each row's votes per class: sum of w_i over the models whose top-1 class it is.

    Its argmax is the voted class (ties to the lowest class id, as scikit-learn's VotingClassifier
    does with argmax of bincount).
    """
    n = len(chunks)
    weights = [1.0] * n if weights is None else list(weights)
    votes = np.zeros(chunks[0].shape, dtype=np.float64)
    rows = np.arange(len(votes))
    for w, c in zip(weights, chunks, strict=True):
        votes[rows, np.argmax(c, axis=-1)] += w  # one vote per row: no repeated index
    return votes


def vote_row_values(problem: Problem, positions: np.ndarray | None = None) -> np.ndarray:
    """Top-1 correctness (0/1) of the uniform hard vote on each row."""
    sub = problem if positions is None else problem.restrict(_absolute(problem, positions))
    out = np.empty(sub.n_rows, dtype=np.float64)
    for pos, index in sub.chunks(per_row=2):
        votes = hard_vote([sub.scores[i][index] for i in range(sub.n)])
        out[pos] = np.argmax(votes, axis=-1) == sub.labels_at(index).classes
    return out


def _absolute(problem: Problem, positions: np.ndarray) -> np.ndarray:
    return positions if problem.rows is None else problem.rows[positions]


def stratified_folds(
    labels: metrics.Labels, rows: int, k: int, *, seed: int = 0
) -> list[np.ndarray]:
    """`k` disjoint sets of positions 0..rows-1 (sorted) covering them all; with class labels,
    each class is dealt round-robin over the folds after a seeded shuffle (as StratifiedKFold)."""
    rng = np.random.default_rng(seed)
    fold_of = np.empty(rows, dtype=np.int64)
    if labels.classes is not None:
        classes = labels.classes
        offset = 0
        for c in np.unique(classes):
            members = rng.permutation(np.flatnonzero(classes == c))
            fold_of[members] = (offset + np.arange(len(members))) % k
            offset += len(members)
    else:
        fold_of[rng.permutation(rows)] = np.arange(rows) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]
