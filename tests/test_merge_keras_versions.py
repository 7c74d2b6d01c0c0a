"""`merge` on `.keras` files as each Keras 3 version wrote them.

Keras 3.0 to 3.5 name a layer's weights group after its class only (`layers/conv2d_1/vars/0`
for a layer called `conv2d_8`; `keras.src.utils.naming.to_snake_case`, where a digit starts
no word) and write no `name` attribute on the `vars` group; 3.6 and later add the attribute. The
files here are real Keras 3.15 archives whose weights file is rewritten as 3.4 wrote it, and
Keras 3.15 itself loads them before fusecli is asked to.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from fusecli.merging.merge import merge


def classic_sequential(keras, seed: int):
    """A Sequential whose layers are named as a long session numbers them (`conv2d_8`), with the
    classes whose snake-case names hold digits."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv2d_8"),
            keras.layers.BatchNormalization(name="batch_normalization_3"),
            keras.layers.DepthwiseConv2D(3, name="depthwise_conv2d_2"),
            keras.layers.Conv2D(3, 1, name="conv2d_9"),
            keras.layers.Flatten(name="flatten_2"),
            keras.layers.Dense(5, name="dense_9"),
        ],
        name="sequential_4",
    )
    rng = np.random.default_rng(seed)
    for v in model.weights:
        low = 0.5 if "variance" in v.path else -0.5  # a variance below zero gives NaN
        v.assign(rng.uniform(low, low + 1.0, v.shape))
    return model


def as_keras_3_4(source: Path, target: Path) -> Path:
    """Rewrite a `.keras` archive's weights file as Keras 3.4 wrote it: no attributes on any
    group, and 3.4 in the metadata."""
    with zipfile.ZipFile(source) as src:
        weights = io.BytesIO(src.read("model.weights.h5"))
        with h5py.File(weights, "r+") as h5:
            groups = [h5]
            h5.visititems(
                lambda _, node: groups.append(node) if isinstance(node, h5py.Group) else None
            )
            for group in groups:
                for key in list(group.attrs):
                    del group.attrs[key]
        with zipfile.ZipFile(target, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "model.weights.h5":
                    data = weights.getvalue()
                elif item.filename == "metadata.json":
                    data = json.dumps({**json.loads(data), "keras_version": "3.4.1"}).encode()
                dst.writestr(item, data)
    return target


@pytest.fixture(scope="module")
def files(keras, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kv")
    out = {}
    for seed in (1, 2):
        model = classic_sequential(keras, seed)
        model.save(d / f"new{seed}.keras")
        out[f"new{seed}"] = d / f"new{seed}.keras"
        out[f"old{seed}"] = as_keras_3_4(d / f"new{seed}.keras", d / f"old{seed}.keras")
    return out


def test_the_crafted_file_is_written_as_keras_3_4_did_and_keras_loads_it(keras, files):
    with (
        zipfile.ZipFile(files["old1"]) as z,
        h5py.File(io.BytesIO(z.read("model.weights.h5"))) as h5,
    ):
        assert sorted(h5["layers"]) == [
            "batch_normalization",
            "conv2d",
            "conv2d_1",
            "dense",
            "depthwise_conv2d",
            "flatten",
        ]
        assert dict(h5["layers/conv2d/vars"].attrs) == {}
    old = keras.saving.load_model(files["old1"])
    new = keras.saving.load_model(files["new1"])
    for a, b in zip(old.weights, new.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("pair", [("old1", "old2"), ("old1", "new2")])
def test_keras_3_4_sequential_merges_as_keras_loads_it(keras, files, tmp_path, pair):
    out = tmp_path / "soup.keras"
    report = merge([files[k] for k in pair], out)
    assert report.merged == 12
    a, b = (keras.saving.load_model(files[k]) for k in pair)
    soup = keras.saving.load_model(out)
    for va, vb, vs in zip(a.weights, b.weights, soup.weights, strict=True):
        expected = (np.asarray(va) + np.asarray(vb)) / 2
        np.testing.assert_allclose(np.asarray(vs), expected, rtol=1e-6, atol=1e-7)
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype("float32")
    averaged = keras.models.clone_model(a)
    averaged.set_weights([np.asarray(v) for v in soup.weights])
    got = np.asarray(soup(x))
    assert np.ptp(got) > 0.1
    np.testing.assert_allclose(got, np.asarray(averaged(x)), rtol=1e-5, atol=1e-6)


def _dense_net(keras, *, with_lambda: bool):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(inputs)
    if with_lambda:
        outputs = keras.layers.Lambda(lambda t: t, name="code")(outputs)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_the_h5_plan_uses_the_config_that_was_scanned(keras, tmp_path, suffix):
    # merge -o x.h5 plans the output from the template's layout (read with its scan), not from a
    # second read of the path: a file renamed over the template after its scan (here one with
    # a Lambda) cannot put its config into the output.
    from fusecli.formats.weights_layout import read_layout
    from fusecli.merging import keras2_convert

    path = tmp_path / f"template{suffix}"
    _dense_net(keras, with_lambda=False).save(path)
    layout = read_layout(path)
    swapped = tmp_path / f"swapped{suffix}"
    _dense_net(keras, with_lambda=True).save(swapped)
    swapped.replace(path)
    flat, mapping = keras2_convert.places(layout, "h5")
    assert "Lambda" not in json.dumps(flat.config)
    assert len(mapping) == len(layout.variables) == 2
