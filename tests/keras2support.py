"""Keras 2 era .h5 files and tf-keras' own outputs, written once per test session.

tests/legacy_fixtures/make_keras2_h5.py runs in one subprocess (tf-keras and Keras 3 stay in
separate processes) and writes every model the Keras 2 tests use; test modules share the result.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GENERATOR = Path(__file__).parent / "legacy_fixtures" / "make_keras2_h5.py"
MARKER = "FUSECLI_TEST_MARKER"
_DIRS: dict[str, Path] = {}


def keras2_reference_dir(tmp_path_factory) -> Path:
    """The directory of NAME.h5 / NAME.npz pairs (see the generator), made on first use."""
    if "dir" not in _DIRS:
        if importlib.util.find_spec("tf_keras") is None:
            pytest.skip("tf-keras is not installed (pip install -e '.[test]')")
        out = tmp_path_factory.mktemp("keras2")
        env = {k: v for k, v in os.environ.items() if k != MARKER}
        done = subprocess.run(
            [sys.executable, str(GENERATOR), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        _DIRS["dir"] = out
    return _DIRS["dir"]


def expected(keras2_dir: Path, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(inputs, tf-keras outputs) saved next to NAME.h5."""
    with np.load(keras2_dir / f"{name}.npz") as data:
        xs = [data[f"x{i}"] for i in range(sum(k.startswith("x") for k in data.files))]
        ys = [data[f"y{i}"] for i in range(sum(k.startswith("y") for k in data.files))]
    return xs, ys
