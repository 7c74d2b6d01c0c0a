"""Keras 3 inputs (`.keras`, Keras 3 `.h5`) fused into a `.h5` that tf-keras 2.x and Keras 3 both
load (`fusecli.formats.keras3_to_keras2`, then the flat graph of `fusecli.fusion.flat_h5`).

The models are built here in Keras 3 with non-trivial weights; the fused file is loaded by Keras 3
here and by tf-keras in a subprocess, and each must compute 0.8 A(x) + 0.2 B(x) as Keras 3
computes A and B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import predict, run_cli
from keras2support import expected, keras2_reference_dir

pytestmark = pytest.mark.slow
keras = pytest.importorskip("keras")
layers = keras.layers

_TF_KERAS_PREDICT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np, tensorflow as tf, tf_keras
    model = tf_keras.models.load_model(sys.argv[1], compile=False)
    with np.load(sys.argv[2]) as data:
        xs = [data[f"x{i}"] for i in range(sum(k.startswith("x") for k in data.files))]
    ys = tf.nest.flatten(model(xs if len(xs) > 1 else xs[0], training=False))
    np.savez(sys.argv[3], **{f"y{i}": np.asarray(y) for i, y in enumerate(ys)})
    """
)


@pytest.fixture(autouse=True)
def _needs_tf_keras() -> None:
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install -e '.[test]')")


