"""`inspect`'s output shapes and dtypes, computed from the config, against Keras' own.

The reference is the built model's `outputs`: Keras 3's for Keras 3 files (.keras and .h5),
tf-keras' for Keras 2 files (written and described by tf-keras in one subprocess).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import shapezoo
from click.testing import CliRunner
from filesupport import rewrite_keras_config

from fusecli.cli import cli
from fusecli.config.shapes import UNKNOWN, OutputShapes, model_outputs
from fusecli.inspection import inspect_file

TESTS = Path(__file__).resolve().parent

KERAS2_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.path.insert(0, sys.argv[2])
    import tf_keras as keras
    import shapezoo

    out, described = sys.argv[1], {}
    for name, model in shapezoo.build(keras, True).items():
        model.save(f"{out}/{name}.h5")
        described[name] = {
            "name": model.name,
            "inputs": [[t.shape.as_list(), t.dtype.name] for t in model.inputs],
            "outputs": [[t.shape.as_list(), t.dtype.name] for t in model.outputs],
        }
    with open(f"{out}/described.json", "w") as f:
        json.dump(described, f)
    """
)


def _specs(tensors: list[dict]) -> list[list]:
    return [[t["shape"], t["dtype"]] for t in tensors]


@pytest.fixture(scope="session")
def keras3_zoo(tmp_path_factory, keras):
    """The zoo's models saved by Keras 3 as .keras and .h5, with Keras' own description."""
    d = tmp_path_factory.mktemp("shapes3")
    described = {}
    for name, model in shapezoo.build(keras, False).items():
        model.save(d / f"{name}.keras")
        model.save(d / f"{name}.h5")
        described[name] = {
            "name": model.name,
            "inputs": [[list(t.shape), t.dtype] for t in model.inputs],
            "outputs": [[list(t.shape), t.dtype] for t in model.outputs],
        }
    return d, described


@pytest.fixture(scope="session")
def keras2_zoo(tmp_path_factory):
    """The zoo's models saved by tf-keras as Keras 2 .h5 files, with tf-keras' description."""
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install -e '.[test]')")
    d = tmp_path_factory.mktemp("shapes2")
    subprocess.run(
        [sys.executable, "-c", KERAS2_SCRIPT, str(d), str(TESTS)],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
        timeout=300,
    )
    return d, json.loads((d / "described.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files_shapes_and_dtypes_are_keras_own(keras3_zoo, suffix):
    folder, described = keras3_zoo
    for name, expected in described.items():
        report = inspect_file(folder / f"{name}{suffix}")
        assert report["name"] == expected["name"]
        assert _specs(report["inputs"]) == expected["inputs"], name
        assert _specs(report["outputs"]) == expected["outputs"], name
    assert len(described["zoo"]["outputs"]) > 120  # every layer configuration is an output


def test_shapes_propagate_through_the_graph_without_what_keras3_records(keras3_zoo):
    """Keras 3 records the shape of every tensor a layer is called on; with those records
    removed, each layer's input comes from the layers before it, as in Keras 2 files."""
    folder, described = keras3_zoo
    for name, expected in described.items():
        config = json.loads(zipfile.ZipFile(folder / f"{name}.keras").read("config.json"))
        pending = [config]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                if item.get("class_name") == "__keras_tensor__":
                    item["config"].update(shape=None, dtype=None)
                item.pop("build_config", None)
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
        outputs = [[list(spec.shape), spec.dtype] for _, spec in model_outputs(config)]
        assert outputs == expected["outputs"], name


@pytest.mark.slow
def test_keras2_files_shapes_dtypes_and_names_are_tf_keras_own(keras2_zoo):
    folder, described = keras2_zoo
    for name, expected in described.items():
        report = inspect_file(folder / f"{name}.h5")
        assert report["keras_version"].startswith("2.")
        assert report["name"] == expected["name"]  # functional ones too
        assert _specs(report["inputs"]) == expected["inputs"], name
        assert _specs(report["outputs"]) == expected["outputs"], name
    assert len(described["zoo"]["outputs"]) > 110


def test_the_table_shows_the_shape_keras_gives(keras2_zoo):
    folder, _ = keras2_zoo
    result = CliRunner().invoke(cli, ["inspect", str(folder / "seq_cnn.h5")])
    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[1]
    assert " seq_cnn " in row
    assert re.search(r" conv2d(_\d+)?_input \(None, 16, 16, 1\) float32 ", row)
    assert re.search(r" dense(_\d+)? \(None, 10\) float32 ", row)


def test_unknown_layers_are_question_marks_and_nothing_else(tmp_path, keras):
    """A layer no rule knows makes its own output unknown; what follows it is known again where
    Keras 3 recorded its input's shape, and per dimension where the rank is certain."""
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 4), name="x")
    h = keras.layers.GRU(3, return_sequences=True, name="gru")(x)
    model = keras.Model(x, [keras.layers.Dense(2, name="head")(h), h], name="m")
    model.save(tmp_path / "m.keras")

    def edit(config):
        gru, head = config["config"]["layers"][1:3]
        gru["class_name"] = "MyRecurrent"  # a custom layer: nothing is known of its output
        head["inbound_nodes"][0]["args"][0]["config"]["shape"] = None  # nor recorded
        return config

    rewrite_keras_config(tmp_path / "m.keras", tmp_path / "custom.keras", edit)
    outputs = inspect_file(tmp_path / "custom.keras")["outputs"]
    assert outputs == [
        {"name": "head", "shape": None, "dtype": "float32"},
        {"name": "gru", "shape": None, "dtype": None},
    ]

    def custom_cell(config):
        layer = config["config"]["layers"][1]
        layer["class_name"] = "RNN"
        layer["config"]["cell"] = {"class_name": "MyCell", "config": {"name": "cell"}}
        return config

    rewrite_keras_config(tmp_path / "m.keras", tmp_path / "cell.keras", custom_cell)
    outputs = inspect_file(tmp_path / "cell.keras")["outputs"]
    assert outputs[1] == {"name": "gru", "shape": [None, 6, UNKNOWN], "dtype": "float32"}
    assert outputs[0] == {"name": "head", "shape": [None, 6, 2], "dtype": "float32"}
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "cell.keras")])
    assert "gru (None, 6, ?) float32" in result.stdout


