"""Shared fixtures: tiny real Keras models, saved once per test session.

Helpers here build models; tests save them where they need them. Every model is seeded so that
numbers are reproducible.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def keras():
    import keras as _keras

    return _keras


def dense_model(keras, in_dim: int = 4, out_dim: int = 3, seed: int = 0, name: str | None = None):
    """A small functional MLP, named as the first model of a fresh process is ("functional",
    "dense", "dense_1"), whichever tests made models before: as files saved by separate
    processes are, and as the tests that name layers expect."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((in_dim,))
    h = keras.layers.Dense(8, activation="relu", name="dense")(x)
    y = keras.layers.Dense(out_dim, activation="softmax", name="dense_1")(h)
    return keras.Model(x, y, name=name or "functional")


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, keras) -> dict[str, Path]:
    """Named model files on disk, made once: see the keys below."""
    d = tmp_path_factory.mktemp("models")
    files: dict[str, Path] = {}

    def save(key: str, model, suffix: str = ".keras") -> None:
        path = d / f"{key}{suffix}"
        model.save(path)
        files[key] = path

    save("a", dense_model(keras, seed=1))
    save("b", dense_model(keras, seed=2))
    save("c", dense_model(keras, seed=3))
    # Two files whose models share a name, as every unnamed model made in its own process does.
    save("a_h5", dense_model(keras, seed=1, name="functional"), ".h5")
    save("b_h5", dense_model(keras, seed=2, name="functional"), ".h5")
    save("wide_out", dense_model(keras, out_dim=5, seed=4))
    save("other_in", dense_model(keras, in_dim=6, seed=5))
    return files


REPO = Path(__file__).resolve().parents[1]

# Session fixtures that run tf-keras in a subprocess or build a zoo of models: a test that uses one
# is in the slow tier (`pytest -m "not slow"` is the fast one; docs/development.md).
_SLOW_FIXTURES = {"keras2_zoo", "keras3_zoo", "keras2_pair", "keras2_dir", "wrapped"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None):
    """Run `python -m fusecli ARGS` as a real subprocess, on this checkout's code."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fusecli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        input=input,
        timeout=300,
    )


def predict(model, inputs) -> list[np.ndarray]:
    """Model outputs on `inputs` as a flat list of numpy arrays."""
    import keras

    return [np.asarray(o) for o in keras.tree.flatten(model(inputs, training=False))]
