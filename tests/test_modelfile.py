"""The TF-free reader: config, metadata and weights of .keras and .h5 files."""

from __future__ import annotations

import zipfile

import h5py
import numpy as np
import pytest

from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import (
    file_format,
    open_hdf5,
    open_weights,
    read_model_file,
    walk_hdf5,
)


def test_read_keras_file(model_files, keras):
    mf = read_model_file(model_files["a"])
    assert (mf.format, mf.keras_version) == ("keras", keras.__version__)
    assert mf.config["class_name"] == "Functional"
    assert mf.size == model_files["a"].stat().st_size
    assert set(mf.members) == {"config.json", "metadata.json", "model.weights.h5"}


def test_read_h5_file(model_files, keras):
    mf = read_model_file(model_files["a_h5"])
    assert (mf.format, mf.keras_version, mf.backend) == ("h5", keras.__version__, "tensorflow")
    assert [x["class_name"] for x in mf.config["config"]["layers"]] == [
        "InputLayer", "Dense", "Dense"
    ]  # fmt: skip
    assert mf.members == []


def test_format_is_read_from_content_not_name(model_files, tmp_path):
    disguised = tmp_path / "really_h5.keras"
    disguised.write_bytes(model_files["a_h5"].read_bytes())
    assert file_format(disguised) == "h5"
    # ... and a name that lies is refused: Keras would pick the format by the name.
    with pytest.raises(ModelFileError) as e:
        read_model_file(disguised)
    assert str(e.value) == (
        f"{disguised}: is an HDF5 file named .keras; rename it to match what it holds"
    )


@pytest.mark.parametrize("key", ["a", "a_h5"])
def test_open_weights_gives_the_stored_values(model_files, key, keras):
    model = keras.saving.load_model(model_files[key])
    kernel = np.asarray(model.layers[1].kernel)
    with open_weights(model_files[key]) as weights:
        if key == "a":
            stored = weights["layers/dense/vars/0"]
        else:  # each layer group lists its datasets in `weight_names`, as Keras reads them
            group = weights[model.layers[1].name]
            stored = group[group.attrs["weight_names"][0]]
        np.testing.assert_array_equal(stored[()], kernel)


def test_open_hdf5_turns_read_errors_into_model_file_error(model_files):
    with pytest.raises(ModelFileError) as caught, open_hdf5(model_files["a"]) as h5:
        h5["no/such/dataset"]
    assert str(caught.value).startswith(f"{model_files['a']}: weights cannot be read (")


def test_walk_hdf5_lists_links_in_name_order_without_following_them(tmp_path):
    path = tmp_path / "links.h5"
    with h5py.File(path, "w") as h5:
        h5["b/x"] = np.zeros(3)
        h5["a"] = np.ones(2)
        h5["b/loop"] = h5["b"]  # a hard link to its own group
        h5["b/soft"] = h5py.SoftLink("/a")
        h5["b/ext"] = h5py.ExternalLink("other.h5", "/y")
    with h5py.File(path, "r") as h5:
        entries = [(e.name, e.kind, e.target) for e in walk_hdf5(h5, path)]
    assert entries == [
        ("a", "dataset", None),
        ("b", "group", None),
        ("b/ext", "external", ("other.h5", "/y")),
        ("b/loop", "group", None),  # met, not entered again
        ("b/soft", "soft", None),
        ("b/x", "dataset", None),
    ]


def test_weights_member_names_the_weights_format(model_files, tmp_path):
    assert read_model_file(model_files["a"]).weights_member == "model.weights.h5"
    assert read_model_file(model_files["a_h5"]).weights_member is None
    path = tmp_path / "npz.keras"
    with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(path, "w") as dst:
        dst.writestr("config.json", src.read("config.json"))
        dst.writestr("model.weights.npz", b"")
    assert read_model_file(path).weights_member == "model.weights.npz"
    with pytest.raises(ModelFileError) as caught, open_weights(path):
        pass
    assert str(caught.value).startswith(f"{path}: keeps its weights in model.weights.npz")
