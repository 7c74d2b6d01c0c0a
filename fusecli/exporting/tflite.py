"""TFLite (LiteRT): one flatbuffer file for phones and small devices.

Converted from the SavedModel this package writes, with TFLite's built-in ops only (no Flex
delegate needed on the device), so the file keeps the `serving_default` signature and its names.
Recurrent layers (GRU, LSTM) convert only with a fixed batch size: their TensorList ops need a
static element shape.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from fusecli.errors import FusecliError
from fusecli.exporting import saved_model
from fusecli.exporting.signature import Signature

# What the converter says when a recurrent layer meets a free batch dimension.
_NEEDS_STATIC_SHAPE = ("requires element_shape to be static", "TensorListReserve")


def require() -> None:
    """Nothing beyond TensorFlow."""


def write(signature: Signature, path: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix=f"fusecli-{os.getpid()}-tflite-") as work:
        saved = Path(work) / "saved_model"
        saved_model.write(signature, saved)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        try:
            flatbuffer = converter.convert()
        except Exception as e:
            raise _conversion_error(e, signature) from e
    path.write_bytes(flatbuffer)


def run(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the file's serving_default signature in the TFLite interpreter."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(saved_model.SIGNATURE_KEY)
    return {name: np.array(value) for name, value in runner(**feed).items()}


def _conversion_error(e: Exception, signature: Signature) -> FusecliError:
    text = str(e)
    if signature.batch_size is None and any(s in text for s in _NEEDS_STATIC_SHAPE):
        return FusecliError(
            "The model cannot be converted to TFLite with a free batch size: its recurrent "
            "layers (GRU, LSTM...) need a fixed one. Use --batch-size N (batch_size=N), e.g. "
            "--batch-size 1. Received: input shapes "
            + ", ".join(str(t.shape) for t in signature.inputs)
        )
    return FusecliError(f"The TFLite converter failed: {_first_error(text)}")


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "error: " in line:
            return line.split("error: ", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no message"
