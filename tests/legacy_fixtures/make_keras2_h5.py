"""Write Keras 2 era .h5 model files with tf-keras, and what tf-keras computes on fixed inputs.

Run in its own process (tf-keras and Keras 3 must not share one):

    python tests/legacy_fixtures/make_keras2_h5.py OUT_DIR

For every model NAME it writes OUT_DIR/NAME.h5 (`model.save`, Keras 2 format) and OUT_DIR/NAME.npz
holding the inputs `x0, x1, ...` and tf-keras' outputs `y0, y1, ...` (training=False); for those in
ARCHIVED also NAME.keras, the archive tf.keras 2.13+ writes (see `write_archive`). Weights are
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
import tensorflow as tf  # noqa: E402
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


# -- Keras 2 constructs whose meaning Keras 3 may have changed (tests/test_keras2_semantics.py) --
# Inputs are padded the two ways Keras 2 users padded: rows 0 and 3 at the end, row 1 at the
# start, row 2 not at all; a mask that is dropped or misread shows in every row but row 2.
LENGTH = 7
# (padded at the end from, padded at the start up to, short row padded from) per input, so that
# two masked inputs of one model have different masks.
PADDINGS = ((4, 3, 2), (2, 5, 6))


def padded_ids(rng: np.random.Generator, variant: int = 0) -> np.ndarray:
    after, before, short = PADDINGS[variant % len(PADDINGS)]
    ids = rng.integers(1, VOCAB, size=(4, LENGTH))
    ids[0, after:] = 0
    ids[1, :before] = 0
    ids[3, short:] = 0
    return ids.astype("int32")


def padded_floats(rng: np.random.Generator, features: int, variant: int = 0) -> np.ndarray:
    after, before, short = PADDINGS[variant % len(PADDINGS)]
    x = rng.standard_normal((4, LENGTH, features)).astype("float32")
    x[0, after:] = 0.0
    x[1, :before] = 0.0
    x[3, short:] = 0.0
    return x


def ids_input(name: str) -> k.KerasTensor:
    return k.Input((LENGTH,), dtype="int32", name=name)


def s2s_masked() -> k.Model:
    """The issue's case: a decoder LSTM over a masked Embedding, started from the encoder's
    states (Keras 3 drops the mask of an RNN called with initial_state)."""
    source, target = ids_input("source"), ids_input("target")
    _, h, c = L.LSTM(8, return_state=True)(L.Embedding(VOCAB, 6, mask_zero=True)(source))
    decoder = L.Embedding(VOCAB, 6, mask_zero=True)(target)
    decoded = L.LSTM(8, return_sequences=True)(decoder, initial_state=[h, c])
    return k.Model([source, target], L.Dense(VOCAB, activation="softmax")(decoded), name="s2s")


def s2s_states() -> k.Model:
    """More RNNs with initial_state over masked sequences: GRU, SimpleRNN, RNN(cell), the mask
    reaching them through Dropout, TimeDistributed and another RNN's return_sequences; and an
    unmasked decoder (which Keras 3 already runs as Keras 2 did)."""
    source, target = ids_input("source"), ids_input("target")
    encoded = L.Embedding(VOCAB, 6, mask_zero=True)(source)
    _, h, c = L.LSTM(8, return_state=True)(encoded)
    _, g = L.GRU(8, return_state=True, reset_after=False)(encoded)
    decoder = L.Embedding(VOCAB, 6, mask_zero=True)(target)
    first = L.LSTM(8, return_sequences=True)(decoder, initial_state=[h, c])
    second = L.GRU(8, return_sequences=True)(L.Dropout(0.2)(first), initial_state=g)
    dense = L.TimeDistributed(L.Dense(8, activation="tanh"))(second)
    third = L.SimpleRNN(8, return_sequences=True, go_backwards=True)(dense, initial_state=[g])
    fourth = L.RNN(L.LSTMCell(8), return_sequences=True)(dense, initial_state=[h, c])
    unmasked = L.LSTM(8, return_sequences=True)(L.Embedding(VOCAB, 6)(target), initial_state=[h, c])
    outputs = [first, second, third, fourth, unmasked]
    return k.Model([source, target], outputs, name="s2s_states")


def s2s_bidirectional() -> k.Model:
    """A bidirectional encoder with return_state feeding its four states to a bidirectional
    decoder over a masked sequence, and their concatenation to a plain one."""
    source, target = ids_input("source"), ids_input("target")
    encoded = L.Embedding(VOCAB, 6, mask_zero=True)(source)
    seq, fh, fc, bh, bc = L.Bidirectional(L.LSTM(4, return_sequences=True, return_state=True))(
        encoded
    )
    decoder = L.Embedding(VOCAB, 6, mask_zero=True)(target)
    both = L.Bidirectional(L.LSTM(4, return_sequences=True))(
        decoder, initial_state=[fh, fc, bh, bc]
    )
    h, c = L.Concatenate()([fh, bh]), L.Concatenate()([fc, bc])
    plain = L.LSTM(8, return_sequences=True)(decoder, initial_state=[h, c])
    return k.Model([source, target], [seq, both, plain], name="s2s_bidirectional")


def masking_states() -> k.Model:
    """Masking(0.) (a mask from float vectors) into an LSTM called with initial_state."""
    x = k.Input((LENGTH, FEATURES), name="frames")
    start = k.Input((5,), name="start")
    h, c = L.Dense(8, activation="tanh")(start), L.Dense(8)(start)
    seq = L.LSTM(8, return_sequences=True)(L.Masking(0.0)(x), initial_state=[h, c])
    return k.Model([x, start], seq, name="masking_states")


def masking_merged() -> k.Model:
    """Two Masking masks added: Keras 2 ANDs them, Keras 3 ORs them."""
    a, b = k.Input((LENGTH, FEATURES), name="a"), k.Input((LENGTH, FEATURES), name="b")
    added = L.Add()([L.Masking(0.0)(a), L.Masking(0.0)(b)])
    return k.Model([a, b], L.LSTM(4, return_sequences=True)(added), name="masking_merged")


def masking_shared() -> k.Model:
    """A Masking mask read by MultiHeadAttention and by an LSTM (Keras 3's attention removes
    the mask from the tensor it reads)."""
    x = k.Input((LENGTH, FEATURES), name="frames")
    masked = L.Masking(0.0)(x)
    attended = L.MultiHeadAttention(num_heads=2, key_dim=3)(masked, masked)
    seq = L.LSTM(4, return_sequences=True)(masked)
    return k.Model(x, [attended, seq], name="masking_shared")


def rescaled_mask() -> k.Model:
    """Rescaling and Normalization between a masked Embedding and RNNs: tf-keras' do not pass
    the mask on, Keras 3's do."""
    ids = ids_input("ids")
    e = L.Embedding(VOCAB, 6, mask_zero=True)(ids)
    rescaled = L.LSTM(4, return_sequences=True)(L.Rescaling(2.0, offset=0.5)(e))
    normalized = L.GRU(4, return_sequences=True)(
        L.Normalization(mean=[0.1] * 6, variance=[2.0] * 6)(e)
    )
    return k.Model(ids, [rescaled, normalized], name="rescaled_mask")


