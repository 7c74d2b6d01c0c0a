"""ONNX: one file for onnxruntime, Triton and other ONNX runtimes.

Converted by tf2onnx from the same serving function the SavedModel gets, so the graph's inputs
and outputs carry the Keras model's names. Keras' own `model.export(format="onnx")` uses tf2onnx
too, but refuses a model that was loaded and never called, and names the outputs `Identity:0`
(docs/export.md). tf2onnx, onnx and onnxruntime are the optional extra `fusecli[onnx]`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fusecli.errors import FusecliError
from fusecli.exporting.signature import Signature

INSTALL = "pip install 'fusecli[onnx]'"


def require() -> None:
    """Fail before any work if the onnx extra is missing, saying how to install it."""
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise FusecliError(
            "Exporting to ONNX needs tf2onnx, onnx and onnxruntime, which are not installed "
            f"({e}). Install them with: {INSTALL}"
        ) from None
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)


def write(signature: Signature, path: Path) -> None:
    import tf2onnx

    try:
        tf2onnx.convert.from_function(
            signature.serving_function(),
            input_signature=signature.tensor_specs(),
            output_path=str(path),
        )
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise FusecliError(f"tf2onnx could not convert the model: {detail}") from e


def run(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the file in onnxruntime, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))
