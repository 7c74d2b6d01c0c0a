"""`fusecli export`: SavedModel, TFLite and ONNX, each run in its own runtime here and compared
with the Keras model, independently of fusecli's own check.

Conversions are slow, so the models are tiny and made once per module, and most round trips go
through the Python API in this process; the CLI runs in a subprocess only where its contract
(stdout, `Error:` lines, exit codes) is the point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from filesupport import keras2_files, marker_model

import fusecli
from fusecli.errors import FusecliError, InvalidRequest, VerificationError

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra is not installed")

# The served names each model must keep: (inputs, outputs).
NAMES = {
    "fused": (["rgb_frame", "pose_joints"], ["fused"]),
    "logits": (["image"], ["fused"]),
    "merged": (["image"], ["probs"]),
    "multi": (["feats"], ["fused_cls", "fused_reg"]),
}


def _cnn(keras, seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 1), name="image")
    h = keras.layers.Conv2D(3, 3, activation="tanh")(x)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax", name="probs")(h))


def _gru(keras, seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((5, 3), name="joints")
    h = keras.layers.GRU(4)(x)
    return keras.Model(x, keras.layers.Dense(3, activation="softmax")(h))


def _two_heads(keras, seed: int):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="feats")
    h = keras.layers.Dense(6, activation="tanh")(x)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(h)
    return keras.Model(x, [cls, keras.layers.Dense(2, name="reg")(h)])


@pytest.fixture(scope="module")
def models(tmp_path_factory, keras) -> dict[str, Path]:
    """The four models to export, as files made by fusecli itself, and a few bad inputs."""
    d = tmp_path_factory.mktemp("export_models")
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 6, 1), name="frame")
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3, activation="relu")(x))
    keras.Model(x, keras.layers.Dense(3, activation="softmax")(h)).save(d / "rgb.keras")
    _gru(keras, 1).save(d / "pose.keras")
    _cnn(keras, 2).save(d / "cnn_a.keras")
    _cnn(keras, 3).save(d / "cnn_b.keras")
    _two_heads(keras, 4).save(d / "heads_a.keras")
    _two_heads(keras, 5).save(d / "heads_b.keras")
    files = {
        "fused": d / "fused.keras",
        "logits": d / "logits.keras",
        "merged": d / "merged.keras",
        "multi": d / "multi.keras",
        "cnn_a": d / "cnn_a.keras",
        "cnn_b": d / "cnn_b.keras",
    }
    # (fusecli's own tests check these files; here they are only inputs)
    rgb_pose = [d / "rgb.keras", d / "pose.keras"]
    fusecli.fuse_to_file(rgb_pose, files["fused"], [0.8, 0.2], verify=False)
    cnns = [d / "cnn_a.keras", d / "cnn_b.keras"]
    fusecli.fuse_to_file(cnns, files["logits"], at="logits", verify=False)
    fusecli.merge(cnns, files["merged"], verify=False)
    heads = [d / "heads_a.keras", d / "heads_b.keras"]
    fusecli.fuse_to_file(heads, files["multi"], verify=False)

    # Text in: no random batch to check an export with.
    x = keras.Input((1,), dtype="string", name="word")
    keras.Model(x, keras.layers.StringLookup(vocabulary=["a", "b"])(x)).save(d / "words.keras")
    files["words"] = d / "words.keras"
    files["unsafe_marker"] = d / "code_ran"
    marker_model(keras, files["unsafe_marker"]).save(d / "unsafe.keras")
    files["unsafe_marker"].unlink()  # building the model ran its Lambda once
    files["unsafe"] = d / "unsafe.keras"
    (d / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip")
    files["broken"] = d / "broken.keras"
    return files


@pytest.fixture(scope="module")
def cli_runs(models, tmp_path_factory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """The CLI runs that convert, started together at the module's first test so that they run
    while the in-process round trips do; each test then waits for its own."""
    runs = {
        "gru_tflite": ("fused", "fused.tflite"),
        "saved_model": ("multi", "served"),
        "onnx_json": ("fused", "fused.onnx", "--json"),
    }
    if not HAVE_ONNX:
        del runs["onnx_json"]
    started = {}
    for key, (model, out, *flags) in runs.items():
        d = tmp_path_factory.mktemp(key)
        started[key] = (_start_cli("export", models[model], "-o", d / out, *flags), d / out)
    yield started
    for proc, _ in started.values():  # those a deselected test did not wait for
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _start_cli(*args: object) -> subprocess.Popen:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "fusecli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )


def _finished(run: tuple[subprocess.Popen, Path]) -> tuple[subprocess.CompletedProcess, Path]:
    proc, out = run
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


# -- what a client of each runtime sees, read without fusecli ---------------------------------


def _serve(fmt: str, path: Path, feed: dict[str, np.ndarray]):
    """(input names, output names, outputs) of the artifact, as its runtime's users call it."""
    if fmt == "saved-model":
        import tensorflow as tf

        fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        out = {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in feed.items()}).items()}
        return sorted(fn.structured_input_signature[1]), sorted(fn.structured_outputs), out
    if fmt == "tflite":
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=str(path))
        names = interpreter.get_signature_list()["serving_default"]
        out = interpreter.get_signature_runner("serving_default")(**feed)
        return sorted(names["inputs"]), sorted(names["outputs"]), out
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [o.name for o in session.get_outputs()]
    ins = sorted(i.name for i in session.get_inputs())
    return ins, sorted(outs), dict(zip(outs, session.run(outs, feed), strict=True))


