"""Model files for the model-file tests (inspect, safety, broken files, fuzz), made once per run.

Keras 3 files are built in the test process; Keras 2 era `.h5` files are written by tf-keras in
one subprocess (tf-keras and Keras 3 do not share a process well). Helpers here also rewrite a
real file's config, to make the hostile files no Keras would write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import h5py

_CACHE: dict[str, Any] = {}

KERAS2_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    out = sys.argv[1]
    counts = {}
    keras.utils.set_random_seed(0)

    x = keras.Input((4,), name="inp")
    h = keras.layers.Dense(8)(x)
    h = keras.layers.Lambda(lambda t: t * 2, name="lam")(h)
    h = tf.math.l2_normalize(h, axis=-1)  # a TF function fusecli does not convert
    inner = keras.Model(x, h, name="inner")

    @keras.utils.register_keras_serializable("MyPkg")
    class MyLayer(keras.layers.Layer):
        def call(self, t):
            return t

    xo = keras.Input((4,), name="o")
    m = keras.Model(xo, MyLayer(name="mine")(inner(xo)), name="outer")
    m.save(f"{out}/k2_unsafe.h5")
    counts["k2_unsafe"] = m.count_params()

    t = keras.Input((6,), dtype="int32", name="tokens")
    e = keras.layers.Embedding(20, 4)(t)
    g = keras.layers.GRU(3, name="gru")(e)
    l = keras.layers.LSTM(2, name="lstm")(e)
    c = keras.layers.Concatenate()([g, l])
    b = keras.layers.BatchNormalization()(c)
    m = keras.Model(t, keras.layers.Dense(5, activation="softmax", name="probs")(b), name="rnn")
    m.save(f"{out}/k2_rnn.h5")
    m.save(f"{out}/k2_rnn.keras")  # tf-keras names its own modules (tf_keras.src...) in it
    counts["k2_rnn"] = m.count_params()

    s = keras.Sequential(
        [keras.layers.Dense(3, input_shape=(5,)), keras.layers.BatchNormalization(),
         keras.layers.Dropout(0.1), keras.layers.Dense(2, name="last")], name="seq2")
    s.save(f"{out}/k2_seq.h5")
    counts["k2_seq"] = s.count_params()
    with open(f"{out}/counts.json", "w") as f:
        json.dump(counts, f)
    """
)


def keras2_files(tmp_path_factory) -> dict[str, Path]:
    """Keras 2 era .h5 files written by tf-keras, and `counts`: their count_params()."""
    if "keras2" not in _CACHE:
        d = tmp_path_factory.mktemp("keras2")
        subprocess.run(
            [sys.executable, "-c", KERAS2_SCRIPT, str(d)],
            check=True,
            capture_output=True,
            env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
            timeout=300,
        )
        files: dict[str, Any] = {p.stem: p for p in d.glob("*.h5")}
        files["k2_rnn_keras"] = d / "k2_rnn.keras"
        files["counts"] = json.loads((d / "counts.json").read_text())
        _CACHE["keras2"] = files
    return _CACHE["keras2"]


def marker_model(keras: Any, marker: Path, *, nested: bool = False) -> Any:
    """A model whose Lambda creates `marker` whenever its code runs (also while loading).

    The path is a constant in the Lambda's own bytecode (Keras does not restore defaults).
    """
    touch = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).touch(), t)[1]")
    keras.utils.set_random_seed(0)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(3, name="dense")(x)
    h = keras.layers.Lambda(touch, name="lam")(h)
    model = keras.Model(x, h, name="inner" if nested else "lambda_model")
    if nested:
        y = keras.Input((4,), name="x")
        model = keras.Model(y, keras.layers.Softmax(name="probs")(model(y)), name="outer")
    return model


def rewrite_keras_config(source: Path, target: Path, edit) -> Path:
    """Copy a .keras archive, passing its config through `edit(config) -> config`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            dst.writestr(item, data)
    return target


def rewrite_h5_config(source: Path, target: Path, edit) -> Path:
    """Copy a .h5 model file, passing its model_config through `edit(config) -> config`."""
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "r+") as h5:
        h5.attrs["model_config"] = json.dumps(edit(json.loads(h5.attrs["model_config"])))
    return target


def layer_configs(config: dict) -> list[dict]:
    """The layer entries of a functional or Sequential config, top level only."""
    return config["config"]["layers"]
