"""`fusecli.merge` on tiny real models: the variable order, every method against numpy on the
tensors Keras reports, the formats, and the refusals."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile

import faults
import h5py
import numpy as np
import pytest
from conftest import REPO, predict
from test_merge_methods import mergekit_slerp

from fusecli.errors import (
    FusecliError,
    InvalidRequest,
    ModelFileError,
    UnsafeModelError,
    VerificationError,
)
from fusecli.formats import archive
from fusecli.formats.modelfile import open_weights
from fusecli.formats.weights_layout import read_layout, read_tensor
from fusecli.merging.merge import merge


def conv_net(keras, seed: int, *, units: int = 3, activation: str = "softmax", head="head"):
    """Conv + BatchNormalization, a nested model with two of each, and a Dense head; every
    variable (BatchNormalization statistics too) set to seeded random values."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((4, 4, 8))
    h = keras.layers.Conv2D(8, 3, padding="same")(inner_in)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Conv2D(8, 1)(h)
    h = keras.layers.BatchNormalization()(h)
    block = keras.Model(inner_in, h, name="block")
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(8, 3, strides=2, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    y = block(y)
    y = keras.layers.GlobalAveragePooling2D()(y)
    y = keras.layers.Dense(units, activation=activation, name=head)(y)
    return _randomized(keras.Model(x, y), seed)


def seq_net(keras, seed: int):
    """A Sequential model holding a nested Sequential (legacy .h5 names its weights by scope)."""
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential([keras.layers.Dense(6), keras.layers.BatchNormalization()])
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5),
            keras.layers.BatchNormalization(),
            inner,
            keras.layers.Dense(2),
        ]
    )
    return _randomized(model, seed)


def counting_net(keras, seed: int):
    """A model with an int32 variable, which merging copies from the first model."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,))
    y = _counting_layer(keras)(2)(x)
    model = keras.Model(x, y)
    model.layers[-1].count.assign(10 * seed)
    return _randomized(model, seed)


def attention_net(keras, seed: int):
    """MultiHeadAttention keeps its variables in sub-layers, stored differently per format."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((5, 8))
    y = keras.layers.MultiHeadAttention(2, 4, name="attention")(x, x)
    return keras.Model(x, keras.layers.Dense(2)(y))


def _counting_layer(keras):
    @keras.saving.register_keras_serializable(package="fusecli_tests")
    class CountingDense(keras.layers.Layer):
        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
            self.bias = self.add_weight(shape=(self.units,), name="bias")
            self.count = self.add_weight(shape=(), dtype="int32", trainable=False, name="count")

        def call(self, x):
            return x @ self.kernel + self.bias

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    return CountingDense


def _randomized(model, seed: int):
    rng = np.random.default_rng(seed)
    values = []
    for v in model.weights:
        shape = tuple(v.shape)
        if "int" in str(v.dtype):
            values.append(np.asarray(v))
        elif "moving_variance" in v.path:
            values.append((rng.random(shape) + 0.5).astype("float32"))
        else:
            values.append((rng.standard_normal(shape) * 0.5).astype("float32"))
    model.set_weights(values)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory, keras):
    d = tmp_path_factory.mktemp("merge")
    out = {}

    def save(key, model, suffix):
        out[key] = d / f"{key}{suffix}"
        model.save(out[key])

    for seed in (1, 2, 3):
        save(f"k{seed}", conv_net(keras, seed), ".keras")
    for seed in (1, 2):
        save(f"h{seed}", conv_net(keras, seed), ".h5")
    save("base_h", conv_net(keras, 0), ".h5")
    frozen = conv_net(keras, 6)
    frozen.get_layer("block").layers[1].trainable = False  # its variables move last in .h5
    save("frozen_h", frozen, ".h5")
    save("wide", conv_net(keras, 4, units=5), ".keras")
    save("wide_h", conv_net(keras, 4, units=5, head="wide_head"), ".h5")
    save("tanh", conv_net(keras, 5, activation="tanh"), ".keras")
    save("seq1", seq_net(keras, 1), ".keras")
    save("seq1_h", seq_net(keras, 1), ".h5")
    save("mha1", attention_net(keras, 1), ".keras")
    save("mha2", attention_net(keras, 2), ".keras")
    save("mha2_h", attention_net(keras, 2), ".h5")
    save("int1", counting_net(keras, 1), ".keras")
    save("int2", counting_net(keras, 2), ".keras")
    return out


