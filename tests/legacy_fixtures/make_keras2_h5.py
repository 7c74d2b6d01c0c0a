"""Write Keras 2 era .h5 model files with tf-keras, and what tf-keras computes on fixed inputs.

Run in its own process (tf-keras and Keras 3 must not share one):

    python tests/legacy_fixtures/make_keras2_h5.py OUT_DIR

For every model NAME it writes OUT_DIR/NAME.h5 (`model.save`, Keras 2 format) and OUT_DIR/NAME.npz
holding the inputs `x0, x1, ...` and tf-keras' outputs `y0, y1, ...` (training=False). Weights are
random (seeded), biases and BatchNormalization statistics included, so that no layer is close to
the identity and a wrongly loaded weight shows in the outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tf_keras as k  # noqa: E402

L = k.layers
BATCH = 3
TIME, FEATURES = 6, 4  # the recurrent streams' input: (batch, TIME, FEATURES)
VOCAB = 20
INPUT_SEED = 1234  # the same for every model, so models with equal input shapes get equal x


def gru() -> k.Model:
    """A GRU stream: stacked GRUs, reset_after both ways, implementation 1 and 2."""
    return k.Sequential(
        [
            L.GRU(8, input_shape=(TIME, FEATURES), return_sequences=True, implementation=1),
            L.GRU(6, reset_after=False, go_backwards=True),
            L.Dense(3, activation="softmax"),
        ],
        name="gru_stream",
    )


def lstm() -> k.Model:
    """An LSTM stream declared with batch_input_shape, as Keras 1/2 tutorials did."""
    return k.Sequential(
        [
            L.LSTM(
                8, batch_input_shape=(None, TIME, FEATURES), return_sequences=True, implementation=1
            ),
            L.LSTM(6, unit_forget_bias=False, time_major=False),
            L.Dropout(0.5),
            L.Dense(3, activation="softmax"),
        ],
        name="lstm_stream",
    )


def conv() -> k.Model:
    """Convolutions, DepthwiseConv2D, BatchNormalization and pooling in a Sequential."""
    return k.Sequential(
        [
            L.Conv2D(4, 3, padding="same", input_shape=(12, 12, 3)),
            L.BatchNormalization(),
            L.Activation("relu"),
            L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
            L.BatchNormalization(axis=-1, momentum=0.9),
            L.ReLU(max_value=6.0),
            L.MaxPooling2D(2),
            L.SeparableConv2D(6, 3, padding="valid"),
            L.AveragePooling2D(2),
            L.Dropout(0.3),
            L.Flatten(),
            L.Dense(5),
        ],
        name="conv_net",
    )


def conv1d() -> k.Model:
    """Embedding with input_length, Conv1D, 1D pooling and a global pooling."""
    return k.Sequential(
        [
            L.Embedding(VOCAB, 5, input_length=7),
            L.Conv1D(6, 3, activation="tanh"),
            L.MaxPooling1D(2),
            L.GlobalAveragePooling1D(),
            L.Dense(2),
        ],
        name="text_conv",
    )


def masked() -> k.Model:
    """Embedding(mask_zero=True) feeding a bidirectional LSTM and a GRU: masks must survive."""
    return k.Sequential(
        [
            L.Embedding(VOCAB, 5, mask_zero=True, input_shape=(7,)),
            L.Bidirectional(L.LSTM(4, return_sequences=True)),
            L.GRU(4),
            L.Dense(2),
        ],
        name="masked_text",
    )


def multi_io() -> k.Model:
    """A functional model with two inputs, two outputs, a nested Sequential and a nested Model."""
    image = k.Input((8, 8, 1), name="image")
    vector = k.Input((5,), name="vector")
    tower = k.Sequential(
        [
            L.Dense(6, activation="relu", input_shape=(5,)),
            L.BatchNormalization(trainable=False),
            L.Dropout(0.2),
        ],
        name="vector_tower",
    )
    inner_in = k.Input((8, 8, 1))
    inner_out = L.GlobalMaxPooling2D()(L.Conv2D(3, 3, activation="relu")(inner_in))
    image_tower = k.Model(inner_in, inner_out, name="image_tower")
    joined = L.Concatenate()([image_tower(image), tower(vector)])
    hidden = L.Dense(7, activation="elu")(joined)
    label = L.Dense(3, activation="softmax", name="label")(hidden)
    score = L.Dense(1, name="score")(L.Add()([hidden, L.Dense(7)(joined)]))
    return k.Model([image, vector], [label, score], name="two_heads")


def transfer() -> k.Model:
    """The fine-tuning recipe: a frozen functional base (with BatchNormalization) as the first
    layer of a Sequential; the base returns one tensor, which Keras 2 did not wrap in a list."""
    image = k.Input((8, 8, 3))
    base = k.Model(image, L.BatchNormalization()(L.Conv2D(4, 3)(image)), name="base")
    base.trainable = False
    return k.Sequential([base, L.GlobalAveragePooling2D(), L.Dense(2)], name="fine_tuned")


def siamese() -> k.Model:
    """A shared nested Sequential called twice (nodes 1 and 2), one call is itself an output,
    and a nested Model that is an output too; TimeDistributed and SimpleRNN inside."""
    encoder = k.Sequential(
        [L.TimeDistributed(L.Dense(5), input_shape=(TIME, FEATURES)), L.SimpleRNN(4)],
        name="encoder",
    )
    head_in = k.Input((4,))
    head = k.Model(head_in, L.Dense(2, activation="tanh")(head_in), name="head")
    left, right = k.Input((TIME, FEATURES), name="left"), k.Input((TIME, FEATURES), name="right")
    a, b = encoder(left), encoder(right)
    return k.Model([left, right], [head(L.Subtract()([a, b])), b], name="siamese")


def hard_sigmoid() -> k.Model:
    """The Keras <= 2.3 defaults: recurrent_activation="hard_sigmoid" (clip(0.2x + 0.5) in
    Keras 2, clip(x/6 + 0.5) in Keras 3), also as GRU and Dense activation; and ConvLSTM2D,
    whose recurrent_activation is hard_sigmoid by default in tf.keras too."""
    return k.Sequential(
        [
            L.ConvLSTM2D(2, 3, padding="same", return_sequences=True, input_shape=(3, 5, 5, 1)),
            L.TimeDistributed(L.Flatten()),
            L.LSTM(6, recurrent_activation="hard_sigmoid", return_sequences=True, name="old_lstm"),
            L.GRU(
                5, recurrent_activation="hard_sigmoid", activation="hard_sigmoid", reset_after=False
            ),
            L.Dense(3, activation="hard_sigmoid"),
        ],
        name="classic",
    )


def seq2seq() -> k.Model:
    """An encoder-decoder: the decoder LSTM starts from the encoder's states (call kwargs that
    hold tensors), plus Attention(score_mode="dot") and MultiHeadAttention."""
    source, target = k.Input((TIME, FEATURES), name="source"), k.Input((5, 3), name="target")
    encoded, h, c = L.LSTM(8, return_sequences=True, return_state=True)(source)
    decoded = L.LSTM(8, return_sequences=True)(target, initial_state=[h, c])
    attended = L.Attention(score_mode="dot")([decoded, encoded])
    mixed = L.MultiHeadAttention(num_heads=2, key_dim=4)(decoded, encoded)
    return k.Model([source, target], L.Dense(3)(L.Concatenate()([attended, mixed])), name="seq2seq")


def assorted() -> k.Model:
    """Layers with smaller Keras 2 -> 3 differences (LeakyReLU alpha, SpatialDropout noise_shape
    and trainable, Conv1DTranspose groups, SeparableConv's unused kernel_* arguments), and
    RNN over a list of cells."""
    return k.Sequential(
        [
            L.Normalization(mean=[0.5, 1, 0, -1], variance=[1, 2, 3, 4], input_shape=(4,)),
            L.Dense(12),
            L.LeakyReLU(alpha=0.2),
            L.PReLU(),
            L.LayerNormalization(),
            L.Reshape((6, 2)),
            L.SpatialDropout1D(0.1),
            L.DepthwiseConv1D(3, padding="same"),
            L.SeparableConv1D(4, 2),
            L.Conv1DTranspose(3, 2),
            L.GaussianNoise(0.1),
            L.RNN([L.GRUCell(3), L.LSTMCell(2)], return_sequences=True),
            L.Rescaling(0.5, offset=0.1),
            L.Flatten(),
        ],
        name="assorted",
    )


def volumes() -> k.Model:
    """Conv3D and 3D pooling; a stateful GRU (fixed batch) beside it."""
    cube = k.Input((4, 4, 4, 1), batch_size=BATCH, name="cube")
    steps = k.Input((TIME, FEATURES), batch_size=BATCH, name="steps")
    a = L.Flatten()(L.MaxPooling3D()(L.Conv3D(2, 2, activation="relu")(cube)))
    b = L.GRU(3, stateful=True)(steps)
    return k.Model([cube, steps], L.Dense(2)(L.Concatenate()([a, b])), name="volumes")


def mixed_precision() -> k.Model:
    """Layers whose dtype is a mixed_float16 policy (stored as a dict in the config)."""
    return k.Sequential(
        [
            L.Dense(8, activation="relu", input_shape=(4,), dtype="mixed_float16"),
            L.Dense(3, dtype="float32"),
        ],
        name="mixed",
    )


def lambda_code() -> k.Model:
    """A Lambda whose bytecode touches the file named by $FUSECLI_TEST_MARKER when it runs."""
    return k.Sequential(
        [
            L.Dense(3, input_shape=(4,)),
            L.Lambda(
                lambda x: (
                    __import__("pathlib")
                    .Path(__import__("os").environ["FUSECLI_TEST_MARKER"])
                    .touch()
                    if "FUSECLI_TEST_MARKER" in __import__("os").environ
                    else None,
                    x * 2.0,
                )[1]
            ),
        ],
        name="with_lambda",
    )


def tf_op() -> k.Model:
    """`x * 2.0` on a Keras tensor: tf-keras stores a TFOpLambda layer."""
    x = k.Input((4,))
    return k.Model(x, L.Dense(2)(x) * 2.0, name="with_tf_op")


MODELS: dict[str, Callable[[], k.Model]] = {
    "gru": gru,
    "lstm": lstm,
    "conv": conv,
    "conv1d": conv1d,
    "masked": masked,
    "multi_io": multi_io,
    "transfer": transfer,
    "siamese": siamese,
    "hard_sigmoid": hard_sigmoid,
    "seq2seq": seq2seq,
    "assorted": assorted,
    "volumes": volumes,
    "mixed_precision": mixed_precision,
    "lambda_code": lambda_code,
    "tf_op": tf_op,
}


def randomize(model: k.Model, rng: np.random.Generator) -> None:
    """Random weights everywhere; variances positive, so BatchNormalization stays defined."""
    values = []
    for w in model.weights:
        v = rng.normal(0.0, 0.5, size=w.shape)
        if "moving_variance" in w.name:
            v = np.abs(v) + 0.5
        values.append(v.astype(w.dtype.as_numpy_dtype))
    model.set_weights(values)


def sample_inputs(model: k.Model, rng: np.random.Generator) -> list[np.ndarray]:
    xs = []
    for tensor in model.inputs:
        shape = (BATCH, *tensor.shape[1:])
        if tensor.dtype.is_integer or model.name in ("text_conv", "masked_text"):
            x = rng.integers(1, VOCAB, size=shape)
            x[:, -2:] = 0  # padding, so masks matter
            xs.append(x.astype("int32"))
        else:
            xs.append(rng.standard_normal(shape).astype("float32"))
    return xs


def strip_input_layer(src: Path, dst: Path) -> None:
    """Copy a Sequential .h5 and drop its InputLayer from the config, as Keras <= 2.3 wrote it."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layers = config["config"]["layers"]
        assert layers[0]["class_name"] == "InputLayer"
        config["config"]["layers"] = layers[1:]
        f.attrs["model_config"] = json.dumps(config).encode("utf8")


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for seed, (name, build) in enumerate(MODELS.items()):
        k.utils.set_random_seed(seed)
        if name == "mixed_precision":
            k.mixed_precision.set_global_policy("float32")
        model = build()
        randomize(model, np.random.default_rng(seed))
        xs = sample_inputs(model, np.random.default_rng(INPUT_SEED))
        ys = model(xs if len(xs) > 1 else xs[0], training=False)
        ys = ys if isinstance(ys, list | tuple) else [ys]
        model.save(out / f"{name}.h5")
        arrays = {f"x{i}": x for i, x in enumerate(xs)}
        arrays.update({f"y{i}": np.asarray(y, dtype="float32") for i, y in enumerate(ys)})
        np.savez(out / f"{name}.npz", **arrays)
    strip_input_layer(out / "gru.h5", out / "gru_old.h5")
    shutil.copyfile(out / "gru.npz", out / "gru_old.npz")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
