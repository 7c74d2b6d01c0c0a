"""tune's methods for many models (greedy, optimize, stack, calibration, hard vote, auto), each
against an independent numpy (or scikit-learn) reference written here; recipes applied anywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fusecli.cli import cli
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores import metrics
from fusecli.scores.calibration import fit_temperature
from fusecli.scores.methods import greedy, optimize, stack
from fusecli.scores.methods.base import Problem, stratified_folds
from fusecli.scores.recipe import apply_recipe, load_recipe
from fusecli.scores.tuning import tune, tune_scores


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _zoo(n=6, rows=200, classes=5, seed=0, probabilities=True):
    """n models of varied quality on the same rows: noisy logits that each know some classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=rows)
    out = []
    for i in range(n):
        z = rng.standard_normal((rows, classes)) * (1 + i % 3)
        z += (0.5 + 0.3 * i) * np.eye(classes)[y] * rng.random((rows, 1)) * 2
        out.append((_softmax(z) if probabilities else z).astype(np.float32))
    return out, y


def caruana_reference(scores, y, rounds, probabilities=True):
    """Plain Caruana with replacement on whole arrays: accuracy, ties to the lower log loss,
    then the lower index; the best round kept (earliest among equals)."""
    s = [np.asarray(a, np.float64) for a in scores]
    total = np.zeros_like(s[0])
    chosen, history = [], []
    rows = np.arange(len(y))
    for r in range(1, rounds + 1):
        best = None
        for i, a in enumerate(s):
            fused = (total + a) / r
            acc = np.sum(np.argmax(fused, axis=1) == y)
            p = fused if probabilities else _softmax(fused)
            loss = -np.sum(np.log(np.clip(p[rows, y], 1e-15, 1)))
            key = (-acc, round(loss, 9), i)
            if best is None or key < best[0]:
                best = (key, i)
        (neg_acc, loss, _), i = best
        total += s[i]
        chosen.append(i)
        history.append((neg_acc, loss, r))
    best_round = min(history)[2]
    counts = np.bincount(chosen[:best_round], minlength=len(s))
    return counts / best_round, best_round


@pytest.mark.parametrize(("seed", "probabilities"), [(0, True), (1, True), (2, False)])
def test_greedy_equals_a_plain_caruana(seed, probabilities):
    scores, y = _zoo(seed=seed, probabilities=probabilities)
    result = tune_scores(scores, y, method="greedy", rounds=25, folds=0)
    weights, best_round = caruana_reference(scores, y, 25, probabilities)
    np.testing.assert_allclose(result.weights, weights, atol=1e-12)
    assert result.choice["best_round"] == best_round
    assert sum(result.choice["counts"]) == best_round
    fused = sum(w * s.astype(np.float64) for w, s in zip(weights, scores, strict=True))
    assert result.score == pytest.approx(np.mean(np.argmax(fused, axis=1) == y))


def test_greedy_reads_rows_in_chunks_and_folds_the_same(monkeypatch):
    """Small chunks and a row subset (a CV fold) give what whole arrays give."""
    import fusecli.scores.methods.base as base

    scores, y = _zoo(seed=3)
    rows = np.sort(np.random.default_rng(0).choice(len(y), 120, replace=False))
    problem = Problem(scores, metrics.Labels(classes=y), "accuracy", True).restrict(rows)
    whole = greedy.choose(problem, rounds=15)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 7 * 5)  # 7 rows a chunk
    chunked = greedy.choose(problem, rounds=15)
    assert chunked.weights == whole.weights
    weights, _ = caruana_reference([s[rows] for s in scores], y[rows], 15)
    np.testing.assert_allclose(whole.weights, weights, atol=1e-12)


def test_greedy_bagging_averages_bags_over_halves():
    scores, y = _zoo(n=6, seed=4)
    result = tune_scores(scores, y, method="greedy", rounds=10, bags=4, folds=0)
    assert sum(result.weights) == pytest.approx(1.0)
    assert result.choice["counts"] and len(result.weights) == 6


