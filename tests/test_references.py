"""Functions named by reference in a config are code: refused, reported, never copied clean.

The files are crafted here (JSON and HDF5 attributes written directly), one per way a config can
name a function: by module and name (Keras 2 `.h5`), through `config` (Keras 3's registered
`"pkg>fn"`), by `registered_name`. The referenced function would leave a marker file (or end the
process) if anything called it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import run_cli
from filesupport import rewrite_keras_config

import fusecli
from fusecli.errors import UnsafeModelError
from fusecli.inspection import inspect_file
from fusecli.safety.references import PURE_FUNCTIONS
from fusecli.safety.scan import scan

REFERENCE = "by reference, which Keras would look up and run"


def keras2_h5(path, function, *, function_type="function"):
    """A Keras 2 era `.h5` (Input -> Lambda -> Dense) written with h5py alone."""
    kernel = np.arange(12, dtype="float32").reshape(4, 3) / 10
    bias = np.array([0.1, -0.2, 0.3], dtype="float32")
    config = {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "x"},
                    "name": "x",
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Lambda",
                    "config": {
                        "name": "lam",
                        "trainable": True,
                        "dtype": "float32",
                        "function": function,
                        "function_type": function_type,
                        "module": "tf_keras.src.layers.core.lambda_layer",
                        "output_shape": None,
                        "output_shape_type": "raw",
                        "output_shape_module": None,
                        "arguments": {},
                    },
                    "name": "lam",
                    "inbound_nodes": [[["x", 0, 0, {}]]],
                },
                {
                    "class_name": "Dense",
                    "config": {"name": "dense", "trainable": True, "units": 3, "use_bias": True},
                    "name": "dense",
                    "inbound_nodes": [[["lam", 0, 0, {}]]],
                },
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [["dense", 0, 0]],
        },
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = "2.15.0"
        h5.attrs["backend"] = "tensorflow"
        h5.attrs["model_config"] = json.dumps(config)
        weights = h5.create_group("model_weights")
        weights.attrs["layer_names"] = [b"x", b"lam", b"dense"]
        weights.attrs["keras_version"] = "2.15.0"
        weights.attrs["backend"] = "tensorflow"
        for name in ("x", "lam"):
            weights.create_group(name).attrs["weight_names"] = np.array([], dtype="S1")
        dense = weights.create_group("dense")
        dense.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        dense.create_dataset("dense/kernel:0", data=kernel)
        dense.create_dataset("dense/bias:0", data=bias)
    return path


KERAS2_REFERENCES = {
    "module_and_name": {
        "module": "tf_keras.src.layers.core.lambda_layer",
        "class_name": "function",
        "config": "sys.exit",
        "registered_name": None,
    },
    "no_class_name": {"module": "tf_keras.src.layers.core.lambda_layer", "config": "sys.exit"},
    "activations_module": {"module": "tf_keras.activations", "config": "sys.exit"},
}


@pytest.fixture(scope="module")
def marker_function(tmp_path_factory, keras):
    """A registered custom function ("hostile>touch") that creates a marker file when called."""
    marker = tmp_path_factory.mktemp("marker") / "called"

    @keras.saving.register_keras_serializable("hostile")
    def touch(x):
        marker.touch()
        return x

    yield marker
    keras.saving.get_custom_objects().pop("hostile>touch", None)


@pytest.fixture(scope="module")
def relu_lambda(tmp_path_factory, keras):
    """A Keras 3 file whose Lambda names Keras' relu by reference: allowed."""
    x = keras.Input((4,), name="x")
    h = keras.layers.Lambda(keras.activations.relu, name="lam")(x)
    path = tmp_path_factory.mktemp("relu") / "relu.keras"
    keras.Model(x, keras.layers.Dense(3, name="dense")(h), name="functional").save(path)
    return path


def _with_function(source, target, function):
    def edit(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                layer["config"]["function"] = function
        return config

    return rewrite_keras_config(source, target, edit)


@pytest.mark.parametrize("kind", sorted(KERAS2_REFERENCES))
def test_keras2_reference_by_module_and_name_is_code(tmp_path, kind):
    path = keras2_h5(tmp_path / "k2.h5", KERAS2_REFERENCES[kind])
    (finding,) = scan(path)
    assert finding.path == "model/lam"
    assert "'sys.exit'" in finding.reason and REFERENCE in finding.reason
    with pytest.raises(UnsafeModelError, match="by reference"):
        fusecli.load_model(path)


def test_keras2_reference_refused_by_fuse_merge_and_reported_by_inspect(tmp_path):
    path = keras2_h5(tmp_path / "k2.h5", KERAS2_REFERENCES["module_and_name"])
    for args in (
        ("fuse", path, path, "-o", tmp_path / "out.keras"),
        ("merge", path, path, "-o", tmp_path / "merged.h5"),
        ("predict", path, tmp_path / "x.npy", "-o", tmp_path / "p.npy"),
    ):
        np.save(tmp_path / "x.npy", np.ones((2, 4), "float32"))
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)  # sys.exit would give 0 or other
        assert result.stderr.startswith("Error: ") and REFERENCE in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2.h5", "x.npy"]
    result = run_cli("inspect", path, "--json")
    (report,) = json.loads(result.stdout)
    assert [f["path"] for f in report["unsafe"]] == ["model/lam"]