def rescaled_sequential() -> k.Model:
    """The same in a Sequential model."""
    return k.Sequential(
        [
            L.Embedding(VOCAB, 6, mask_zero=True, input_shape=(LENGTH,)),
            L.Rescaling(2.0),
            L.LSTM(4, return_sequences=True),
            L.Dropout(0.1),
            L.GRU(3, return_sequences=True),
        ],
        name="rescaled_sequential",
    )


def nested_masked() -> k.Model:
    """A masked sequence handed to a nested functional model whose LSTM starts from given
    states (and to one without such a layer, which needs nothing)."""
    seq_in, h_in, c_in = k.Input((LENGTH, 6)), k.Input((5,)), k.Input((5,))
    inner = k.Model(
        [seq_in, h_in, c_in],
        L.LSTM(5, return_sequences=True)(seq_in, initial_state=[h_in, c_in]),
        name="decoder_model",
    )
    plain_in = k.Input((LENGTH, 6))
    plain = k.Model(plain_in, L.GRU(3, return_sequences=True)(plain_in), name="plain_model")
    ids, start = ids_input("ids"), k.Input((5,), name="start")
    e = L.Embedding(VOCAB, 6, mask_zero=True)(ids)
    return k.Model([ids, start], [inner([e, start, start]), plain(e)], name="nested_masked")