def _functional(name: str, inner: dict | None) -> dict:
    """A Keras 2 style functional config: x -> inner (called twice) -> Add, or x -> Dense."""
    ref = [[["x", 0, 0, {}]]]
    layers = [{"class_name": "InputLayer", "name": "x",
               "config": {"name": "x", "batch_input_shape": [None, 4], "dtype": "float32"},
               "inbound_nodes": []}]  # fmt: skip
    if inner is None:
        layers.append({"class_name": "Dense", "name": "d", "inbound_nodes": ref,
                       "config": {"name": "d", "units": 4, "dtype": "float32"}})  # fmt: skip
        out = "d"
    else:
        layers.append({**inner, "name": "inner", "inbound_nodes": [ref[0], ref[0]]})
        layers.append({"class_name": "Add", "name": "add", "config": {"name": "add"},
                       "inbound_nodes": [[["inner", 1, 0, {}], ["inner", 2, 0, {}]]]})  # fmt: skip
        out = "add"
    config = {"name": name, "layers": layers, "input_layers": [["x", 0, 0]],
              "output_layers": [[out, 0, 0]]}  # fmt: skip
    return {"class_name": "Functional", "config": config}


@pytest.mark.slow
def test_a_model_used_twice_at_every_level_is_walked_once_per_level():
    """2**depth calls if each call were walked again; the model is walked once per level, and
    without recursion (deeper than Python's recursion limit)."""
    depth = 1500
    model = _functional("f0", None)
    for level in range(1, depth + 1):
        model = _functional(f"f{level}", model)
    shapes = OutputShapes(model)
    assert shapes.outputs == model_outputs(model)
    [(name, spec)] = shapes.outputs
    assert (name, spec.shape, spec.dtype) == ("add", (None, 4), "float32")
    # One evaluation of each level's model and of its Add, and one of the Dense at the bottom.
    assert shapes.evaluations == 2 * depth + 2