def test_optimize_reaches_the_best_of_a_fine_grid():
    scores, y = _zoo(n=3, seed=5)
    result = tune_scores(scores, y, method="optimize", metric="logloss", folds=0)
    rows = np.arange(len(y))
    best = (np.inf, None)
    for a in range(101):
        for b in range(101 - a):
            w = np.array([a, b, 100 - a - b]) / 100
            p = sum(wi * s.astype(np.float64) for wi, s in zip(w, scores, strict=True))
            loss = -np.mean(np.log(np.clip(p[rows, y], 1e-15, 1)))
            best = min(best, (loss, tuple(w)), key=lambda t: t[0])
    assert result.score <= best[0] + 1e-9
    np.testing.assert_allclose(result.weights, best[1], atol=0.011)


def test_optimize_on_logits_minimises_the_loss_of_softmax_of_the_sum():
    scores, y = _zoo(n=3, seed=6, probabilities=False)
    problem = Problem(scores, metrics.Labels(classes=y), "logloss", False)
    choice = optimize.choose(problem)
    rows = np.arange(len(y))

    def loss(w):
        p = _softmax(sum(wi * s.astype(np.float64) for wi, s in zip(w, scores, strict=True)))
        return -np.mean(np.log(p[rows, y]))

    found = loss(choice.weights)
    for a in range(0, 101, 5):
        for b in range(0, 101 - a, 5):
            assert found <= loss(np.array([a, b, 100 - a - b]) / 100) + 1e-9


def test_stack_fit_equals_scikit_learns_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    scores, y = _zoo(n=3, rows=150, classes=4, seed=7)
    x = np.concatenate([s.astype(np.float64) for s in scores], axis=1)
    for c in (0.1, 10.0):
        coef, intercept = stack.fit(x, y, 4, c, tol=1e-10)
        ref = sklearn.LogisticRegression(C=c, tol=1e-12, max_iter=100_000).fit(x, y)
        np.testing.assert_allclose(coef, ref.coef_.T, atol=2e-4)
        np.testing.assert_allclose(intercept, ref.intercept_ - ref.intercept_.mean(), atol=2e-4)
        np.testing.assert_allclose(_softmax(x @ coef + intercept), ref.predict_proba(x), atol=1e-5)


@pytest.mark.slow
def test_stack_chooses_c_by_held_out_log_loss():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        _check_stack_chooses_c()


def _check_stack_chooses_c():
    scores, y = _zoo(n=3, rows=150, classes=4, seed=8)
    x = np.concatenate([s.astype(np.float64) for s in scores], axis=1)
    folds = stratified_folds(metrics.Labels(classes=y), len(y), 5)
    losses = []
    for c in stack.CANDIDATE_C:
        total = 0.0
        for held in folds:
            train = np.setdiff1d(np.arange(len(y)), held)
            coef, b = stack.fit(x[train], y[train], 4, c)
            p = _softmax(x[held] @ coef + b)
            total -= np.sum(np.log(p[np.arange(len(held)), y[held]]))
        losses.append(total)
    assert stack.choose_c(x, y, 4) == stack.CANDIDATE_C[int(np.argmin(losses))]


def test_folds_are_disjoint_stratified_and_cover_every_row():
    y = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(metrics.Labels(classes=y), len(y), 5)
    joined = np.concatenate(folds)
    assert sorted(joined) == list(range(len(y)))
    assert [np.sum(y[f] == 0) for f in folds] == [2] * 5


def test_temperature_minimises_the_log_loss():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 4, size=300)
    z = 5 * (rng.standard_normal((300, 4)) + 1.2 * np.eye(4)[y])  # over-confident
    t = fit_temperature(z, y)
    rows = np.arange(300)

    def loss(temp):
        return -np.mean(np.log(_softmax(z / temp)[rows, y]))

    grid = np.exp(np.linspace(-3, 3, 2001))
    best = grid[np.argmin([loss(g) for g in grid])]
    assert t == pytest.approx(best, rel=0.01)
    assert t > 1


