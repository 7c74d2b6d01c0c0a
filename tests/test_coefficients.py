"""Weights: parsing, checking, and the CLI's variadic --w (pure Python, no Keras)."""

from __future__ import annotations

import math

import pytest

from fusecli.cli.common import join_weight_values
from fusecli.coefficients import parse_weights, resolve_weights
from fusecli.errors import InvalidRequest


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.8,0.2", (0.8, 0.2)), ("0.8 0.2", (0.8, 0.2)), ("1", (1.0,)), ("-1e-3,2", (-0.001, 2.0))],
)
def test_parse_weights(text, expected):
    assert parse_weights(text) == expected


@pytest.mark.parametrize("text", ["", " , ", "a,b", "0.8,x"])
def test_parse_weights_rejects_non_numbers(text):
    with pytest.raises(InvalidRequest):
        parse_weights(text)


def test_default_weights_are_equal():
    assert resolve_weights(None, 4) == (0.25, 0.25, 0.25, 0.25)


def test_normalize_rescales_to_sum_one():
    w = resolve_weights([2, 6], 2, normalize=True)
    assert w == (0.25, 0.75)
    assert math.fsum(w) == 1.0


def test_weights_are_kept_as_given_without_normalize():
    assert resolve_weights([1, 1.5], 2) == (1.0, 1.5)


def test_wrong_count_names_both():
    with pytest.raises(InvalidRequest) as e:
        resolve_weights([0.8], 2)
    assert str(e.value) == "Expected one weight per model (2 models). Received: weights=(0.8,)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_refused(bad):
    with pytest.raises(InvalidRequest, match="finite"):
        resolve_weights([0.5, bad], 2)


def test_normalizing_zero_sum_refused():
    with pytest.raises(InvalidRequest, match="sum to 0"):
        resolve_weights([1, -1], 2, normalize=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["a", "b", "--w", "0.8", "0.2"], ["a", "b", "--w", "0.8,0.2"]),
        (["--w", "0.8", "0.2", "a", "b"], ["--w", "0.8,0.2", "a", "b"]),
        (["--w", "0.8,0.2", "a", "b"], ["--w", "0.8,0.2", "a", "b"]),
        (["a", "--w", "-1", "2", "-o", "x.keras"], ["a", "--w", "-1,2", "-o", "x.keras"]),
        (["a", "--weights", "1", "b"], ["a", "--weights", "1", "b"]),
        (["--", "--w", "1"], ["--", "--w", "1"]),
    ],
)
def test_join_weight_values(argv, expected):
    assert join_weight_values(argv) == expected


def test_normalizing_an_overflowing_sum_refused():
    with pytest.raises(InvalidRequest) as e:
        resolve_weights([1e308, 1e308], 2, normalize=True)
    assert str(e.value) == (
        "Cannot normalize weights whose sum overflows. Received: weights=(1e+308, 1e+308)"
    )


def test_cli_normalizing_an_overflowing_sum_is_a_usage_error(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from fusecli.cli import cli

    np.save(tmp_path / "a.npy", np.ones((2, 2)))
    a = str(tmp_path / "a.npy")
    args = ["combine", a, a, "--w", "1e308", "1e308", "--normalize", "-o", str(tmp_path / "x.npy")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "Cannot normalize weights whose sum overflows" in result.stderr
    assert "Traceback" not in result.output
