"""Write Keras 2 era .h5 models ending in a softmax (or a sigmoid) with tf-keras, and their logits
as tf-keras computes them, for the tests of `fuse --at logits` on Keras 2 files.

Run in its own process (tf-keras and Keras 3 must not share one):

    python tests/legacy_fixtures/make_keras2_logits_h5.py OUT_DIR

For every model NAME it writes OUT_DIR/NAME.h5 (`model.save`, Keras 2 format) and OUT_DIR/NAME.npz
holding the input `x` (the same for every model), the output `y` and the logits `z`, both
computed by tf-keras on the file loaded back: `z` is the input of the final Softmax or
Activation("softmax") layer, or the last Dense layer's `kernel * h + bias` (tf-keras calls the
layer with its activation set to linear), so that the logits do not come from fusecli's cut.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tf_keras as k  # noqa: E402

L = k.layers
FEATURES, TIME, CLASSES = 5, 3, 4


def dense_softmax() -> k.Model:
    """Functional; the last Dense layer has activation="softmax"."""
    x = k.Input((FEATURES,), name="features")
    h = L.Dense(16, activation="relu")(x)
    return k.Model(x, L.Dense(CLASSES, activation="softmax")(h), name="dense_softmax")


def trailing_softmax() -> k.Model:
    """Sequential ending in a Softmax layer."""
    return k.Sequential(
        [L.InputLayer((FEATURES,)), L.Dense(12, activation="tanh"), L.Dense(CLASSES), L.Softmax()]
    )


def nested_activation() -> k.Model:
    """A nested Sequential (with BatchNormalization) feeding Dense, then Activation("softmax")."""
    inner = k.Sequential(
        [L.Dense(10, activation="relu", input_shape=(FEATURES,)), L.BatchNormalization()]
    )
    x = k.Input((FEATURES,))
    return k.Model(x, L.Activation("softmax")(L.Dense(CLASSES)(inner(x))))


def old_sequential() -> k.Model:
    """A Sequential with no InputLayer (the first layer declares input_shape), Dense(softmax)."""
    return k.Sequential(
        [
            L.Dense(8, activation="relu", input_shape=(FEATURES,)),
            L.Dense(CLASSES, activation="softmax"),
        ]
    )


def sequence_axis1_a() -> k.Model:
    """Per-time-step scores normalised over time: Softmax(axis=1) on (batch, TIME, CLASSES)."""
    x = k.Input((FEATURES,))
    h = L.Reshape((TIME, CLASSES))(L.Dense(TIME * CLASSES)(x))
    return k.Model(x, L.Softmax(axis=1)(h))


def sequence_axis1_b() -> k.Model:
    x = k.Input((FEATURES,))
    h = L.Dense(TIME * CLASSES, activation="tanh")(L.Dense(7, activation="relu")(x))
    return k.Model(x, L.Softmax(axis=1)(L.Reshape((TIME, CLASSES))(h)))


def sequence_last_axis() -> k.Model:
    """The same shape of output, softmax over the last axis: its logits cannot join axis 1's."""
    x = k.Input((FEATURES,))
    h = L.Reshape((TIME, CLASSES))(L.Dense(TIME * CLASSES)(x))
    return k.Model(x, L.Softmax()(h))


def sigmoid_head() -> k.Model:
    """A multi-label head: Dense(activation="sigmoid")."""
    x = k.Input((FEATURES,))
    h = L.Dense(8, activation="relu")(x)
    return k.Model(x, L.Dense(CLASSES, activation="sigmoid")(h))


MODELS = [
    dense_softmax,
    trailing_softmax,
    nested_activation,
    old_sequential,
    sequence_axis1_a,
    sequence_axis1_b,
    sequence_last_axis,
    sigmoid_head,
]


def randomize(model: k.Model, rng: np.random.Generator) -> None:
    """Random weights, large enough that the outputs vary with the input; variances positive."""
    values = []
    for w in model.weights:
        v = rng.normal(0.0, 0.8, size=w.shape)
        if "moving_variance" in w.name:
            v = np.abs(v) + 0.5
        values.append(v.astype(w.dtype.as_numpy_dtype))
    model.set_weights(values)


def logits(model: k.Model, x: np.ndarray) -> np.ndarray:
    """What the last layer takes before its activation, as tf-keras computes it."""
    last = model.layers[-1]
    before = np.asarray(k.Model(model.inputs, last.input)(x, training=False))
    if isinstance(last, L.Softmax | L.Activation):
        return before
    last.activation = k.activations.linear
    return np.asarray(last(before))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(7).normal(0.0, 1.5, (8, FEATURES)).astype("float32")
    for seed, build in enumerate(MODELS):
        k.utils.set_random_seed(seed)
        model = build()
        randomize(model, np.random.default_rng(seed))
        path = out / f"{build.__name__}.h5"
        model.save(path)
        loaded = k.models.load_model(path, compile=False)
        y = np.asarray(loaded(x, training=False))
        z = logits(loaded, x)
        np.savez(out / f"{build.__name__}.npz", x=x, y=y, z=z)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
