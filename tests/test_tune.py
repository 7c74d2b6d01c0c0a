"""`tune`: the simplex grid, the best weights against an independent exhaustive search, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from fusecli.cli import cli
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.tuning import MAX_GRID_POINTS, simplex_grid, tune, tune_scores


def exhaustive_best(scores, classes, k, metric):
    """The best weights by brute force: every k-composition, scored one by one with numpy.

    Ties: closest to uniform, then the most weight on earlier inputs (as documented).
    """
    n = len(scores)
    rows = np.arange(len(classes))
    candidates = []
    for ks in itertools.product(range(k + 1), repeat=n):
        if sum(ks) != k:
            continue
        fused = sum((c / k) * s.astype(np.float64) for c, s in zip(ks, scores, strict=True))
        if metric == "accuracy":
            value = -np.mean(np.argmax(fused, axis=1) == classes)
        elif metric == "logloss":
            p = np.exp(fused - fused.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            value = -np.mean(np.log(np.clip(p[rows, classes], 1e-15, 1)))
        else:  # mse against one-hot rows
            target = np.eye(fused.shape[1])[classes]
            value = np.mean((fused - target) ** 2)
        spread = sum((n * c - k) ** 2 for c in ks)
        candidates.append((value, spread, tuple(-c for c in ks), ks))
    value, _, _, ks = min(candidates)
    return [c / k for c in ks], abs(value)


@pytest.mark.parametrize(
    ("n", "step", "metric", "seed"),
    [
        (2, 0.1, "accuracy", 0),
        (3, 0.1, "accuracy", 1),
        (3, 0.25, "accuracy", 2),
        (4, 0.2, "accuracy", 3),
        (3, 0.1, "logloss", 4),
        (2, 0.05, "mse", 5),
    ],
)
def test_best_weights_equal_an_exhaustive_grid(n, step, metric, seed):
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 5, size=80)
    # Noisy logits that each know some of the answer, so weights matter.
    scores = [
        (rng.standard_normal((80, 5)) + 1.5 * np.eye(5)[classes] * rng.random((80, 1))).astype(
            np.float32
        )
        for _ in range(n)
    ]
    result = tune_scores(scores, classes, method="grid", step=step, metric=metric)
    weights, value = exhaustive_best(scores, classes, round(1 / step), metric)
    assert result.weights == pytest.approx(weights, abs=1e-12)
    np.testing.assert_allclose(result.score, value, rtol=1e-9)
    assert result.grid_points == math.comb(round(1 / step) + n - 1, n - 1)
    assert result.ranking[0].weights == result.weights


def test_grid_holds_every_point_once_and_the_vertices():
    grid = simplex_grid(3, 0.1)
    assert grid.shape == (66, 3)
    assert (grid.sum(axis=1) == 10).all() and (grid >= 0).all()
    assert len({tuple(r) for r in grid}) == 66
    for vertex in np.eye(3, dtype=int) * 10:
        assert any((grid == vertex).all(axis=1))
    np.testing.assert_array_equal(simplex_grid(2, 0.5), [[2, 0], [1, 1], [0, 2]])


def test_ties_prefer_uniform_then_earlier_inputs():
    rng = np.random.default_rng(0)
    same = rng.random((30, 4))
    classes = rng.integers(0, 4, size=30)
    assert tune_scores([same, same], classes, method="grid").weights == [0.5, 0.5]
    # Uniform (1/3 each) is not on a 0.5 grid: three points are equally close; lexical order wins.
    assert tune_scores([same, same, same], classes, method="grid", step=0.5).weights == [
        0.5,
        0.5,
        0.0,
    ]


def test_singles_are_each_input_alone():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 3, size=40)
    a, b = rng.random((40, 3)), rng.random((40, 3))
    result = tune_scores([a, b], classes, names=["a", "b"])
    assert [c.score for c in result.singles] == [
        np.mean(np.argmax(a, axis=1) == classes),
        np.mean(np.argmax(b, axis=1) == classes),
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": 0.3}, "The step must divide 1 into equal parts"),
        ({"step": 0.01, "n": 6}, "The weight grid for 6 models in steps of 0.01 has 96,560,646"),
        ({"metric": "top5"}, "--metric top5 needs 5 or more classes. Received: 3 classes"),
        ({"n": 1}, "Expected two or more score arrays to tune. Received: 1"),
    ],
)
def test_bad_requests(kwargs, message):
    n = kwargs.pop("n", 2)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        tune_scores([rng.random((5, 3))] * n, np.zeros(5, dtype=int), method="grid", **kwargs)
    assert MAX_GRID_POINTS == 1_000_000


def _write_scores(tmp_path, n=2, rows=60, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=rows)
    paths = []
    for i in range(n):
        s = (rng.random((rows, classes)) + np.eye(classes)[y] * rng.random((rows, 1))).astype(
            np.float32
        )
        np.save(tmp_path / f"s{i}.npy", s)
        paths.append(tmp_path / f"s{i}.npy")
    np.save(tmp_path / "y.npy", y)
    return paths, tmp_path / "y.npy"


def test_cli_json_and_table(tmp_path):
    paths, y = _write_scores(tmp_path)
    runner = CliRunner()
    result = runner.invoke(
        cli, ["tune", *map(str, paths), "--labels", str(y), "--json", "--method", "grid"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    scores = [np.load(p) for p in paths]
    weights, value = exhaustive_best(scores, np.load(y), 10, "accuracy")
    assert doc["weights"] == pytest.approx(weights)
    assert doc["score"] == pytest.approx(value)
    assert [s["name"] for s in doc["singles"]] == [str(p) for p in paths]
    assert "Method: grid (asked for with --method grid)." in result.stderr
    assert f"accuracy: {value:.4f} on the 60 validation rows" in result.stderr

    table = runner.invoke(
        cli, ["tune", *map(str, paths), "--labels", str(y), "--top", "2", "--method", "grid"]
    )
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["rank", str(paths[0]), str(paths[1]), "accuracy"]
    assert lines[1].split()[:3] == ["1", f"{weights[0]:.2f}", f"{weights[1]:.2f}"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "alone", "alone"]
    assert lines[3].split()[1:3] == ["1.00", "0.00"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["{s0}", "{s1}"], 2, "Tuning score arrays needs --labels (or --data holding 'y')"),
        (["{s0}", "{s1}", "--labels", "{y}", "-o", "{tmp}/f.keras"], 2, "-o writes a fused model"),
        (["{s0}", "m.keras", "--labels", "{y}"], 2, "Expected either model files"),
        (
            ["{s0}", "{s1}", "--labels", "{short}"],
            1,
            "Error: {short}: expected one label per row of the scores (60 rows). "
            "Received: 10 labels",
        ),
        (["{s0}", "{s1}", "--labels", "{y}", "--step", "0.3"], 2, "The step must divide 1"),
        (
            ["{s0}", "{s1}", "--labels", "{y}", "--step", "5e-324"],
            2,
            "Error: The step is too small to divide 1 into a grid of weights. "
            "Received: step=5e-324",
        ),
        (
            ["{s0}", "{s1}", "--data", "{y}"],
            2,
            "Error: --data {y} is a .npy file: it holds the inputs, not labels; "
            "pass the labels with --labels",
        ),
    ],
)
def test_cli_errors(tmp_path, args, code, message):
    paths, y = _write_scores(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=int))
    names = {
        "s0": paths[0],
        "s1": paths[1],
        "y": y,
        "tmp": tmp_path,
        "short": tmp_path / "short.npy",
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(cli, ["tune", *(a.format(**names) for a in args)])
    assert result.exit_code == code
    assert message.format(**names) in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tune_models_runs_them_and_writes_the_fused_model(tmp_path, model_files, keras):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    a = keras.saving.load_model(model_files["a"])
    b = keras.saving.load_model(model_files["b"])
    pa, pb = np.asarray(a(x)), np.asarray(b(x))
    # Labels on which neither model alone is best: the argmax of a known mix.
    y = np.argmax(0.3 * pa + 0.7 * pb + 0.02 * rng.standard_normal(pa.shape), axis=1)
    # tune runs the models through other kernels (a compiled graph) than pa, pb, so its scores
    # may differ in the last bits; at every grid point no row is so close to a tie that its
    # argmax, hence the accuracy and the best weights, could depend on them.
    for k in range(11):
        top2 = np.sort(k / 10 * pa + (1 - k / 10) * pb, axis=1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-5
    np.savez(tmp_path / "val.npz", x=x, y=y)
    out = tmp_path / "fused.keras"
    result = tune(
        [model_files["a"], model_files["b"]], data=tmp_path / "val.npz", output=out, method="grid"
    )
    weights, value = exhaustive_best([pa, pb], y, 10, "accuracy")
    assert result.weights == pytest.approx(weights)
    assert result.score == pytest.approx(value)
    fused = keras.saving.load_model(out)
    np.testing.assert_allclose(
        np.asarray(fused(x)), weights[0] * pa + weights[1] * pb, rtol=1e-5, atol=1e-6
    )
    assert result.output == str(out)


def test_tune_at_logits(tmp_path, model_files, keras):
    import inspect

    from fusecli.fusion.fuse import fuse_to_file
    from fusecli.scores.prediction import predict_array

    if "at" not in inspect.signature(fuse_to_file).parameters:
        pytest.skip("needs `fuse --at logits` (fusion.fuse_to_file(..., at=...))")

    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    za = predict_array(model_files["a"], tmp_path / "val.npz", at="logits")
    zb = predict_array(model_files["b"], tmp_path / "val.npz", at="logits")
    y = np.argmax(0.6 * za + 0.4 * zb + 0.05 * rng.standard_normal(za.shape), axis=1)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    out = tmp_path / "fused.keras"
    models = [model_files["a"], model_files["b"]]
    result = tune(
        models, data=tmp_path / "val.npz", at="logits", metric="logloss", output=out, method="grid"
    )
    weights, value = exhaustive_best([za, zb], y, 10, "logloss")  # logloss of softmax(sum)
    assert result.weights == pytest.approx(weights)
    np.testing.assert_allclose(result.score, value, rtol=1e-6)
    assert result.at == "logits" and result.as_dict()["at"] == "logits"
    fused = np.asarray(keras.saving.load_model(out)(x))
    z = weights[0] * za + weights[1] * zb
    expected = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(fused, expected / expected.sum(1, keepdims=True), atol=1e-5)
    with pytest.raises(InvalidRequest, match=r"--at logits runs models up to their logits"):
        tune([tmp_path / "a.npy", tmp_path / "b.npy"], labels=tmp_path / "y.npy", at="logits")


def test_cli_refuses_stdin_on_a_terminal(tmp_path, monkeypatch):
    import sys

    import fusecli.cli.streams as streams

    paths, y = _write_scores(tmp_path)
    monkeypatch.setattr(streams, "is_tty", lambda stream: stream is sys.stdin)
    result = CliRunner().invoke(cli, ["tune", "-", str(paths[1]), "--labels", str(y)])
    assert result.exit_code == 2
    assert "stdin ('-') is a terminal; pipe or redirect a .npy array into it" in result.stderr


def test_zero_rows_are_refused(tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(0, dtype=int))
    args = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--labels", str(tmp_path / "y.npy")]
    result = CliRunner().invoke(cli, ["tune", *args])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: Expected scores with at least one row to tune on. "
        f"Received: {tmp_path / 'a.npy'} has shape (0, 3)\n"
    )


@pytest.mark.parametrize(("step", "shown"), [(0.125, "0.375"), (0.0625, "0.3125"), (0.25, "0.25")])
def test_table_shows_weights_finer_than_hundredths(tmp_path, step, shown):
    paths, y = _write_scores(tmp_path)
    args = ["tune", *map(str, paths), "--labels", str(y), "--step", str(step), "--top", "100"]
    args += ["--method", "grid"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    weights = [line.split()[1] for line in result.stdout.splitlines()[1:]]
    assert shown in weights
    k = round(1 / step)
    assert sorted(set(weights)) == sorted({f"{j / k:.{len(shown) - 2}f}" for j in range(k + 1)})


def test_non_finite_metric_values_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.random((6, 3)) * 1e200)
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    args = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--labels", str(tmp_path / "y.npy")]
    result = CliRunner().invoke(cli, ["tune", *args, "--metric", "mse", "--json"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: The mse of the fused scores overflows to a non-finite value; the scores are "
        "too large (up to "
    )
    assert result.stderr.endswith(" in absolute value): rescale them\n")
    assert result.stdout == ""
    with pytest.raises(FusecliError, match=r"b: holds NaN or infinite values \(first in row 2\)"):
        bad = np.zeros((4, 3))
        bad[2, 1] = np.inf
        tune_scores([np.zeros((4, 3)), bad], np.zeros(4, dtype=int), names=["a", "b"])


@pytest.mark.parametrize(
    ("seed", "shape", "metric"),
    [(1, (103, 7), "mse"), (4, (60, 4), "mse"), (1, (60, 4), "logloss"), (3, (103, 7), "logloss")],
)
def test_identical_inputs_tie_exactly_and_uniform_wins(seed, shape, metric):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    classes = rng.integers(0, shape[1], size=shape[0])
    result = tune_scores([a, a], classes, method="grid", metric=metric)
    assert result.weights == [0.5, 0.5]


def test_scores_and_labels_from_named_pipes(tmp_path):
    import io
    import os
    import threading

    paths, y = _write_scores(tmp_path)

    def fifo(name, array):
        path = tmp_path / name
        os.mkfifo(path)
        buffer = io.BytesIO()
        np.save(buffer, array)

        def feed() -> None:
            with open(path, "wb") as f:
                f.write(buffer.getvalue())

        threading.Thread(target=feed, daemon=True).start()
        return path

    expected = tune_scores([np.load(p) for p in paths], np.load(y), names=["a", "b"], method="grid")
    pipes = [fifo("s0", np.load(paths[0])), paths[1], "--labels", fifo("y", np.load(y))]
    result = CliRunner().invoke(cli, ["tune", *map(str, pipes), "--json", "--method", "grid"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["weights"] == expected.weights