@pytest.fixture(scope="module")
def kw(keras, files):
    """The tensors Keras itself reports for a file: `load_model(path).get_weights()`."""
    cache = {}

    def get(key):
        if key not in cache:
            cache[key] = keras.models.load_model(files[key], compile=False).get_weights()
        return cache[key]

    return get


def loaded_weights(keras, path):
    return keras.models.load_model(path).get_weights()  # safe_mode on, as users load


def assert_weights(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


def no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# -- the order of variables ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("key", ["k1", "h1", "frozen_h", "seq1", "seq1_h", "int1"])
def test_variable_order_is_keras_model_weights_order(keras, files, key):
    model = keras.models.load_model(files[key], compile=False)
    layout = read_layout(files[key])
    assert [v.shape for v in layout.variables] == [tuple(w.shape) for w in model.weights]
    with open_weights(files[key]) as group:
        for variable, weight in zip(layout.variables, model.weights, strict=True):
            np.testing.assert_array_equal(
                read_tensor(files[key], group, variable), np.asarray(weight)
            )


def test_both_layouts_list_the_same_tensors(files):
    tensors = []
    for key in ("k1", "h1"):
        layout = read_layout(files[key])
        with open_weights(files[key]) as group:
            tensors.append([read_tensor(files[key], group, v) for v in layout.variables])
    assert len(tensors[0]) == 20
    for a, b in zip(*tensors, strict=True):
        np.testing.assert_array_equal(a, b)


# -- every method against numpy --------------------------------------------------------------


def test_linear_three_models_is_the_average(keras, files, kw, tmp_path):
    out = tmp_path / "soup.keras"
    report = merge([files["k1"], files["k2"], files["k3"]], out)
    expected = [
        (a.astype(np.float64) + b + c) / 3
        for a, b, c in zip(kw("k1"), kw("k2"), kw("k3"), strict=True)
    ]
    assert_weights(loaded_weights(keras, out), expected)
    assert (report.method, report.weights, report.tensors, report.merged) == (
        "linear",
        [1 / 3, 1 / 3, 1 / 3],
        20,
        20,
    )
    assert report.verified and report.format == "keras" and no_leftovers(tmp_path)


def test_merged_model_computes_like_the_averaged_keras_model(keras, files, kw, tmp_path):
    out = tmp_path / "avg.keras"
    merge([files["k1"], files["k2"]], out)
    by_hand = keras.models.load_model(files["k1"])
    by_hand.set_weights([(a + b) / 2 for a, b in zip(kw("k1"), kw("k2"), strict=True)])
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), x)[0], predict(by_hand, x)[0], rtol=1e-5, atol=1e-6
    )


def test_linear_weights_mixed_layouts_to_h5(keras, files, kw, tmp_path):
    out = tmp_path / "mixed.h5"
    report = merge([files["h1"], files["k2"], files["k3"]], out, weights=(5, 3, 2))
    assert report.weights == [0.5, 0.3, 0.2] and report.template == str(files["h1"])
    expected = [
        0.5 * a + 0.3 * b + 0.2 * c for a, b, c in zip(kw("h1"), kw("k2"), kw("k3"), strict=True)
    ]
    assert_weights(loaded_weights(keras, out), expected)
    with h5py.File(out) as f:
        assert "model_config" in f.attrs and "optimizer_weights" not in f


def test_linear_no_normalize_keras_output_from_h5_first(keras, files, kw, tmp_path):
    out = tmp_path / "sum.keras"
    report = merge([files["h1"], files["k2"]], out, weights=(1.0, 1.0), normalize=False)
    assert report.template == str(files["k2"])
    assert_weights(
        loaded_weights(keras, out), [a + b for a, b in zip(kw("h1"), kw("k2"), strict=True)]
    )


