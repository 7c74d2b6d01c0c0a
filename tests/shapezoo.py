"""Small models covering the layers whose output shapes `inspect` computes from the config.

The same code builds them with Keras 3 (in the test process) and with tf-keras (in a subprocess,
for Keras 2 files): `build(keras, keras2)` returns {name: model}. Nothing here is trained or run;
the models are only built, so that Keras states their output shapes and dtypes.
"""

from __future__ import annotations

from typing import Any


def build(keras: Any, keras2: bool) -> dict[str, Any]:
    """Models whose `outputs` are the reference for `inspect`'s output shapes and dtypes."""
    keras.utils.set_random_seed(0)
    return {
        "zoo": zoo(keras, keras2),
        "nested": nested(keras),
        "seq_cnn": seq_cnn(keras, keras2),
        "seq_rnn": seq_rnn(keras, keras2),
        "video": video(keras),
        "seq2seq": seq2seq(keras),
        "built": built(keras),
    }


def zoo(keras: Any, keras2: bool) -> Any:
    """One functional model with an output per layer configuration under test."""
    L = keras.layers
    img = keras.Input((12, 10, 3), name="img")
    seq = keras.Input((7, 4), name="seq")
    vol = keras.Input((6, 6, 6, 2), name="vol")
    tok = keras.Input((9,), dtype="int32", name="tok")
    vec = keras.Input((5,), name="vec")
    dyn = keras.Input((None, None, 3), name="dyn")
    cf = keras.Input((3, 12, 10), name="cf")  # channels_first images
    frames = keras.Input((4, 8, 8, 2), name="frames")
    texts = keras.Input((None, 6), name="texts")
    first = "channels_first"
    outs = [
        L.Dense(6)(vec),
        L.Dense(4, dtype="float64")(seq),
        L.Conv2D(5, 3)(img),
        L.Conv2D(5, (3, 2), strides=2, padding="same")(img),
        L.Conv2D(4, 3, dilation_rate=2)(img),
        L.Conv2D(4, (2, 3), strides=(2, 3))(dyn),
        L.Conv2D(4, 3, strides=2, data_format=first)(cf),
        L.Conv2D(4, 3, padding="same", data_format=first)(cf),
        L.Conv1D(3, 3, padding="causal", dilation_rate=2)(seq),
        L.Conv1D(3, 2, strides=2)(seq),
        L.Conv1D(3, 3)(texts),
        L.Conv3D(2, 3, padding="same", strides=2)(vol),
        L.Conv3D(2, (3, 2, 1))(vol),
        L.Conv2DTranspose(3, 3, strides=2)(img),
        L.Conv2DTranspose(3, 3, strides=2, padding="same")(img),
        L.Conv2DTranspose(3, 3, strides=2, output_padding=1)(img),
        L.Conv2DTranspose(3, 2, strides=2, data_format=first)(cf),
        L.Conv1DTranspose(2, 3, strides=2)(seq),
        L.Conv3DTranspose(2, 2, strides=2)(vol),
        L.SeparableConv2D(4, 3, strides=2)(img),
        L.SeparableConv1D(4, 3, padding="same")(seq),
        L.DepthwiseConv2D(3, depth_multiplier=2)(img),
        L.DepthwiseConv2D(3, data_format=first)(cf),
        L.DepthwiseConv1D(3, strides=2)(seq),
        L.MaxPooling2D()(img),
        L.AveragePooling2D(3, strides=2, padding="same")(img),
        L.MaxPooling2D((2, 3))(dyn),
        L.MaxPooling2D(2, data_format=first)(cf),
        L.MaxPooling1D(2)(seq),
        L.AveragePooling1D(3, strides=1, padding="same")(seq),
        L.MaxPooling3D(2)(vol),
        L.AveragePooling3D((3, 2, 2), strides=1)(vol),
        L.GlobalAveragePooling2D()(img),
        L.GlobalMaxPooling2D(data_format=first)(cf),
        L.GlobalMaxPooling1D(keepdims=True)(seq),
        L.GlobalAveragePooling1D()(texts),
        L.GlobalMaxPooling3D()(vol),
        L.GlobalAveragePooling2D(keepdims=True, data_format=first)(cf),
        L.Flatten()(img),
        L.Flatten()(dyn),
        L.Flatten()(tok),
        L.Reshape((6, 20, 3))(img),
        L.Reshape((-1, 2))(seq),
        L.Reshape((2, -1))(texts),
        L.Permute((2, 1))(seq),
        L.Permute((3, 1, 2))(img),
        L.RepeatVector(3)(vec),
        L.SimpleRNN(3)(seq),
        L.GRU(3, return_sequences=True)(texts),
        *L.LSTM(3, return_state=True)(seq),
        *L.GRU(2, return_sequences=True, return_state=True)(seq),
        *L.SimpleRNN(2, return_state=True, go_backwards=True)(texts),
        L.Bidirectional(L.LSTM(3))(seq),
        L.Bidirectional(L.GRU(2, return_sequences=True), merge_mode="sum")(texts),
        *L.Bidirectional(L.LSTM(2), merge_mode=None)(seq),
        *L.Bidirectional(L.GRU(2, return_state=True))(seq),
        *L.Bidirectional(L.LSTM(2, return_sequences=True, return_state=True), merge_mode="ave")(
            seq
        ),
        L.RNN(L.LSTMCell(3), return_sequences=True)(seq),
        *L.RNN([L.GRUCell(2), L.LSTMCell(3)], return_state=True)(seq),
        L.ConvLSTM2D(3, 3, return_sequences=True)(frames),
        *L.ConvLSTM2D(2, 3, padding="same", strides=2, return_state=True)(frames),
        L.ConvLSTM1D(2, 3)(L.TimeDistributed(L.Reshape((64, 2)))(frames)),
        L.TimeDistributed(L.Dense(3))(seq),
        L.TimeDistributed(L.Conv2D(2, 3))(frames),
        L.TimeDistributed(L.MaxPooling2D())(frames),
        L.TimeDistributed(L.Flatten())(frames),
        L.Embedding(20, 4)(tok),
        L.Add()([L.Dense(3)(vec), L.Dense(3)(vec)]),
        L.Subtract()([L.Dense(3)(vec), L.Dense(3)(vec)]),
        L.Multiply()([seq, L.Dense(1)(seq)]),
        L.Average()([seq, seq]),
        L.Maximum()([seq, seq]),
        L.Minimum()([texts, texts]),
        L.Concatenate()([L.Dense(2)(vec), vec, L.Dense(1)(vec)]),
        L.Concatenate(axis=1)([seq, seq, seq]),
        L.Concatenate()([seq, texts]),
        L.Dot(axes=1)([vec, vec]),
        L.Dot(axes=(2, 2))([seq, seq]),
        L.Dot(axes=-1, normalize=True)([seq, L.Dense(4)(seq)]),
        L.Activation("relu")(img),
        L.Softmax()(seq),
        L.Dropout(0.1)(seq),
        L.SpatialDropout1D(0.1)(seq),
        L.BatchNormalization()(img),
        L.LayerNormalization()(seq),
        L.Rescaling(2.0)(img),
        L.GaussianNoise(0.1)(vec),
        L.ZeroPadding2D(((1, 2), (0, 3)))(img),
        L.ZeroPadding2D(1, data_format=first)(cf),
        L.ZeroPadding1D(2)(seq),
        L.ZeroPadding3D((1, 2, 0))(vol),
        L.Cropping2D(((1, 0), (2, 1)))(img),
        L.Cropping2D(2, data_format=first)(cf),
        L.Cropping1D((1, 2))(seq),
        L.Cropping3D(1)(vol),
        L.UpSampling2D((2, 3))(img),
        L.UpSampling2D(2, data_format=first)(cf),
        L.UpSampling1D(3)(seq),
        L.UpSampling3D(2)(vol),
        L.Attention()([seq, texts, L.Dense(4)(texts)]),
        *L.Attention(use_scale=True)([seq, seq], return_attention_scores=True),
        L.AdditiveAttention()([seq, seq]),
        L.MultiHeadAttention(2, 3)(seq, texts),
        L.MultiHeadAttention(2, 3, output_shape=5)(seq, seq),
        *L.MultiHeadAttention(2, 3)(seq, seq, return_attention_scores=True),
        # Mixed precision: layers compute in float16, the last one back in float32.
        L.Dense(3, dtype="mixed_float16")(vec),
        L.Activation("softmax", dtype="float32")(L.Dense(3, dtype="mixed_float16")(vec)),
        L.Conv2D(2, 3, dtype="mixed_bfloat16")(img),
        L.LSTM(2, dtype="mixed_float16")(seq),
        L.Flatten(dtype="mixed_float16")(L.Dense(2, dtype="mixed_float16")(seq)),
    ]
    if not keras2:
        outs += [
            L.RMSNormalization()(seq),
            L.UnitNormalization()(vec),
            L.Identity()(tok),
            L.ZeroPadding1D(1, data_format=first)(seq),
            L.Lambda(lambda t: t[:, :3], output_shape=(3,))(vec),  # Keras 3 takes its word
        ]
    if keras2:  # TensorFlow operations, which tf-keras wraps in TFOpLambda layers
        import tensorflow as tf

        h = L.Dense(4)(tf.nn.relu(tf.math.multiply(vec / 255.0, 2.0)) + 1)
        outs += [L.Dense(3)(h * h), tf.cast(h, "float16"), tf.math.sigmoid(seq)]
    inputs = [img, seq, vol, tok, vec, dyn, cf, frames, texts]
    return keras.Model(inputs, outs, name="zoo")


