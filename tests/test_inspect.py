"""`fusecli inspect`: what it reports must match what Keras itself says about the loaded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, dense_model
from filesupport import keras2_files, marker_model

from fusecli.cli import cli
from fusecli.formats.modelfile import open_weights
from fusecli.inspection import inspect_file

KEYS = {"path", "format", "keras_version", "name", "inputs", "outputs", "params", "layers",
        "unsafe", "size", "recipe"}  # fmt: skip


def mixed_model(keras):
    """Nested functional + Sequential, a shared layer, BatchNormalization's non-trainable
    variables, recurrent cells, an embedding and a second, integer input."""
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="features")
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(10, 4)(tokens)
    inner_in = keras.Input((6,))
    h = keras.layers.Dense(8, name="inner_dense")(inner_in)
    h = keras.layers.BatchNormalization(name="inner_bn")(h)
    inner = keras.Model(inner_in, keras.layers.Dropout(0.2)(h), name="inner")
    seq = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), keras.layers.BatchNormalization()], name="seq"
    )
    shared = keras.layers.Dense(3, name="shared")
    h = seq(inner(x))
    merged = keras.layers.Concatenate(name="merge")(
        [shared(h), shared(h), keras.layers.GRU(3)(e), keras.layers.LSTM(2)(e)]
    )
    out = keras.layers.Dense(5, activation="softmax", name="probs")(merged)
    return keras.Model([x, tokens], out, name="mixed")


@pytest.fixture(scope="session")
def mixed(tmp_path_factory, keras):
    """The mixed model, with optimizer variables (a .keras file then stores them too)."""
    d = tmp_path_factory.mktemp("inspect")
    model = mixed_model(keras)
    model.compile("adam", "categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    files = {"model": model, "keras": d / "mixed.keras", "h5": d / "mixed.h5"}
    model.save(files["keras"])
    model.save(files["h5"])
    with open_weights(files["keras"]) as weights:
        assert len(weights["optimizer/vars"]) > 2  # stored, and not to be counted
    return files


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_inspect_matches_keras(mixed, fmt, keras):
    report = inspect_file(mixed[fmt])
    loaded = keras.saving.load_model(mixed[fmt], compile=False)
    assert report["params"] == loaded.count_params() == mixed["model"].count_params()
    assert report["format"] == fmt
    assert report["keras_version"] == keras.__version__
    assert report["name"] == "mixed"
    assert report["size"] == mixed[fmt].stat().st_size
    assert report["inputs"] == [
        {"name": "features", "shape": [None, 6], "dtype": "float32"},
        {"name": "tokens", "shape": [None, 5], "dtype": "int32"},
    ]
    assert report["outputs"] == [{"name": "probs", "shape": [None, 5], "dtype": "float32"}]
    assert report["layers"] == {
        "BatchNormalization": 2, "Concatenate": 1, "Dense": 4, "Dropout": 1, "Embedding": 1,
        "Functional": 1, "GRU": 1, "InputLayer": 4, "LSTM": 1, "Sequential": 1,
    }  # fmt: skip
    assert report["unsafe"] == []


@pytest.mark.slow
def test_inspect_sequential_and_keras2_files(tmp_path, tmp_path_factory, keras):
    seq = keras.Sequential(
        [keras.Input((7,)), keras.layers.Dense(3), keras.layers.Softmax()], name="plain_seq"
    )
    seq.save(tmp_path / "seq.keras")
    report = inspect_file(tmp_path / "seq.keras")
    assert report["params"] == seq.count_params() == 24
    assert report["outputs"][0]["shape"] == [None, 3]
    assert report["inputs"][0]["shape"] == [None, 7]

    files = keras2_files(tmp_path_factory)
    rnn = inspect_file(files["k2_rnn"])
    assert (rnn["params"], rnn["keras_version"]) == (files["counts"]["k2_rnn"], "2.21.0")
    assert rnn["inputs"] == [{"name": "tokens", "shape": [None, 6], "dtype": "int32"}]
    assert rnn["outputs"] == [{"name": "probs", "shape": [None, 5], "dtype": "float32"}]
    rnn_keras = inspect_file(files["k2_rnn_keras"])
    assert rnn_keras["params"] == files["counts"]["k2_rnn"]
    assert (rnn_keras["format"], rnn_keras["unsafe"]) == ("keras", [])
    assert rnn_keras["outputs"] == rnn["outputs"]
    seq2 = inspect_file(files["k2_seq"])
    assert seq2["params"] == files["counts"]["k2_seq"]
    assert seq2["inputs"][0]["shape"] == [None, 5]
    assert seq2["outputs"] == [{"name": "last", "shape": [None, 2], "dtype": "float32"}]
    assert inspect_file(files["k2_unsafe"])["params"] == files["counts"]["k2_unsafe"]


def test_inspect_json_of_a_folder(tmp_path, keras):
    marker_model(keras, tmp_path / "ran", nested=True).save(tmp_path / "lam.keras")
    dense_model(keras, seed=3).save(tmp_path / "plain.h5")
    (tmp_path / "notes.txt").write_text("not a model")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    reports = json.loads(result.stdout)
    assert [Path(r["path"]).name for r in reports] == ["lam.keras", "plain.h5"]
    assert all(set(r) >= KEYS for r in reports)
    assert reports[0]["unsafe"] == [
        {
            "path": "outer/inner/lam",
            "class_name": "Lambda",
            "reason": "is a Lambda layer with Python bytecode, which would run when loaded",
            "what": "layer",
        }
    ]
    assert reports[0]["outputs"] == [{"name": "probs", "shape": [None, 3], "dtype": "float32"}]
    assert reports[1]["params"] == 4 * 8 + 8 + 8 * 3 + 3


def test_inspect_table(model_files):
    result = CliRunner().invoke(cli, ["inspect", str(model_files["a"])])
    assert result.exit_code == 0
    header, row = result.stdout.splitlines()
    assert header.split() == ["FILE", "FORMAT", "KERAS", "MODEL", "INPUTS", "OUTPUTS", "PARAMS",
                              "LAYERS", "SIZE", "UNSAFE"]  # fmt: skip
    assert row.startswith(str(model_files["a"]))
    assert " .keras " in row and " 67 " in row and row.endswith(" -")
    assert "(None, 4) float32" in row and "(None, 3) float32" in row


def test_inspect_goes_on_after_a_broken_file(model_files, tmp_path):
    missing = tmp_path / "missing.keras"
    result = CliRunner().invoke(cli, ["inspect", str(missing), str(model_files["b"]), "--json"])
    assert result.exit_code == 1
    assert [r["path"] for r in json.loads(result.stdout)] == [str(model_files["b"])]
    assert result.stderr == f"Error: {missing}: no such file\n"


@pytest.mark.slow
def test_inspect_never_imports_tensorflow(model_files, tmp_path_factory):
    """In a real process: inspecting .keras and Keras 2 .h5 files leaves TensorFlow unimported."""
    k2 = keras2_files(tmp_path_factory)["k2_unsafe"]
    code = (
        "import sys, json, io, contextlib\n"
        "from fusecli.cli import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        cli(['inspect', {str(model_files['a'])!r}, {str(k2)!r}, '--json'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "print(len(json.loads(out.getvalue())), sorted(m for m in ('tensorflow', 'keras')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2 []\n"