def test_deeply_nested_sequential_files_are_inspected_in_linear_time(tmp_path, keras):
    """The issue's file, deeper: 28 levels took over 120 s (1.9x per level); 60 would be
    centuries if the walk were exponential."""
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")]).save(
        tmp_path / "s.keras"
    )
    depth = 60

    def nest(config):
        for level in range(depth):
            shape = [None, 4]
            config = {"module": "keras", "class_name": "Sequential", "registered_name": None,
                      "config": {"name": f"level{level}", "layers": [
                          {"class_name": "InputLayer",
                           "config": {"batch_shape": shape, "dtype": "float32", "name": "in"}},
                          config]}}  # fmt: skip
        return config

    rewrite_keras_config(tmp_path / "s.keras", tmp_path / "deep.keras", nest)
    report = inspect_file(tmp_path / "deep.keras")
    assert report["name"] == f"level{depth - 1}"
    assert report["outputs"] == [{"name": "level58", "shape": [None, 3], "dtype": "float32"}]
    assert report["layers"]["Sequential"] == depth
    config = json.loads(zipfile.ZipFile(tmp_path / "deep.keras").read("config.json"))
    assert OutputShapes(config).evaluations == depth + 2  # each Sequential and the Dense, once


def _widening(name: str, inner: dict | None, extra: int) -> dict:
    """A Keras 2 style functional config whose inner model is called on x and on x widened by
    `extra` features: each level doubles the distinct input shapes the levels below see."""
    ref = [[["x", 0, 0, {}]]]
    layers = [{"class_name": "InputLayer", "name": "x",
               "config": {"name": "x", "batch_input_shape": [None, None], "dtype": "float32"},
               "inbound_nodes": []}]  # fmt: skip
    if inner is None:
        layers.append({"class_name": "Activation", "name": "out", "inbound_nodes": ref,
                       "config": {"name": "out", "activation": "relu"}})  # fmt: skip
    else:
        layers += [
            {"class_name": "Dense", "name": "d", "config": {"name": "d", "units": extra},
             "inbound_nodes": ref},
            {"class_name": "Concatenate", "name": "wide", "config": {"name": "wide"},
             "inbound_nodes": [[["x", 0, 0, {}], ["d", 0, 0, {}]]]},
            {**inner, "name": "inner",
             "inbound_nodes": [ref[0], [["wide", 0, 0, {}]]]},
            {"class_name": "Concatenate", "name": "out", "config": {"name": "out"},
             "inbound_nodes": [[["inner", 1, 0, {}], ["inner", 2, 0, {}]]]},
        ]  # fmt: skip
    config = {"name": name, "layers": layers, "input_layers": [["x", 0, 0]],
              "output_layers": [["out", 0, 0]]}  # fmt: skip
    return {"class_name": "Functional", "config": config}


def test_a_file_crafted_to_need_exponentially_many_evaluations_is_cut_short():
    """Calls on 2**depth distinct shapes cannot all be walked: past a budget proportional to
    the file's layers, nested models' outputs are unknown rather than computed."""
    depth = 40
    model = _widening("w0", None, 0)
    for level in range(1, depth + 1):
        model = _widening(f"w{level}", model, 2**level)
    model["config"]["layers"][0]["config"]["batch_input_shape"] = [None, 1]
    shapes = OutputShapes(model)
    layers = 5 * depth + 2  # in the whole file, nested models included
    assert shapes.evaluations < 10 * layers  # not 2**40
    [(name, spec)] = shapes.outputs
    assert (name, spec.shape) == ("out", None)

    shallow = _widening("w0", None, 0)
    for level in range(1, 4):  # 2**3 shapes: well within the budget, and computed
        shallow = _widening(f"w{level}", shallow, 2**level)
    shallow["config"]["layers"][0]["config"]["batch_input_shape"] = [None, 1]
    [(_, spec)] = model_outputs(shallow)
    # Each level's output is f(w) + f(w + extra): 8 inputs of widths 1 + (subset sums of 2, 4, 8).
    assert spec.shape == (None, sum(1 + s for s in range(0, 15, 2)))