def nested(keras: Any) -> Any:
    """Models in models: functional in functional, Sequential with and without an input, a
    model called twice, on another shape, and inside TimeDistributed."""
    L = keras.layers
    x_in = keras.Input((4,), name="inner_in")
    inner = keras.Model(x_in, L.Dense(3, name="inner_dense")(x_in), name="inner")
    seq_model = keras.Sequential([keras.Input((3,)), L.Dense(2), L.Dropout(0.1)], name="seq_in")
    deferred = keras.Sequential([L.Dense(2), L.Dense(5)], name="deferred")
    steps_in = keras.Input((None, 4), name="steps_in")
    steps = keras.Model(steps_in, L.LSTM(2, return_sequences=True)(steps_in), name="steps")
    per_step = keras.Sequential([L.Dense(3), L.Dense(2)], name="per_step")
    wrapped = keras.Sequential([keras.Input((4,)), inner, L.Dense(6)], name="wrapped")
    y = keras.Input((4,), name="y")
    s = keras.Input((7, 4), name="s")
    outs = [
        seq_model(inner(y)),
        seq_model(inner(L.Dense(4)(y))),
        deferred(y),
        steps(s),
        L.TimeDistributed(per_step)(s),
        wrapped(y),
    ]
    return keras.Model([y, s], outs, name="outer")