def mask_wrappers() -> k.Model:
    """A mask through TimeDistributed, Bidirectional (merge modes), Attention,
    AdditiveAttention, MultiHeadAttention and masked global pooling."""
    ids = ids_input("ids")
    e = L.Embedding(VOCAB, 6, mask_zero=True)(ids)
    t = L.TimeDistributed(L.Dense(6, activation="tanh"))(e)
    b = L.Bidirectional(L.GRU(5, return_sequences=True))(t)
    s = L.Bidirectional(L.LSTM(6, return_sequences=True), merge_mode="sum")(t)
    a = L.Attention()([b, b])
    scaled = L.Attention(use_scale=True, score_mode="concat")([s, t])
    ad = L.AdditiveAttention()([s, t, s])
    m = L.MultiHeadAttention(num_heads=2, key_dim=4)(b, b)
    lstm = L.LSTM(6, return_sequences=True)(L.Concatenate()([a, ad, m, scaled]))
    mean, peak = L.GlobalAveragePooling1D()(lstm), L.GlobalMaxPooling1D()(lstm)
    outputs = [t, b, s, a, scaled, ad, m, lstm, mean, peak]
    return k.Model(ids, outputs, name="mask_wrappers")


def causal_attention() -> k.Model:
    """Decoder self-attention: use_causal_mask in the call (tf.keras >= 2.10) and Attention's
    `causal=True` argument (tf.keras 2.4 to 2.9; written into the config after saving)."""
    ids = ids_input("ids")
    e = L.Embedding(VOCAB, 6, mask_zero=True)(ids)
    called = L.Attention()([e, e], use_causal_mask=True)
    argument = L.Attention(causal=True, name="causal_attention")([e, e])
    m = L.MultiHeadAttention(num_heads=2, key_dim=3)(e, e, use_causal_mask=True)
    return k.Model(ids, [called, argument, m], name="causal_attention")


def masking_layer() -> k.Model:
    """Masking(0.) in front of recurrent layers with go_backwards, unroll, return_state,
    stacked, SimpleRNN, and a Bidirectional merging by multiplication."""
    x = k.Input((LENGTH, FEATURES), name="frames")
    masked = L.Masking(0.0)(x)
    first = L.LSTM(6, return_sequences=True, go_backwards=True)(masked)
    second, h = L.GRU(5, return_sequences=True, return_state=True, unroll=True)(first)
    third = L.SimpleRNN(4, return_sequences=True)(second)
    fourth = L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="mul")(third)
    last = L.LSTM(3, go_backwards=True, unroll=True)(fourth)
    return k.Model(x, [first, second, h, third, fourth, last], name="masking_layer")


