"""Keras 2 `.h5` inputs fused at the logits (`--at logits`) and with `--scale lambda`, as file
operations (no Keras), into a `.h5` that tf-keras 2.x and Keras 3 both load and into `.keras`
(and Keras 3 inputs into the same kind of `.h5`).

The inputs, and their logits, are written by tf-keras (tests/legacy_fixtures/
make_keras2_logits_h5.py); each fused file is loaded by Keras 3 here and, if `.h5`, by tf-keras in
a subprocess, and must compute softmax(0.8 zA(x) + 0.2 zB(x)) from tf-keras' own logits.
"""

from __future__ import annotations

import importlib.util
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

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "tests" / "legacy_fixtures" / "make_keras2_logits_h5.py"
pytestmark = pytest.mark.slow

_TF_KERAS_PREDICT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np, tf_keras
    model = tf_keras.models.load_model(sys.argv[1], compile=False, safe_mode=False)
    print("classes:", ",".join(type(layer).__name__ for layer in model.layers), file=sys.stderr)
    np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2]), training=False)))
    """
)


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    """NAME.h5 and NAME.npz (x, y, z: input, output, logits) written by tf-keras."""
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("keras2_logits")
    done = subprocess.run(
        [sys.executable, str(GENERATOR), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def arrays(heads: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(heads / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def tf_keras_output(model: Path, x: np.ndarray, tmp: Path) -> tuple[np.ndarray, str]:
    """The fused file loaded and run by tf-keras, in its own process; and its layers' classes."""
    np.save(tmp / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", _TF_KERAS_PREDICT, str(model), str(tmp / "x.npy"), str(tmp / "y")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    classes = next(line for line in done.stderr.splitlines() if line.startswith("classes:"))
    return np.load(tmp / "y.npy"), classes


def fuse(*args: object) -> dict:
    result = run_cli("fuse", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def loaders_compute(keras, fused: Path, x: np.ndarray, wanted: np.ndarray, tmp: Path) -> str:
    """Keras 3 (and, for a .h5, tf-keras) computes `wanted` from the fused file; tf-keras' list
    of the layers' classes ("" for a .keras file)."""
    (got3,) = predict(keras.models.load_model(fused, compile=False, safe_mode=False), x)
    np.testing.assert_allclose(got3, wanted, rtol=1e-5, atol=1e-6)
    if fused.suffix != ".h5":
        return ""
    got2, classes = tf_keras_output(fused, x, tmp)
    np.testing.assert_allclose(got2, wanted, rtol=1e-5, atol=1e-6)
    return classes


# (a, b, softmax axis): a Dense(softmax) model with a trailing Softmax one; a nested Sequential
# with BatchNormalization and Activation("softmax") with a Keras <= 2.3 Sequential (no
# InputLayer); softmax over axis 1 of (batch, time, classes) on both sides.
PAIRS = [
    ("dense_softmax", "trailing_softmax", -1),
    ("nested_activation", "old_sequential", -1),
    ("sequence_axis1_a", "sequence_axis1_b", 1),
]


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize(("a", "b", "axis"), PAIRS)
def test_fused_at_the_logits(tmp_path, keras, heads, a, b, axis, suffix):
    one, two = arrays(heads, a), arrays(heads, b)
    x = one["x"]
    wanted = softmax(0.8 * one["z"] + 0.2 * two["z"], axis)
    # The logits matter: the same weights at the outputs give something else, and the outputs
    # vary with the input (a wrong weight or a missing cut shows).
    assert not np.allclose(wanted, 0.8 * one["y"] + 0.2 * two["y"], atol=1e-3)
    assert np.ptp(wanted, axis=0).max() > 0.1
    out = tmp_path / f"fused{suffix}"
    report = fuse(heads / f"{a}.h5", heads / f"{b}.h5", "--w", "0.8", "0.2", "--at", "logits",
                  "-o", out)  # fmt: skip
    assert report["converted"] == []  # fused as files, no model loaded in Keras
    assert report["at"] == "logits" and report["activation"] == "softmax"
    loaders_compute(keras, out, x, wanted, tmp_path)
    if suffix == ".h5":
        with h5py.File(out, "r") as f:
            config = json.loads(f.attrs["model_config"])
        classes = [layer["class_name"] for layer in config["config"]["layers"]]
        assert classes.count("Softmax") == 1  # the inputs' softmaxes cut, one on the sum
        assert config["config"]["layers"][-1]["config"]["axis"] == axis


def test_activation_none_gives_the_weighted_logits(tmp_path, keras, heads):
    one, two = arrays(heads, "dense_softmax"), arrays(heads, "nested_activation")
    out = tmp_path / "fused.h5"
    fuse(heads / "dense_softmax.h5", heads / "nested_activation.h5", "--w", "0.8", "0.2",
         "--at", "logits", "--activation", "none", "-o", out)  # fmt: skip
    loaders_compute(keras, out, one["x"], 0.8 * one["z"] + 0.2 * two["z"], tmp_path)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("at", ["output", "logits"])
def test_scale_lambda(tmp_path, keras, heads, at, suffix):
    # The literal Lambda recipe, as asked for: tf-keras and Keras 3 (safe_mode=False) both load
    # the .h5; Keras 3 refuses it by default, as it does every Lambda holding bytecode.
    one, two = arrays(heads, "dense_softmax"), arrays(heads, "trailing_softmax")
    if at == "logits":
        wanted = softmax(0.8 * one["z"] + 0.2 * two["z"], -1)
    else:
        wanted = 0.8 * one["y"] + 0.2 * two["y"]
    out = tmp_path / f"fused{suffix}"
    report = fuse(heads / "dense_softmax.h5", heads / "trailing_softmax.h5", "--w", "0.8", "0.2",
                  "--at", at, "--scale", "lambda", "-o", out)  # fmt: skip
    assert report["converted"] == [] and report["scale"] == "lambda"
    classes = loaders_compute(keras, out, one["x"], wanted, tmp_path)
    if suffix == ".h5":
        assert classes.count("Lambda") == 2 and "Rescaling" not in classes
    with pytest.raises(ValueError, match="Lambda"):
        keras.models.load_model(out, compile=False)
    shown = run_cli("inspect", out, "--json")
    assert shown.returncode == 0, shown.stderr
    options = json.loads(shown.stdout)[0]["recipe"]["options"]
    assert options["scale"] == "lambda" and options["at"] == at


def test_verify_at_the_logits(tmp_path, heads):
    # --verify loads the written file in Keras 3 and compares it with the models' own logits.
    out = tmp_path / "fused.h5"
    report = fuse(heads / "nested_activation.h5", heads / "trailing_softmax.h5", "--w", "0.8",
                  "0.2", "--at", "logits", "--scale", "lambda", "--verify", "-o", out)  # fmt: skip
    assert report["converted"] == [] and report["verify"]["result"] == "passed"
    assert report["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_no_keras_is_imported(tmp_path, heads, suffix):
    code = (
        "import sys\n"
        "from fusecli.fusion.fuse import fuse_to_file\n"
        "fuse_to_file(sys.argv[1:3], sys.argv[3], [0.8, 0.2], at='logits', scale='lambda')\n"
        "print([m for m in ('keras', 'tensorflow', 'tf_keras') if m in sys.modules])\n"
    )
    out = tmp_path / f"f{suffix}"
    args = [str(heads / "dense_softmax.h5"), str(heads / "nested_activation.h5"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert out.exists()


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        # A sigmoid head has no softmax to cut (the rules of fusecli.fusion.logits).
        ("dense_softmax", "sigmoid_head", "no final softmax"),
        # Softmaxes over different axes: their logits do not add up to one softmax.
        ("sequence_axis1_a", "sequence_last_axis", "must agree"),
    ],
)
def test_logits_out_of_reach_are_refused_in_one_line(tmp_path, heads, a, b, why, suffix):
    out = tmp_path / f"fused{suffix}"
    result = run_cli("fuse", heads / f"{a}.h5", heads / f"{b}.h5", "--at", "logits", "-o", out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: "), result.stderr
    assert why in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_the_written_file_is_scanned(tmp_path, heads, suffix):
    # The head's own Lambdas pass the scan (fusecli's bytecode, asked for); anything else that
    # would run code or read another file on load does not.
    from fusecli.formats.modelfile import read_model_file
    from fusecli.fusion.flat_h5 import head_lambdas
    from fusecli.fusion.proof import written_findings

    out = tmp_path / f"fused{suffix}"
    fuse(heads / "dense_softmax.h5", heads / "trailing_softmax.h5", "--scale", "lambda", "-o", out)
    head = head_lambdas(read_model_file(out).config)
    assert len(head) == 2
    assert written_findings(out, head) == []
    # The head's Lambdas are let pass by name, and only they.
    assert {f.path.split("/")[-1] for f in written_findings(out, set())} == head
    if suffix == ".keras":
        return
    with h5py.File(out, "r+") as f:
        f["model_weights"]["elsewhere"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    found = written_findings(out, head)
    assert len(found) == 1 and "another file" in found[0].describe()


def test_keras3_inputs_at_the_logits_with_lambda_into_h5(tmp_path, keras, heads):
    # Keras 3 .keras inputs reach the same flat .h5 (converted to Keras 2's schema): at the
    # logits, Lambda-scaled, loaded by tf-keras and Keras 3 alike.
    x = arrays(heads, "dense_softmax")["x"]
    rng = np.random.default_rng(5)
    inp = keras.Input((x.shape[1],))
    a = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(keras.layers.Dense(9)(inp)))
    inp = keras.Input((x.shape[1],))
    hidden = keras.layers.Dense(4)(keras.layers.Dense(7, activation="tanh")(inp))
    b = keras.Model(inp, keras.layers.Softmax()(hidden))
    for model in (a, b):
        model.set_weights([rng.normal(0.0, 1.0, w.shape).astype("float32") for w in model.weights])
        model.save(tmp_path / f"{'a' if model is a else 'b'}.keras")
    kernel, bias = a.layers[-1].get_weights()
    za = np.asarray(keras.Model(a.inputs, a.layers[-1].input)(x)) @ kernel + bias
    zb = np.asarray(keras.Model(b.inputs, b.layers[-1].input)(x))
    wanted = softmax(0.8 * za + 0.2 * zb, -1)
    assert not np.allclose(wanted, 0.8 * np.asarray(a(x)) + 0.2 * np.asarray(b(x)), atol=1e-3)
    out = tmp_path / "fused.h5"
    fuse(tmp_path / "a.keras", tmp_path / "b.keras", "--w", "0.8", "0.2", "--at", "logits",
         "--scale", "lambda", "-o", out)  # fmt: skip
    classes = loaders_compute(keras, out, x, wanted, tmp_path)
    assert classes.count("Lambda") == 2
