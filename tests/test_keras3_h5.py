"""Keras 3 `.h5` files Keras' own loader misreads: `Attention(score_mode="dot")`, whose string
Keras' legacy loader turns into the function `keras.layers.dot`, and operation nodes
(`keras.ops.not_equal` on a Keras tensor), which it takes for unknown custom layers; and the
message for a Lambda whose bytecode another Python version wrote."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import predict, run_cli

from fusecli.formats.keras3_h5 import misread_layers
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow


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


def test_operation_nodes_in_a_keras3_h5_load(keras, tmp_path):
    from keras import ops

    keras.utils.set_random_seed(4)
    x = keras.Input((4,), name="x")
    kept = ops.cast(ops.not_equal(x, 0.0), "float32") * x
    model = keras.Model(x, keras.layers.Dense(3, name="head")(ops.add(kept, 1.0)), name="ops")
    path = tmp_path / "ops.h5"
    model.save(path)
    data = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    data[:, 0] = 0.0
    want = predict(model, data)[0]
    assert np.ptp(want) > 0.1
    np.testing.assert_allclose(predict(load_model(path), data)[0], want, rtol=1e-5, atol=1e-6)


def test_bytecode_of_another_python_is_said_to_be(keras, tmp_path):
    import base64
    import json
    import zipfile

    x = keras.Input((3,), name="x")
    lam = keras.layers.Lambda(lambda t: t * 2, name="lam")
    keras.Model(x, lam(x), name="lam_model").save(tmp_path / "a.keras")

    def edit(config):
        for spec in config["config"]["layers"]:
            if spec["class_name"] == "Lambda":
                code = spec["config"]["function"]["config"]
                raw = bytearray(base64.b64decode(code["code"]))
                raw[0] = 0x01  # a type code no Python's marshal knows, as another version's may be
                code["code"] = base64.b64encode(bytes(raw)).decode()
        return config

    path = tmp_path / "other_python.keras"
    with zipfile.ZipFile(tmp_path / "a.keras") as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            dst.writestr(item, data)
    np.save(tmp_path / "d.npy", np.ones((2, 3), dtype="float32"))
    result = run_cli("predict", path, tmp_path / "d.npy", "-o", tmp_path / "o.npy", "--trust")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"Error: {path}: cannot be loaded: a Lambda layer's Python bytecode was written by "
        "another Python version and cannot be loaded by this one (Python 3."
    )