def merge_masks() -> k.Model:
    """Merge layers of masked sequences: Add, Multiply, Average, Maximum, Concatenate on the
    features and on the time axis, and a masked sequence added to an unmasked one."""
    a_ids, b_ids = ids_input("a"), ids_input("b")
    frames = k.Input((LENGTH, 6), name="frames")
    a = L.Embedding(VOCAB, 6, mask_zero=True)(a_ids)
    b = L.Embedding(VOCAB, 6, mask_zero=True)(b_ids)
    added = L.LSTM(4, return_sequences=True)(L.Add()([a, b]))
    mixed = L.GRU(4, return_sequences=True)(L.Multiply()([a, L.Average()([a, b])]))
    peak = L.SimpleRNN(4, return_sequences=True)(L.Maximum()([a, b]))
    features = L.LSTM(4, return_sequences=True)(L.Concatenate()([a, b]))
    time = L.LSTM(4, return_sequences=True)(L.Concatenate(axis=1)([a, b]))
    half = L.LSTM(4, return_sequences=True)(L.Add()([a, frames]))
    return k.Model(
        [a_ids, b_ids, frames], [added, mixed, peak, features, time, half], name="merge_masks"
    )


def masked_convolutions() -> k.Model:
    """Masked embeddings into layers that do not use masks (Conv1D, Flatten, Dense on 3D,
    GlobalMaxPooling1D), as text-classification tutorials wrote them."""
    ids = ids_input("ids")
    e = L.Embedding(VOCAB, 6, mask_zero=True)(ids)
    conv = L.Conv1D(5, 3, padding="same", activation="relu")(e)
    dense = L.Dense(5)(e)
    pooled = L.GlobalMaxPooling1D()(dense)
    averaged = L.GlobalAveragePooling1D()(dense)
    flat = L.Dense(3)(L.Flatten()(e))
    after_conv = L.LSTM(3)(conv)
    return k.Model(ids, [conv, dense, pooled, averaged, flat, after_conv], name="masked_convs")


def channels_first() -> k.Model:
    """data_format="channels_first" (a Keras 2 user's keras.json): convolutions, pooling,
    padding, upsampling, BatchNormalization(axis=1), Flatten's weight order."""
    image = k.Input((3, 10, 10), name="image")
    cf = "channels_first"
    x = L.Conv2D(4, 3, padding="same", data_format=cf, activation="relu")(image)
    x = L.BatchNormalization(axis=1)(x)
    x = L.ZeroPadding2D(1, data_format=cf)(x)
    x = L.MaxPooling2D(2, data_format=cf)(x)
    x = L.SeparableConv2D(5, 3, data_format=cf)(x)
    x = L.UpSampling2D(2, data_format=cf)(x)
    x = L.Cropping2D(((1, 2), (0, 1)), data_format=cf)(x)
    x = L.AveragePooling2D(2, data_format=cf)(x)
    flat = L.Dense(4)(L.Flatten(data_format=cf)(x))
    pooled = L.GlobalAveragePooling2D(data_format=cf)(x)
    line = L.Conv1D(3, 2, data_format=cf)(L.Reshape((5, 6))(L.Flatten(data_format=cf)(x)))
    return k.Model(image, [flat, pooled, line], name="channels_first")


def dropouts() -> k.Model:
    """Noise layers (Dropout noise_shape, SpatialDropout, GaussianDropout, AlphaDropout):
    the identity at inference in both versions."""
    return k.Sequential(
        [
            L.Dense(6, input_shape=(LENGTH, FEATURES)),
            L.Dropout(0.5, noise_shape=(None, 1, 6)),
            L.GaussianDropout(0.3),
            L.AlphaDropout(0.2),
            L.Reshape((LENGTH, 6, 1)),
            L.SpatialDropout2D(0.3),
            L.Flatten(),
            L.ActivityRegularization(l1=0.1),
            L.Dense(3),
        ],
        name="dropouts",
    )


def conv_lstm() -> k.Model:
    """ConvLSTM2D the ways video tutorials used it: sigmoid and the default hard_sigmoid,
    go_backwards, return_state, then BatchNormalization and Conv3D."""
    clip = k.Input((4, 6, 6, 2), name="clip")
    seq = L.ConvLSTM2D(3, 3, padding="same", return_sequences=True, go_backwards=True)(clip)
    seq = L.BatchNormalization()(seq)
    last, h, c = L.ConvLSTM2D(2, 3, recurrent_activation="sigmoid", return_state=True, dropout=0.1)(
        seq
    )
    volume = L.Conv3D(1, 3, padding="same", activation="sigmoid")(seq)
    return k.Model(clip, [volume, last, h, c], name="conv_lstm")


