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
    if _keras2_schema(Path(path)):
        return (
            f"{name} loads in tf-keras (Keras 2) and in Keras 3 ({how}): it is written in "
            "Keras 2's .h5 schema."
        )
    return (
        f"{name} loads in Keras 3 ({how}); not in tf-keras (Keras 2): it is written in Keras 3's "
        ".h5 schema."
    )


def _keras2_schema(path: Path) -> bool:
    """A `.h5` written in Keras 2's schema (`fusecli.fusion.flat_h5`), which both load."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            version = h5.attrs.get("keras_version", "")
    except OSError:
        return False
    version = version.decode() if isinstance(version, bytes) else str(version)
    return version.startswith("2.")
