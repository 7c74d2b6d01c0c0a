"""The TF-free reader: config, metadata and weights of .keras and .h5 files."""

from __future__ import annotations

import numpy as np
import pytest

from fusecli.errors import ModelFileError
from fusecli.files.modelfile import file_format, open_hdf5, open_weights, read_model_file


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
