"""Keras 3 `.h5` files Keras' own loader misreads: `Attention(score_mode="dot")`, whose string
Keras' legacy loader turns into the function `keras.layers.dot`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import predict, run_cli

from fusecli.formats.keras3_h5 import misread_layers
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model


def attention_model(keras, *, nested: bool):
    keras.utils.set_random_seed(3)
    q, v = keras.Input((5, 4), name="q"), keras.Input((6, 4), name="v")
    att = keras.layers.Attention(score_mode="dot", use_scale=True, name="att")([q, v])
    concat = keras.layers.Attention(score_mode="concat", name="att_concat")([q, v])
    y = keras.layers.GlobalAveragePooling1D()(keras.layers.Add()([att, concat]))
    model = keras.Model([q, v], keras.layers.Dense(3, name="head")(y), name="inner")
    if nested:
        a, b = keras.Input((5, 4), name="a"), keras.Input((6, 4), name="b")
        model = keras.Model([a, b], keras.layers.Softmax()(model([a, b])), name="outer")
    for w in model.weights:
        w.assign(np.random.default_rng(len(w.path)).normal(0, 0.8, w.shape))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("nested", [False, True])
def test_attention_in_a_keras3_h5_loads_and_computes_as_saved(keras, tmp_path, nested):
    model = attention_model(keras, nested=nested)
    path = tmp_path / "att.h5"
    model.save(path)
    config = read_model_file(path).config
    assert [s["config"]["name"] for s in misread_layers(config)] == ["att"]
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(3, 5, 4)).astype("float32"), rng.normal(size=(3, 6, 4))]
    xs[1] = xs[1].astype("float32")
    loaded = load_model(path)
    want = predict(model, xs)[0]
    assert np.ptp(want) > 0.05
    np.testing.assert_allclose(predict(loaded, xs)[0], want, rtol=1e-5, atol=1e-6)
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", path, path, "-o", out)
    assert result.returncode == 0, result.stderr
    fused = keras.saving.load_model(out, safe_mode=True)
    np.testing.assert_allclose(predict(fused, xs)[0], want, rtol=1e-5, atol=1e-6)