def test_slerp_matches_mergekit_per_tensor(keras, files, kw, tmp_path):
    out = tmp_path / "slerp.keras"
    report = merge([files["k1"], files["h2"]], out, method="slerp", t=0.3)
    assert (report.method, report.t, report.weights) == ("slerp", 0.3, None)
    expected = [
        mergekit_slerp(0.3, a.astype(np.float64), b.astype(np.float64))
        for a, b in zip(kw("k1"), kw("h2"), strict=True)
    ]
    assert_weights(loaded_weights(keras, out), expected)


def test_slerp_of_a_model_with_itself_takes_the_linear_fallback(keras, files, kw, tmp_path):
    out = tmp_path / "same.keras"
    merge([files["k1"], files["h1"]], out, method="slerp", t=0.7)
    assert_weights(loaded_weights(keras, out), kw("k1"))


def test_task_arithmetic(keras, files, kw, tmp_path):
    out = tmp_path / "ta.h5"
    report = merge(
        [files["k1"], files["h2"]],
        out,
        method="task-arithmetic",
        base=files["base_h"],
        weights=(0.6, 0.3),
    )
    assert (report.base, report.weights) == (str(files["base_h"]), [0.6, 0.3])
    base = kw("base_h")
    expected = [
        b + 0.6 * (x - b) + 0.3 * (y - b) for b, x, y in zip(base, kw("k1"), kw("h2"), strict=True)
    ]
    assert_weights(loaded_weights(keras, out), expected)


def test_integer_variables_are_copied_from_the_first_model(keras, files, kw, tmp_path):
    out = tmp_path / "int.keras"
    with pytest.raises(UnsafeModelError, match="a custom object registered outside Keras"):
        merge([files["int2"], files["int1"]], out)  # its layer class is code of ours, not Keras'
    assert not out.exists()
    report = merge([files["int2"], files["int1"]], out, trust=True)
    assert (report.merged, report.copied) == (2, 1)
    model = keras.models.load_model(out)
    assert int(model.layers[-1].count.numpy()) == 20
    kernel, bias = kw("int1")[0], kw("int1")[1]
    k2, b2 = kw("int2")[0], kw("int2")[1]
    np.testing.assert_allclose(model.layers[-1].kernel.numpy(), (kernel + k2) / 2, rtol=1e-6)
    np.testing.assert_allclose(model.layers[-1].bias.numpy(), (bias + b2) / 2, rtol=1e-6)


def test_progress_reports_bytes(files, tmp_path):
    calls = []
    merge(
        [files["k1"], files["k2"]], tmp_path / "p.keras", progress=lambda d, t: calls.append((d, t))
    )
    assert len(calls) == 20
    total = read_layout(files["k1"]).variables
    assert calls[-1] == (sum(v.nbytes for v in total),) * 2


def test_inputs_are_not_changed(files, tmp_path):
    keys = ("k1", "h2")
    before = [hashlib.sha256(files[k].read_bytes()).hexdigest() for k in keys]
    merge([files[k] for k in keys], tmp_path / "x.h5")
    assert [hashlib.sha256(files[k].read_bytes()).hexdigest() for k in keys] == before