def tf_keras_outputs(model: Path, xs: list[np.ndarray], tmp: Path) -> list[np.ndarray]:
    """The model loaded and run by tf-keras, in its own process."""
    np.savez(tmp / "x.npz", **{f"x{i}": x for i, x in enumerate(xs)})
    done = subprocess.run(
        [sys.executable, "-c", _TF_KERAS_PREDICT, str(model), str(tmp / "x.npz"), str(tmp / "y")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp / "y.npz") as data:
        return [data[f"y{i}"] for i in range(len(data.files))]


def randomized(model, seed: int):
    """Weights far from their initial values (BatchNormalization statistics included), so that
    a weight given to the wrong layer or in the wrong order shows."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        values = rng.normal(0.0, 0.5, size=v.shape)
        if "variance" in v.path:
            values = np.abs(values) + 0.5
        if "embeddings" in v.path:
            values = rng.normal(0.0, 1.0, size=v.shape)
        v.assign(values.astype(v.dtype))
    return model


def check_both(tmp: Path, fused: Path, a, b, xs: list[np.ndarray]) -> None:
    """The fused `.h5` in tf-keras and in Keras 3 computes 0.8 A(x) + 0.2 B(x)."""
    arg = xs if len(xs) > 1 else xs[0]
    xa, xb = (xs[0], xs[1]) if len(xs) > 1 else (xs[0], xs[0])
    want = [0.8 * ya + 0.2 * yb for ya, yb in zip(predict(a, xa), predict(b, xb), strict=True)]
    assert np.std(want[0]) > 1e-2  # outputs that vary
    got3 = predict(keras.models.load_model(fused, compile=False), arg)
    got2 = tf_keras_outputs(fused, xs, tmp)
    for w, g3, g2 in zip(want, got3, got2, strict=True):
        np.testing.assert_allclose(g3, w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g2, w, rtol=1e-4, atol=1e-5)
    with h5py.File(fused, "r") as h5:
        config = json.loads(h5.attrs["model_config"])
        assert str(h5.attrs["keras_version"]).startswith("2.")
    text = json.dumps(config)
    assert "batch_shape" not in text and "__keras_tensor__" not in text
    assert "DTypePolicy" not in text


def fuse(tmp: Path, a: Path, b: Path, *extra: str) -> Path:
    out = tmp / "fused.h5"
    done = run_cli("fuse", a, b, "--w", "0.8", "0.2", "-o", out, *extra)
    assert done.returncode == 0, done.stderr
    assert "loads in tf-keras (Keras 2) and in Keras 3" in done.stderr
    return out


def _mlp(name: str, seed: int, nested: bool):
    x = keras.Input((8,), name="x")
    tower = keras.Sequential(
        [keras.Input((8,)), layers.Dense(16, activation="relu"), layers.BatchNormalization()],
        name="tower",
    )
    h = tower(x) if nested else layers.Dense(16, activation="tanh")(x)
    skip = layers.Dense(16, use_bias=False)(x)
    h = layers.Add()([h, skip])
    h = layers.Concatenate()([h, layers.Rescaling(0.5)(x)])
    h = layers.Dropout(0.3)(h)
    y = layers.Dense(5, activation="softmax")(layers.Dense(12, activation="gelu")(h))
    return randomized(keras.Model(x, y, name=name), seed)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_dense_pair_with_a_nested_sequential(tmp_path: Path, suffix: str) -> None:
    a, b = _mlp("a", 1, nested=True), _mlp("b", 2, nested=False)
    a.save(tmp_path / f"a{suffix}")
    b.save(tmp_path / f"b{suffix}")
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    fused = fuse(tmp_path, tmp_path / f"a{suffix}", tmp_path / f"b{suffix}")
    check_both(tmp_path, fused, a, b, [x])


def test_cnn_pair_with_batchnorm_keras_and_h5_inputs(tmp_path: Path) -> None:
    def cnn(seed: int, deep: bool):
        x = keras.Input((12, 12, 3), name="image")
        h = layers.Conv2D(4, 3, activation="relu")(x)
        h = layers.BatchNormalization()(h)
        if deep:
            h = layers.MaxPooling2D()(h)
            h = layers.Conv2D(6, 3, padding="same")(h)
            h = layers.GlobalAveragePooling2D()(h)
        else:
            h = layers.AveragePooling2D(2)(h)
            h = layers.Flatten()(h)
        y = layers.Dense(3)(layers.Activation("relu")(h))  # a regression head: outputs vary
        return randomized(keras.Model(x, y), seed)

    a, b = cnn(3, True), cnn(4, False)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.h5")
    x = np.random.default_rng(1).normal(size=(4, 12, 12, 3)).astype("float32")
    check_both(tmp_path, fuse(tmp_path, tmp_path / "a.keras", tmp_path / "b.h5"), a, b, [x])


def test_gru_lstm_pair(tmp_path: Path) -> None:
    x = keras.Input((7, 3), name="frames")
    h = layers.GRU(5, return_sequences=True)(x)
    h = layers.LayerNormalization()(h)
    a = keras.Model(x, layers.Dense(4)(layers.LSTM(6)(h)))
    b = keras.Sequential(
        [
            keras.Input((7, 3)),
            layers.Bidirectional(layers.LSTM(3, return_sequences=True)),
            layers.GRU(4, reset_after=False),
            layers.Dense(4),
        ]
    )
    a, b = randomized(a, 5), randomized(b, 6)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    xs = np.random.default_rng(2).normal(size=(3, 7, 3)).astype("float32")
    check_both(tmp_path, fuse(tmp_path, tmp_path / "a.keras", tmp_path / "b.keras"), a, b, [xs])


def test_separate_inputs_text_and_features(tmp_path: Path) -> None:
    tokens = keras.Input((9,), dtype="int32", name="tokens")
    h = layers.Embedding(20, 6)(tokens)
    h = layers.Conv1D(5, 3, activation="relu")(h)
    a = keras.Model(tokens, layers.Dense(3)(layers.GlobalMaxPooling1D()(h)))
    feats = keras.Input((4,), name="feats")
    i = keras.Input((4,))
    inner = keras.Model(i, layers.Dense(6, activation="elu")(i), name="inner")
    h = layers.Flatten()(layers.Reshape((3, 2))(inner(feats)))
    b = keras.Model(feats, layers.Dense(3)(h))
    a, b = randomized(a, 7), randomized(b, 8)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.h5")
    rng = np.random.default_rng(3)
    xs = [rng.integers(0, 20, size=(5, 9)).astype("int32"), rng.normal(size=(5, 4)).astype("f4")]
    fused = fuse(tmp_path, tmp_path / "a.keras", tmp_path / "b.h5")
    check_both(tmp_path, fused, a, b, xs)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda x: layers.Dense(3)(x + 1.0), "operation node"),
        (lambda x: layers.Dense(3, activation="hard_sigmoid")(x), "hard_sigmoid"),
        (lambda x: layers.RMSNormalization()(layers.Dense(3)(x)), "RMSNormalization"),
        (lambda x: layers.MultiHeadAttention(2, 4)(*[layers.Reshape((2, 2))(x)] * 2), "MultiHead"),
    ],
)
def test_refused_in_one_line_before_writing(tmp_path: Path, build, reason: str) -> None:
    x = keras.Input((4,))
    bad = keras.Model(x, layers.Flatten()(build(x)))
    good = keras.Model(x, layers.Dense(bad.outputs[0].shape[-1])(x))
    bad.save(tmp_path / "bad.keras")
    good.save(tmp_path / "good.keras")
    out = tmp_path / "fused.h5"
    done = run_cli("fuse", tmp_path / "good.keras", tmp_path / "bad.keras", "-o", out)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert reason in lines[0] and "-o fused.keras" in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.keras", "good.keras"]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_merge_into_h5_loads_in_both(tmp_path: Path, suffix: str) -> None:
    a = _mlp("a", 9, nested=True)
    b = keras.models.clone_model(a)
    rng = np.random.default_rng(4)
    for va, vb in zip(a.weights, b.weights, strict=True):
        shift = 0.0 if "variance" in va.path else rng.normal(0.0, 0.2, size=va.shape)
        vb.assign((np.asarray(va) + shift).astype("float32"))
    a.save(tmp_path / f"a{suffix}")
    b.save(tmp_path / f"b{suffix}")
    out = tmp_path / "merged.h5"
    done = run_cli("merge", tmp_path / f"a{suffix}", tmp_path / f"b{suffix}", "-o", out)
    assert done.returncode == 0, done.stderr
    mean = keras.models.clone_model(a)
    for vm, va, vb in zip(mean.weights, a.weights, b.weights, strict=True):
        vm.assign(0.5 * np.asarray(va) + 0.5 * np.asarray(vb))
    x = np.random.default_rng(5).normal(size=(6, 8)).astype("float32")
    want = predict(mean, x)[0]
    assert np.abs(want - predict(a, x)[0]).max() > 1e-3  # the merge changed something
    np.testing.assert_allclose(tf_keras_outputs(out, [x], tmp_path)[0], want, rtol=1e-4, atol=1e-5)
    got3 = predict(keras.models.load_model(out, compile=False), x)[0]
    np.testing.assert_allclose(got3, want, rtol=1e-4, atol=1e-5)
    with h5py.File(out, "r") as h5:
        assert "batch_shape" not in h5.attrs["model_config"]


def test_merge_into_h5_refuses_what_keras2_cannot_hold(tmp_path: Path) -> None:
    x = keras.Input((4,))
    model = keras.Model(x, layers.Dense(3, activation="hard_sigmoid")(x))
    model.save(tmp_path / "a.keras")
    model.save(tmp_path / "b.keras")
    out = tmp_path / "merged.h5"
    done = run_cli("merge", tmp_path / "a.keras", tmp_path / "b.keras", "-o", out)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert "hard_sigmoid" in lines[0] and "write a .keras file instead" in lines[0], lines[0]
    assert not out.exists()


def test_at_logits_into_h5_loads_in_both(tmp_path: Path) -> None:
    a, b = _mlp("a", 11, nested=True), _mlp("b", 12, nested=False)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.h5")
    out = tmp_path / "fused.h5"
    args = ["--w", "0.8", "0.2", "--at", "logits", "-o", out]
    done = run_cli("fuse", tmp_path / "a.keras", tmp_path / "b.h5", *args)
    assert done.returncode == 0, done.stderr
    x = np.random.default_rng(6).normal(size=(6, 8)).astype("float32")

    def logits(model) -> np.ndarray:
        last = model.layers[-1]  # Dense(5, activation="softmax")
        h = np.asarray(keras.Model(model.inputs, last.input)(x))
        return h @ np.asarray(last.kernel) + np.asarray(last.bias)

    z = 0.8 * logits(a) + 0.2 * logits(b)
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(tf_keras_outputs(out, [x], tmp_path)[0], want, rtol=1e-4, atol=1e-6)
    got3 = predict(keras.models.load_model(out, compile=False), x)[0]
    np.testing.assert_allclose(got3, want, rtol=1e-4, atol=1e-6)


def test_masked_text_pair_padded_sequences(tmp_path: Path) -> None:
    # Keras 3 records an Embedding(mask_zero=True)'s mask as a `not_equal` operation node passed
    # to every later call; Keras 2's config leaves it to each Keras to pass the mask on.
    def text(seed: int, bidirectional: bool):
        tokens = keras.Input((7,), dtype="int32", name="tokens")
        h = layers.Embedding(30, 5, mask_zero=True)(tokens)
        rnn = layers.LSTM(4, return_sequences=True)
        h = layers.Bidirectional(rnn)(h) if bidirectional else layers.GRU(6)(h)
        if bidirectional:
            h = layers.GlobalAveragePooling1D()(h)
        return randomized(keras.Model(tokens, layers.Dense(3)(h)), seed)

    a, b = text(13, False), text(14, True)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.h5")
    ids = np.random.default_rng(7).integers(1, 30, size=(4, 7)).astype("int32")
    ids[0, 4:] = 0  # padded at the end
    ids[1, :3] = 0  # at the start
    ids[2, :] = 0
    ids[2, 0] = 5
    fused = fuse(tmp_path, tmp_path / "a.keras", tmp_path / "b.h5")
    check_both(tmp_path, fused, a, b, [ids])
    with h5py.File(fused, "r") as h5:
        assert "NotEqual" not in h5.attrs["model_config"]


def test_a_keras2_h5_and_a_keras3_keras_into_one_h5(tmp_path: Path, tmp_path_factory) -> None:
    # tf-keras wrote gru.h5 (tests/legacy_fixtures/make_keras2_h5.py), with its own outputs.
    keras2_dir = keras2_reference_dir(tmp_path_factory)
    (x,), (y2,) = expected(keras2_dir, "gru")
    inputs = keras.Input(x.shape[1:])
    b = keras.Model(inputs, layers.Dense(3)(layers.LSTM(5)(inputs)))
    b = randomized(b, 15)
    b.save(tmp_path / "b.keras")
    fused = fuse(tmp_path, keras2_dir / "gru.h5", tmp_path / "b.keras")
    want = 0.8 * y2 + 0.2 * predict(b, x)[0]
    np.testing.assert_allclose(
        tf_keras_outputs(fused, [x], tmp_path)[0], want, rtol=1e-4, atol=1e-5
    )
    got3 = predict(keras.models.load_model(fused, compile=False), x)[0]
    np.testing.assert_allclose(got3, want, rtol=1e-4, atol=1e-5)
