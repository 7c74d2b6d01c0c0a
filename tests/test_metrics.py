"""Metrics on score arrays: pure numpy, checked against direct definitions."""

from __future__ import annotations

import numpy as np
import pytest

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores import metrics


def _topk_by_sort(scores: np.ndarray, classes: np.ndarray, k: int) -> int:
    """Top-k the slow way: a stable sort by descending score."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return int(sum(c in row for c, row in zip(classes, order, strict=True)))


def test_topk_matches_stable_sort_including_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(300, 7)).astype(np.float32)  # many ties
    classes = rng.integers(0, 7, size=300)
    got = metrics.topk_correct(scores, classes, (1, 3, 5))
    assert got.tolist() == [_topk_by_sort(scores, classes, k) for k in (1, 3, 5)]
    assert got[0] == int(np.sum(np.argmax(scores, axis=1) == classes))


def test_topk_on_a_batch_of_weightings():
    rng = np.random.default_rng(1)
    scores = rng.random((4, 50, 6))
    classes = rng.integers(0, 6, size=50)
    got = metrics.topk_correct(scores, classes, (1, 5))
    for g in range(4):
        assert got[g].tolist() == [_topk_by_sort(scores[g], classes, k) for k in (1, 5)]


def test_accuracy_ks():
    assert metrics.accuracy_ks((10, 4)) == (1,)
    assert metrics.accuracy_ks((10, 5)) == (1, 5)
    assert metrics.accuracy_ks((10,)) == (1,)


def test_parse_labels_kinds():
    shape = (4, 3)
    ids = metrics.parse_labels(np.array([0, 2, 1, 2]), shape, source="y")
    assert ids.kind == "classes" and ids.default_metric == "accuracy"
    hot = metrics.parse_labels(np.eye(3, dtype=np.float32)[[0, 2, 1, 2]], shape, source="y")
    np.testing.assert_array_equal(hot.classes, [0, 2, 1, 2])
    targets = metrics.parse_labels(np.full(shape, 0.5), shape, source="y")
    assert targets.kind == "targets" and targets.default_metric == "mse"
    column = metrics.parse_labels(np.arange(4.0), (4, 1), source="y")
    assert column.targets.shape == (4, 1)


@pytest.mark.parametrize(
    ("raw", "shape", "message"),
    [
        (
            np.array([0, 1]),
            (3, 2),
            "y: expected one label per row of the scores (3 rows). Received: 2 labels",
        ),
        (np.array([0, 1, 3]), (3, 3), "y: holds class 3, but the scores have 3 classes (0 to 2)"),
        (np.array([0, -1, 1]), (3, 3), "y: holds class -1, but the scores have 3 classes (0 to 2)"),
        (np.array(["a", "b", "c"]), (3, 3), "y: labels hold values of dtype <U1, not numbers"),
        (np.array([0.0, np.nan, 1.0]), (3,), "y: labels hold NaN or infinite values"),
        (np.array(3), (3,), "y: labels are a single number, expected one per row"),
    ],
)
def test_parse_labels_errors(raw, shape, message):
    with pytest.raises(FusecliError) as e:
        metrics.parse_labels(raw, shape, source="y")
    assert str(e.value) == message


def test_class_labels_refuses_targets():
    with pytest.raises(FusecliError) as e:
        metrics.class_labels(np.array([0.0, 1.0]), (2, 3), source="y")
    assert str(e.value) == (
        "y: class ids must be integers. Received: labels of dtype float64 "
        "(save them with .astype(int))"
    )
    with pytest.raises(FusecliError, match=r"^y: accuracy needs class labels"):
        metrics.class_labels(np.zeros((2, 3)), (2, 3), source="y")


def test_logloss_on_probabilities_and_on_logits():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((20, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes = rng.integers(0, 4, size=20)
    labels = metrics.Labels(classes=classes)
    expected = -np.mean(np.log(probs[np.arange(20), classes]))
    got_p = metrics.evaluate("logloss", probs, labels, probabilities=True)
    got_z = metrics.evaluate("logloss", logits, labels, probabilities=False)
    np.testing.assert_allclose([got_p, got_z], [expected, expected], rtol=1e-12)
    assert metrics.looks_like_probabilities(probs)
    assert not metrics.looks_like_probabilities(logits)


def test_mse_with_class_labels_is_the_brier_score_and_with_targets_plain():
    scores = np.array([[0.7, 0.3], [0.2, 0.8]])
    labels = metrics.Labels(classes=np.array([0, 0]))
    expected = np.mean(np.square(scores - np.array([[1.0, 0.0], [1.0, 0.0]])))
    np.testing.assert_allclose(
        metrics.evaluate("mse", scores, labels, probabilities=True), expected
    )
    targets = metrics.Labels(targets=np.array([[1.0], [2.0]]))
    np.testing.assert_allclose(
        metrics.evaluate("mse", np.array([[1.5], [1.0]]), targets, probabilities=False), 0.625
    )


def test_accuracy_on_targets_is_a_usage_error():
    with pytest.raises(InvalidRequest, match=r"--metric accuracy needs class labels"):
        metrics.evaluate(
            "accuracy",
            np.zeros((2, 1)),
            metrics.Labels(targets=np.zeros((2, 1))),
            probabilities=False,
        )


def test_uint64_labels_beyond_int64_name_the_class():
    raw = np.array([0, 1, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(FusecliError) as e:
        metrics.parse_labels(raw, (3, 4), source="y.npy")
    assert (
        str(e.value)
        == "y.npy: holds class 9223372036854775813, but the scores have 4 classes (0 to 3)"
    )
