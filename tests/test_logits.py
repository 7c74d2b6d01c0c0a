"""`fuse --at logits`: out = softmax(sum w_i z_i), z_i the models' outputs before their softmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import predict

from fusecli.cli import cli
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.fusion.fuse import fuse, fuse_to_file


def _softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _body(keras, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,))
    return x, keras.layers.Dense(8, activation="relu")(x)


@pytest.fixture(scope="module")
def ends(tmp_path_factory, keras):
    """Three ways to end in a softmax, each with its logits model for reference."""
    d = tmp_path_factory.mktemp("logits")
    files, logit_models = {}, {}

    x, h = _body(keras, 1)  # the last layer's own activation
    dense = keras.layers.Dense(3, activation="softmax")
    files["dense"] = d / "dense.keras"
    keras.Model(x, dense(h)).save(files["dense"])
    twin = keras.layers.Dense(3)
    logit_models["dense"] = keras.Model(x, twin(h))
    twin.set_weights(dense.get_weights())

    x, h = _body(keras, 2)  # a trailing Softmax layer
    z = keras.layers.Dense(3)(h)
    files["softmax_layer"] = d / "softmax_layer.h5"
    keras.Model(x, keras.layers.Softmax()(z)).save(files["softmax_layer"])
    logit_models["softmax_layer"] = keras.Model(x, z)

    x, h = _body(keras, 3)  # Activation("softmax"), in a Sequential model
    seq = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Activation("softmax")]
    )
    files["activation"] = d / "activation.keras"
    seq.save(files["activation"])
    logit_models["activation"] = keras.Model(seq.inputs, seq.layers[0].output)

    x, h = _body(keras, 4)  # no softmax at all
    files["linear"] = d / "linear.keras"
    keras.Model(x, keras.layers.Dense(3, name="scores")(h)).save(files["linear"])
    return files, logit_models


@pytest.fixture(scope="module")
def x4():
    return np.random.default_rng(5).standard_normal((6, 4)).astype("float32") * 3


def test_the_reference_logits_are_right(keras, ends, x4):
    files, logit_models = ends
    for key in ("dense", "softmax_layer", "activation"):
        probs = predict(keras.models.load_model(files[key]), x4)[0]
        np.testing.assert_allclose(_softmax(predict(logit_models[key], x4)[0]), probs, atol=1e-6)


@pytest.mark.parametrize(
    ("a", "b"), [("dense", "softmax_layer"), ("softmax_layer", "activation"), ("dense", "dense")]
)
def test_fused_at_logits(tmp_path, keras, ends, x4, a, b):
    files, logit_models = ends
    out = tmp_path / "f.h5"
    report = fuse_to_file([files[a], files[b]], out, [1.0, 1.5], at="logits", normalize=False)
    assert report.formula == "softmax(sum(w_i * logits_i(x)))"
    z = 1.0 * predict(logit_models[a], x4)[0] + 1.5 * predict(logit_models[b], x4)[0]
    fused = keras.models.load_model(out)
    got = predict(fused, x4)[0]
    np.testing.assert_allclose(got, _softmax(z), rtol=1e-5, atol=1e-6)
    # ... which is not what adding the probabilities gives.
    probs = [predict(keras.models.load_model(files[k]), x4)[0] for k in (a, b)]
    assert np.abs(got - (probs[0] + 1.5 * probs[1]) / 2.5).max() > 1e-3
    assert fused.layers[-1].__class__.__name__ == "Softmax" and fused.layers[-1].name == "fused"


def test_logits_without_activation(keras, ends, x4):
    files, logit_models = ends
    fused = fuse([files["dense"], files["activation"]], [0.5, 0.5], at="logits", activation="none")
    expected = (
        0.5 * predict(logit_models["dense"], x4)[0]
        + 0.5 * predict(logit_models["activation"], x4)[0]
    )
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-5, atol=1e-6)


def test_softmax_after_output_fusion(keras, ends, x4):
    files, _ = ends
    fused = fuse([files["linear"], files["linear"]], [0.5, 0.5], activation="softmax")
    scores = predict(keras.models.load_model(files["linear"]), x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], _softmax(scores), rtol=1e-5, atol=1e-6)


def test_a_model_without_softmax_is_refused(tmp_path, ends):
    files, _ = ends
    with pytest.raises(FusecliError) as e:
        fuse_to_file([files["dense"], files["linear"]], tmp_path / "f.keras", at="logits")
    assert str(e.value).startswith(
        "Model 'linear' has no final softmax to fuse before: output 0 comes from layer 'scores' "
        "(Dense, activation 'linear')."
    )
    assert list(tmp_path.iterdir()) == []


def test_unknown_at_and_activation(tmp_path, ends):
    files, _ = ends
    with pytest.raises(InvalidRequest, match="Expected at to be one of"):
        fuse_to_file([files["dense"], files["dense"]], tmp_path / "f.keras", at="middle")
    with pytest.raises(InvalidRequest, match="Expected activation to be one of"):
        fuse_to_file([files["dense"], files["dense"]], tmp_path / "f.keras", activation="relu")


def test_cli_at_logits(tmp_path, keras, ends, x4):
    files, logit_models = ends
    out = tmp_path / "f.h5"
    args = ["fuse", files["dense"], files["softmax_layer"], "--w", "1", "1.5", "--at", "logits"]
    args += ["--no-normalize"]  # the logits' sum, as I3D adds them
    result = CliRunner().invoke(cli, [*map(str, args), "-o", str(out), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["at"], report["activation"]) == ("logits", "softmax")
    assert "largest difference from softmax(sum(w_i * logits_i(x)))" in result.stderr
    z = predict(logit_models["dense"], x4)[0] + 1.5 * predict(logit_models["softmax_layer"], x4)[0]
    got = predict(keras.models.load_model(out), x4)[0]
    np.testing.assert_allclose(got, _softmax(z), rtol=1e-5, atol=1e-6)


def test_cli_refusal_is_one_line(tmp_path, ends):
    files, _ = ends
    args = ["fuse", files["dense"], files["linear"], "--at", "logits", "-o", tmp_path / "f.keras"]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Model 'linear' has no final softmax")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_softmax_axis_1_of_a_matrix_is_its_last_axis(tmp_path, keras, ends, x4, suffix):
    # Softmax(axis=1) on (batch, classes) works over the same axis as axis=-1: the two fuse.
    files, logit_models = ends
    x, h = _body(keras, 6)
    z = keras.layers.Dense(3)(h)
    axis1 = tmp_path / f"axis1{suffix}"
    keras.Model(x, keras.layers.Softmax(axis=1)(z)).save(axis1)
    out = tmp_path / f"f{suffix}"
    fuse_to_file([axis1, files["dense"]], out, [1.0, 1.5], at="logits", normalize=False)
    expected = predict(keras.Model(x, z), x4)[0] + 1.5 * predict(logit_models["dense"], x4)[0]
    got = predict(keras.models.load_model(out), x4)[0]
    np.testing.assert_allclose(got, _softmax(expected), rtol=1e-5, atol=1e-6)