def test_estimates_are_honest_and_said(tmp_path):
    scores, y = _zoo(n=4, seed=10)
    result = tune_scores(scores, y, method="greedy", rounds=10, names=list("abcd"))
    est = result.estimates
    assert est["folds"] == 5
    assert est["uniform"]["cv"] == pytest.approx(
        np.mean(np.argmax(sum(s.astype(np.float64) for s in scores), axis=1) == y)
    )
    assert [s["name"] for s in est["singles"]] == list("abcd")
    verdicts = {c["against"]: c["verdict"] for c in est["comparisons"]}
    assert set(verdicts) == {est["best_single"], "uniform"}
    assert all(v in ("better", "worse", "within noise", "tie") for v in verdicts.values())
    # the hard vote: majority of top-1 classes, ties to the lowest class
    votes = np.zeros((len(y), 5))
    for s in scores:
        votes[np.arange(len(y)), np.argmax(s, axis=1)] += 1
    assert est["hard_vote_accuracy"] == pytest.approx(np.mean(np.argmax(votes, axis=1) == y))


@pytest.mark.slow
def test_auto_says_what_it_chose_and_why():
    scores, y = _zoo(n=5, seed=11)
    result = tune_scores(scores, y, budget=1e6)  # every candidate, however busy the machine
    assert result.method in ("greedy", "optimize", "stack", "uniform")
    assert result.reason.startswith("auto: the best 5-fold cross-validated accuracy")
    tried = {t["name"] for t in result.estimates["tried"]}
    assert {"greedy", "optimize", "stack"} <= tried
    best = max(result.estimates["tried"] + [result.estimates["uniform"]], key=lambda t: t["cv"])
    assert result.cv == pytest.approx(best["cv"])


def _write(tmp_path, prefix, arrays):
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{prefix}{i}.npy")
        np.save(paths[-1], a)
    return paths


@pytest.mark.parametrize(
    ("method", "calibrate"),
    [("greedy", False), ("optimize", False), ("stack", False), ("greedy", True), ("stack", True)],
)
def test_recipe_tuned_on_validation_applies_to_test(tmp_path, method, calibrate):
    scores, y = _zoo(n=4, rows=300, seed=12, probabilities=not calibrate)
    val = _write(tmp_path, "val", [s[:200] for s in scores])
    test = _write(tmp_path, "test", [s[200:] for s in scores])
    np.save(tmp_path / "y.npy", y[:200])
    recipe_path = tmp_path / "r.json"
    args = ["tune", *map(str, val), "--labels", str(tmp_path / "y.npy"), "--method", method]
    args += ["--save-recipe", str(recipe_path), "--folds", "0", "--json"]
    if calibrate:
        args.append("--calibrate")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    recipe = json.loads(recipe_path.read_text())
    assert recipe["inputs"] == [str(p) for p in val] and recipe["method"] == method
    out = tmp_path / "fused.npy"
    combined = CliRunner().invoke(
        cli, ["combine", *map(str, test), "--recipe", str(recipe_path), "-o", str(out)]
    )
    assert combined.exit_code == 0, combined.stderr
    # the same numbers by hand, from the recipe's parameters
    p = [s[200:].astype(np.float64) for s in scores]
    if calibrate:
        assert recipe["temperatures"] == doc["temperatures"]
        p = [_softmax(z / t) for z, t in zip(p, recipe["temperatures"], strict=True)]
    if method == "stack":
        x = np.concatenate(p, axis=1)
        expected = _softmax(x @ np.array(recipe["coef"]) + np.array(recipe["intercept"]))
    else:
        expected = sum(w * s for w, s in zip(recipe["weights"], p, strict=True))
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-6)
    # and on the validation rows, the recipe scores what tune said
    val_fused = apply_recipe(val, recipe_path, None, labels=tmp_path / "y.npy")
    if not calibrate:
        assert val_fused.accuracy["fused"]["top1"] == pytest.approx(doc["score"])


