"""What the default check passes loads: asset files (a TextVectorization's vocabulary) and the
dtypes a layer accepts (Keras 2.0's `Embedding(dtype="int32")`), in fuse and merge."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from keras2support import expected, keras2_reference_dir

TEXTS = (
    ["the cat sat on the mat", "a dog ran far away", "the dog sat"],
    ["birds fly high over the sea", "fish swim deep", "the sea is deep"],
)
SAMPLE = ["the cat sat", "birds fly over the sea", "fish dog far", "mat deep high"]


def text_classifier(keras, seed: int, sequential: bool):
    """A Keras 3 text classifier whose vocabulary (adapted on its own texts) is an asset."""
    keras.utils.set_random_seed(seed)
    vectorize = keras.layers.TextVectorization(max_tokens=30, output_sequence_length=6)
    vectorize.adapt(TEXTS[seed % 2])
    layers = [
        vectorize,
        keras.layers.Embedding(30, 4),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, activation="softmax"),
    ]
    if sequential:
        return keras.Sequential([keras.Input((), dtype="string"), *layers], name=f"s{seed}")
    x = h = keras.Input((), dtype="string")
    for layer in layers:
        h = layer(h)
    return keras.Model(x, h, name=f"f{seed}")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, keras) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("text")
    files = {}
    for name, seed, sequential in (("a", 0, False), ("b", 1, True)):
        files[name] = d / f"{name}.keras"
        text_classifier(keras, seed, sequential).save(files[name])
    return files


def test_text_vectorization_models_fuse_and_load_with_their_vocabularies(
    tmp_path, text_files, keras
):
    out = tmp_path / "fused.keras"
    done = run_cli("fuse", text_files["a"], text_files["b"], "--w", "0.7", "0.3", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "checked" in done.stderr

    x = keras.ops.convert_to_tensor(SAMPLE)
    a, b = (keras.models.load_model(text_files[k]) for k in "ab")
    want = 0.7 * np.asarray(a(x)) + 0.3 * np.asarray(b(x))
    # The two vocabularies differ: swapped or missing, the outputs would too.
    assert np.abs(np.asarray(a(x)) - np.asarray(b(x))).max() > 1e-3
    got = np.asarray(keras.models.load_model(out)(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_needing_assets_is_refused_for_h5_before_any_loading(tmp_path, text_files):
    out = tmp_path / "fused.h5"
    done = run_cli("fuse", text_files["a"], text_files["b"], "-o", out)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "Error: Model 'a' needs asset files "
        "(assets/layers/text_vectorization/_lookup_layer/vocabulary.txt: a vocabulary or lookup "
        "table) that a .h5 file cannot hold (a plain model.save('x.h5') loses them the same "
        f"way); write a .keras file instead. Received: {text_files['a']}"
    )
    assert list(tmp_path.iterdir()) == []


# -- Keras 2.0's Embedding(dtype="int32") -----------------------------------------------------


@pytest.fixture(scope="module")
def keras20(tmp_path_factory) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """A Keras 2.0 era Embedding + GRU text model (its Embedding's dtype int32), and what
    tf-keras computes with it (from the same model before its config was rewritten)."""
    d = keras2_reference_dir(tmp_path_factory)
    xs, ys = expected(d, "text_gru_k20")
    return d / "text_gru_k20.h5", xs, ys


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras20_int_embedding_fuses_to_a_file_keras_loads(tmp_path, keras20, keras, suffix):
    source, xs, ys = keras20
    twin = tmp_path / "twin.h5"
    shutil.copy(source, twin)
    out = tmp_path / f"fused{suffix}"
    done = run_cli("fuse", source, twin, "--w", "0.8", "0.2", "-o", out)
    assert done.returncode == 0, done.stderr
    got = np.asarray(keras.models.load_model(out)(xs[0].astype("int32")))
    np.testing.assert_allclose(got, ys[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_keras20_int_embedding_merges_to_a_file_both_kerases_load(tmp_path, keras20):
    source, xs, ys = keras20
    twin = tmp_path / "twin.h5"
    shutil.copy(source, twin)
    out = tmp_path / "merged.h5"
    done = run_cli("merge", source, twin, "-o", out)
    assert done.returncode == 0, done.stderr

    import fusecli

    got = np.asarray(fusecli.load_model(out)(xs[0].astype("int32")))
    np.testing.assert_allclose(got, ys[0], rtol=1e-5, atol=1e-6)

    np.save(tmp_path / "x.npy", xs[0])
    script = (
        "import sys, numpy as np, tf_keras as k\n"
        "m = k.models.load_model(sys.argv[1], compile=False)\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n"
    )
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    ran = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ys[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_keras20_file_itself_loads_through_the_door(keras20):
    import fusecli

    source, xs, ys = keras20
    got = np.asarray(fusecli.load_model(source)(xs[0].astype("int32")))
    np.testing.assert_allclose(got, ys[0], rtol=1e-5, atol=1e-6)
