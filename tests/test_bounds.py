"""Bounded before allocated: sizes a config declares are checked before Keras builds anything,
also where fusecli cannot follow a layer's shapes; `predict` sizes its batches by the widest
layer.

The files are tiny real models whose configs are rewritten here (`num_tokens`, the target size),
as a hostile file would be: Keras would allocate gigabytes for them.
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
from conftest import run_cli
from filesupport import rewrite_keras_config

import fusecli
from fusecli.config.shapes import OutputShapes
from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.scan import scan
from fusecli.scores import prediction

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow


def _set(layer_name: str, **changes):
    def edit(config):
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == layer_name:
                layer["config"].update(changes)
        return config

    return edit


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, keras):
    """x -> CategoryEncoding(10) -> Dense(64), and the same with a layer between whose
    output shape fusecli does not compute."""
    d = tmp_path_factory.mktemp("encoded")
    x = keras.Input((3,), name="x", dtype="int32")
    h = keras.layers.CategoryEncoding(num_tokens=10, output_mode="multi_hot", name="enc")(x)
    keras.Model(x, keras.layers.Dense(64, name="dense")(h), name="m").save(d / "direct.keras")
    x = keras.Input((3,), name="x", dtype="int32")
    h = keras.layers.CategoryEncoding(num_tokens=10, output_mode="multi_hot", name="enc")(x)
    h = keras.layers.UnitNormalization(name="unknown")(h)
    keras.Model(x, keras.layers.Dense(64, name="dense")(h), name="m").save(d / "hidden.keras")
    return d


@pytest.mark.parametrize("which", ["direct", "hidden"])
def test_a_dense_after_a_huge_category_encoding_is_refused(encoded, tmp_path, which):
    def edit(config):
        config = _set("enc", num_tokens=20_000_000)(config)
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == "unknown":  # a layer whose shapes fusecli does not follow
                layer["class_name"] = "Discretization"
                layer["config"]["bin_boundaries"] = [0.5]
            if layer["config"]["name"] == "dense":  # nothing else says what it is called on
                layer.pop("build_config", None)
                layer["inbound_nodes"][0]["args"][0]["config"]["shape"] = [None, None]
        return config

    path = rewrite_keras_config(encoded / f"{which}.keras", tmp_path / "big.keras", edit)
    if which == "hidden":  # the guard must not depend on fusecli following the shapes
        config = read_model_file(path).config
        dense = next(c["config"] for c in config["config"]["layers"] if c["name"] == "dense")
        (shape,) = OutputShapes(config).first_inputs.get(id(dense), [None])
        assert shape is None or shape[-1] is None
    with pytest.raises(ModelFileError, match=r"layer 'dense' declares units=64 on inputs"):
        scan(path)
    result = run_cli("inspect", path)
    assert result.returncode == 1 and "20000000" in result.stderr


def test_the_plain_models_pass(encoded):
    assert scan(encoded / "direct.keras") == scan(encoded / "hidden.keras") == []


@pytest.fixture(scope="module")
def resized(tmp_path_factory, keras):
    d = tmp_path_factory.mktemp("resized")
    x = keras.Input((8, 8, 1), name="x")
    h = keras.layers.Resizing(16, 16, name="resize")(x)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    keras.Model(x, keras.layers.Dense(2, name="dense")(h), name="r").save(d / "r.keras")
    return d / "r.keras"


def test_a_huge_resizing_in_a_small_file_is_refused_before_keras_builds_it(resized, tmp_path):
    path = rewrite_keras_config(
        resized, tmp_path / "huge.keras", _set("resize", height=40000, width=40000)
    )
    assert path.stat().st_size < 30_000
    with pytest.raises(ModelFileError, match=r"layer 'resize' works on .*40000"):
        fusecli.load_model(path)
    data = tmp_path / "x.npy"
    np.save(data, np.ones((1, 8, 8, 1), "float32"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_cli("predict", path, data, "-o", tmp_path / "s.npy")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "40000" in result.stderr
    assert not (tmp_path / "s.npy").exists()
    peak_kb = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    assert peak_kb < 4_000_000  # far from the 6.4 GB one row would take


def test_predict_bounds_its_batches_by_the_widest_layer(resized, keras, monkeypatch):
    model = keras.saving.load_model(resized)
    assert prediction.row_bytes(model) == 16 * 16 * 4  # the resized image, float32
    monkeypatch.setattr(prediction, "ACTIVATION_BUDGET", 16 * 16 * 4 * 6)
    x = np.random.default_rng(0).normal(size=(20, 8, 8, 1)).astype("float32")
    batches = list(prediction.predict_batches(model, [x], batch_size=256))
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    np.testing.assert_allclose(np.concatenate(batches), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
