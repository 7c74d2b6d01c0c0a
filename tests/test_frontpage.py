"""The front page runs as printed: the Keras 2 era example pair, the README's fuse commands, the
default output's format and the message saying which Kerases load what was written."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_cli

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow

EXAMPLES = REPO / "examples"
PAIR = ("rgb_stream.h5", "pose_stream.h5")
SHAPES = {"rgb_stream.h5": (4, 16, 16, 3), "pose_stream.h5": (4, 17, 2)}
H5_LOADERS = (
    "fused.h5 loads in tf-keras (Keras 2) and in Keras 3 (keras.models.load_model): it is "
    "written in Keras 2's .h5 schema."
)
KERAS_LOADERS = (
    "fused.keras loads in Keras 3 (keras.models.load_model); not in tf-keras (Keras 2), which "
    "reads no Keras 3 .keras file."
)
TF_KERAS = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture
def examples(tmp_path) -> Path:
    """A copy of examples/ in a fresh folder, the current folder of the commands run."""
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    return tmp_path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs, and what tf-keras computes with each example stream (in its own process)."""
    d = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(SHAPES[name]).astype("float32") for name in PAIR]
    script = (
        "import sys, numpy as np, tf_keras as k\n"
        "for i, path in enumerate(sys.argv[2:]):\n"
        "    m = k.models.load_model(path, compile=False)\n"
        "    x = np.load(f'{sys.argv[1]}/x{i}.npy')\n"
        "    np.save(f'{sys.argv[1]}/y{i}.npy', m.predict(x, verbose=0))\n"
    )
    for i, x in enumerate(xs):
        np.save(d / f"x{i}.npy", x)
    ran = subprocess.run(
        [sys.executable, "-c", script, str(d), *(str(EXAMPLES / n) for n in PAIR)],
        capture_output=True,
        text=True,
        env=TF_KERAS,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return xs, [np.load(d / f"y{i}.npy") for i in range(len(PAIR))]


def test_the_example_pair_is_keras2_era(tmp_path):
    for name in PAIR:
        with h5py.File(EXAMPLES / name, "r") as h5:
            assert str(h5.attrs["keras_version"]).startswith("2.")
            assert "batch_input_shape" in str(h5.attrs["model_config"])


@pytest.mark.slow
def test_the_committed_pair_is_what_its_script_makes(tmp_path):
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_keras2_examples.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=TF_KERAS,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    for name in PAIR:
        with h5py.File(EXAMPLES / name, "r") as shipped, h5py.File(tmp_path / name, "r") as made:
            assert shipped.attrs["model_config"] == made.attrs["model_config"]
            shipped_data, made_data = _datasets(shipped), _datasets(made)
            assert shipped_data.keys() == made_data.keys() and shipped_data
            for key, values in shipped_data.items():
                np.testing.assert_array_equal(values, made_data[key])


def _datasets(h5: h5py.File) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    h5.visititems(lambda n, o: found.update({n: o[()]}) if isinstance(o, h5py.Dataset) else None)
    return found


@pytest.mark.slow
def test_fuse_with_no_output_writes_h5_for_h5_inputs(examples, reference, keras):
    done = run_cli(
        "fuse", "examples/rgb_stream.h5", "examples/pose_stream.h5", "--w", "0.8", "0.2",
        cwd=examples,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "fused.h5\n"
    assert done.stderr.splitlines()[-1] == H5_LOADERS
    xs, ys = reference
    got = np.asarray(keras.models.load_model(examples / "fused.h5")(xs))
    np.testing.assert_allclose(got, 0.8 * ys[0] + 0.2 * ys[1], rtol=1e-5, atol=1e-6)


def test_fuse_with_no_output_keeps_keras_for_keras_and_mixed_inputs(examples):
    for pair in (
        ("examples/rgb_stream.keras", "examples/pose_stream.keras"),
        ("examples/rgb_stream.keras", "examples/pose_stream.h5"),
    ):
        done = run_cli("fuse", *pair, "--force", cwd=examples)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "fused.keras\n"
        assert done.stderr.splitlines()[-1] == KERAS_LOADERS


@pytest.mark.slow
def test_the_readme_set_up_command_runs_as_printed(examples, reference, keras):
    """The first command of the README's set-up, after `pip install . &&`."""
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("pip install . && fusecli fuse"))
    args = shlex.split(line.split("&&", 1)[1])
    assert args[:2] == ["fusecli", "fuse"]
    done = run_cli(*args[1:], cwd=examples)
    assert done.returncode == 0, done.stderr
    written = examples / done.stdout.strip()
    xs, ys = reference
    got = np.asarray(keras.models.load_model(written)(xs))
    np.testing.assert_allclose(got, 0.8 * ys[0] + 0.2 * ys[1], rtol=1e-5, atol=1e-6)