def _feed(model, names: list[str], rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    return {
        n: (3 * rng.standard_normal((rows, *t.shape[1:]))).astype("float32")
        for n, t in zip(names, model.inputs, strict=True)
    }


CASES = [
    pytest.param(name, fmt, marks=[needs_onnx] if fmt == "onnx" else [])
    for name in NAMES
    for fmt in ("saved-model", "tflite", "onnx")
]


@pytest.mark.usefixtures("cli_runs")
@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_each_format_round_trips_with_the_models_own_names(models, tmp_path, keras, name, fmt):
    out = tmp_path / {"saved-model": "served", "tflite": "m.tflite", "onnx": "m.onnx"}[fmt]
    batch = 2 if (name, fmt) == ("fused", "tflite") else None  # the GRU needs it for TFLite
    report = fusecli.export(models[name], out, batch_size=batch)

    in_names, out_names = NAMES[name]
    assert report.format == fmt and report.verified and report.outputs_vary
    assert [t["name"] for t in report.inputs] == in_names
    assert [t["name"] for t in report.outputs] == out_names
    assert report.max_abs_diff <= report.tolerance
    model = keras.saving.load_model(models[name])
    feed = _feed(model, in_names, rows=batch or 3)
    got_in, got_out, got = _serve(fmt, out, feed)
    assert (got_in, got_out) == (sorted(in_names), sorted(out_names))
    expected = keras.tree.flatten(model([feed[n] for n in in_names]))
    spread = 0.0
    for n, want in zip(out_names, expected, strict=True):
        np.testing.assert_allclose(got[n], np.asarray(want), rtol=1e-4, atol=1e-5)
        spread = max(spread, float(np.ptp(np.asarray(want), axis=0).max()))
    assert spread > 1e-3  # the outputs vary with the input, so the comparison means something
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


def test_a_keras2_era_h5_goes_through_the_door_and_exports(tmp_path_factory, tmp_path):
    # GRU + LSTM over an Embedding, written by tf-keras: converted on load, then exported.
    path = keras2_files(tmp_path_factory)["k2_rnn"]
    report = fusecli.export(path, tmp_path / "rnn.tflite", batch_size=2)
    assert [t["name"] for t in report.inputs] == ["tokens"]
    assert report.inputs[0]["dtype"] == "int32" and report.outputs[0]["name"] == "probs"
    assert report.verified and report.rows == 2 and report.max_abs_diff <= report.tolerance


def test_the_gru_needs_a_batch_size_for_tflite_and_the_error_says_so(cli_runs):
    r, out = _finished(cli_runs["gru_tflite"])
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("Error: The model cannot be converted to TFLite with a free batch")
    assert "--batch-size N" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == "" and list(out.parent.iterdir()) == []


def test_cli_prints_only_the_path_and_names_on_stderr(cli_runs, models):
    r, out = _finished(cli_runs["saved_model"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n"
    assert "Input feats: float32 (None, 4)" in r.stderr
    assert "Output fused_cls: float32 (None, 3)" in r.stderr
    assert "Output fused_reg: float32 (None, 2)" in r.stderr
    assert (out / "saved_model.pb").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    r = run_cli("export", models["multi"], "-o", out)
    assert r.returncode == 1
    assert r.stderr == f"Error: {out}: already exists (use --force to replace it)\n"


@needs_onnx
def test_cli_json_is_the_only_thing_on_stdout(cli_runs):
    r, out = _finished(cli_runs["onnx_json"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["output"] == str(out) and report["format"] == "onnx"
    assert report["inputs"] == [
        {"name": "rgb_frame", "shape": [None, 6, 6, 1], "dtype": "float32"},
        {"name": "pose_joints", "shape": [None, 5, 3], "dtype": "float32"},
    ]
    assert report["outputs"] == [{"name": "fused", "shape": [None, 3], "dtype": "float32"}]
    assert report["verified"] and report["runtime"] == "onnxruntime"
    assert 0 <= report["max_abs_diff"] <= report["tolerance"]


def test_an_export_that_cannot_be_checked_is_deleted_and_no_verify_keeps_it(models, tmp_path):
    out = tmp_path / "served"
    with pytest.raises(VerificationError) as e:
        fusecli.export(models["words"], out)
    assert str(e.value) == (
        "Cannot make random input of dtype string for input 'word' to check the export, "
        "so it was not kept; use --no-verify to export it unchecked"
    )
    assert list(tmp_path.iterdir()) == []  # the SavedModel was written, then removed
    report = fusecli.export(models["words"], out, verify=False)
    assert not report.verified and (out / "saved_model.pb").is_file()


def test_the_check_fails_when_the_artifact_computes_something_else(models, tmp_path):
    from fusecli.exporting import saved_model
    from fusecli.exporting.formats import FORMATS
    from fusecli.exporting.signature import signature_of
    from fusecli.exporting.verify import check_export
    from fusecli.safety.loading import load_model

    other = tmp_path / "other"
    fusecli.export(models["cnn_b"], other, verify=False)  # same names and shapes, other weights
    signature = signature_of(load_model(models["cnn_a"]))
    with pytest.raises(VerificationError, match="differs from the Keras model by up to"):
        check_export(signature, FORMATS["saved-model"], saved_model.run, other)


@pytest.mark.parametrize("which", ["broken", "unsafe"])
def test_a_broken_or_unsafe_input_is_one_error_line(models, tmp_path, which):
    r = run_cli("export", models[which], "-o", tmp_path / "m.tflite")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"Error: {models[which]}: ")
    assert len(r.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert not models["unsafe_marker"].exists()


def test_without_the_onnx_extra_the_error_names_the_install_command(models, tmp_path):
    # The packages are hidden from this one process, as if they were not installed.
    hide = "import sys; sys.modules.update(tf2onnx=None, onnxruntime=None); "
    code = hide + "from fusecli.cli import main; sys.argv[0] = 'fusecli'; main()"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "export",
            str(models["fused"]),
            "-o",
            str(tmp_path / "m.onnx"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("Error: Exporting to ONNX needs tf2onnx, onnx and onnxruntime")
    assert r.stderr.endswith("Install them with: pip install 'fusecli[onnx]'\n")
    assert list(tmp_path.iterdir()) == []


# -- where it may write: checked before any work ----------------------------------------------


def test_the_output_picks_the_format(models, tmp_path):
    with pytest.raises(InvalidRequest, match="The output picks the format"):
        fusecli.export(models["merged"], tmp_path / "m.keras")
    with pytest.raises(InvalidRequest, match="extension asks for TFLite"):
        fusecli.export(models["merged"], tmp_path / "m.tflite", format="onnx")
    with pytest.raises(InvalidRequest, match="Expected batch_size to be 1 or more"):
        fusecli.export(models["merged"], tmp_path / "m.tflite", batch_size=0)
    report = fusecli.export(models["merged"], tmp_path / "v1.2", format="saved-model")
    assert report.format == "saved-model" and (tmp_path / "v1.2" / "saved_model.pb").is_file()


def test_force_replaces_a_saved_model_but_never_another_directory_or_an_input(models, tmp_path):
    out = tmp_path / "served"
    fusecli.export(models["merged"], out, verify=False)
    report = fusecli.export(models["logits"], out, force=True, verify=False)
    assert [t["name"] for t in report.outputs] == ["fused"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]

    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(FusecliError, match="does not hold a SavedModel"):
        fusecli.export(models["merged"], other, force=True)
    assert (other / "cat.jpg").read_bytes() == b"meow"

    inside = out / "model.keras"
    inside.write_bytes(models["merged"].read_bytes())
    with pytest.raises(FusecliError, match="holds one of the input files"):
        fusecli.export(inside, out, force=True)
    alias = tmp_path / "alias.tflite"  # the input under another name
    alias.symlink_to(models["merged"])
    before = models["merged"].read_bytes()
    with pytest.raises(FusecliError, match="is one of the input files"):
        fusecli.export(models["merged"], alias, force=True)
    assert models["merged"].read_bytes() == before


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fusecli.cli import cli\n"
        "assert CliRunner().invoke(cli, ['export', '--help']).exit_code == 0\n"
        "heavy = ['tensorflow', 'keras', 'numpy', 'h5py', 'tf2onnx', 'fusecli.exporting.export']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[]\n"
