"""Keras 2 era .h5 files: loaded into Keras 3 they compute what tf-keras (Keras 2) computed.

The files and tf-keras' own outputs are made once per session by
tests/legacy_fixtures/make_keras2_h5.py in a subprocess (tf-keras and Keras 3 stay in separate
processes); see that script for what each model holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import predict, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras2support import MARKER, expected, keras2_reference_dir

from fusecli.cli import cli
from fusecli.errors import ModelFileError, UnsafeModelError
from fusecli.formats import keras2
from fusecli.safety.loading import load_model

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

# name -> what it covers (all compared against tf-keras' outputs)
CONVERTED = {
    "gru": "GRU: time_major, implementation=1, reset_after both ways, go_backwards; input_shape",
    "gru_old": "the same file with no InputLayer in its config, as Keras <= 2.3 wrote it",
    "lstm": "LSTM: time_major, implementation=1, unit_forget_bias; batch_input_shape; Dropout",
    "conv": "Conv2D, DepthwiseConv2D(groups), SeparableConv2D, BatchNormalization, pooling",
    "conv1d": "Embedding(input_length), Conv1D, MaxPooling1D, GlobalAveragePooling1D",
    "masked": "Embedding(mask_zero) -> Bidirectional(LSTM) -> GRU: the mask carries through",
    "multi_io": "two inputs, two outputs, nested Model and nested Sequential with frozen BN",
    "siamese": "a nested Sequential shared by two calls, nested models as outputs, "
    "TimeDistributed, SimpleRNN",
    "transfer": "a frozen functional base with BatchNormalization inside a Sequential",
    "hard_sigmoid": "Keras 2's hard_sigmoid in LSTM, GRU, Dense, and ConvLSTM2D's default",
    "seq2seq": "encoder states as a decoder's initial_state, Attention, MultiHeadAttention",
    "assorted": "Normalization, LeakyReLU(alpha), PReLU, SpatialDropout1D, DepthwiseConv1D, "
    "SeparableConv1D, Conv1DTranspose, RNN([GRUCell, LSTMCell]), Rescaling",
    "volumes": "Conv3D, MaxPooling3D, a stateful GRU",
    "mixed_precision": "a layer whose dtype is a mixed_float16 Policy dict",
}


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory) -> Path:
    """Keras 2 .h5 files and tf-keras' outputs on fixed inputs, written by tf-keras itself."""
    return keras2_reference_dir(tmp_path_factory)