def seq_cnn(keras: Any, keras2: bool) -> Any:
    """A Sequential CNN; in Keras 2 style its first layer carries the input shape."""
    L = keras.layers
    if keras2:
        head = [L.Conv2D(4, 3, activation="relu", input_shape=(16, 16, 1))]
    else:
        head = [keras.Input((16, 16, 1)), L.Conv2D(4, 3, activation="relu")]
    return keras.Sequential(
        [
            *head,
            L.MaxPooling2D(),
            L.Conv2D(8, 3, padding="same", strides=2),
            L.BatchNormalization(),
            L.Flatten(),
            L.Dropout(0.2),
            L.Dense(10, activation="softmax"),
        ],
        name="seq_cnn",
    )


def seq_rnn(keras: Any, keras2: bool) -> Any:
    """A Sequential text model: Embedding, stacked and bidirectional recurrent layers."""
    L = keras.layers
    if keras2:
        head = [L.Embedding(50, 8, input_length=12)]
    else:
        head = [keras.Input((12,), dtype="int32"), L.Embedding(50, 8)]
    return keras.Sequential(
        [
            *head,
            L.Bidirectional(L.GRU(4, return_sequences=True)),
            L.LSTM(5, return_sequences=True),
            L.TimeDistributed(L.Dense(3, activation="softmax")),
        ],
        name="seq_rnn",
    )


def video(keras: Any) -> Any:
    """TimeDistributed CNN into an LSTM, and a ConvLSTM2D branch."""
    L = keras.layers
    clips = keras.Input((5, 16, 16, 3), name="clips")
    h = L.TimeDistributed(L.Conv2D(4, 3, activation="relu"))(clips)
    h = L.TimeDistributed(L.MaxPooling2D())(h)
    h = L.TimeDistributed(L.Flatten())(h)
    h = L.LSTM(6)(h)
    c = L.ConvLSTM2D(3, 3, padding="same", return_sequences=True)(clips)
    c = L.BatchNormalization()(c)
    c = L.ConvLSTM2D(2, 3)(c)
    c = L.GlobalAveragePooling2D()(c)
    out = L.Dense(4, activation="softmax", name="label")(L.Concatenate()([h, c]))
    return keras.Model(clips, out, name="video")


def built(keras: Any) -> Any:
    """A Sequential model given its input shape by `build()`: only the model config holds it."""
    L = keras.layers
    model = keras.Sequential([L.Conv1D(4, 3, strides=2), L.GlobalMaxPooling1D(), L.Dense(2)])
    model.build((None, 9, 3))
    return model


def seq2seq(keras: Any) -> Any:
    """An encoder-decoder: the decoder LSTM starts from the encoder's states."""
    L = keras.layers
    enc_in = keras.Input((None,), name="enc_tokens")
    dec_in = keras.Input((None,), name="dec_tokens")
    e = L.Embedding(30, 8, name="enc_embed")(enc_in)
    _, h, c = L.LSTM(16, return_state=True, name="encoder")(e)
    d = L.Embedding(30, 8, name="dec_embed")(dec_in)
    d = L.LSTM(16, return_sequences=True, name="decoder")(d, initial_state=[h, c])
    out = L.Dense(30, activation="softmax", name="chars")(d)
    return keras.Model([enc_in, dec_in], out, name="seq2seq")
