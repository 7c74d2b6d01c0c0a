"""SavedModel: a directory TF Serving, Vertex AI and `tf.saved_model.load` read.

Its `serving_default` signature takes the model's inputs by name and returns its outputs by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusecli import runtime
from fusecli.exporting.signature import Signature

SIGNATURE_KEY = "serving_default"


def require() -> None:
    """Nothing beyond TensorFlow."""


def write(signature: Signature, path: Path) -> None:
    """Write the SavedModel into the (empty or absent) directory `path`."""
    keras = runtime.keras()
    archive = keras.export.ExportArchive()
    archive.track(signature.model)
    archive.add_endpoint(SIGNATURE_KEY, signature.serving_function())
    archive.write_out(str(path), verbose=False)


def run(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the SavedModel's serving_default signature, as a client calls it."""
    import tensorflow as tf

    served = tf.saved_model.load(str(path)).signatures[SIGNATURE_KEY]
    outputs = served(**{name: tf.constant(value) for name, value in feed.items()})
    return {name: np.asarray(value) for name, value in outputs.items()}