def test_combine_hard_vote(tmp_path):
    scores, y = _zoo(n=3, seed=13)
    paths = _write(tmp_path, "s", scores)
    out = tmp_path / "votes.npy"
    result = CliRunner().invoke(
        cli, ["combine", *map(str, paths), "--vote", "hard", "--w", "1", "2", "1", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    expected = np.zeros(scores[0].shape)
    for w, s in zip((1, 2, 1), scores, strict=True):
        expected[np.arange(len(s)), np.argmax(s, axis=1)] += w
    np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("nan", 1, "Error: {s1}: holds NaN or infinite values (first in row 3)"),
        ("label", 1, "Error: {y}: holds class 9, but the scores have 5 classes (0 to 4)"),
        ("one", 2, "Error: Expected two or more inputs to tune. Received: 1"),
        ("rows", 1, "Error: Scores must have the same shape to be fused."),
        ("recipe", 1, "Error: {r}: is not a fusecli recipe"),
        ("count", 2, "Error: The recipe fuses 2 inputs"),
        ("plot", 2, "Error: --plot writes a .png file."),
    ],
)
def test_bad_inputs_are_one_error_line(tmp_path, case, code, message):
    scores, y = _zoo(n=2, rows=40, seed=14)
    if case == "nan":
        scores[1][3, 2] = np.nan
    if case == "rows":
        scores[1] = scores[1][:30]
    if case == "label":
        y = y.copy()
        y[5] = 9
    s = _write(tmp_path, "s", scores)
    np.save(tmp_path / "y.npy", y)
    r = tmp_path / "r.json"
    names = {"s1": s[1], "y": tmp_path / "y.npy", "r": r}
    args = ["tune", *map(str, s), "--labels", str(tmp_path / "y.npy"), "--method", "greedy"]
    if case == "one":
        args = ["tune", str(s[0]), "--labels", str(tmp_path / "y.npy")]
    if case == "recipe":
        r.write_text("{not json")
        args = ["combine", *map(str, s), "--recipe", str(r), "-o", str(tmp_path / "f.npy")]
    if case == "count":
        CliRunner().invoke(cli, [*args, "--save-recipe", str(r), "--folds", "0"])
        args = ["combine", str(s[0]), "--recipe", str(r), "-o", str(tmp_path / "f.npy")]
    if case == "plot":
        args += ["--plot", str(tmp_path / "p.jpg")]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.stderr
    assert message.format(**names) in result.stderr
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_calibrate_refuses_probabilities(tmp_path):
    scores, y = _zoo(n=2, seed=15)
    with pytest.raises(FusecliError, match=r"a: --calibrate needs logits"):
        tune_scores(scores, y, calibrate=True, names=["a", "b"])


def test_unknown_parameter_and_method_are_usage_errors():
    scores, y = _zoo(n=2, seed=16)
    with pytest.raises(InvalidRequest, match="Expected method to be one of"):
        tune_scores(scores, y, method="soup")
    with pytest.raises(InvalidRequest, match=r"Expected rounds >= 1. Received: rounds=0"):
        tune_scores(scores, y, method="greedy", rounds=0)
    with pytest.raises(InvalidRequest, match="Unknown tune parameter 'round'"):
        tune(["a.npy", "b.npy"], labels="y.npy", round=3)


def test_recipe_files_are_checked(tmp_path):
    r = tmp_path / "r.json"
    doc = {"format": "fusecli-recipe", "version": 1, "method": "greedy", "inputs": ["a", "b"]}
    r.write_text(json.dumps({**doc, "row_shape": [3], "weights": [0.5]}))
    with pytest.raises(FusecliError, match=r"is a broken recipe \(weights: expected 2 numbers"):
        load_recipe(r)


@pytest.mark.parametrize("n", [2, 5])
def test_plot_draws_a_png(tmp_path, n):
    pytest.importorskip("matplotlib")
    scores, y = _zoo(n=n, seed=17)
    s = _write(tmp_path, "s", scores)
    np.save(tmp_path / "y.npy", y)
    png = tmp_path / "tune.png"
    args = ["tune", *map(str, s), "--labels", str(tmp_path / "y.npy"), "--plot", str(png)]
    result = CliRunner().invoke(cli, [*args, "--method", "greedy", "--folds", "0"])
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    scores, y = _zoo(n=2, seed=18)
    s = _write(tmp_path, "s", scores)
    np.save(tmp_path / "y.npy", y)
    args = ["tune", *map(str, s), "--labels", str(tmp_path / "y.npy"), "--plot", "x.png"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.stderr == "Error: --plot needs matplotlib: pip install 'fusecli[plot]'\n"
