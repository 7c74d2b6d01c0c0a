"""`fuse --inputs shared` with input shapes that are compatible but not equal."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import predict, run_cli

from fusecli.fusion.inputs import choose_mode, unify


def conv_model(keras, shape, seed: int, name: str):
    keras.utils.set_random_seed(seed)
    x = keras.Input(shape, name="x")
    h = keras.layers.Conv1D(3, 2, padding="same")(x)
    y = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(x, keras.layers.Dense(2, activation="softmax")(y), name=name)


def test_unify_takes_the_more_specific_shape():
    assert unify((None, None, 1), (None, 4, 1)) == (None, 4, 1)
    assert unify((None, 4, None), (None, None, 3)) == (None, 4, 3)
    assert unify((None, 4, 1), (None, 5, 1)) is None
    assert unify((None, 4), (None, 4, 1)) is None
    sigs = [[("x", (None, None, 1), "float32")], [("x", (None, 4, 1), "float32")]]
    assert choose_mode("shared", sigs, ["a", "b"]) == ("shared", "asked for", [(None, 4, 1)])
    assert choose_mode("auto", sigs, ["a", "b"])[0] == "separate"  # auto wants them equal


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_shared_inputs_of_compatible_shapes_are_fused(keras, tmp_path, suffix):
    var, fix = conv_model(keras, (None, 1), 1, "var"), conv_model(keras, (4, 1), 2, "fix")
    a, b = tmp_path / f"var{suffix}", tmp_path / f"fix{suffix}"
    var.save(a)
    fix.save(b)
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", a, b, "--inputs", "shared", "--w", "0.3", "0.7", "-o", out)
    assert result.returncode == 0, result.stderr
    fused = keras.saving.load_model(out)
    assert tuple(fused.inputs[0].shape) == (None, 4, 1)
    x = np.random.default_rng(0).normal(size=(5, 4, 1)).astype("float32")
    want = 0.3 * predict(var, x)[0] + 0.7 * predict(fix, x)[0]
    assert np.ptp(want) > 0.01
    np.testing.assert_allclose(predict(fused, x)[0], want, rtol=1e-5, atol=1e-6)


def test_incompatible_shapes_are_refused_in_one_line(keras, tmp_path):
    a, b = tmp_path / "four.keras", tmp_path / "five.keras"
    conv_model(keras, (4, 1), 1, "four").save(a)
    conv_model(keras, (5, 1), 2, "five").save(b)
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", a, b, "--inputs", "shared", "-o", out)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "Error: Cannot share inputs: input 0 of 'four' is (None, 4, 1) float32, of 'five' "
        "(None, 5, 1) float32. Use --inputs separate\n"
    )
    assert not out.exists()
