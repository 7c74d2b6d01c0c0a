"""Keras 2 constructs whose meaning Keras 3 changed: reproduced exactly, or the file refused.

Each model is written by tf-keras (tests/legacy_fixtures/make_keras2_h5.py, one subprocess per
session) with its outputs on padded inputs (padded at the end, at the start, not at all), so a
mask that Keras 3 drops, combines differently or removes shows in the numbers.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import predict, run_cli
from keras2support import expected, keras2_reference_dir

from fusecli.errors import ModelFileError
from fusecli.formats import keras2
from fusecli.merging.merge import merge
from fusecli.safety.loading import load_model

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

# name -> what Keras 3 alone would get wrong (or "" where it already agreed), all compared
# with tf-keras.
REPRODUCED = {
    "s2s_masked": "the issue's decoder: masked Embedding -> LSTM(initial_state=[h, c])",
    "s2s_states": "GRU, SimpleRNN(go_backwards), RNN(LSTMCell) with initial_state, the mask "
    "through Dropout, TimeDistributed and another RNN",
    "s2s_bidirectional": "Bidirectional called with initial_state (Keras 2 recorded "
    "constants=None), and a decoder started from concatenated bidirectional states",
    "mask_wrappers": "a tensor read by MultiHeadAttention and by Attention: Keras 3's "
    "MultiHeadAttention removes its mask",
    "merge_masks": "Add/Multiply/Average/Maximum/Concatenate of sequences with different "
    "masks (Keras 2 ANDs them, Keras 3 ORs them), and a masked plus an unmasked sequence",
    "causal_attention": "Attention(causal=True) of tf.keras 2.4-2.9, use_causal_mask calls",
    "rescaled_mask": "Rescaling and Normalization pass a mask on in Keras 3, not in Keras 2",
    "rescaled_sequential": "the same in a Sequential model",
    "masking_layer": "",
    "masked_convolutions": "",
    "channels_first": "",
    "dropouts": "",
    "conv_lstm": "",
    "td_cnn_lstm": "",
    "stacked_rnns": "",
    "bn_renorm": "",
}


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory):
    return keras2_reference_dir(tmp_path_factory)


def config_of(path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["model_config"])


@pytest.mark.parametrize("name", list(REPRODUCED))
def test_loaded_model_computes_what_tf_keras_computed(keras2_dir, name):
    xs, ys = expected(keras2_dir, name)
    got = predict(load_model(keras2_dir / f"{name}.h5"), xs if len(xs) > 1 else xs[0])
    assert [g.shape for g in got] == [y.shape for y in ys]
    for g, y in zip(got, ys, strict=True):
        np.testing.assert_allclose(g, y, rtol=1e-5, atol=1e-5)


def test_the_masks_are_rebuilt_with_standard_weightless_layers(keras2_dir):
    converted = keras2.convert_config(config_of(keras2_dir / "s2s_masked.h5"))
    added = [s for s in converted["config"]["layers"] if s["name"].endswith("_keras2_mask")]
    assert [(s["class_name"], s["config"]) for s in added] == [
        (
            "Discretization",
            {"name": f"{ids}_keras2_mask", "bin_boundaries": [0.5], "output_mode": "int"},
        )
        for ids in ("source", "target")  # the encoder's LSTM gets its mask explicitly too
    ]
    (decoder,) = [
        s
        for s in converted["config"]["layers"]
        if s["class_name"] == "LSTM" and "initial_state" in s["inbound_nodes"][0]["kwargs"]
    ]
    (node,) = decoder["inbound_nodes"]
    assert len(node["kwargs"]["initial_state"]) == 2
    assert node["kwargs"]["mask"]["config"]["keras_history"] == ["target_keras2_mask", 0, 0]


def test_fused_file_is_plain_keras3_and_keeps_the_masks(keras2_dir, tmp_path, keras):
    path = keras2_dir / "s2s_masked.h5"
    result = run_cli("fuse", path, path, "--w", "0.5", "0.5", "-o", "fused.keras", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    xs, (y,) = expected(keras2_dir, "s2s_masked")
    fused = keras.models.load_model(tmp_path / "fused.keras")  # safe mode: nothing custom
    np.testing.assert_allclose(predict(fused, xs)[0], y, rtol=1e-5, atol=1e-5)


def test_merged_keras2_file_loads_with_the_masks(keras2_dir, tmp_path):
    path = keras2_dir / "s2s_masked.h5"
    merge([path, path], tmp_path / "merged.h5")
    xs, (y,) = expected(keras2_dir, "s2s_masked")
    got = predict(load_model(tmp_path / "merged.h5"), xs)[0]
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)


# -- refused: the layer named, and why -----------------------------------------------------------

REFUSED = {
    "masking_states": "cannot convert Keras 2 layer 'lstm_{n}' (LSTM): its input carries a mask "
    "(from the Masking layer 'masking'), which Keras 3 does not pass to an RNN layer called "
    "with initial_state",
    "masking_merged": "cannot convert Keras 2 layer 'lstm_{n}' (LSTM): its input's mask (the AND "
    "of the masks of the Masking layer 'masking_{m}' and the Masking layer 'masking_{m2}') "
    "combines several masks, which Keras 2 does with AND over the inputs that have one and "
    "Keras 3 with OR (and not at all when one input has none)",
    "masking_shared": "cannot convert Keras 2 layer 'lstm_{n}' (LSTM): its input 'masking_{m}' "
    "carries a mask (from the Masking layer 'masking_{m}') and is also read by a "
    "MultiHeadAttention layer, which removes it in Keras 3",
    "nested_masked": "cannot convert Keras 2 layer 'decoder_model' (Functional): it is handed "
    "a masked input (ids != 0 of 'ids'), and Keras 3 would not give its layer 'lstm_{n}' (LSTM) "
    "the mask Keras 2 gives it",
    "bn_virtual": "cannot convert Keras 2 layer 'batch_normalization_{n}' (BatchNormalization): "
    "virtual_batch_size=2 has no Keras 3 equivalent (only virtual_batch_size=None does)",
}


def refusal(keras2_dir, name: str) -> str:
    """The expected message, with the layer numbers tf-keras gave this session's layers."""
    import re

    with pytest.raises(ModelFileError) as info:
        keras2.convert_config(config_of(keras2_dir / f"{name}.h5"), keras2_dir / f"{name}.h5")
    message = str(info.value)
    pattern = re.escape(f"{keras2_dir / name}.h5: " + REFUSED[name])
    pattern = re.sub(r"\\\{(n|m|m2)\\\}", r"\\d+", pattern)
    assert re.fullmatch(pattern, message), message
    return message


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_by_load_model_and_merge_alike(keras2_dir, tmp_path, name):
    message = refusal(keras2_dir, name)
    path = keras2_dir / f"{name}.h5"
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert str(info.value) == message
    with pytest.raises(ModelFileError) as info:
        merge([path, path], tmp_path / "merged.h5")
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_cli_fuse_and_merge_refuse_in_one_line(keras2_dir, tmp_path):
    message = refusal(keras2_dir, "masking_states")
    path = keras2_dir / "masking_states.h5"
    for args in (("fuse", path, path, "-o", "out.keras"), ("merge", path, path, "-o", "out.h5")):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == f"Error: {message}"
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_rnn_constants_are_refused(keras2_dir, tmp_path):
    config = config_of(keras2_dir / "s2s_bidirectional.h5")
    (layer,) = [
        s
        for s in config["config"]["layers"]
        if s["class_name"] == "Bidirectional" and len(s["inbound_nodes"][0]) > 1
    ]
    layer["inbound_nodes"][0][0][3]["constants"] = ["source", 0, 0]
    with pytest.raises(ModelFileError) as info:
        keras2.convert_config(config, "m.h5")
    assert str(info.value) == (
        f"m.h5: cannot convert Keras 2 layer {layer['name']!r} (Bidirectional): it is called "
        "with constants, which Keras 3 RNN layers do not take"
    )
