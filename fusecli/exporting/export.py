"""`fusecli.export`: one saved or loaded Keras model to SavedModel, TFLite or ONNX, checked."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from fusecli import runtime
from fusecli.errors import FusecliError, InvalidRequest, ModelFileError
from fusecli.exporting.formats import ExportFormat, format_for
from fusecli.exporting.signature import signature_of
from fusecli.exporting.verify import check_export
from fusecli.output import (
    atomic_output,
    atomic_output_dir,
    check_output_dir,
    check_output_path,
)
from fusecli.safety.loading import load_model

if TYPE_CHECKING:
    import keras

ModelSource: TypeAlias = "str | os.PathLike[str] | keras.Model"

# A directory --force may replace: one that holds a SavedModel, never any other.
_SAVED_MODEL_MARKERS = ("saved_model.pb", "saved_model.pbtxt")


@dataclass
class ExportReport:
    """What `export` wrote; `as_dict()` is the CLI's `--json` document."""

    output: str
    format: str
    model: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    batch_size: int | None
    verified: bool
    runtime: str
    rows: int | None
    max_abs_diff: float | None
    tolerance: float | None
    outputs_vary: bool | None
    per_output: list[dict[str, Any]] | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export(
    model: ModelSource,
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    batch_size: int | None = None,
    verify: bool = True,
    force: bool = False,
    trust: bool = False,
) -> ExportReport:
    """Export `model` (a .keras/.h5 path or a `keras.Model`) for serving, atomically.

    The format follows `output`: a directory (or `format="saved-model"`) for a SavedModel,
    `.tflite` for TFLite, `.onnx` for ONNX (needs `pip install 'fusecli[onnx]'`). Inputs and
    outputs keep the model's own names. `batch_size` fixes the batch dimension (TFLite needs it
    for recurrent layers). Unless `verify` is False, the artifact is run in its own runtime on a
    random batch and compared with the Keras model; beyond the format's round-off it is deleted
    and `VerificationError` raised.
    """
    fmt = format_for(output, format)
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise InvalidRequest(f"Expected batch_size to be 1 or more. Received: {batch_size!r}")
    writer = fmt.load()
    writer.require()
    sources = [model] if isinstance(model, str | os.PathLike) else []
    output = _check_output(output, fmt, sources, force=force)
    loaded = _load(model, trust=trust)
    signature = signature_of(loaded, batch_size)
    check = None
    with _atomic(output, fmt, force=force) as tmp, _no_bytecode_files():
        writer.write(signature, tmp)
        if verify:
            check = check_export(signature, fmt, writer.run, tmp)
    return ExportReport(
        output=str(output),
        format=fmt.name,
        model=str(model) if sources else f"<model {loaded.name}>",
        inputs=[t.as_dict() for t in signature.inputs],
        outputs=[t.as_dict() for t in signature.outputs],
        batch_size=batch_size,
        verified=check is not None,
        runtime=fmt.runtime,
        rows=check.rows if check else None,
        max_abs_diff=check.max_abs_diff if check else None,
        tolerance=check.tolerance if check else None,
        outputs_vary=check.outputs_vary if check else None,
        per_output=check.per_output if check else None,
    )


def _check_output(
    output: str | os.PathLike[str], fmt: ExportFormat, sources: list, *, force: bool
) -> Path:
    if not fmt.is_directory:
        return check_output_path(output, inputs=sources, force=force)
    path = check_output_dir(output, inputs=sources, force=force)
    not_empty = path.is_dir() and any(path.iterdir())
    if not_empty and not any((path / m).is_file() for m in _SAVED_MODEL_MARKERS):
        raise FusecliError(
            f"{path}: is a directory that does not hold a SavedModel; --force replaces only "
            "a SavedModel. Choose another output"
        )
    return path


def _atomic(output: Path, fmt: ExportFormat, *, force: bool) -> Any:
    return (
        atomic_output_dir(output, force=force)
        if fmt.is_directory
        else atomic_output(output, force=force)
    )


def _load(model: ModelSource, *, trust: bool) -> keras.Model:
    if isinstance(model, str | os.PathLike):
        loaded = load_model(model, trust=trust)
        _check_finite(loaded, model)
        return loaded
    keras = runtime.keras()
    if not isinstance(model, keras.Model):
        raise InvalidRequest(
            f"Expected a model file path or a keras.Model. Received: {type(model).__name__}"
        )
    return model


def _check_finite(model: keras.Model, path: str | os.PathLike[str]) -> None:
    """An artifact of NaN weights would pass the check (NaN matches NaN) and serve nothing."""
    for variable in model.weights:
        values = np.asarray(variable)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ModelFileError(path, f"weight {variable.path!r} holds NaN or infinite values")


@contextlib.contextmanager
def _no_bytecode_files() -> Iterator[None]:
    """TensorFlow's autograph writes the functions it converts as modules in $TMPDIR and imports
    them; Python would leave their `__pycache__` there, a folder nobody removes."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before
