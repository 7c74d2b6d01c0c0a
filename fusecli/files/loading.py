"""Loading model files into Keras: the single door every command goes through.

Before Keras touches a file, it is read and scanned without Keras (`fusecli.files.safety`): a broken
file raises `ModelFileError`, one that holds code `UnsafeModelError`. Keras 2 era `.h5` files go
through `fusecli.files.legacy`, which rewrites their config for Keras 3.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fusecli import runtime
from fusecli.errors import ModelFileError
from fusecli.files import legacy
from fusecli.files.modelfile import ModelFile
from fusecli.files.safety import refuse_unsafe

if TYPE_CHECKING:
    import keras


def load_model(path: str | os.PathLike[str], *, trust: bool = False) -> keras.Model:
    """Load a `.keras` or `.h5` model file (Keras 3, or Keras 2 era `.h5`), uncompiled.

    `trust=True` skips the scan for code and loads with safe_mode off; only for trusted files.
    """
    return load_checked(refuse_unsafe(path, trust=trust), trust=trust)


def load_checked(model_file: ModelFile, *, trust: bool = False) -> keras.Model:
    """Load a file that `safety.refuse_unsafe` has read and passed (so that several files can
    all be checked before the first, slow, Keras load)."""
    path = model_file.path
    if path.suffix != path.suffix.lower():
        raise ModelFileError(
            path,
            f"Keras loads only files whose name ends in lower case; rename it to "
            f"{path.stem}{path.suffix.lower()}",
        )
    if model_file.written_by_keras2:
        return legacy.load_keras2_h5(path, trust=trust)
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