def td_cnn_lstm() -> k.Model:
    """TimeDistributed CNN feeding an LSTM (per-frame features, then a sequence model)."""
    return k.Sequential(
        [
            L.TimeDistributed(L.Conv2D(3, 3, activation="relu"), input_shape=(5, 8, 8, 1)),
            L.TimeDistributed(L.MaxPooling2D(2)),
            L.TimeDistributed(L.BatchNormalization()),
            L.TimeDistributed(L.Flatten()),
            L.LSTM(6, return_sequences=True),
            L.TimeDistributed(L.Dense(3, activation="softmax")),
        ],
        name="td_cnn_lstm",
    )


def stacked_rnns() -> k.Model:
    """Stacked and bidirectional recurrent layers with return_state (no mask), merge_mode
    None and "ave", go_backwards with return_sequences, and StackedRNNCells."""
    x = k.Input((LENGTH, FEATURES), name="frames")
    forward, backward = L.Bidirectional(L.GRU(4, return_sequences=True), merge_mode=None)(x)
    seq, fh, bh = L.Bidirectional(L.GRU(3, return_sequences=True, return_state=True))(forward)
    ave = L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="ave")(backward)
    rev = L.LSTM(4, return_sequences=True, go_backwards=True)(ave)
    cells = L.RNN(L.StackedRNNCells([L.LSTMCell(3), L.GRUCell(2)]), return_state=True)(rev)
    return k.Model(x, [forward, backward, seq, fh, bh, ave, rev, *cells], name="stacked")


def bn_renorm() -> k.Model:
    """BatchNormalization with batch renormalization (tf.keras only), and with neither center
    nor scale on axis 1."""
    x = k.Input((LENGTH, FEATURES), name="x")
    renorm = L.BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0}, name="renorm")(x)
    bare = L.BatchNormalization(center=False, scale=False, axis=1, name="bare")(x)
    return k.Model(x, [renorm, bare], name="bn_renorm")


def bn_virtual() -> k.Model:
    """BatchNormalization with a virtual batch size (tf.keras only)."""
    return k.Sequential(
        [L.BatchNormalization(virtual_batch_size=2, input_shape=(LENGTH, FEATURES))],
        name="bn_virtual",
    )


def text_gru() -> k.Model:
    """A text classifier as Keras 2.0 tutorials wrote it: Embedding(input_length) into a GRU
    (rewritten as Keras 2.0 saved it by `write_keras20`)."""
    return k.Sequential(
        [
            L.Embedding(VOCAB, 6, input_length=LENGTH),
            L.GRU(5, reset_after=False),
            L.Dense(3, activation="softmax"),
        ],
        name="text_gru",
    )


# Models fed padded_ids / padded_floats (4 rows) rather than the plain inputs.
PADDED = (
    "s2s", "s2s_states", "s2s_bidirectional", "masking_states", "masking_merged",
    "masking_shared", "mask_wrappers", "causal_attention", "masking_layer", "merge_masks",
    "masked_convs", "dropouts", "rescaled_mask", "nested_masked",
    "rescaled_sequential",
    "stacked", "bn_renorm", "bn_virtual",
)  # fmt: skip

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
    "s2s_masked": s2s_masked,
    "s2s_states": s2s_states,
    "s2s_bidirectional": s2s_bidirectional,
    "masking_states": masking_states,
    "masking_merged": masking_merged,
    "masking_shared": masking_shared,
    "rescaled_mask": rescaled_mask,
    "rescaled_sequential": rescaled_sequential,
    "nested_masked": nested_masked,
    "mask_wrappers": mask_wrappers,
    "causal_attention": causal_attention,
    "masking_layer": masking_layer,
    "merge_masks": merge_masks,
    "masked_convolutions": masked_convolutions,
    "channels_first": channels_first,
    "dropouts": dropouts,
    "conv_lstm": conv_lstm,
    "td_cnn_lstm": td_cnn_lstm,
    "stacked_rnns": stacked_rnns,
    "bn_renorm": bn_renorm,
    "bn_virtual": bn_virtual,
    "text_gru": text_gru,
}


