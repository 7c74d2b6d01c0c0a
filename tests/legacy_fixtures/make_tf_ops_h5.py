"""Write tf.keras 2 models that call TensorFlow functions on Keras tensors (TFOpLambda layers),
and what tf-keras computes on fixed inputs.

Run in its own process (tf-keras and Keras 3 must not share one):

    python tests/legacy_fixtures/make_tf_ops_h5.py OUT_DIR

For every model NAME it writes OUT_DIR/NAME.h5 and OUT_DIR/NAME.npz (inputs `x0, x1, ...`,
tf-keras' outputs `y0, y1, ...`), as make_keras2_h5.py does; weights random and seeded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as k  # noqa: E402

L = k.layers


def arithmetic() -> k.Model:
    """Elementwise arithmetic and comparisons between tensors and with constants."""
    a, b = k.Input((5,), name="a"), k.Input((5,), name="b")
    x = L.Dense(5, name="da")(a)
    y = L.Dense(5, name="db")(b)
    positive = tf.abs(y) + 1.0
    outs = [
        x + y,
        x - y,
        x * y,
        x / positive,
        tf.divide(x, positive),
        2.0 / positive,
        1.0 - x,
        x * 3.0 + 0.5,
        -x,
        tf.maximum(x, y),
        tf.minimum(x, 0.25),
        tf.pow(positive, 1.5),
        x**2,
        x // positive,
        x % 0.75,
        tf.cast(x > y, tf.float32),
        tf.cast(x >= 0.1, tf.float32) + tf.cast(x < -0.1, tf.float32) * 2.0,
        tf.cast(tf.math.less_equal(x, y), tf.float32),
        tf.cast(tf.math.not_equal(tf.round(x), 0.0), tf.float32),
        tf.cast(tf.math.logical_and(x > 0, y > 0), tf.float32),
        tf.cast(tf.math.logical_or(x > 0, tf.math.logical_not(y > 0)), tf.float32),
        tf.where(x > y, x, y),
        tf.add(x, y) + tf.subtract(y, x) * tf.multiply(x, 0.5),
    ]
    return k.Model([a, b], outs, name="tf_arithmetic")


def unary() -> k.Model:
    """tf.math and tf.nn functions of one tensor, concatenated and fed to a Dense layer."""
    a = k.Input((6,), name="a")
    x = L.Dense(6, name="d")(a)
    pos = tf.abs(x) + 0.5
    parts = [
        tf.exp(x / 4.0), tf.math.log(pos), tf.math.log1p(tf.abs(x)), tf.sqrt(pos),
        tf.math.rsqrt(pos), tf.sin(x), tf.cos(x), tf.tanh(x), tf.sigmoid(x), tf.nn.relu(x),
        tf.nn.relu6(x * 4.0), tf.nn.softplus(x), tf.math.softsign(x), tf.nn.selu(x),
        tf.nn.elu(x), tf.nn.silu(x), tf.nn.gelu(x), tf.nn.leaky_relu(x, 0.3), tf.math.erf(x),
        tf.math.reciprocal(pos), tf.sign(x), tf.floor(x * 3.0), tf.math.ceil(x * 3.0),
        tf.square(x), tf.math.negative(x), tf.math.expm1(x / 4.0), tf.math.tan(x / 4.0),
    ]  # fmt: skip
    y = tf.concat(parts, axis=-1)
    return k.Model(a, [y, L.Dense(3, name="head")(y)], name="tf_unary")


def shapes() -> k.Model:
    """Concatenation, reshapes, transposes, slicing, reductions, softmax, matmul."""
    a, b = k.Input((4, 6), name="a"), k.Input((4, 6), name="b")
    x = L.Dense(6, name="da")(a)
    y = L.Dense(6, name="db")(b)
    c = tf.concat([x, y], axis=-1)
    r = tf.reshape(c, (-1, 4, 3, 4))
    t = tf.transpose(r, perm=[0, 2, 1, 3])
    e = tf.expand_dims(x, axis=1)
    s = tf.squeeze(e, axis=1)
    outs = [
        t,
        tf.transpose(x),
        tf.stack([x, y], axis=1),
        s[:, 1:3, ::2],
        s[:, 0],
        x[..., 1],
        x[:, tf.newaxis, 1:],
        x[:, -1, 2:5],
        tf.strided_slice(x, [0, 1, 0], [0, 3, 6], [1, 1, 2], begin_mask=1, end_mask=1),
        tf.strided_slice(x, [0, 2, 0], [0, 3, 6], begin_mask=5, end_mask=5, shrink_axis_mask=2),
        tf.reduce_mean(t, axis=[1, 2]),
        tf.reduce_sum(x, axis=-1, keepdims=True),
        tf.reduce_max(x, axis=1),
        tf.reduce_min(x, 2),
        tf.reduce_prod(tf.abs(x) + 0.5, axis=-1),
        tf.math.reduce_logsumexp(x, axis=1),
        tf.nn.softmax(x, axis=1),
        tf.nn.softmax(tf.reduce_sum(x, axis=-1, keepdims=True) + y),
        tf.nn.log_softmax(x),
        tf.cast(tf.math.argmax(x, axis=-1), tf.float32),
        tf.cast(tf.math.argmin(x, axis=1), tf.float32),
        tf.matmul(x, y, transpose_b=True),
        tf.matmul(tf.transpose(x, perm=[0, 2, 1]), y),
        tf.clip_by_value(x, -0.5, 0.5),
    ]
    return k.Model([a, b], outs, name="tf_shapes")


def masked() -> k.Model:
    """An op between a masking Embedding and an LSTM: tf-keras drops the mask at the op."""
    ids = k.Input((7,), dtype="int32", name="ids")
    h = L.Embedding(20, 4, mask_zero=True, name="emb")(ids)
    h = h * 2.0
    h = L.LSTM(3, name="lstm")(h)
    return k.Model(ids, h, name="tf_masked")


def nested() -> k.Model:
    """Ops on the outputs of a nested model called twice (Keras 2 numbers its calls from 1)."""
    inner_in = k.Input((5,))
    inner = k.Model(inner_in, L.Dense(4, name="inner_dense")(inner_in), name="tower")
    a, b = k.Input((5,), name="a"), k.Input((5,), name="b")
    out = tf.nn.softmax(inner(a) - inner(b) * 0.5)
    return k.Model([a, b], out, name="tf_nested")


def unsupported() -> k.Model:
    """tf.math.l2_normalize, which fusecli does not convert."""
    a = k.Input((5,), name="a")
    return k.Model(a, tf.math.l2_normalize(L.Dense(3)(a), axis=-1), name="tf_unsupported")


MODELS = {
    "tf_arithmetic": arithmetic,
    "tf_unary": unary,
    "tf_shapes": shapes,
    "tf_masked": masked,
    "tf_nested": nested,
    "tf_unsupported": unsupported,
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, build) in enumerate(MODELS.items()):
        k.utils.set_random_seed(seed)
        model = build()
        rng = np.random.default_rng(seed)
        model.set_weights([rng.normal(0.0, 0.7, w.shape).astype("float32") for w in model.weights])
        xs = []
        for tensor in model.inputs:
            shape = (3, *tensor.shape[1:])
            if tensor.dtype.is_integer:
                x = rng.integers(1, 20, size=shape)
                x[0, -3:] = 0  # padding, so that a mask matters
                xs.append(x.astype("int32"))
            else:
                xs.append(rng.standard_normal(shape).astype("float32"))
        ys = tf.nest.flatten(model(xs if len(xs) > 1 else xs[0], training=False))
        model.save(out / f"{name}.h5")
        arrays = {f"x{i}": x for i, x in enumerate(xs)}
        arrays.update({f"y{i}": np.asarray(y, dtype="float32") for i, y in enumerate(ys)})
        np.savez(out / f"{name}.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
