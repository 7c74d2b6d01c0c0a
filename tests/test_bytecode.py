"""Python bytecode wherever a file puts it: cell-wrapper functions written by tf-keras, Lambda
functions whose label says "raw", marshalled code under any key. Found by the scan, refused by
every command, and never run (each payload would create a marker file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_cli
from filesupport import marker_model, rewrite_h5_config, rewrite_keras_config

from fusecli.cli import cli
from fusecli.errors import UnsafeModelError
from fusecli.inspection import inspect_file
from fusecli.merging.merge import merge
from fusecli.safety.loading import load_model
from fusecli.safety.scan import Finding, scan

REFUSING = "; refusing (use --trust to load it anyway)"
BYTECODE = "is a Lambda layer with Python bytecode, which would run when loaded"

# tf-keras writes each file, then loads it once to show that loading runs the payload.
WRAPPERS_SCRIPT = textwrap.dedent(
    """
    import json, os, pathlib, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tf_keras as keras
    from tf_keras.src.layers.rnn import cell_wrappers

    out = pathlib.Path(sys.argv[1])
    marker = out / "payload_ran"
    touch = eval(f"lambda *a: (pathlib.Path({str(marker)!r}).touch(), a[-1])[1]")
    visit = eval(f"lambda s: (pathlib.Path({str(marker)!r}).touch(), True)[1]")
    keras.utils.set_random_seed(0)
    x = keras.Input((5, 3), name="x")
    residual = cell_wrappers.ResidualWrapper(keras.layers.GRUCell(3), residual_fn=touch)
    dropout = cell_wrappers.DropoutWrapper(
        keras.layers.GRUCell(3), state_keep_prob=0.9, dropout_state_filter_visitor=visit)
    y = keras.layers.RNN(residual, name="rnn")(x)
    z = keras.layers.RNN(dropout, name="rnn_dropout")(x)
    model = keras.Model(x, keras.layers.Add(name="add")([y, z]), name="wrapped")
    ran = {}
    for name in ("wrappers.h5", "wrappers.keras"):
        model.save(out / name)
        marker.unlink(missing_ok=True)
        keras.models.load_model(out / name, safe_mode=False) if name.endswith(".keras") \\
            else keras.models.load_model(out / name)
        ran[name] = marker.exists()
        marker.unlink(missing_ok=True)
    (out / "ran.json").write_text(json.dumps(ran))
    """
)


@pytest.fixture(scope="session")
def wrapped(tmp_path_factory) -> dict[str, Path]:
    """tf-keras files whose RNN cells are wrapped with Python functions (stored as bytecode)."""
    d = tmp_path_factory.mktemp("wrappers")
    subprocess.run(
        [sys.executable, "-c", WRAPPERS_SCRIPT, str(d)],
        check=True,
        capture_output=True,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
        timeout=300,
    )
    files = {"h5": d / "wrappers.h5", "keras": d / "wrappers.keras", "marker": d / "payload_ran"}
    files["ran"] = json.loads((d / "ran.json").read_text())
    return files


WRAPPER_FINDINGS = [
    Finding(
        "wrapped/rnn/residual_wrapper",
        "ResidualWrapper",
        "holds Python bytecode in 'residual_fn', which would run when loaded",
    ),
    Finding(
        "wrapped/rnn_dropout/dropout_wrapper",
        "DropoutWrapper",
        "holds Python bytecode in 'dropout_fn', which would run when loaded",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h5", "keras"])
def test_tf_keras_runs_wrapper_functions_and_the_scan_finds_them(wrapped, kind):
    assert wrapped["ran"][f"wrappers.{kind}"]  # the control: tf-keras runs them while loading
    assert scan(wrapped[kind]) == WRAPPER_FINDINGS
    assert inspect_file(wrapped[kind])["unsafe"] == [f.as_dict() for f in WRAPPER_FINDINGS]


@pytest.mark.parametrize("kind", ["h5", "keras"])
def test_every_command_refuses_wrapper_functions(wrapped, model_files, tmp_path, kind):
    path = wrapped[kind]
    first = WRAPPER_FINDINGS[0].describe()
    message = f"{path}: {first} (and 1 more: see `fusecli inspect {path}`){REFUSING}"
    with pytest.raises(UnsafeModelError) as caught:
        load_model(path)
    assert str(caught.value) == message
    with pytest.raises(UnsafeModelError) as caught:
        merge([path, path], tmp_path / f"m.{kind}")
    assert str(caught.value) == message
    result = CliRunner().invoke(cli, ["fuse", str(path), str(model_files["a"]), "-o",
                                      str(tmp_path / "f.keras")])  # fmt: skip
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []
    assert not wrapped["marker"].exists()


def test_inspect_lists_wrapper_functions_in_a_real_process(wrapped):
    result = run_cli("inspect", wrapped["h5"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        f"unsafe: {wrapped['h5']}: {f.describe()}" for f in WRAPPER_FINDINGS
    ]
    assert not wrapped["marker"].exists()


@pytest.fixture(scope="session")
def raw_lambda(tmp_path_factory, keras) -> dict[str, Path]:
    """A Keras 3 `.h5` whose Lambda function is a Keras 2 style list labelled "raw"."""
    d = tmp_path_factory.mktemp("raw_lambda")
    marker = d / "lambda_ran"
    source = d / "source.h5"
    marker_model(keras, marker).save(source)
    marker.unlink()

    def edit(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                code = layer["config"]["function"]["config"]
                layer["config"]["function"] = [code["code"], None, None]
                layer["config"]["function_type"] = "raw"
        return config

    return {"h5": rewrite_h5_config(source, d / "raw.h5", edit), "marker": marker}


def test_a_list_valued_lambda_function_labelled_raw_is_bytecode(raw_lambda, model_files, tmp_path):
    path = raw_lambda["h5"]
    assert scan(path) == [Finding("lambda_model/lam", "Lambda", BYTECODE)]
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", path, model_files["a_h5"], "-o", out)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"Error: {path}: layer 'lambda_model/lam' {BYTECODE}{REFUSING}\n"
    result = run_cli("merge", path, path, "-o", tmp_path / "m.h5")
    assert result.stderr == f"Error: {path}: layer 'lambda_model/lam' {BYTECODE}{REFUSING}\n"
    assert list(tmp_path.iterdir()) == []
    assert not raw_lambda["marker"].exists()
    # The control: Keras' legacy loader reads the list as bytecode and runs it.
    load_model(path, trust=True)
    assert raw_lambda["marker"].exists()
    raw_lambda["marker"].unlink()


def _code(raw_lambda) -> str:
    config = json.loads(__import__("h5py").File(raw_lambda["h5"], "r").attrs["model_config"])
    return next(x for x in config["config"]["layers"] if x["class_name"] == "Lambda")["config"][
        "function"
    ][0]


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (lambda code: [code, None, None], True),
        (lambda code: [code], True),
        # func_load's base64 decoding skips characters outside the alphabet
        (lambda code: ["!*" + code.replace("A", "A\n"), None, None], True),
        (lambda code: ["!" * 1000 + code, None, None], True),
        (lambda code: ["Y0" + "_layer" * 20, 0, 0, {}], False),  # a long name, not code
        (lambda code: [code[4:], None, None], False),  # shifted: no longer a code object
    ],
)
def test_marshalled_code_is_found_under_any_key(raw_lambda, model_files, tmp_path, value, found):
    payload = value(_code(raw_lambda))

    def edit(config):
        config["config"]["layers"][1]["config"]["bias_initializer"] = {"seed": payload}
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "hidden.keras", edit)
    expected = [
        Finding(
            "functional/dense",
            "Dense",
            "holds Python bytecode in 'seed', which would run when loaded",
        )
    ]
    assert scan(path) == (expected if found else [])


def test_wrapper_function_stored_by_name_is_found(model_files, tmp_path):
    def edit(config):
        config["config"]["layers"][1]["config"].update(
            residual_fn="system", residual_fn_type="function", residual_fn_module="os"
        )
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "named.keras", edit)
    assert [f.describe() for f in scan(path)] == [
        "layer 'functional/dense' holds a callable in 'residual_fn' calling the Python function "
        "'system' from module 'os', which Keras would look up and run"
    ]
