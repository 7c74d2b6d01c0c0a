"""`predict`: a model over .npy/.npz/.h5 data to a .npy file or stdout; and a real shell pipe."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from fusecli.cli import cli
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.prediction import predict_array, predict_to_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def x_data():
    return np.random.default_rng(0).standard_normal((37, 4)).astype(np.float32)


@pytest.fixture(scope="session")
def expected_a(model_files, keras, x_data):
    return np.asarray(keras.saving.load_model(model_files["a"])(x_data))


@pytest.fixture(scope="session")
def two_input_model(tmp_path_factory, keras):
    keras.utils.set_random_seed(7)
    rgb = keras.Input((3,), name="rgb")
    pose = keras.Input((2,), name="pose")
    h = keras.layers.Concatenate()([rgb, pose])
    model = keras.Model([rgb, pose], keras.layers.Dense(4, activation="softmax")(h))
    path = tmp_path_factory.mktemp("two") / "two.keras"
    model.save(path)
    return path, model


def test_npz_in_uneven_batches_with_progress(tmp_path, model_files, x_data, expected_a):
    np.savez(tmp_path / "d.npz", x=x_data)
    calls = []
    report = predict_to_file(
        model_files["a"],
        tmp_path / "d.npz",
        tmp_path / "s.npy",
        batch_size=10,
        progress=lambda done, total: calls.append((done, total)),
    )
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected_a, rtol=1e-5, atol=1e-6)
    assert calls == [(10, 37), (20, 37), (30, 37), (37, 37)]
    assert report.shape == [37, 3] and report.inputs == ["input_layer"]


def test_npy_h5_and_key(tmp_path, model_files, x_data, expected_a):
    np.save(tmp_path / "d.npy", x_data)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["features"] = x_data
    np.savez(tmp_path / "k.npz", feats=x_data, y=np.zeros(37, dtype=int))
    for data, key in (("d.npy", None), ("d.h5", "features"), ("k.npz", "feats")):
        got = predict_array(model_files["a"], tmp_path / data, key=key, batch_size=16)
        np.testing.assert_allclose(got, expected_a, rtol=1e-5, atol=1e-6)


def test_several_inputs_by_name_or_position(tmp_path, two_input_model):
    path, model = two_input_model
    rng = np.random.default_rng(1)
    rgb = rng.random((9, 3)).astype(np.float32)
    pose = rng.random((9, 2)).astype(np.float32)
    expected = np.asarray(model([rgb, pose]))
    np.savez(tmp_path / "named.npz", pose=pose, rgb=rgb)
    np.savez(tmp_path / "pos.npz", x0=rgb, x1=pose)
    for data in ("named.npz", "pos.npz"):
        np.testing.assert_allclose(predict_array(path, tmp_path / data), expected, rtol=1e-5)
    np.savez(tmp_path / "bad.npz", x=rgb)
    with pytest.raises(FusecliError) as e:
        predict_array(path, tmp_path / "bad.npz")
    assert str(e.value) == (
        f"{tmp_path / 'bad.npz'}: the model has 2 inputs (rgb, pose); expected arrays named "
        "after them or x0 ... x1. Received arrays: x"
    )
    with pytest.raises(InvalidRequest, match=r"--key picks one array, but the model has 2"):
        predict_array(path, tmp_path / "pos.npz", key="x0")


def _bad_data(tmp_path, x_data):
    np.savez(tmp_path / "wide.npz", x=np.zeros((5, 6), np.float32))
    np.savez(tmp_path / "nokey.npz", features=x_data)
    np.savez(tmp_path / "str.npz", x=np.array([["a"] * 4] * 5))
    np.savez(tmp_path / "none.npz", x=np.zeros((0, 4), np.float32))
    bad = x_data.copy()
    bad[11, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "text.txt").write_text("1 2 3 4\n")
    header = io.BytesIO()  # a .npy header promising 4 TiB, then 64 bytes: numpy allocates first
    shape = {"descr": "<f4", "fortran_order": False, "shape": (2**38, 4)}
    np.lib.format.write_array_header_1_0(header, shape)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))
    with h5py.File(tmp_path / "lazy.h5", "w") as f:  # 8 MiB of rows declared, none stored
        f.create_dataset("x", shape=(2**19, 4), dtype="f4", chunks=(1024, 4), compression="gzip")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            "wide.npz",
            "{d}/wide.npz: data of shape (5, 6) does not fit the model's input 'input_layer' of "
            "shape (None, 4)",
        ),
        (
            "nokey.npz",
            "{d}/nokey.npz: has no array 'x' (it holds: features); choose one with --key",
        ),
        ("str.npz", "{d}/str.npz: array 'x' holds values of dtype <U1, not numbers"),
        ("none.npz", "{d}/none.npz: the data has no rows"),
        ("junk.npz", "{d}/junk.npz: cannot be read as npz data"),
        ("text.txt", "{d}/text.txt: is not a .npy, .npz or .h5 data file"),
        ("missing.npz", "{d}/missing.npz: no such file"),
        (
            "huge.npz",
            "{d}/huge.npz: array 'x' is truncated (its header promises 4398046511104 bytes of "
            "data for shape (274877906944, 4), the member holds 64)",
        ),
        (
            "lazy.h5",
            "{d}/lazy.h5: array 'x' declares 8388608 bytes but stores 0 (more than 1000 times "
            "less); refusing a possible decompression bomb",
        ),
    ],
)
def test_bad_data_is_one_clean_error_and_writes_nothing(
    tmp_path, model_files, x_data, data, message
):
    _bad_data(tmp_path, x_data)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FusecliError) as e:
        predict_to_file(model_files["a"], tmp_path / data, tmp_path / "s.npy", batch_size=8)
    assert str(e.value).startswith(message.format(d=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_nan_output_is_one_clean_error_and_writes_nothing(tmp_path, keras, x_data):
    # A purely linear model: NaN in, NaN out on every CPU. (Through a ReLU or a max, whether NaN
    # survives depends on the CPU's kernels: oneDNN's ReLU turns it into 0 on some.)
    keras.utils.set_random_seed(0)
    x = keras.Input((4,))
    keras.Model(x, keras.layers.Dense(3)(x)).save(tmp_path / "linear.keras")
    _bad_data(tmp_path, x_data)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FusecliError) as e:
        predict_to_file(
            tmp_path / "linear.keras", tmp_path / "nan.npz", tmp_path / "s.npy", batch_size=8
        )
    assert str(e.value).startswith(
        "The model's output is NaN or infinite for row 11 (check the input data)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_model_with_two_outputs_is_refused_in_memory(tmp_path, keras, x_data):
    x = keras.Input((4,))
    model = keras.Model(x, [keras.layers.Dense(2)(x), keras.layers.Dense(3)(x)])
    np.savez(tmp_path / "d.npz", x=x_data)
    with pytest.raises(FusecliError, match=r"has 2 outputs; tuning fuses one score array"):
        predict_array(model, tmp_path / "d.npz")  # tune's: one score per model
    with pytest.raises(InvalidRequest, match=r"write them to a \.npz file"):
        predict_to_file(model, tmp_path / "d.npz", tmp_path / "s.npy")
    assert not (tmp_path / "s.npy").exists()


def test_cli_file_json_and_stdout(tmp_path, model_files, x_data, expected_a):
    np.savez(tmp_path / "d.npz", x=x_data)
    runner = CliRunner()
    base = ["predict", str(model_files["a"]), str(tmp_path / "d.npz")]
    result = runner.invoke(cli, [*base, "-o", str(tmp_path / "s.npy"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["shape"] == [37, 3] and doc["output"] == str(tmp_path / "s.npy")
    assert "Wrote" in result.stderr

    result = runner.invoke(cli, [*base, "-o", "-", "--batch-size", "5"])
    assert result.exit_code == 0, result.stderr
    got = np.load(io.BytesIO(result.stdout_bytes))
    np.testing.assert_allclose(got, expected_a, rtol=1e-5, atol=1e-6)

    result = runner.invoke(cli, [*base, "-o", str(tmp_path / "s.npy")])
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"Error: {tmp_path / 's.npy'}: already exists (use --force to replace it)\n"
    )

    result = runner.invoke(cli, [*base, "-o", "-", "--json"])
    assert result.exit_code == 2
    assert "--json and -o - would both write to stdout; choose one" in result.stderr


@pytest.mark.slow
def test_shell_pipe_predict_into_combine(tmp_path, model_files, x_data, keras):
    """What a user types: predict streams .npy to stdout, combine reads it from stdin."""
    y = np.arange(37) % 3
    np.savez(tmp_path / "val.npz", x=x_data, y=y)
    b = np.asarray(keras.saving.load_model(model_files["b"])(x_data))
    np.save(tmp_path / "b.npy", b)
    a = np.asarray(keras.saving.load_model(model_files["a"])(x_data))
    # predict's scores come from other kernels (a compiled graph, batches of 8) and may differ
    # from `a` in the last bits: no row is so close to a tie that its argmax could follow them.
    top2 = np.sort(a, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-5
    fusecli = f"{sys.executable} -m fusecli"
    done = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"{fusecli} predict {model_files['a']} val.npz -o - --batch-size 8 "
            f"| {fusecli} combine - b.npy --w 0.8 0.2 --labels val.npz -o fused.npy",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "fused.npy\n"
    fused = np.load(tmp_path / "fused.npy")
    np.testing.assert_allclose(fused, 0.8 * a + 0.2 * b, rtol=1e-5, atol=1e-6)
    top1 = np.mean(np.argmax(fused, axis=1) == y)
    assert re.search(rf"^  - \(stdin\) +{np.mean(np.argmax(a, 1) == y):.4f}", done.stderr, re.M)
    assert re.search(rf"^  fused +{top1:.4f}$", done.stderr, re.MULTILINE)
    assert "Traceback" not in done.stderr
    assert "predict  [" not in done.stderr  # no progress bar when stderr is not a terminal


def test_at_logits_writes_the_scores_before_the_softmax(tmp_path, model_files, keras, x_data):
    pytest.importorskip("fusecli.fusion.logits")  # `fuse --at logits` provides the cut
    model = keras.saving.load_model(model_files["a"])
    last = model.layers[-1]
    logits = x_data
    for layer in model.layers[1:-1]:
        logits = np.asarray(layer(logits))
    kernel, bias = last.get_weights()
    expected = logits @ kernel + bias
    np.savez(tmp_path / "d.npz", x=x_data)
    report = predict_to_file(model_files["a"], tmp_path / "d.npz", tmp_path / "z.npy", at="logits")
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), expected, rtol=1e-5, atol=1e-5)
    assert report.at == "logits"

    x = keras.Input((4,))
    keras.Model(x, keras.layers.Dense(3, name="scores")(x)).save(tmp_path / "linear.keras")
    with pytest.raises(FusecliError, match=r"^Model 'linear' has no final softmax"):
        predict_array(tmp_path / "linear.keras", tmp_path / "d.npz", at="logits")
