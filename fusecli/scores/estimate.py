"""Honest estimates: how well a way of fusing does on rows it was not chosen on.

k-fold cross-validation of the validation rows: the method chooses on k-1 folds and is scored on
the held-out fold, so every row gets an out-of-fold value (its metric under a choice made without
it); their mean is the estimate. Baselines that need no choosing (each model alone, the uniform
average, the hard vote) are scored on the same rows.

Noise: two ways of fusing are compared row by row (paired), so their difference's standard
error is std(per-row differences) / sqrt(rows). A difference within `NOISE_SIGMAS` standard errors
is a near-tie, and is said to be one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusecli.scores import metrics
from fusecli.scores.methods.base import Choice, Problem, row_values, stratified_folds
from fusecli.scores.options import DEFAULT_FOLDS

__all__ = ["DEFAULT_FOLDS", "Scored", "compare", "cross_validate", "make_folds"]

NOISE_SIGMAS = 2.0


@dataclass
class Scored:
    """One way of fusing, scored: on the validation rows it was chosen on, and out of fold."""

    name: str
    validation: float
    cv: float | None = None
    seconds: float = 0.0
    choice: Choice | None = field(default=None, repr=False)
    rows: np.ndarray | None = field(default=None, repr=False)  # per-row values (oof, or val.)

    @property
    def estimate(self) -> float:
        return self.validation if self.cv is None else self.cv

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "validation": self.validation, "cv": self.cv}


def score_method(
    problem: Problem, name: str, choose: Callable[[Problem], Choice], folds: list[np.ndarray]
) -> Scored:
    """Choose on all rows (the validation score), and cross-validate over `folds` if any."""
    start = time.perf_counter()
    choice = choose(problem)
    values = row_values(choice, problem)
    scored = Scored(name, float(np.mean(values)), choice=choice, rows=values)
    if folds:
        scored.rows = cross_validate(problem, choose, folds)
        scored.cv = float(np.mean(scored.rows))
    scored.seconds = time.perf_counter() - start
    return scored


def score_fixed(problem: Problem, name: str, choice: Choice) -> Scored:
    """A way of fusing that is not chosen on the rows (a single model, the average)."""
    values = row_values(choice, problem)
    mean = float(np.mean(values))
    return Scored(name, mean, cv=mean, choice=choice, rows=values)


def cross_validate(
    problem: Problem, choose: Callable[[Problem], Choice], folds: list[np.ndarray]
) -> np.ndarray:
    """Out-of-fold per-row values: for each fold, choose on the others, score on it."""
    out = np.empty(problem.n_rows)
    everything = np.arange(problem.n_rows)
    for held in folds:
        train = np.setdiff1d(everything, held)
        choice = choose(problem.restrict(_absolute(problem, train)))
        out[held] = row_values(choice, problem, held)
    return out


def make_folds(problem: Problem, k: int) -> list[np.ndarray]:
    """k stratified folds of the problem's rows; none when there are too few rows for k."""
    if k < 2 or problem.n_rows < 2 * k:
        return []
    return stratified_folds(problem.labels, problem.n_rows, k)


def compare(a: Scored, b: Scored, metric: str) -> dict[str, Any]:
    """a - b, its paired standard error, and whether it is within the noise."""
    diff_rows = a.rows - b.rows
    diff = float(np.mean(diff_rows))
    se = float(np.std(diff_rows, ddof=1) / math.sqrt(len(diff_rows))) if len(diff_rows) > 1 else 0
    better = diff > 0 if metrics.HIGHER_IS_BETTER[metric] else diff < 0
    tie = abs(diff) <= NOISE_SIGMAS * se
    return {
        "against": b.name,
        "difference": diff,
        "standard_error": se,
        "verdict": "tie"
        if diff == 0
        else ("within noise" if tie else "better" if better else "worse"),
    }


def _absolute(problem: Problem, positions: np.ndarray) -> np.ndarray:
    return positions if problem.rows is None else problem.rows[positions]