def test_a_keras2_function_name_in_the_lambda_itself_is_code(tmp_path):
    path = keras2_h5(tmp_path / "k2.h5", "exit")
    (finding,) = scan(path)
    assert "calling the Python function 'exit'" in finding.reason


@pytest.mark.parametrize(
    "function",
    [
        # through `config`: Keras looks the name up among registered functions first
        {"module": "builtins", "class_name": "function", "config": "hostile>touch"},
        {
            "module": "builtins",
            "class_name": "function",
            "config": "hostile>touch",
            "registered_name": "function",
        },
        # by `registered_name`
        {
            "module": "builtins",
            "class_name": "function",
            "config": "relu",
            "registered_name": "hostile>touch",
        },
        # a Keras module, a name that is not a Keras function
        {"module": "keras.src.layers", "class_name": "function", "config": "touch"},
    ],
)
def test_keras3_references_are_refused_and_never_called(
    tmp_path, relu_lambda, marker_function, function
):
    path = _with_function(relu_lambda, tmp_path / "ref.keras", function)
    findings = scan(path)
    assert [f.path for f in findings] == ["functional/lam"]
    with pytest.raises(UnsafeModelError):
        fusecli.load_model(path)
    assert not marker_function.exists()


def test_the_marker_function_is_called_when_trusted(tmp_path, relu_lambda, marker_function):
    """The crafted file is real: Keras does call the referenced function when told to trust."""
    function = {"module": "builtins", "class_name": "function", "config": "hostile>touch"}
    path = _with_function(relu_lambda, tmp_path / "ref.keras", function)
    model = fusecli.load_model(path, trust=True)
    assert marker_function.exists()
    marker_function.unlink()
    assert model.get_layer("lam") is not None


def test_keras_own_functions_by_reference_are_allowed(tmp_path, relu_lambda):
    assert scan(relu_lambda) == []
    for module in ("builtins", "keras.activations", "keras.src.activations.activations"):
        function = {"module": module, "class_name": "function", "config": "gelu"}
        assert scan(_with_function(relu_lambda, tmp_path / "ok.keras", function)) == []
    assert {"relu", "softmax", "mean_squared_error", "accuracy"} <= PURE_FUNCTIONS
    assert not {"exec", "eval", "exit", "get_file", "system"} & PURE_FUNCTIONS


def test_merge_never_copies_a_reference_clean(tmp_path, relu_lambda, marker_function):
    function = {"module": "builtins", "class_name": "function", "config": "hostile>touch"}
    path = _with_function(relu_lambda, tmp_path / "ref.keras", function)
    result = run_cli("merge", path, relu_lambda, "-o", tmp_path / "m.keras")
    assert result.returncode == 1 and REFERENCE in result.stderr
    assert not (tmp_path / "m.keras").exists()
    assert "unsafe" in inspect_file(path) and inspect_file(path)["unsafe"]


def test_inspect_escapes_control_characters_from_the_file(tmp_path, relu_lambda):
    """A model name holding `ESC [8m` (conceal) would hide the `unsafe:` lines that follow."""

    def edit(config):
        config["config"]["name"] = "\x1b[8mquiet\u202e"
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                layer["config"]["function"] = {"module": "os", "config": "system\x1b[2K"}
                layer["config"]["name"] = "lam\x9b8m"
        return config

    name = "model\x1b[8m.keras"
    path = rewrite_keras_config(relu_lambda, tmp_path / name, edit)
    for args in ((path,), (path, "--json"), (path, tmp_path / "missing\x07.keras")):
        result = run_cli("inspect", *args)
        for stream in (result.stdout, result.stderr):
            assert not any(c in stream for c in "\x1b\x07\x9b\u202e"), args
    table = run_cli("inspect", path).stdout
    assert "\\x1b[8mquiet\\u202e" in table
    assert "unsafe: " in table and "lam\\x9b8m" in table
    (report,) = json.loads(run_cli("inspect", path, "--json").stdout)
    assert report["name"] == "\\x1b[8mquiet\\u202e"