def copy_with_config(src: Path, dst: Path, edit) -> Path:
    """Copy a model file and change its model_config with `edit(config)`."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        edit(config)
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
    return dst


# -- numbers: Keras 3 computes what Keras 2 computed ---------------------------------------------


@pytest.mark.parametrize("name", list(CONVERTED))
def test_loaded_model_computes_what_tf_keras_computed(keras2_dir, name):
    model = load_model(keras2_dir / f"{name}.h5")
    xs, ys = expected(keras2_dir, name)
    got = predict(model, xs if len(xs) > 1 else xs[0])
    assert len(got) == len(ys)
    tolerance = 1e-3 if name == "mixed_precision" else 1e-5
    for g, y in zip(got, ys, strict=True):
        np.testing.assert_allclose(g, y, rtol=tolerance, atol=tolerance)


def test_gru_without_reset_after_is_read_as_keras_2_1_wrote_it(keras2_dir, tmp_path):
    # Keras <= 2.1 had no reset_after (its GRU is reset_after=False); Keras 3 defaults to True.
    def edit(config):
        gru = config["config"]["layers"][2]["config"]
        assert gru["reset_after"] is False
        del gru["reset_after"], gru["time_major"]

    path = copy_with_config(keras2_dir / "gru.h5", tmp_path / "gru21.h5", edit)
    (x,), (y,) = expected(keras2_dir, "gru")
    np.testing.assert_allclose(predict(load_model(path), x)[0], y, rtol=1e-5, atol=1e-6)


def test_weights_are_not_left_at_their_initial_values(keras2_dir):
    # The generator gave every weight random values; equal outputs alone could hide a
    # BatchNormalization left at mean 0 / variance 1 if its input happened to be small.
    model = load_model(keras2_dir / "conv.h5")
    bn = next(layer for layer in model.layers if type(layer).__name__ == "BatchNormalization")
    with h5py.File(keras2_dir / "conv.h5", "r") as f:
        group = f["model_weights"][bn.name][bn.name]
        saved_variance = np.asarray(group["moving_variance:0"])
    np.testing.assert_array_equal(np.asarray(bn.moving_variance), saved_variance)


def test_keras2_files_are_recognised_and_keras3_files_are_not(keras2_dir, model_files):
    assert keras2.is_keras2_h5(keras2_dir / "gru.h5")
    assert not keras2.is_keras2_h5(model_files["a_h5"])  # written by Keras 3
    assert not keras2.is_keras2_h5(model_files["a"])  # .keras


def test_keras3_h5_still_loads_through_keras_itself(model_files, keras):
    model = load_model(model_files["a_h5"])
    reference = keras.saving.load_model(model_files["a_h5"], compile=False)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype("float32")
    np.testing.assert_allclose(predict(model, x)[0], predict(reference, x)[0], rtol=1e-6)


# -- the config rewrite ------------------------------------------------------------------------


def test_convert_config_rewrites_a_copy(keras2_dir):
    with h5py.File(keras2_dir / "gru_old.h5", "r") as f:
        original = json.loads(f.attrs["model_config"])
    before = json.dumps(original)
    converted = keras2.convert_config(original)
    assert json.dumps(original) == before
    layers = converted["config"]["layers"]
    assert layers[0] == {
        "class_name": "InputLayer",
        "config": {"batch_shape": [None, 6, 4], "dtype": "float32", "name": "gru_input"},
    }
    assert "time_major" not in layers[1]["config"]
    assert "batch_input_shape" not in layers[1]["config"]
    assert layers[1]["config"]["implementation"] == 1  # Keras 3 still takes this one


def test_convert_config_renumbers_calls_of_nested_models(keras2_dir):
    with h5py.File(keras2_dir / "siamese.h5", "r") as f:
        original = json.loads(f.attrs["model_config"])
    converted = keras2.convert_config(original)
    # Keras 2 numbers the two calls of the shared encoder 1 and 2, Keras 3 numbers them 0 and 1;
    # for outputs Keras 3 shifts Functional models itself but not Sequential ones.
    assert original["config"]["output_layers"] == [["head", 1, 0], ["encoder", 2, 0]]
    assert converted["config"]["output_layers"] == [["head", 1, 0], ["encoder", 1, 0]]
    subtract = next(s for s in converted["config"]["layers"] if s["class_name"] == "Subtract")
    assert subtract["inbound_nodes"] == [[["encoder", 0, 0, {}], ["encoder", 1, 0, {}]]]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


def _nodes(data, path=()):
    """Every (path, value) inside a JSON tree."""
    yield path, data
    items = (
        data.items()
        if isinstance(data, dict)
        else enumerate(data)
        if isinstance(data, list)
        else ()
    )
    for key, value in items:
        yield from _nodes(value, (*path, key))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_convert_config_raises_only_model_file_errors_on_mutated_configs(keras2_dir, data):
    name = data.draw(
        st.sampled_from(
            [
                "gru_old",
                "multi_io",
                "seq2seq",
                "siamese",
                "s2s_states",
                "merge_masks",
                "mask_wrappers",
            ]
        )
    )
    with h5py.File(keras2_dir / f"{name}.h5", "r") as f:
        config = json.loads(f.attrs["model_config"])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p, _ in _nodes(config) if p]
        if not paths:  # everything deleted already
            break
        path = data.draw(st.sampled_from(paths))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    try:
        converted = keras2.convert_config(config, "m.h5")
    except ModelFileError as e:
        assert str(e).startswith("m.h5: ")
    else:
        assert isinstance(converted, dict)


# -- what cannot be converted: one clear error naming the file and the layer ---------------------


def test_time_major_true_is_refused_with_the_layer_named(keras2_dir, tmp_path):
    def edit(config):
        config["config"]["layers"][1]["config"]["time_major"] = True

    path = copy_with_config(keras2_dir / "gru.h5", tmp_path / "tm.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: cannot convert Keras 2 layer 'gru' (GRU): time_major=True has no Keras 3 "
        "equivalent (only time_major=False does)"
    )


def test_unknown_argument_is_reported_with_keras_reason_and_the_layer(keras2_dir, tmp_path):
    def edit(config):
        config["config"]["layers"][-1]["config"]["flux"] = 3

    path = copy_with_config(keras2_dir / "gru.h5", tmp_path / "flux.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: cannot convert Keras 2 layer 'dense' (Dense): Unrecognized keyword arguments "
        "passed to Dense: {'flux': 3}"
    )


def test_unknown_layer_class_is_named(keras2_dir, tmp_path):
    def edit(config):
        config["config"]["layers"][-1]["class_name"] = "MyAttention"

    path = copy_with_config(keras2_dir / "gru.h5", tmp_path / "custom.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: cannot convert Keras 2 layer 'dense' (MyAttention): Keras 3 has no layer of "
        "this name; if it is a custom layer, its Python code must be imported and registered "
        "with keras.saving.register_keras_serializable"
    )


def test_nested_layer_is_named_by_its_path(keras2_dir, tmp_path):
    def edit(config):
        tower = next(s for s in config["config"]["layers"] if s["name"] == "vector_tower")
        tower["config"]["layers"][2]["config"]["axis"] = [1, 2]

    path = copy_with_config(keras2_dir / "multi_io.h5", tmp_path / "axes.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: cannot convert Keras 2 layer 'vector_tower/batch_normalization_2' "
        "(BatchNormalization): axis=[1, 2] (several axes) is not supported"
    )


def test_hard_sigmoid_that_cannot_be_matched_is_refused(keras2_dir, tmp_path):
    def edit(config):
        config["config"]["layers"][3]["config"]["activation"] = "hard_sigmoid"

    path = copy_with_config(keras2_dir / "hard_sigmoid.h5", tmp_path / "lstm_hs.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == (
        f"{path}: cannot convert Keras 2 layer 'old_lstm' (LSTM): activation='hard_sigmoid' is "
        "clip(0.2x + 0.5) in Keras 2 but clip(x/6 + 0.5) in Keras 3, and this layer's weights "
        "cannot be rescaled to make up for it"
    )


def test_tf_op_layer_is_converted_and_an_unknown_tf_function_refused(keras2_dir, tmp_path):
    path = keras2_dir / "tf_op.h5"  # x * 2.0: tests/test_keras2_ops.py covers the rest
    xs, ys = expected(keras2_dir, "tf_op")
    np.testing.assert_allclose(predict(load_model(path), xs)[0], ys[0], rtol=1e-5, atol=1e-6)
    bad = unknown_tf_function(keras2_dir, tmp_path)
    with pytest.raises(UnsafeModelError) as info:  # the scan refuses it first
        load_model(bad)
    assert (
        "'with_tf_op/tf.math.multiply' is a TFOpLambda layer, which calls the TensorFlow "
        "function tf.linalg.l2_normalize named in the file" in str(info.value)
    )
    with pytest.raises(ModelFileError) as info:  # trusted, it still cannot be converted
        load_model(bad, trust=True)
    assert str(info.value).startswith(
        f"{bad}: cannot convert Keras 2 layer 'tf.math.multiply' (TFOpLambda): "
        "tf.linalg.l2_normalize has no Keras 3 equivalent fusecli converts"
    )


def unknown_tf_function(keras2_dir: Path, tmp_path: Path) -> Path:
    """tf_op.h5 with its TFOpLambda calling a function fusecli does not convert."""

    def edit(config):
        for spec in config["config"]["layers"]:
            if spec["class_name"] == "TFOpLambda":
                spec["config"]["function"] = "linalg.l2_normalize"

    return copy_with_config(keras2_dir / "tf_op.h5", tmp_path / "l2.h5", edit)


def test_weights_that_do_not_fit_are_reported(keras2_dir, tmp_path):
    def edit(config):
        config["config"]["layers"][-1]["config"]["units"] = 4

    path = copy_with_config(keras2_dir / "gru.h5", tmp_path / "units.h5", edit)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value).startswith(
        f"{path}: its weights do not fit the converted model: Shape mismatch in layer #2 "
    )


# -- safety: a Lambda's bytecode never runs unless trusted ---------------------------------------


def test_lambda_bytecode_is_refused_and_never_runs(keras2_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER, str(marker))
    path = keras2_dir / "lambda_code.h5"
    with pytest.raises(UnsafeModelError) as info:
        load_model(path)
    assert str(info.value) == (  # the scan's words: it refuses the file before any conversion
        f"{path}: layer 'with_lambda/lambda' is a Lambda layer with Python bytecode, which would "
        "run when loaded; refusing (use --trust to load it anyway)"
    )
    assert not marker.exists()
    with pytest.raises(UnsafeModelError) as info:  # and the conversion refuses it on its own
        keras2.load_keras2(path)
    assert str(info.value) == (
        f"{path}: layer 'lambda' (Lambda) holds Python bytecode that would run when the model "
        "is built; refused (use --trust only for files you trust)"
    )
    assert not marker.exists()


def test_keras_safe_mode_backs_up_the_lambda_check(keras2_dir, tmp_path, monkeypatch):
    # Even a config that got past our own check is built in Keras' safe mode unless trusted.
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER, str(marker))
    path = keras2_dir / "lambda_code.h5"
    with h5py.File(path, "r") as f:
        config = keras2.convert_config(json.loads(f.attrs["model_config"]), path, trust=True)
    with pytest.raises(ModelFileError, match=r"\(Lambda\): Requested the deserialization"):
        keras2._build(config, path, trust=False)
    assert not marker.exists()


def test_trusted_lambda_loads_and_computes(keras2_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER, str(marker))
    model = load_model(keras2_dir / "lambda_code.h5", trust=True)
    xs, ys = expected(keras2_dir, "lambda_code")
    np.testing.assert_allclose(predict(model, xs[0])[0], ys[0], rtol=1e-5, atol=1e-6)
    assert marker.exists()


# -- done when: two Keras 2 streams fuse to what Keras 2 computes -------------------------------


def fused_expected(keras2_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    (x_gru,), (y_gru,) = expected(keras2_dir, "gru")
    (x_lstm,), (y_lstm,) = expected(keras2_dir, "lstm")
    np.testing.assert_array_equal(x_gru, x_lstm)  # the generator feeds both the same x
    return x_gru, 0.8 * y_gru + 0.2 * y_lstm


def test_cli_fuses_gru_and_lstm_streams(keras2_dir, tmp_path, keras):
    out = tmp_path / "fused.keras"
    result = CliRunner().invoke(
        cli,
        [
            "fuse",
            str(keras2_dir / "gru.h5"),
            str(keras2_dir / "lstm.h5"),
            "--w",
            "0.8",
            "0.2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    x, y = fused_expected(keras2_dir)
    fused = keras.models.load_model(out)
    np.testing.assert_allclose(predict(fused, x)[0], y, rtol=1e-5, atol=1e-6)


def test_cli_reports_an_unconvertible_file_in_one_line(keras2_dir, tmp_path):
    out = tmp_path / "fused.keras"
    bad = unknown_tf_function(keras2_dir, tmp_path)
    args = ["fuse", str(bad), str(keras2_dir / "gru.h5"), "-o", str(out), "--trust"]
    result = CliRunner().invoke(cli, args)  # trusted, so that it gets past the scan
    assert result.exit_code == 1
    warning, error = result.stderr.splitlines()
    assert warning == "Warning: --trust: model files may run code while they load."
    assert error.startswith(
        f"Error: {bad}: cannot convert Keras 2 layer 'tf.math.multiply' (TFOpLambda): "
    )
    assert not out.exists()


def test_fuse_subprocess_writes_a_plain_keras3_file(keras2_dir, tmp_path, keras):
    result = run_cli(
        "fuse",
        keras2_dir / "gru.h5",
        keras2_dir / "lstm.h5",
        "--w",
        "0.8",
        "0.2",
        "-o",
        "fused.keras",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "fused.keras\n"
    assert "Traceback" not in result.stderr
    x, y = fused_expected(keras2_dir)
    fused = keras.models.load_model(tmp_path / "fused.keras")  # plain Keras 3, safe mode on
    np.testing.assert_allclose(predict(fused, x)[0], y, rtol=1e-5, atol=1e-6)
