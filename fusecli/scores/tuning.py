"""Choosing how to fuse models' scores on validation data, and saying how sure the choice is.

    result = tune_scores([a, b, c], y_val, method="auto")
    result = tune(["a.npy", "b.npy", "c.npy"], labels="y.npy", save_recipe="r.json")

The methods live in `fusecli.scores.methods` (grid, greedy, optimize, stack); `auto` scores the
ones that fit a time budget by k-fold cross-validation (`fusecli.scores.estimate`) and keeps the
best estimate. Every result carries the validation score of the choice, its cross-validated
estimate, and the same for each model alone, the uniform average and the hard vote, with the
differences that are within the noise said so. `--calibrate` first fits one temperature per
model (`fusecli.scores.calibration`). The choice can be saved as a recipe (`fusecli.scores.recipe`)
and applied to other rows or built into a model.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.formats.modelfile import MODEL_SUFFIXES
from fusecli.scores import estimate, metrics
from fusecli.scores.arrays import check_finite, is_score_path
from fusecli.scores.methods import check_parameters, chooser
from fusecli.scores.methods.base import Problem, single, uniform, vote_row_values
from fusecli.scores.methods.grid import (  # noqa: F401 - the grid's API, as before
    MAX_GRID_POINTS,
    check_grid_size,
    divisions,
    grid_size,
    rank_grid,
    simplex_grid,
)
from fusecli.scores.options import DEFAULT_STEP, METHOD_CHOICES
from fusecli.scores.recipe import Recipe

# auto: the grid is a candidate while it is this small (4 models at 0.1: 286 points).
AUTO_GRID_POINTS = 300
# auto: stacking is a candidate while its regression has at most this many coefficients.
AUTO_STACK_COEFFICIENTS = 100_000
# Order of preference among equal estimates: the simpler first.
_SIMPLER = ("uniform", "grid", "greedy", "optimize", "stack")


def auto_budget(n: int) -> float:
    """Seconds auto may spend estimating methods for n models: 10 s plus 2 s per model."""
    return 10.0 + 2.0 * n


@dataclass
class Candidate:
    weights: list[float]
    score: float


@dataclass
class TuneResult:
    """What was chosen and how it and the baselines fare; `as_dict()` is `--json`."""

    names: list[str]
    metric: str
    step: float
    weights: list[float] | None  # None for a stacking head
    score: float  # the choice's metric on the validation rows it was chosen on
    singles: list[Candidate]
    ranking: list[Candidate]
    grid_points: int  # how many combinations the method scored
    rows: int
    at: str = "output"
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    method: str = "grid"
    reason: str = ""
    choice: dict[str, Any] = field(default_factory=dict)
    estimates: dict[str, Any] = field(default_factory=dict)
    temperatures: list[float] | None = None
    recipe: Recipe | None = field(default=None, repr=False)
    recipe_path: str | None = None
    history: list[float] = field(default_factory=list)  # greedy: metric per round
    curve: list[tuple[float, float]] = field(default_factory=list)  # two models: (w, metric)
    uniform: float | None = None  # the uniform average's validation score

    @property
    def cv(self) -> float | None:
        return self.estimates.get("chosen", {}).get("cv")

    def as_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "method": self.method,
            "reason": self.reason,
            "metric": self.metric,
            "higher_is_better": metrics.HIGHER_IS_BETTER[self.metric],
            "step": self.step,
            "weights": self.weights,
            "score": self.score,
            "cv": self.cv,
            "choice": self.choice,
            "temperatures": self.temperatures,
            "estimates": self.estimates,
            "singles": [
                {"name": n, "score": c.score} for n, c in zip(self.names, self.singles, strict=True)
            ],
            "ranking": [{"weights": c.weights, "score": c.score} for c in self.ranking],
            "grid_points": self.grid_points,
            "rows": self.rows,
            "at": self.at,
            "output": self.output,
            "recipe": self.recipe_path,
            "notes": self.notes,
        }


def tune_scores(
    scores: Sequence[np.ndarray],
    labels: np.ndarray | metrics.Labels,
    *,
    method: str = "auto",
    step: float = DEFAULT_STEP,
    metric: str | None = None,
    names: Sequence[str] | None = None,
    keep: int = 10,
    activation: str | None = None,
    folds: int = estimate.DEFAULT_FOLDS,
    calibrate: bool = False,
    budget: float | None = None,
    progress: Any = None,
    curve: bool = False,
    **parameters: Any,
) -> TuneResult:
    """Choose how to fuse `scores` (n arrays (N, classes), memory maps welcome) by `method`.

    `labels`: class ids (N,), one-hot rows, or targets of the scores' shape (see `metrics`);
    `metric` defaults to accuracy for class labels and mse for targets. `activation="softmax"`
    scores softmax(sum w_i s_i) instead, as a model fused at its logits computes. `folds`: k of
    the cross-validated estimate (0: none). `calibrate`: the scores are logits; fit one
    temperature per model first. `parameters`: the methods' (see `fusecli.scores.methods`),
    e.g. rounds=100 for greedy. `curve`: for two models, also score the weights 0, 0.01, ..., 1
    on the first (`TuneResult.curve`, for a plot).
    """
    if method not in METHOD_CHOICES:
        raise InvalidRequest(f"Expected method to be one of {METHOD_CHOICES}. Received: {method!r}")
    if activation not in (None, "softmax"):
        raise InvalidRequest(
            f"Expected activation to be None or 'softmax'. Received: activation={activation!r}"
        )
    n = len(scores)
    if n < 2:
        raise InvalidRequest(f"Expected two or more score arrays to tune. Received: {n}")
    divisions(step)
    if method == "grid":
        check_grid_size(n, step)
    parameters = check_parameters(parameters)
    names = list(names) if names is not None else [f"scores{i}" for i in range(n)]
    for name, s in zip(names[1:], scores[1:], strict=True):
        if s.shape != scores[0].shape:
            raise FusecliError(
                "Scores must have the same shape to be fused. "
                f"Received: {names[0]} has shape {scores[0].shape}, {name} has shape {s.shape}"
            )
    shape = scores[0].shape
    if len(shape) == 0 or shape[0] == 0:
        raise FusecliError(
            f"Expected scores with at least one row to tune on. Received: {names[0]} has shape "
            f"{tuple(shape)}"
        )
    for name, s in zip(names, scores, strict=True):
        _check_finite_chunked(s, name)
    if not isinstance(labels, metrics.Labels):
        labels = metrics.parse_labels(labels, shape, source="labels")
    metric = metric or labels.default_metric
    if metric not in metrics.METRICS:
        raise InvalidRequest(
            f"Expected metric to be one of {metrics.METRICS}. Received: {metric!r}"
        )
    if metric != "mse" and labels.classes is None:
        raise InvalidRequest(
            f"--metric {metric} needs class labels (integer class ids or one-hot rows); "
            "these labels are targets: use --metric mse"
        )
    if metric == "top5" and shape[-1] < 5:
        raise InvalidRequest(
            f"--metric top5 needs 5 or more classes. Received: {shape[-1]} classes"
        )

    from threadpoolctl import threadpool_limits

    # BLAS threads only slow the small products of the fits (20x and more on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        return _tune_checked(
            scores, labels, names, shape, method, step, metric, keep, activation, folds,
            calibrate, budget, progress, curve, parameters,
        )  # fmt: skip


def _tune_checked(
    scores: Sequence[np.ndarray],
    labels: metrics.Labels,
    names: list[str],
    shape: tuple[int, ...],
    method: str,
    step: float,
    metric: str,
    keep: int,
    activation: str | None,
    folds: int,
    calibrate: bool,
    budget: float | None,
    progress: Any,
    curve: bool,
    parameters: dict[str, Any],
) -> TuneResult:
    n = len(scores)
    notes: list[str] = []
    temperatures = None
    softmax = activation == "softmax"
    if calibrate:
        from fusecli.scores.calibration import calibrate as fit_calibration

        scores, temperatures = fit_calibration(scores, labels, names)
        softmax = False
        notes.append(
            "calibrate: temperatures "
            + ", ".join(f"{n}={t:.3g}" for n, t in zip(names, temperatures, strict=True))
        )
    probabilities = not softmax and all(_looks_like_probabilities(s) for s in scores)
    if metric == "logloss" and not probabilities and not softmax:
        notes.append("logloss: the scores are not all probabilities, so softmax(fused) is scored")
    problem = Problem(list(scores), labels, metric, probabilities, softmax)
    k_folds = estimate.make_folds(problem, folds)
    if folds >= 2 and not k_folds:
        notes.append(
            f"estimate: {shape[0]} rows are too few for {folds}-fold cross-validation; "
            "validation scores only"
        )

    with np.errstate(over="ignore", invalid="ignore"):
        baselines = [
            estimate.score_fixed(problem, name, single(problem, i)) for i, name in enumerate(names)
        ]
        average = estimate.score_fixed(problem, "uniform", uniform(problem))
    _check_overflow([*baselines, average], metric, scores)

    if method == "auto":
        scored, tried, reason = _auto(
            problem, k_folds, step, parameters, names, average, budget, progress
        )
    else:
        problem.progress = progress
        scored = estimate.score_method(
            problem, method, chooser(method, {"step": step, **parameters}), k_folds
        )
        problem.progress = None
        tried, reason = [scored], f"asked for with --method {method}"
    choice = scored.choice
    notes.extend(choice.notes)
    estimates = _estimates(problem, scored, tried, baselines, average, metric, k_folds)
    ranking = [Candidate(w, v) for w, v in choice.ranking] or (
        [Candidate(choice.weights, scored.validation)] if choice.weights is not None else []
    )
    ranking = ranking[:keep]
    recipe = Recipe(
        method=choice.method,
        inputs=list(names),
        row_shape=[int(d) for d in shape[1:]],
        at="logits" if (calibrate or softmax) else "output",
        softmax=softmax,
        weights=choice.weights,
        counts=choice.counts,
        coef=None if choice.coef is None else choice.coef.tolist(),
        intercept=None if choice.intercept is None else choice.intercept.tolist(),
        temperatures=temperatures,
        metric=metric,
        estimate={"validation": scored.validation, "cv": scored.cv, "folds": len(k_folds)},
    )
    along = _curve(problem) if curve and n == 2 else []
    return TuneResult(
        curve=along,
        uniform=average.validation,
        names=names,
        metric=metric,
        step=step,
        weights=choice.weights,
        score=scored.validation,
        singles=[
            Candidate(single(problem, i).weights, b.validation) for i, b in enumerate(baselines)
        ],
        ranking=ranking,
        grid_points=choice.evaluated,
        rows=int(shape[0]),
        notes=notes,
        method=choice.method,
        reason=reason,
        choice=choice.as_dict(),
        estimates=estimates,
        temperatures=temperatures,
        recipe=recipe,
        history=list(choice.history),
    )


def _auto(
    problem: Problem,
    folds: list[np.ndarray],
    step: float,
    parameters: dict[str, Any],
    names: list[str],
    average: estimate.Scored,
    budget: float | None,
    progress: Any,
) -> tuple[estimate.Scored, list[estimate.Scored], str]:
    """Score the candidate methods that fit the budget; keep the best cross-validated one."""
    budget = auto_budget(problem.n) if budget is None else budget
    candidates = ["greedy", "optimize"]
    if grid_size(problem.n, step) <= AUTO_GRID_POINTS:
        candidates.insert(0, "grid")
    skipped = []
    width = int(np.prod(problem.row_shape))
    if (
        problem.labels.classes is not None
        and len(problem.row_shape) == 1
        and problem.n * width * width <= AUTO_STACK_COEFFICIENTS
    ):
        candidates.append("stack")
    else:
        skipped.append("stack (too many coefficients for these scores)")
    if problem.metric == "mse" and problem.softmax:
        candidates.remove("optimize")
    start = time.perf_counter()
    tried: list[estimate.Scored] = []
    for index, name in enumerate(candidates):
        if progress is not None:
            progress(index, len(candidates))
        if tried and time.perf_counter() - start > budget:
            skipped.append(f"{name} (out of time)")
            continue
        choose = chooser(name, {"step": step, **parameters})
        fit_start = time.perf_counter()
        scored = estimate.score_method(problem, name, choose, [])
        fit_seconds = time.perf_counter() - fit_start
        projected = fit_seconds * max(0, len(folds) - 1)
        if folds and time.perf_counter() - start + projected > budget:
            if tried:
                skipped.append(f"{name} (its estimate would take ~{projected:.0f} s)")
                continue
        elif folds:
            scored.rows = estimate.cross_validate(problem, choose, folds)
            scored.cv = float(np.mean(scored.rows))
        scored.seconds = time.perf_counter() - fit_start
        tried.append(scored)
    if progress is not None:
        progress(len(candidates), len(candidates))
    with_cv = [s for s in tried if s.cv is not None]
    contenders = [*with_cv, average] if with_cv else tried
    higher = metrics.HIGHER_IS_BETTER[problem.metric]
    best = min(
        contenders,
        key=lambda s: (
            -round(s.estimate, 12) if higher else round(s.estimate, 12),
            _SIMPLER.index(s.name),
        ),
    )
    if best is average:
        best = estimate.score_method(problem, "uniform", lambda p: uniform(p), [])
        best.cv, best.rows = average.cv, average.rows
    what = f"{len(folds)}-fold cross-validated" if with_cv else "validation"
    others = ", ".join(f"{s.name} {s.estimate:.4f}" for s in contenders if s.name != best.name)
    reason = (
        f"auto: the best {what} {problem.metric}, {best.estimate:.4f}"
        + (f" against {others}" if others else "")
        + f" (budget {budget:.0f} s)"
    )
    if skipped:
        reason += "; not tried: " + ", ".join(skipped)
    return best, tried, reason


def _estimates(
    problem: Problem,
    chosen: estimate.Scored,
    tried: list[estimate.Scored],
    singles: list[estimate.Scored],
    average: estimate.Scored,
    metric: str,
    folds: list[np.ndarray],
) -> dict[str, Any]:
    """The `--json` estimates: the choice, what else was tried, the baselines, comparisons."""
    higher = metrics.HIGHER_IS_BETTER[metric]
    best_single = max(singles, key=lambda s: s.validation if higher else -s.validation)
    comparisons = [estimate.compare(chosen, best_single, metric)]
    comparisons.append(estimate.compare(chosen, average, metric))
    comparisons += [estimate.compare(chosen, s, metric) for s in tried if s.name != chosen.name]
    out: dict[str, Any] = {
        "folds": len(folds),
        "chosen": chosen.as_dict(),
        "tried": [s.as_dict() for s in tried],
        "uniform": average.as_dict(),
        "singles": [s.as_dict() for s in singles],
        "best_single": best_single.name,
        "comparisons": comparisons,
    }
    if problem.labels.classes is not None and len(problem.row_shape) == 1:
        out["hard_vote_accuracy"] = float(np.mean(vote_row_values(problem)))
    return out


def _curve(problem: Problem) -> list[tuple[float, float]]:
    """The metric at weights (w, 1 - w), w = 0, 0.01, ..., 1."""
    from fusecli.scores.methods.base import Choice, row_values

    points = []
    for k in range(101):
        w = k / 100
        values = row_values(Choice("grid", weights=[w, 1 - w]), problem)
        points.append((w, float(np.mean(values))))
    return points


def _check_overflow(
    scored: list[estimate.Scored], metric: str, scores: Sequence[np.ndarray]
) -> None:
    if all(np.isfinite(s.rows).all() for s in scored):
        return
    biggest = max(float(np.max(np.abs(s))) for s in scores)
    raise FusecliError(
        f"The {metric} of the fused scores overflows to a non-finite value; the scores are "
        f"too large (up to {biggest:.4g} in absolute value): rescale them"
    )


def _check_finite_chunked(values: np.ndarray, name: str) -> None:
    step = max(1, (1 << 22) // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, len(values), step):
        check_finite(np.asarray(values[start : start + step]), name, first_row=start)


def _looks_like_probabilities(values: np.ndarray) -> bool:
    step = max(1, (1 << 22) // max(1, int(np.prod(values.shape[1:]))))
    return all(
        metrics.looks_like_probabilities(np.asarray(values[start : start + step]))
        for start in range(0, len(values), step)
    )


def tune(
    sources: Sequence[str | os.PathLike[str]],
    *,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    key: str | None = None,
    labels_key: str | None = None,
    method: str = "auto",
    step: float = DEFAULT_STEP,
    metric: str | None = None,
    at: str = "output",
    keep: int = 10,
    batch_size: int = 256,
    trust: bool = False,
    output: str | os.PathLike[str] | None = None,
    save_recipe: str | os.PathLike[str] | None = None,
    force: bool = False,
    folds: int = estimate.DEFAULT_FOLDS,
    calibrate: bool = False,
    budget: float | None = None,
    progress: Any = None,
    method_progress: Any = None,
    plot: str | os.PathLike[str] | None = None,
    **parameters: Any,
) -> TuneResult:
    """Choose how to fuse model files (run once each on `data`) or .npy score arrays.

    Labels come from `labels` (a .npy, or the `labels_key` array of a .npz/.h5), else from the
    `y` array of `data`. `method`, `folds`, `calibrate`, `parameters`: see `tune_scores`.
    With `output` (models only), writes the fused model computing the choice; with
    `save_recipe`, the choice as a recipe (see `fusecli.scores.recipe`). `at="logits"` (models
    only) tunes softmax(sum w_i z_i) over the models' logits z_i; `calibrate` takes the models
    at their logits too. .npy score files are memory-mapped, not read into memory.
    `progress(index, count, done, total)` is called as model `index` of `count` runs, and
    `method_progress(done, total)` as the method works. `plot`: a .png drawing of the choice
    (needs matplotlib: `pip install 'fusecli[plot]'`).
    """
    from fusecli.scores.datafile import read_labels

    kind = source_kind(sources)
    if len(sources) < 2:
        raise InvalidRequest(f"Expected two or more inputs to tune. Received: {len(sources)}")
    if method not in METHOD_CHOICES:
        raise InvalidRequest(f"Expected method to be one of {METHOD_CHOICES}. Received: {method!r}")
    divisions(step)
    if method == "grid":
        check_grid_size(len(sources), step)  # refuse a huge grid before any model runs
    check_parameters(parameters)
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
    extra = [p for p in (data, labels) if p is not None]
    if output is not None:
        if kind != "models":
            raise InvalidRequest(
                "-o writes a fused model, so it needs model files, not score arrays "
                "(--save-recipe saves the choice; fuse MODELS --recipe builds the model)"
            )
        from fusecli.output import check_output_path, model_format

        model_format(output)
        check_output_path(output, inputs=[*sources, *extra], force=force)
    if plot is not None:
        from fusecli.scores.plot import check_plot_request

        check_plot_request(plot, inputs=[*sources, *extra], force=force)
    if save_recipe is not None:
        from fusecli.output import check_output_path

        if Path(save_recipe).suffix.lower() != ".json":
            raise InvalidRequest(
                f"A recipe is a .json file. Received: save_recipe={str(save_recipe)!r}"
            )
        check_output_path(save_recipe, inputs=[*sources, *extra], force=force)

    if labels is not None:
        raw_labels = read_labels(labels, key=labels_key)
    else:
        raw_labels = read_labels(data, key=labels_key, in_data=True)
    run_at = "logits" if calibrate else at
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
                    at=run_at,
                    trust=trust,
                    progress=report,
                )
            )
    else:
        from fusecli.scores.arrays import map_scores

        if sum(str(s) == "-" for s in sources) > 1:
            raise InvalidRequest("Only one input can be read from stdin ('-')")
        scores = [map_scores(s) for s in sources]
    labels_name = str(labels if labels is not None else data)
    parsed = metrics.parse_labels(raw_labels, scores[0].shape, source=labels_name)

    result = tune_scores(
        scores,
        parsed,
        method=method,
        step=step,
        metric=metric,
        names=[str(s) for s in sources],
        keep=keep,
        activation="softmax" if run_at == "logits" and not calibrate else None,
        folds=folds,
        calibrate=calibrate,
        budget=budget,
        progress=method_progress,
        curve=plot is not None,
        **parameters,
    )
    result.at = run_at
    result.recipe.at = run_at
    if save_recipe is not None:
        from fusecli.scores.recipe import save_recipe as write_recipe

        write_recipe(result.recipe, save_recipe, force=force)
        result.recipe_path = str(save_recipe)
    if plot is not None:
        from fusecli.scores.plot import plot_tune

        plot_tune(result, plot, force=force)
    if output is not None:
        from fusecli.fusion.recipe_head import fuse_recipe_to_file

        report = fuse_recipe_to_file(list(sources), result.recipe, output, trust=trust, force=force)
        result.output = report.output
    return result


def source_kind(sources: Sequence[str | os.PathLike[str]]) -> str:
    """'models' (.keras/.h5 files) or 'scores' (.npy files, .npz arrays or -); a mix is an
    error."""
    kinds = {"models" if Path(s).suffix.lower() in MODEL_SUFFIXES else "scores" for s in sources}
    if len(kinds) > 1:
        raise InvalidRequest(
            "Expected either model files (.keras, .h5) or score arrays (.npy), not a mix. "
            f"Received: {tuple(str(s) for s in sources)}"
        )
    for s in sources:
        if "scores" in kinds and not is_score_path(str(s)) and not _is_pipe(s):
            raise InvalidRequest(
                f"Expected model files (.keras, .h5) or score arrays (.npy). Received: {str(s)!r}"
            )
    return kinds.pop() if kinds else "scores"


# -- helpers ---------------------------------------------------------------------------------


def _is_pipe(path: str | os.PathLike[str]) -> bool:
    """A named pipe or process substitution (/dev/fd/63) carries a .npy stream without a suffix."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _progress_for(progress: Any, index: int, count: int) -> Any:
    def report(done: int, total: int) -> None:
        progress(index, count, done, total)

    return report
