"""`fusecli fuse` from the command line: CliRunner for the contract, real subprocesses for the
things only a real process shows (TensorFlow's noise, --help speed, python -m)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, predict, run_cli

from fusecli import __version__
from fusecli.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def _fuse(runner, *args):
    return runner.invoke(cli, ["fuse", *map(str, args)], prog_name="fusecli")


def _expected(keras, files, weights, x):
    return sum(
        w * predict(keras.models.load_model(f), x)[0] for w, f in zip(weights, files, strict=True)
    )


@pytest.fixture(scope="module")
def x4():
    return np.random.default_rng(1).standard_normal((3, 4)).astype("float32")


@pytest.mark.parametrize(
    "layout",
    [
        ["{a}", "{b}", "--w", "0.8", "0.2"],
        ["--w", "0.8", "0.2", "{a}", "{b}"],
        ["{a}", "{b}", "--w", "0.8,0.2"],
        ["{a}", "--weights", "0.8", "0.2", "{b}"],
    ],
)
def test_weights_before_or_after_paths(runner, tmp_path, keras, model_files, x4, layout):
    a, b = model_files["a"], model_files["b"]
    out = tmp_path / "f.keras"
    args = [arg.format(a=a, b=b) for arg in layout] + ["-o", str(out)]
    result = _fuse(runner, *args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    fused = keras.models.load_model(out)
    np.testing.assert_allclose(
        predict(fused, x4)[0], _expected(keras, [a, b], [0.8, 0.2], x4), rtol=1e-6, atol=1e-7
    )


def test_normalize(runner, tmp_path, keras, model_files, x4):
    a, b = model_files["a"], model_files["b"]
    out = tmp_path / "n.h5"
    result = _fuse(runner, a, b, "--w", "2", "6", "--normalize", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["weights"] == [0.25, 0.75]
    assert report["format"] == "h5"
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), x4)[0],
        _expected(keras, [a, b], [0.25, 0.75], x4),
        rtol=1e-6,
        atol=1e-7,
    )


def test_json_report(runner, tmp_path, model_files):
    out = tmp_path / "f.keras"
    result = _fuse(runner, model_files["a"], model_files["b"], "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(out)
    assert report["weights"] == [0.5, 0.5]
    assert report["inputs_mode"] == "shared"
    assert report["inputs"] == [{"name": "input", "shape": [None, 4], "dtype": "float32"}]
    assert report["outputs"] == [{"name": "fused", "shape": [None, 3], "dtype": "float32"}]
    assert report["params"] == 2 * (4 * 8 + 8 + 8 * 3 + 3)
    assert report["max_abs_diff"] is None  # the numeric check is opt-in (--verify)
    assert report["check"]["tensors"] == 8
    assert report["check"]["head"] == "0.5*a + 0.5*b"
    assert "Inputs: shared (all models take the same inputs)." in result.stderr


def test_default_output_in_current_folder(runner, tmp_path, model_files):
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        result = _fuse(runner, model_files["a"], model_files["b"])
        assert result.exit_code == 0, result.output
        assert result.stdout == "fused.keras\n"
        assert (tmp_path / cwd / "fused.keras").stat().st_size > 0


def test_auto_says_separate_when_inputs_differ(runner, tmp_path, model_files):
    out = tmp_path / "f.keras"
    result = _fuse(runner, model_files["a"], model_files["other_in"], "-o", out)
    assert result.exit_code == 0, result.output
    assert (
        "Inputs: separate (input 0 of 'a' is (None, 4) float32, of 'other_in' (None, 6) float32)."
        in result.stderr
    )


def test_lambda_scale_warns(runner, tmp_path, model_files):
    result = _fuse(
        runner, model_files["a"], model_files["b"], "--scale", "lambda", "-o", tmp_path / "l.keras"
    )
    assert result.exit_code == 0, result.output
    assert "safe_mode=False" in result.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--w", "0.8"], "Expected one weight per model (2 models). Received: weights=(0.8,)"),
        (["--w", "0.8", "0.1", "0.1"], "Expected one weight per model (2 models)."),
        (["--w", "nan", "1"], "Weights must be finite numbers. Received: weights=(nan, 1.0)"),
        (["--w", "1", "inf"], "Weights must be finite numbers."),
        (["--w", "1", "-1", "--normalize"], "Cannot normalize weights that sum to 0."),
        (["--w", "a,b"], "Invalid value for '--w'"),
        (["-o", "{tmp}/f.onnx"], "The output must end in .keras, .h5 or .hdf5"),
        (["-o", "{tmp}/F.KERAS"], "The output's extension must be lower case"),
        (["-o", "{tmp}/f.H5"], "Keras loads only files whose name ends in .h5."),
        (["--inputs", "both"], "Invalid value for '--inputs'"),
    ],
)
def test_bad_requests_are_usage_errors(runner, tmp_path, model_files, extra, message):
    args = [model_files["a"], model_files["b"], "-o", tmp_path / "f.keras"]
    args += [e.format(tmp=tmp_path) for e in extra]
    result = _fuse(runner, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Try 'fusecli fuse --help' for help." in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_one_model_is_a_usage_error(runner, tmp_path, model_files):
    result = _fuse(runner, model_files["a"], "-o", tmp_path / "f.keras")
    assert result.exit_code == 2
    assert "Expected two or more models to fuse. Received: 1" in result.stderr


def test_missing_file(runner, tmp_path, model_files):
    missing = tmp_path / "nope.keras"
    result = _fuse(runner, model_files["a"], missing, "-o", tmp_path / "f.keras")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {missing}: no such file\n"
    assert not (tmp_path / "f.keras").exists()


def test_existing_output_is_kept_without_force(runner, tmp_path, model_files):
    out = tmp_path / "f.keras"
    out.write_bytes(b"precious")
    result = _fuse(runner, model_files["a"], model_files["b"], "-o", out)
    assert result.exit_code == 1
    assert result.stderr == f"Error: {out}: already exists (use --force to replace it)\n"
    assert out.read_bytes() == b"precious"
    result = _fuse(runner, model_files["a"], model_files["b"], "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:2] == b"PK"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.keras"]  # no temporary left


def test_never_writes_over_an_input(runner, tmp_path, model_files):
    a = tmp_path / "a.keras"
    shutil.copy(model_files["a"], a)
    before = a.read_bytes()
    result = _fuse(runner, a, model_files["b"], "-o", a, "--force")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {a}: is one of the input files; choose another output\n"
    assert a.read_bytes() == before


def test_output_folder_must_exist(runner, tmp_path, model_files):
    out = tmp_path / "no" / "such" / "f.keras"
    result = _fuse(runner, model_files["a"], model_files["b"], "-o", out)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {out}: the folder")


def test_output_mismatch_is_one_line(runner, tmp_path, model_files):
    result = _fuse(runner, model_files["a"], model_files["wide_out"], "-o", tmp_path / "f.keras")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: Output 0 of 'a' has shape (None, 3) but output 0 of")


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.stdout == f"fusecli, version {__version__}\n"


# -- real processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_subprocess_fuse_is_quiet_and_correct(tmp_path, keras, model_files, x4):
    out = tmp_path / "f.keras"
    result = run_cli(
        "fuse", model_files["a_h5"], model_files["b_h5"], "--w", "0.8", "0.2", "-o", out
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    # Only fusecli's own lines: no absl/oneDNN/CUDA/Keras chatter.
    lines = result.stderr.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["Inputs:", "Wrote", "f.keras"], result.stderr
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), x4)[0],
        _expected(keras, [model_files["a_h5"], model_files["b_h5"]], [0.8, 0.2], x4),
        rtol=1e-6,
        atol=1e-7,
    )


def test_subprocess_error_has_no_traceback(tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_text("this is not a model")
    result = run_cli("fuse", broken, broken, "-o", tmp_path / "f.keras")
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: {broken}: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "f.keras").exists()


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fusecli.cli import cli\n"
        'for args in (["--help"], ["fuse", "--help"], ["merge", "--help"], ["tune", "--help"]):\n'
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "heavy = ['tensorflow', 'keras', 'numpy', 'h5py', 'fusecli.fusion.fuse',\n"
        "         'fusecli.merging.merge', 'fusecli.scores.tuning', 'fusecli.formats.modelfile']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout == "[]\n", result.stderr


def test_python_dash_m_help():
    result = run_cli("fuse", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: fusecli fuse [OPTIONS] MODELS...")
