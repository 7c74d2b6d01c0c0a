"""The recipe in the file: every file fuse and merge write says how it was made, and still loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from keras2support import expected, keras2_reference_dir

from fusecli.formats.recipe import KEY, read_recipe

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow

X = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(keras, path: Path) -> np.ndarray:
    return np.asarray(keras.models.load_model(path)(X))


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_fuse_records_its_recipe_and_the_file_loads(tmp_path, model_files, keras, suffix):
    a, b = model_files["a"], model_files["b"]
    out = tmp_path / f"fused{suffix}"
    done = run_cli("fuse", a, b, "--w", "0.8", "0.2", "-o", out)
    assert done.returncode == 0, done.stderr

    assert read_recipe(out, suffix.lstrip(".")) == {
        "version": "0.1.0",
        "command": "fuse",
        "sources": [
            {"file": "a.keras", "sha256": sha256(a)},
            {"file": "b.keras", "sha256": sha256(b)},
        ],
        "options": {
            "weights": [0.8, 0.2],
            "scale": "rescaling",
            "inputs": "shared",
            "at": "output",
            "activation": "none",
        },
    }
    want = 0.8 * outputs(keras, a) + 0.2 * outputs(keras, b)
    np.testing.assert_allclose(outputs(keras, out), want, rtol=1e-5, atol=1e-6)


def test_keras_archive_keeps_its_members_and_keras_metadata(tmp_path, model_files):
    out = tmp_path / "fused.keras"
    assert run_cli("fuse", model_files["a"], model_files["b"], "-o", out).returncode == 0
    import zipfile

    with zipfile.ZipFile(out) as archive:
        assert sorted(archive.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]
        metadata = json.loads(archive.read("metadata.json"))
    assert metadata["keras_version"] and metadata["date_saved"]
    assert metadata[KEY]["command"] == "fuse"


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_merge_records_method_and_parameters(tmp_path, model_files, keras, suffix):
    a, b = (model_files["a"], model_files["b"]) if suffix == ".keras" else (
        model_files["a_h5"], model_files["b_h5"])  # fmt: skip
    out = tmp_path / f"merged{suffix}"
    done = run_cli("merge", a, b, "--w", "0.7", "0.3", "-o", out)
    assert done.returncode == 0, done.stderr

    recipe = read_recipe(out, suffix.lstrip("."))
    assert recipe == {
        "version": "0.1.0",
        "command": "merge",
        "sources": [{"file": a.name, "sha256": sha256(a)}, {"file": b.name, "sha256": sha256(b)}],
        "options": {
            "method": "linear",
            "parameters": {"weights": [0.7, 0.3], "normalize": True},
            "base": None,
            "seed": None,
            "dtype": None,
        },
    }
    outputs(keras, out)  # loads


def test_merge_of_a_fused_file_replaces_its_recipe(tmp_path, model_files):
    fused = [tmp_path / "f1.keras", tmp_path / "f2.keras"]
    for out, w in zip(fused, ("0.8", "0.8"), strict=True):
        done = run_cli("fuse", model_files["a"], model_files["b"], "--w", w, "0.2", "-o", out)
        assert done.returncode == 0, done.stderr
    merged = tmp_path / "m.keras"
    assert run_cli("merge", *fused, "-o", merged).returncode == 0
    recipe = read_recipe(merged, "keras")
    assert recipe["command"] == "merge"
    assert [s["file"] for s in recipe["sources"]] == ["f1.keras", "f2.keras"]


def test_task_arithmetic_records_its_base(tmp_path, model_files):
    out = tmp_path / "ta.keras"
    base = model_files["c"]
    done = run_cli(
        "merge", model_files["a"], model_files["b"], "--method", "task-arithmetic",
        "--base", base, "--w", "0.5", "0.5", "-o", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    recipe = read_recipe(out, "keras")
    assert recipe["options"]["base"] == "c.keras"
    assert recipe["sources"][-1] == {"file": "c.keras", "sha256": sha256(base)}


@pytest.mark.slow
def test_merged_keras2_h5_with_recipe_loads_in_tf_keras(tmp_path, tmp_path_factory):
    """A Keras 2 file merged with itself is itself: tf-keras loads it and computes what it did."""
    keras2_dir = keras2_reference_dir(tmp_path_factory)
    source = keras2_dir / "gru.h5"
    twin = tmp_path / "gru_twin.h5"
    shutil.copy(source, twin)
    out = tmp_path / "merged.h5"
    done = run_cli("merge", source, twin, "-o", out)
    assert done.returncode == 0, done.stderr
    assert read_recipe(out, "h5")["sources"][1] == {"file": "gru_twin.h5", "sha256": sha256(twin)}

    xs, ys = expected(keras2_dir, "gru")
    np.save(tmp_path / "x.npy", xs[0])
    script = (
        "import sys, numpy as np, tf_keras as k\n"
        "m = k.models.load_model(sys.argv[1], compile=False)\n"
        "np.save(sys.argv[3], m.predict(np.load(sys.argv[2]), verbose=0))\n"
    )
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    got_path = tmp_path / "y.npy"
    ran = subprocess.run(
        [sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"), str(got_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    np.testing.assert_allclose(np.load(got_path), ys[0], rtol=1e-5, atol=1e-6)


def test_inspect_shows_the_recipe(tmp_path, model_files):
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    shutil.copy(model_files["a"], a)
    shutil.copy(model_files["b"], b)
    out = tmp_path / "fused.h5"
    assert run_cli("fuse", a, b, "--w", "0.8", "0.2", "-o", out).returncode == 0

    done = run_cli("inspect", "fused.h5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("recipe:")]
    assert lines == [
        "recipe: fused.h5: fusecli 0.1.0 fuse weights=[0.8, 0.2] scale=rescaling inputs=shared "
        "at=output activation=none",
        f"recipe: fused.h5: source a.keras sha256 {sha256(a)}",
        f"recipe: fused.h5: source b.keras sha256 {sha256(b)}",
    ]
    as_json = json.loads(run_cli("inspect", out, "--json").stdout)
    assert as_json[0]["recipe"] == read_recipe(out, "h5")


def test_inspect_escapes_control_characters_in_a_recipe(tmp_path, model_files):
    """The recipe is file data: a crafted one must not drive the terminal."""
    out = tmp_path / "crafted.h5"
    shutil.copy(model_files["a_h5"], out)
    crafted = {
        "version": "9\x1b[2J",
        "command": "fuse\u202e",
        "sources": [{"file": "a\nb.h5", "sha256": "\x07"}],
        "options": {"weights": [1.0]},
    }
    with h5py.File(out, "r+") as h5:
        h5.attrs[KEY] = json.dumps(crafted)

    done = run_cli("inspect", out)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\u202e" not in done.stdout and "\x07" not in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("recipe:")]
    assert lines == [
        f"recipe: {out}: fusecli 9\\x1b[2J fuse\\u202e weights=[1.0]",
        f"recipe: {out}: source a\\nb.h5 sha256 \\x07",
    ]
    shown = json.loads(run_cli("inspect", out, "--json").stdout)[0]["recipe"]
    assert shown["sources"] == [{"file": "a\\nb.h5", "sha256": "\\x07"}]


def test_a_file_without_recipe_shows_none(model_files):
    done = run_cli("inspect", model_files["a"], "--json")
    assert json.loads(done.stdout)[0]["recipe"] is None
    assert "recipe:" not in run_cli("inspect", model_files["a"]).stdout
