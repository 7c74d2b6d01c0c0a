"""`fusecli merge` from the command line: CliRunner for the contract, two real subprocesses."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli

from fusecli.cli import cli
from fusecli.cli.common import progress_bar


@pytest.fixture
def runner():
    return CliRunner()


def _merge(runner, *args):
    return runner.invoke(cli, ["merge", *map(str, args)], prog_name="fusecli")


def _weights(keras, path):
    return keras.models.load_model(path).get_weights()


def test_average_of_three(runner, tmp_path, keras, model_files):
    files = [model_files[k] for k in ("a", "b", "c")]
    out = tmp_path / "soup.keras"
    result = _merge(runner, *files, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    # a, b and c were initialised independently: they merge, with a warning for each
    *warnings, wrote = result.stderr.splitlines()
    assert wrote == (
        f"Wrote {out} (linear, weights 0.333333, 0.333333, 0.333333; 4 tensors merged; "
        "67 parameters; read back and checked)."
    )
    assert [w.split(" does not look")[0] for w in warnings] == [
        "Warning: b.keras",
        "Warning: c.keras",
    ]
    sources = [_weights(keras, f) for f in files]
    for got, *xs in zip(_weights(keras, out), *sources, strict=True):
        np.testing.assert_allclose(got, sum(xs) / 3, rtol=1e-6, atol=1e-7)


def test_weights_json_and_mixed_formats(runner, tmp_path, keras, model_files):
    a, b = model_files["a_h5"], model_files["b"]
    out = tmp_path / "m.h5"
    result = _merge(runner, a, b, "--w", "0.7", "0.3", "--no-normalize", "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("Warning: b.keras does not look like a relative of a_h5.h5")
    report = json.loads(result.stdout)
    relatedness = report.pop("relatedness")
    assert relatedness["reference"] == "a_h5.h5"
    assert relatedness["models"][0]["model"] == "b.keras"
    assert relatedness["kernels"] == 2
    assert report.pop("warnings") == [result.stderr.removeprefix("Warning: ").rstrip("\n")]
    per_tensor = report.pop("per_tensor")
    assert [t["weights"] for t in per_tensor] == [[0.7, 0.3]] * 4
    assert report.pop("settings") == {"weights": [0.7, 0.3], "normalize": False}
    assert report == {
        "output": str(out),
        "format": "h5",
        "method": "linear",
        "models": [str(a), str(b)],
        "base": None,
        "weights": [0.7, 0.3],
        "t": None,
        "template": str(a),
        "tensors": 4,
        "merged": 4,
        "copied": 0,
        "parameters": 67,
        "bytes": 268,
        "verified": True,
        "seed": None,
        "dtype": None,
    }
    for got, x, y in zip(_weights(keras, out), _weights(keras, a), _weights(keras, b), strict=True):
        np.testing.assert_allclose(got, 0.7 * x + 0.3 * y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["{c}", "--method", "slerp", "--t", "0.5"],
            "slerp merges exactly two models. Received: 3 models",
        ),
        (["--method", "slerp"], "slerp needs --t (in [0, 1])"),
        (
            ["--method", "task-arithmetic"],
            "task-arithmetic needs the model the others were fine-tuned from: --base",
        ),
        (
            ["--w", "1", "2", "3"],
            "Expected one weight per model (2 models). Received: weights=1,2,3",
        ),
    ],
)
def test_usage_errors(runner, tmp_path, model_files, extra, message):
    out = tmp_path / "o.keras"
    args = [x.format(c=model_files["c"]) for x in extra]
    result = _merge(runner, model_files["a"], model_files["b"], *args, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.endswith(f"Error: {message}\n")
    assert not out.exists()


def test_different_architectures(runner, tmp_path, model_files):
    out = tmp_path / "o.keras"
    result = _merge(runner, model_files["a"], model_files["wide_out"], "-o", out)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(
        "Error: Models must have the same architecture to be merged; the first difference: "
        "layer 2 ("
    )
    assert result.stderr.endswith(", a Dense: units is 3 in a.keras, 5 in wide_out.keras\n")
    assert result.stderr.count("\n") == 1
    assert not out.exists()


def test_existing_output_and_force(runner, tmp_path, model_files):
    out = tmp_path / "o.keras"
    out.write_text("x")
    args = [model_files["a"], model_files["b"], "-o", out]
    result = _merge(runner, *args)
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {out}: already exists (use --force to replace it)\n",
    )
    assert _merge(runner, *args, "--force", "-q").exit_code == 0
    assert out.read_bytes()[:2] == b"PK"


def test_subprocess_slerp_json(tmp_path, keras, model_files):
    out = tmp_path / "s.keras"
    proc = run_cli(
        "merge",
        model_files["a"],
        model_files["b_h5"],
        "--method",
        "slerp",
        "--t",
        "0.25",
        "-o",
        out,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["t"] == 0.25
    assert proc.stderr.endswith(
        f"\nWrote {out} (slerp, t=0.25; 4 tensors merged; 67 parameters; read back and checked).\n"
    )
    assert len(_weights(keras, out)) == 4


def test_subprocess_error_is_one_line(tmp_path, model_files):
    proc = run_cli("merge", model_files["a"], model_files["other_in"], "-o", tmp_path / "o.h5")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: Models must have the same architecture to be merged")
    assert proc.stderr.count("\n") == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_for_large_models_on_a_terminal(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar("Merging", min_total=2**25) as update:
        update(2**10, 2**20)  # 1 MB of weights: over before a bar is worth drawing
    assert stream.getvalue() == ""
    with progress_bar("Merging", min_total=2**25) as update:
        update(2**25, 2**26)
        update(2**26, 2**26)
    assert "Merging" in stream.getvalue() and "100%" in stream.getvalue()
    with progress_bar("Merging", enabled=False) as update:
        assert update is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar("Merging", min_total=2**25) as update:
        assert update is None


def test_merge_refuses_a_file_that_carries_code(tmp_path, keras):
    keras.utils.set_random_seed(0)
    x = keras.Input((3,))
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(keras.layers.Dense(2)(x))
    paths = [tmp_path / "a.keras", tmp_path / "b.keras"]
    for path in paths:
        keras.Model(x, y, name="functional").save(path)
    out = tmp_path / "m.keras"
    result = CliRunner().invoke(cli, ["merge", *map(str, paths), "-o", str(out)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {paths[0]}: layer 'functional/double' is a Lambda layer with Python bytecode, "
        "which would run when loaded; refusing (use --trust to load it anyway)\n"
    )
    assert not out.exists()


@pytest.mark.slow
def test_wrapped_layers_whose_inner_names_differ_merge(runner, tmp_path, keras):
    # Built in one process, the two models' inner layers are named lstm/lstm_1 and so on.
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 3))
        h = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))(x)
        y = keras.layers.TimeDistributed(keras.layers.Dense(2))(h)
        paths.append(tmp_path / f"w{seed}.keras")
        keras.Model(x, y).save(paths[-1])
    out = tmp_path / "w.keras"
    result = _merge(runner, *paths, "-o", out)
    assert result.exit_code == 0, result.output
    merged = keras.models.load_model(out).get_weights()
    for m, a, b in zip(merged, _weights(keras, paths[0]), _weights(keras, paths[1]), strict=True):
        np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6, atol=1e-7)


def test_overflow_is_one_error_line(tmp_path, model_files):
    out = tmp_path / "o.keras"
    args = ["merge", model_files["a"], model_files["b"], "--w", "1e308", "1e308"]
    result = run_cli(*args, "--no-normalize", "-o", out)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: The merged weight 0 (layer ")
    assert result.stderr.count("\n") == 1  # no numpy RuntimeWarning above it
    assert not out.exists()