@pytest.mark.slow
def test_training_state_is_dropped(keras, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    model.save(a)
    model.save(b)
    out = tmp_path / "m.keras"
    merge([a, b], out)
    with zipfile.ZipFile(out) as z:
        assert "compile_config" not in z.read("config.json").decode()
    with open_weights(out) as group:
        assert "optimizer" not in group
    assert_weights(loaded_weights(keras, out), model.get_weights())


def test_a_keras_output_is_its_template_with_the_tensors_replaced(files, tmp_path):
    """Outside its variables' blocks, the merged file's HDF5 bytes are the first input's."""
    out = tmp_path / "m.keras"
    merge([files["k1"], files["k2"]], out)
    variables = read_layout(files["k1"]).variables
    parts = []
    for path in (files["k1"], out):
        with open_weights(path) as group, archive.RawTensors(path) as raw:
            blocks = sorted(raw.locate(group, v.dataset)[1] for v in variables)
            start = raw.start
        with zipfile.ZipFile(path) as z:
            data = z.read("model.weights.h5")
        kept, at = [], 0
        for position, size in blocks:
            kept.append(data[at : position - start])
            at = position - start + size
        kept.append(data[at:])
        parts.append((len(data), [p - start for p, _ in blocks], b"".join(kept)))
    assert parts[0] == parts[1]


def test_a_tensor_damaged_while_written_is_caught(files, tmp_path, monkeypatch):
    import fusecli.merging.merge as merging

    monkeypatch.setattr(merging, "_write_and_verify", faults.SpliceFlipsOneBit(3))
    out = tmp_path / "m.keras"
    with pytest.raises(VerificationError, match="reads back different from what was computed"):
        merge([files["k1"], files["k2"]], out)
    assert list(tmp_path.iterdir()) == []


# -- refusals --------------------------------------------------------------------------------


def poisoned(src, dst, value=np.nan):
    """A copy of an .h5 model file with one weight set to `value`."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        layout = read_layout(src)
        name = "model_weights/" + layout.variables[-1].dataset
        data = f[name][()]
        data.flat[0] = value
        f[name][...] = data
    return dst


def test_different_architectures_refused_before_any_weight_is_read(files, tmp_path):
    # The second model's weights hold NaN: had any been read, the error would say so.
    bad = poisoned(files["wide_h"], tmp_path / "wide_nan.h5")
    calls = []
    out = tmp_path / "never.keras"
    with pytest.raises(FusecliError) as e:
        merge([files["k1"], bad], out, progress=lambda d, t: calls.append(d))
    assert str(e.value) == (
        "Models must have the same architecture to be merged; the first difference: layer 10 "
        "('head' in k1.keras, 'wide_head' in wide_nan.h5), a Dense: units is 3 in k1.keras, "
        "5 in wide_nan.h5"
    )
    assert calls == [] and not out.exists() and no_leftovers(tmp_path)


def test_different_activation_refused(files, tmp_path):
    with pytest.raises(FusecliError, match=r"activation is 'softmax' in k1.keras, 'tanh' in"):
        merge([files["k1"], files["tanh"]], tmp_path / "o.keras")


def test_different_classes_refused(files, tmp_path):
    with pytest.raises(FusecliError) as e:
        merge([files["k1"], files["seq1"]], tmp_path / "o.keras")
    assert str(e.value).endswith("k1.keras is a Functional model, seq1.keras a Sequential model")


def test_layers_with_sub_layers_merge_within_one_format(keras, files, kw, tmp_path):
    out = tmp_path / "mha.keras"
    merge([files["mha1"], files["mha2"]], out)
    assert_weights(
        loaded_weights(keras, out),
        [(a + b) / 2 for a, b in zip(kw("mha1"), kw("mha2"), strict=True)],
    )


def test_layers_with_sub_layers_are_not_paired_across_formats(files, tmp_path):
    with pytest.raises(FusecliError) as e:
        merge([files["mha1"], files["mha2_h"]], tmp_path / "o.keras")
    assert str(e.value).startswith(
        "Cannot pair the weights of layer 'attention' between .keras and .h5 files (its "
        "sub-layers are stored in different orders); give all models in one format."
    )


def test_nan_weights_refused(files, tmp_path):
    bad = poisoned(files["h2"], tmp_path / "nan.h5", np.inf)
    out = tmp_path / "o.keras"
    with pytest.raises(ModelFileError) as e:
        merge([files["k1"], bad], out)
    assert str(e.value) == (
        f"{bad}: weight 19 (layer 'head', 'head/head/bias') holds NaN or infinite values, "
        "which cannot be merged"
    )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["nan.h5"]


def test_existing_output_refused_unless_force(files, tmp_path):
    out = tmp_path / "o.keras"
    out.write_text("keep me")
    with pytest.raises(FusecliError) as e:
        merge([files["k1"], files["k2"]], out)
    assert str(e.value) == f"{out}: already exists (use --force to replace it)"
    assert out.read_text() == "keep me"
    merge([files["k1"], files["k2"]], out, force=True)
    assert zipfile.is_zipfile(out)


def test_output_over_an_input_refused_even_with_force(files, tmp_path):
    a = shutil.copy(files["k1"], tmp_path / "a.keras")
    before = a.read_bytes()
    with pytest.raises(FusecliError) as e:
        merge([a, files["k2"]], a, force=True)
    assert str(e.value) == f"{a}: is one of the input files; choose another output"
    assert a.read_bytes() == before


def test_keras_output_needs_a_keras_input(files, tmp_path):
    with pytest.raises(FusecliError) as e:
        merge([files["h1"], files["h2"]], tmp_path / "o.keras")
    assert str(e.value).startswith(
        "Cannot write a keras file from .h5 inputs only: the output copies the config of an "
        "input in its own format. Write o.h5 instead"
    )


def test_request_errors_before_any_file(files, tmp_path):
    with pytest.raises(InvalidRequest, match=r"Expected one weight per model \(2 models\)"):
        merge([files["k1"], files["k2"]], tmp_path / "o.keras", weights=(1, 2, 3))
    with pytest.raises(InvalidRequest, match="slerp merges exactly two models"):
        merge([files["k1"], files["k2"], files["k3"]], tmp_path / "o.keras", method="slerp", t=0.5)
    with pytest.raises(InvalidRequest, match="The output must end in .keras, .h5 or .hdf5"):
        merge([files["k1"], files["k2"]], tmp_path / "o.txt")


def test_broken_input_file(files, tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError) as e:
        merge([files["k1"], broken], tmp_path / "o.keras")
    assert str(e.value).startswith(f"{broken}: is not a valid .keras archive")


@pytest.mark.slow
def test_merging_never_imports_tensorflow(files, tmp_path):
    out = tmp_path / "tf.h5"
    code = (
        "import sys\n"
        "from fusecli.merging.merge import merge\n"
        f"merge([{str(files['k1'])!r}, {str(files['h2'])!r}], {str(out)!r})\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_inputs_are_read_side_by_side_each_error_naming_its_file(files, tmp_path):
    """`call_isolated_each` forks one child per input (in a process that may fork): results in
    order, and a child that crashes is one error naming its own file."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from fusecli.formats.weights_layout import read_layout\n"
        "from fusecli.safety.isolation import call_isolated_each\n"
        "from fusecli.errors import ModelFileError\n"
        "def crash_on_b(path):\n"
        "    if path.name.startswith('k2'):\n"
        "        os._exit(3)\n"
        "    return path.name\n"
        "paths = [Path(p) for p in sys.argv[1:]]\n"
        "print([len(x.variables) for x in call_isolated_each(read_layout, paths)])\n"
        "import __main__; __main__.crash_on_b = crash_on_b\n"
        "try:\n"
        "    call_isolated_each(crash_on_b, paths)\n"
        "except ModelFileError as e:\n"
        "    print(e.path == str(paths[1]), 'crashed' in str(e))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(files["k1"]), str(files["k2"])],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    n = len(read_layout(files["k1"]).variables)
    assert done.stdout.splitlines() == [f"[{n}, {n}]", "True True"]


def test_an_input_rewritten_while_merge_reads_it_is_refused(keras, files, tmp_path):
    # merge reads its inputs by path several times (scan, variables, tensors): a file saved
    # again meanwhile (here as the tensors are written) may have given a mix of two files.
    a, b = tmp_path / "a.keras", tmp_path / "b.keras"
    shutil.copy(files["k1"], a)
    shutil.copy(files["k2"], b)
    out = tmp_path / "merged.keras"

    def resave(done: int, total: int) -> None:
        b.write_bytes(b.read_bytes())

    with pytest.raises(ModelFileError, match=r"b\.keras: changed while it was being read"):
        merge([a, b], out, progress=resave)
    assert not out.exists() and no_leftovers(tmp_path)
