"""tf.keras 2 models that call TensorFlow functions on Keras tensors (TFOpLambda layers): loaded,
fused and written as Keras 3 operation nodes, they compute what tf-keras computed.

The files and tf-keras' outputs are written once per session by
tests/legacy_fixtures/make_tf_ops_h5.py in a subprocess (see that script for each model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import predict, run_cli
from keras2support import MARKER, expected

from fusecli.errors import ModelFileError
from fusecli.formats import keras2
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model
from fusecli.safety.scan import scan

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow

GENERATOR = Path(__file__).parent / "legacy_fixtures" / "make_tf_ops_h5.py"
MODELS = ["tf_arithmetic", "tf_unary", "tf_shapes", "tf_masked", "tf_nested"]


@pytest.fixture(scope="session")
def ops_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("tf_ops")
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    done = subprocess.run(
        [sys.executable, str(GENERATOR), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_converted_model_computes_what_tf_keras_computed(ops_dir, name):
    xs, ys = expected(ops_dir, name)
    got = predict(load_model(ops_dir / f"{name}.h5"), xs if len(xs) > 1 else xs[0])
    assert len(got) == len(ys)
    for i, (g, y) in enumerate(zip(got, ys, strict=True)):
        assert g.shape == y.shape, i
        np.testing.assert_allclose(g.astype("float32"), y, rtol=1e-4, atol=1e-5, err_msg=str(i))
    assert max(float(np.ptp(y)) for y in ys) > 0.5  # outputs that vary


def test_every_tf_op_becomes_a_keras_operation_and_the_scan_passes_it(ops_dir):
    for name in MODELS:
        model_file = read_model_file(ops_dir / f"{name}.h5")
        assert scan(model_file) == []
        layers = keras2.convert_config(model_file.config)["config"]["layers"]
        classes = {spec["class_name"] for spec in layers}
        assert not classes & {"TFOpLambda", "SlicingOpLambda"}, name
        ops = [spec for spec in layers if spec.get("module", "").startswith("keras.src.ops.")]
        assert ops and all(spec["registered_name"] == spec["class_name"] for spec in ops)
    layers = keras2.convert_config(read_model_file(ops_dir / "tf_arithmetic.h5").config)
    nodes = [(s["class_name"], n) for s in layers["config"]["layers"] for n in s["inbound_nodes"]]
    calls = [(c, n["args"][-1]) for c, n in nodes if isinstance(n, dict)]
    assert ("Multiply", 3.0) in calls  # x * 3.0


@pytest.mark.slow
def test_fused_tf_op_models_load_in_keras_safe_mode(ops_dir, tmp_path, keras):
    out = tmp_path / "fused.keras"
    a, b = ops_dir / "tf_shapes.h5", ops_dir / "tf_shapes.h5"
    result = run_cli("fuse", a, b, "--w", "0.8", "0.2", "-o", out)
    assert result.returncode == 0, result.stderr
    fused = keras.saving.load_model(out, safe_mode=True)
    xs, ys = expected(ops_dir, "tf_shapes")
    got = predict(fused, xs)
    for g, y in zip(got, ys, strict=True):
        np.testing.assert_allclose(g.astype("float32"), y, rtol=1e-4, atol=1e-5)


def test_an_unconverted_tf_function_is_refused_naming_it(ops_dir, tmp_path):
    path = ops_dir / "tf_unsupported.h5"
    out = tmp_path / "o.keras"
    result = run_cli("fuse", path, path, "-o", out)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.splitlines()[-1] == (
        f"Error: {path}: layer 'tf_unsupported/tf.math.l2_normalize' is a TFOpLambda layer, "
        "which calls the TensorFlow function tf.math.l2_normalize named in the file (fusecli "
        "converts only the functions listed in docs/keras2.md); refusing (use --trust to load "
        "it anyway)"
    )
    with pytest.raises(ModelFileError) as info:
        load_model(path, trust=True)
    assert str(info.value).startswith(
        f"{path}: cannot convert Keras 2 layer 'tf.math.l2_normalize' (TFOpLambda): "
        "tf.math.l2_normalize has no Keras 3 equivalent fusecli converts"
    )


def _tf_op(function: str, node: list, name: str = "op") -> dict:
    return {
        "class_name": "TFOpLambda",
        "name": name,
        "config": {"name": name, "function": function, "dtype": "float32"},
        "inbound_nodes": [node],
    }


def _model(*ops: dict) -> dict:
    inp = {
        "class_name": "InputLayer",
        "name": "x",
        "config": {"name": "x", "batch_input_shape": [None, 3, 4], "dtype": "float32"},
        "inbound_nodes": [],
    }
    return {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [inp, *ops],
            "input_layers": [["x", 0, 0]],
            "output_layers": [[ops[-1]["name"], 0, 0]],
        },
    }


@pytest.mark.parametrize(
    ("function", "kwargs", "reason"),
    [
        ("compat.v1.transpose", {"perm": None, "conjugate": True}, "with conjugate=True"),
        ("linalg.matmul", {"b": ["x", 0, 0], "adjoint_b": True}, "with adjoint_b=True"),
        ("reshape", {"shape": ["x", 0, 0]}, "is given a shape that is not a list of numbers"),
        ("concat", {"axis": 0}, "along axis 0 (the batch) is not converted"),
        ("math.reduce_sum", {"axis": 1, "mystery": 3}, "with mystery=3 is not converted"),
        ("einsum", {}, "has no Keras 3 equivalent fusecli converts"),
    ],
)
def test_arguments_without_an_equivalent_are_refused(function, kwargs, reason):
    config = _model(_tf_op(function, ["x", 0, 0, kwargs]))
    with pytest.raises(ModelFileError) as info:
        keras2.convert_config(config, "m.h5")
    assert reason in str(info.value)
    assert f"cannot convert Keras 2 layer 'op' (TFOpLambda): tf.{function}" in str(info.value)


def test_slices_and_constants_are_carried_as_keras_writes_them():
    ops = [
        _tf_op(
            "__operators__.getitem",
            ["x", 0, 0, {"slice_spec": [{"class_name": "__ellipsis__"}, None, 1]}],
            "s",
        ),
        _tf_op("math.subtract", ["_CONSTANT_VALUE", -1, 1.0, {"y": ["s", 0, 0], "name": None}]),
    ]
    layers = keras2.convert_config(_model(*ops))["config"]["layers"]
    getitem, subtract = layers[1], layers[2]
    assert getitem["class_name"] == "GetItem"
    assert getitem["inbound_nodes"][0]["args"][1] == [
        {"class_name": "__ellipsis__", "config": {}},
        None,
        1,
    ]
    args = subtract["inbound_nodes"][0]["args"]
    assert args[0] == 1.0 and args[1]["config"]["keras_history"] == ["s", 0, 0]
    assert json.loads(json.dumps(layers)) == layers
