"""The export formats, and how an output path picks one.

Adding a format touches one new module (with `require`, `write` and `run`) and one entry here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType

from fusecli.errors import InvalidRequest


@dataclass(frozen=True)
class ExportFormat:
    name: str  # as given to --format
    title: str  # for people
    suffix: str | None  # None: a directory
    module: str  # defines require(), write(signature, path) and run(path, feed)
    runtime: str  # what runs the artifact to check it
    round_off: float  # relative difference from Keras that is still the format's round-off

    @property
    def is_directory(self) -> bool:
        return self.suffix is None

    def load(self) -> ModuleType:
        return import_module(self.module)


# Relative drift from Keras measured on a fused MobileNetV2 pair (bench/bench_export.py): 2e-6 for
# a SavedModel (TensorFlow's graph fuses ops that Keras runs one by one), 7e-6 for TFLite, 5e-6 for
# ONNX (their own kernels). 1e-4 leaves room for deeper networks; a wrong export is off by O(1).
FORMATS = {
    f.name: f
    for f in (
        ExportFormat(
            "saved-model",
            "SavedModel",
            None,
            "fusecli.exporting.saved_model",
            "TensorFlow, through serving_default",
            1e-4,
        ),
        ExportFormat(
            "tflite",
            "TFLite",
            ".tflite",
            "fusecli.exporting.tflite",
            "the TFLite interpreter",
            1e-4,
        ),
        ExportFormat("onnx", "ONNX", ".onnx", "fusecli.exporting.onnx", "onnxruntime", 1e-4),
    )
}
FORMAT_NAMES = tuple(FORMATS)


def format_for(output: str | os.PathLike[str], requested: str | None = None) -> ExportFormat:
    """The format `output` asks for: .tflite, .onnx, or a directory (no extension, an existing
    directory, or `requested="saved-model"`)."""
    path = Path(output)
    by_suffix = {f.suffix: f for f in FORMATS.values() if f.suffix}
    suffix = path.suffix.lower()
    if requested is not None:
        if requested not in FORMATS:
            raise InvalidRequest(
                f"Expected format to be one of {FORMAT_NAMES}. Received: format={requested!r}"
            )
        chosen = FORMATS[requested]
        implied = by_suffix.get(suffix)
        if implied is not None and implied is not chosen:
            raise InvalidRequest(
                f"The output's extension asks for {implied.title}, the format for "
                f"{chosen.title}. Received: output={str(output)!r}, format={requested!r}"
            )
        if chosen.suffix and suffix != chosen.suffix:
            raise InvalidRequest(
                f"A {chosen.title} output must end in {chosen.suffix}. "
                f"Received: output={str(output)!r}"
            )
        return chosen
    if suffix in by_suffix:
        return by_suffix[suffix]
    if not suffix or path.is_dir():
        return FORMATS["saved-model"]
    raise InvalidRequest(
        "The output picks the format: a directory for a SavedModel (or --format saved-model), "
        f".tflite for TFLite, .onnx for ONNX. Received: output={str(output)!r}"
    )
