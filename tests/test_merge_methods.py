"""The merge methods as pure numpy functions, and their option checks (no model, no file)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fusecli.errors import InvalidRequest
from fusecli.merging.methods import (
    METHODS,
    all_parameters,
    methods_table,
    parameters_table,
    plan_merge,
)
from fusecli.merging.methods.linear import linear
from fusecli.merging.methods.parameters import interpolate
from fusecli.merging.methods.slerp import slerp
from fusecli.merging.methods.task_arithmetic import task_arithmetic


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit's `slerp` (merge_methods/slerp.py), transcribed for numpy arrays."""
    v0_copy, v1_copy = np.copy(v0), np.copy(v1)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    v0 = v0 / n0 if n0 > eps else v0
    v1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(v0 * v1)
    if np.abs(dot) > dot_threshold:
        return (1 - t) * v0_copy + t * v1_copy
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return s0 * v0_copy + s1 * v1_copy


def test_registry_names():
    assert tuple(METHODS) == (
        "linear",
        "slerp",
        "task-arithmetic",
        "ties",
        "dare-linear",
        "dare-ties",
        "breadcrumbs",
        "model-stock",
    )


def test_linear_is_the_weighted_sum():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((3, 4)).astype("float32") for _ in range(3)]
    got = linear(iter(xs), (0.5, 0.3, 0.2))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 0.5 * xs[0] + 0.3 * xs[1] + 0.2 * xs[2], rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_mergekit(t):
    rng = np.random.default_rng(1)
    v0, v1 = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    np.testing.assert_allclose(slerp(t, v0, v1), mergekit_slerp(t, v0, v1), rtol=1e-12)


