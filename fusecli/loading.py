"""Loading model files into Keras: the single door every command goes through."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from fusecli import runtime
from fusecli.errors import ModelFileError

if TYPE_CHECKING:
    import keras

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def check_model_path(path: str | os.PathLike[str]) -> Path:
    """Fail early, with the file's name, on paths that cannot be a model file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a model file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(path, "cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise ModelFileError(path, "is empty")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelFileError(
            path, f"is not a Keras model file (expected {', '.join(MODEL_SUFFIXES)})"
        )
    return path


def load_model(path: str | os.PathLike[str], *, trust: bool = False) -> keras.Model:
    """Load a `.keras` or `.h5` model file, uncompiled.

    The file is read and scanned first (`fusecli.safety`), without Keras: a broken file raises
    `ModelFileError`, one that holds code `UnsafeModelError`. `trust=True` skips the scan and
    loads with safe_mode off; only for trusted files.
    """
    from fusecli.safety import refuse_unsafe  # imports modelfile, which imports this module

    path = check_model_path(path)
    refuse_unsafe(path, trust=trust)
    keras = runtime.keras()
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=not trust)
    except Exception as e:  # Keras raises many types for broken files; all mean the same here
        raise ModelFileError(path, f"cannot be loaded by Keras: {_first_line(e)}") from e
    if not isinstance(model, keras.Model):
        raise ModelFileError(path, f"holds a {type(model).__name__}, not a Keras model")
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
