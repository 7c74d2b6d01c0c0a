"""Which Kerases load a file `fuse` wrote: said in one place, so that every message about a
written file says what is true of it."""

from __future__ import annotations

from pathlib import Path

_LOAD = "keras.models.load_model"


def loaded_by(path: str | Path, fmt: str, scale: str = "rescaling") -> str:
    """One sentence: which Kerases load the file at `path` (`fmt` "keras" or "h5"), and how."""
    name = Path(path).name
    how = f"{_LOAD}(path, safe_mode=False)" if scale == "lambda" else _LOAD
    if fmt == "keras":
        return (
            f"{name} loads in Keras 3 ({how}); not in tf-keras (Keras 2), which reads no Keras 3 "
            ".keras file."
        )
    return (
        f"{name} loads in Keras 3 ({how}); not in tf-keras (Keras 2): it is written in Keras 3's "
        ".h5 schema."
    )