def test_slerp_on_orthogonal_unit_vectors_stays_on_the_circle():
    got = slerp(0.5, np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    np.testing.assert_allclose(got, [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-12)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-12


def test_slerp_falls_back_to_linear_for_nearly_parallel_tensors():
    v0 = np.array([1.0, 2.0, 3.0])
    v1 = 3.0 * v0 + np.array([0.0, 1e-3, 0.0])  # cosine > 0.9995
    np.testing.assert_allclose(slerp(0.25, v0, v1), 0.75 * v0 + 0.25 * v1, rtol=1e-12)
    # antiparallel: |dot| > 0.9995 too
    np.testing.assert_allclose(slerp(0.5, v0, -v0), 0.0 * v0, atol=1e-12)


def test_slerp_of_zero_tensors_is_zero():
    z = np.zeros(4)
    np.testing.assert_array_equal(slerp(0.3, z, z), z)
    np.testing.assert_allclose(slerp(0.3, z, np.ones(4)), mergekit_slerp(0.3, z, np.ones(4)))


def test_task_arithmetic():
    rng = np.random.default_rng(2)
    base, a, b = (rng.standard_normal(6) for _ in range(3))
    got = task_arithmetic(base, iter([a, b]), (0.7, 0.4))
    np.testing.assert_allclose(got, base + 0.7 * (a - base) + 0.4 * (b - base), rtol=1e-12)


def test_plan_defaults():
    assert plan_merge("linear", 4).weights == (0.25, 0.25, 0.25, 0.25)
    assert plan_merge("linear", 2, weights=(3, 1)).weights == (0.75, 0.25)
    assert plan_merge("linear", 2, weights=(3, 1), normalize=False).weights == (3.0, 1.0)
    ta = plan_merge("task-arithmetic", 2, has_base=True)
    assert (ta.weights, ta.normalize, ta.needs_base) == ((1.0, 1.0), False, True)
    assert plan_merge("slerp", 2, t=0.5).t == 0.5
    ties = plan_merge("ties", 3, has_base=True, density="0.2,0.8", lambda_=0.9)
    assert ties.settings == {
        "weights": (1.0, 1.0, 1.0),
        "density": (0.2, 0.8),
        "normalize": True,
        "lambda": 0.9,
    }
    assert plan_merge("dare-ties", 2, has_base=True).seed == 0


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("slerp", {"n_models": 3, "t": 0.5}, "slerp merges exactly two models. Received: 3 models"),
        (
            "slerp",
            {"n_models": 2},
            "slerp needs --t (in [0, 1])",
        ),
        ("slerp", {"n_models": 2, "t": 1.5}, "--t must be in [0, 1]. Received: t=1.5"),
        (
            "slerp",
            {"n_models": 2, "t": 0.5, "weights": (1, 2)},
            "slerp takes no weights (it takes --t). Received: weights=1,2",
        ),
        (
            "task-arithmetic",
            {"n_models": 2},
            "task-arithmetic needs the model the others were fine-tuned from: --base",
        ),
        ("ties", {"n_models": 2}, "ties needs the model the others were fine-tuned from: --base"),
        (
            "linear",
            {"n_models": 2, "weights": (1.0,)},
            "Expected one weight per model (2 models). Received: weights=1",
        ),
        ("linear", {"n_models": 1}, "linear merges two or more models. Received: 1 model"),
        (
            "linear",
            {"n_models": 2, "t": 0.2},
            "--t is not a parameter of linear (it takes --w, --normalize). Received: t=0.2",
        ),
        (
            "linear",
            {"n_models": 2, "has_base": True},
            "linear takes no --base (it takes --w, --normalize)",
        ),
        (
            "ties",
            {"n_models": 2, "has_base": True, "density": 0.0},
            "--density must be in (0, 1]. Received: density=0",
        ),
        (
            "ties",
            {"n_models": 2, "has_base": True, "density": "0.5,1.5"},
            "--density must be in (0, 1]. Received: density=1.5",
        ),
        (
            "dare-ties",
            {"n_models": 2, "has_base": True, "seed": "1,2"},
            "--seed takes one value for dare-ties, not a list. Received: seed=1,2",
        ),
        (
            "breadcrumbs",
            {"n_models": 2, "has_base": True, "gamma": 1.0},
            "--gamma must be in [0, 1). Received: gamma=1",
        ),
        (
            "model-stock",
            {"n_models": 2, "has_base": True, "weights": (1, 1)},
            "model-stock takes no weights (it takes --filter-wise). Received: weights=1,1",
        ),
        (
            "model-stock",
            {"n_models": 1, "has_base": True},
            "model-stock merges two or more models. Received: 1 model",
        ),
        (
            "ties",
            {"n_models": 2, "has_base": True, "overrides": ["conv*density=0.3"]},
            "--set takes PATTERN:NAME=VALUE (e.g. 'conv*:density=0.3'). "
            "Received: 'conv*density=0.3'",
        ),
        (
            "ties",
            {"n_models": 2, "has_base": True, "overrides": ["conv*:t=0.3"]},
            "--set 'conv*:t=0.3': t is not a parameter of ties (it takes --w, --density, "
            "--normalize, --lambda)",
        ),
        (
            "dare-ties",
            {"n_models": 2, "has_base": True, "overrides": ["conv*:seed=3"]},
            "--set conv*:seed=...: --seed is one value for the whole model, not per layer",
        ),
        (
            "ties",
            {"n_models": 2, "has_base": True, "overrides": ["conv*:density=2"]},
            "--density must be in (0, 1]. Received: density=2",
        ),
        (
            "ties",
            {"n_models": 2},
            "ties needs the model the others were fine-tuned from: --base",
        ),
        (
            "soup",
            {"n_models": 2},
            "Expected method to be one of ('linear', 'slerp', 'task-arithmetic', 'ties', "
            "'dare-linear', 'dare-ties', 'breadcrumbs', 'model-stock'). Received: method='soup'",
        ),
    ],
)
def test_plan_refusals(method, kwargs, message):
    n = kwargs.pop("n_models")
    with pytest.raises(InvalidRequest) as e:
        plan_merge(method, n, **kwargs)
    assert str(e.value) == message


def test_every_parameter_is_declared_once_with_one_type():
    names = [p.name for p in all_parameters()]
    assert len(names) == len(set(names))
    assert {"weights", "t", "density", "gamma", "lambda", "seed", "normalize"} <= set(names)


def test_gradients_interpolate_as_mergekit():
    # mergekit's evaluate_setting: t * (len - 1), linear between neighbours.
    assert interpolate((0.2, 0.8), 0.0) == 0.2
    assert interpolate((0.2, 0.8), 1.0) == 0.8
    assert interpolate((0.2, 0.5, 0.8), 0.25) == pytest.approx(0.35)
    assert interpolate((0.0, 1.0, 0.0), 0.5) == 1.0
    assert interpolate(0.3, 0.7) == 0.3


def test_the_docs_tables_are_the_declarations():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "merge.md").read_text()
    assert methods_table() in docs
    assert parameters_table() in docs