# Also saved as the `.keras` archive tf.keras 2.13+ writes (a Keras 2 config in Keras 3's layout).
ARCHIVED = (
    "gru", "lstm", "conv", "multi_io", "transfer", "siamese", "hard_sigmoid", "seq2seq",
    "assorted", "lambda_code", "tf_op", "s2s_bidirectional", "causal_attention", "text_gru",
    "masking_states",
)  # fmt: skip


def write_archive(model: k.Model, xs: list[np.ndarray], path: Path) -> None:
    """NAME.keras, and in NAME_archive.npz what tf-keras computes once it has loaded it back
    (tf-keras 2.21 does not archive every argument it takes: Attention's `causal`)."""
    model.save(path)
    if path.stem == "lambda_code":
        return  # its code must not run here: the tests only check that it is refused
    loaded = k.models.load_model(path, compile=False, safe_mode=False)
    ys = tf.nest.flatten(loaded(xs if len(xs) > 1 else xs[0], training=False))
    arrays = {f"x{i}": x for i, x in enumerate(xs)}
    arrays.update({f"y{i}": np.asarray(y, dtype="float32") for i, y in enumerate(ys)})
    np.savez(path.with_name(f"{path.stem}_archive.npz"), **arrays)


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
    if model.name in PADDED:
        return [
            padded_ids(rng, i)
            if t.dtype.is_integer or t.shape[1:] == (LENGTH,)
            else padded_floats(rng, t.shape[-1], i)
            if len(t.shape) == 3 and t.shape[1] == LENGTH
            else rng.standard_normal((4, *t.shape[1:])).astype("float32")
            for i, t in enumerate(model.inputs)
        ]
    xs = []
    for tensor in model.inputs:
        shape = (BATCH, *tensor.shape[1:])
        if tensor.dtype.is_integer or model.name in ("text_conv", "masked_text", "text_gru"):
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


def write_keras20(src: Path, dst: Path) -> None:
    """Copy a Sequential .h5 as Keras 2.0.x wrote it: the config a bare list of layers, no
    InputLayer, the Embedding's dtype its input's (`int32`), keras_version 2.0.8."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        layers = [x for x in config["config"]["layers"] if x["class_name"] != "InputLayer"]
        for layer in layers:
            if layer["class_name"] == "Embedding":
                layer["config"]["dtype"] = "int32"
        config["config"] = layers
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        f.attrs["keras_version"] = b"2.0.8"


def write_attention_causal(path: Path) -> None:
    """tf.keras 2.4 to 2.9 wrote Attention's `causal` argument into the config; tf-keras 2.21
    takes it but no longer writes it."""
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        for spec in config["config"]["layers"]:
            if spec["class_name"] == "Attention":
                spec["config"]["causal"] = spec["name"] == "causal_attention"
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
        ys = tf.nest.flatten(ys)
        model.save(out / f"{name}.h5")
        arrays = {f"x{i}": x for i, x in enumerate(xs)}
        arrays.update({f"y{i}": np.asarray(y, dtype="float32") for i, y in enumerate(ys)})
        np.savez(out / f"{name}.npz", **arrays)
        if name in ARCHIVED:
            write_archive(model, xs, out / f"{name}.keras")
    strip_input_layer(out / "gru.h5", out / "gru_old.h5")
    write_attention_causal(out / "causal_attention.h5")
    shutil.copyfile(out / "gru.npz", out / "gru_old.npz")
    write_keras20(out / "text_gru.h5", out / "text_gru_k20.h5")
    shutil.copyfile(out / "text_gru.npz", out / "text_gru_k20.npz")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
