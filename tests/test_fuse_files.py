"""Fusing at file level: no Keras in the process, unique variable paths, the default check
catching a writer fault, the .h5 limits said up front, an honest --verify, Keras 2 inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import faults
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, dense_model, predict
from faults import FlipOneBit

from fusecli.cli import cli
from fusecli.errors import FusecliError, ModelFileError, VerificationError
from fusecli.fusion import file_fusion as fusion_files
from fusecli.fusion.fuse import fuse_to_file


@pytest.fixture(scope="module")
def x4():
    return np.random.default_rng(7).standard_normal((6, 4)).astype("float32") * 2


def _expected(keras, paths, weights, x):
    return sum(
        w * predict(keras.models.load_model(p), x)[0] for w, p in zip(weights, paths, strict=True)
    )


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _unique_paths(model) -> bool:
    return len({v.path for v in model.weights}) == len(model.weights)


# -- no Keras in the process -----------------------------------------------------------------

_NO_KERAS = textwrap.dedent(
    """
    import json, sys
    from fusecli.fusion.fuse import fuse_to_file
    a, b, c, out = sys.argv[1:]
    cases = {
        "plain": ([a, b], {}),
        "three": ([a, b, c], {}),
        "twice": ([a, a], {}),
        "logits": ([a, b], {"at": "logits"}),
        "softmax": ([a, b], {"activation": "softmax"}),
        "separate": ([a, b], {"inputs": "separate"}),
        "lambda": ([a, b], {"scale": "lambda"}),
        "normalize": ([a, b], {"normalize": True}),
    }
    reports = {}
    for name, (paths, kwargs) in cases.items():
        weights = [2.0, 6.0] if name == "normalize" else [0.8, 0.2, 0.5][: len(paths)]
        kwargs = {"normalize": False, **kwargs}  # the weights as given, but in "normalize"
        report = fuse_to_file(paths, f"{out}/{name}.keras", weights, **kwargs)
        reports[name] = report.as_dict()
    assert "keras" not in sys.modules and "tensorflow" not in sys.modules, "Keras imported"
    print(json.dumps(reports))
    """
)


@pytest.fixture(scope="module")
def fused_without_keras(tmp_path_factory, model_files):
    out = tmp_path_factory.mktemp("nokeras")
    paths = [model_files[k] for k in ("a", "b", "c")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _NO_KERAS, *map(str, paths), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout)


def test_keras3_files_fuse_without_importing_keras(keras, model_files, fused_without_keras, x4):
    out, reports = fused_without_keras
    a, b, c = (keras.models.load_model(model_files[k]) for k in ("a", "b", "c"))
    ya, yb, yc = (predict(m, x4)[0] for m in (a, b, c))
    za, zb = (predict(_logits_model(keras, m), x4)[0] for m in (a, b))
    expected = {
        "plain": 0.8 * ya + 0.2 * yb,
        "three": 0.8 * ya + 0.2 * yb + 0.5 * yc,
        "twice": (0.8 + 0.2) * ya,
        "logits": _softmax(0.8 * za + 0.2 * zb),
        "softmax": _softmax(0.8 * ya + 0.2 * yb),
        "normalize": 0.25 * ya + 0.75 * yb,
    }
    for name, want in expected.items():
        fused = keras.models.load_model(out / f"{name}.keras")  # safe_mode on
        np.testing.assert_allclose(predict(fused, x4)[0], want, rtol=1e-5, atol=1e-6)
        assert _unique_paths(fused), name
        assert reports[name]["check"]["scan"] == "passed"
    separate = keras.models.load_model(out / "separate.keras")
    got = predict(separate, [x4, -x4])[0]
    np.testing.assert_allclose(got, 0.8 * ya + 0.2 * predict(b, -x4)[0], rtol=1e-5, atol=1e-6)
    lam = keras.models.load_model(out / "lambda.keras", safe_mode=False)
    np.testing.assert_allclose(predict(lam, x4)[0], 0.8 * ya + 0.2 * yb, rtol=1e-5, atol=1e-6)
    assert [type(layer).__name__ for layer in lam.layers].count("Lambda") == 2
    assert reports["three"]["check"]["tensors"] == 12
    assert reports["twice"]["branches"] == ["a", "a_2"]


def _logits_model(keras, model):
    last = model.layers[-1]
    twin = keras.layers.Dense(last.units, name="logits")
    logits = keras.Model(model.inputs, twin(last.input))
    twin.set_weights(last.get_weights())
    return logits


def test_the_written_config_is_what_keras_writes(keras, model_files, tmp_path):
    """Loading and saving the fused file again in Keras gives back the same layer graph."""
    out = tmp_path / "f.keras"
    fuse_to_file([model_files["a"], model_files["b"]], out, [0.8, 0.2])
    fused = keras.models.load_model(out)
    again = tmp_path / "again.keras"
    fused.save(again)
    import zipfile

    ours = json.loads(zipfile.ZipFile(out).read("config.json"))
    theirs = json.loads(zipfile.ZipFile(again).read("config.json"))
    assert _strip_ids(ours["config"]) == _strip_ids(theirs["config"])


def _strip_ids(value):
    if isinstance(value, dict):
        return {k: _strip_ids(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, list):
        return [_strip_ids(v) for v in value]
    return value


# -- unique variable paths -------------------------------------------------------------------


def _sequential(keras, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _nested(keras, seed):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,))
    tower = _sequential(keras, seed + 100)
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="dense")(inner_in), name="inner")
    y = keras.layers.Add()([tower(x), inner(x)])
    return keras.Model(x, keras.layers.Dense(3, name="dense_top")(y))


def _with_moving_stats(keras, model):
    """Give every BatchNormalization statistics that change its output (untrained ones do not)."""
    rng = np.random.default_rng(0)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 2, gamma.shape),
                    rng.normal(size=beta.shape),
                    rng.normal(size=mean.shape),
                    rng.uniform(0.5, 2, var.shape),
                ]
            )
    return model


@pytest.mark.parametrize("kind", ["functional", "sequential", "nested", "same_name"])
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_every_variable_path_is_unique(tmp_path, keras, x4, kind, suffix):
    makers = {
        "functional": lambda s: dense_model(keras, seed=s),
        "sequential": lambda s: _sequential(keras, s),
        "nested": lambda s: _nested(keras, s),
        "same_name": lambda s: dense_model(keras, seed=s, name="model"),
    }
    paths = []
    for seed in (1, 2):
        model = _with_moving_stats(keras, makers[kind](seed))
        paths.append(tmp_path / f"{kind}{seed}.keras")
        model.save(paths[-1])
    sources = [keras.models.load_model(p) for p in paths]
    out = tmp_path / f"fused{suffix}"
    fuse_to_file(paths, out, [0.7, 0.3])
    fused = keras.models.load_model(out)
    assert _unique_paths(fused)
    assert len(fused.weights) == sum(len(m.weights) for m in sources)
    expected = 0.7 * predict(sources[0], x4)[0] + 0.3 * predict(sources[1], x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-5, atol=1e-5)


def test_the_keras_path_gives_unique_paths_too(keras, x4):
    import fusecli

    a = dense_model(keras, seed=21, name="model")
    b = dense_model(keras, seed=22, name="model")
    fused = fusecli.fuse([a, b], [0.5, 0.5])
    assert _unique_paths(fused)
    expected = 0.5 * predict(a, x4)[0] + 0.5 * predict(b, x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-6)


# -- the default check -----------------------------------------------------------------------


def test_a_writer_fault_in_one_byte_is_caught_and_leaves_no_file(
    tmp_path, model_files, monkeypatch
):
    # One bit of one byte of one tensor; the fault travels to the process that writes.
    monkeypatch.setattr(fusion_files, "_write_and_prove", FlipOneBit("vars/0"))
    out = tmp_path / "f.keras"
    with pytest.raises(VerificationError, match="differs from its source") as info:
        fuse_to_file([model_files["a"], model_files["b"]], out, [0.8, 0.2])
    assert str(info.value).startswith("Tensor 'layers/functional/layers/dense/vars/0' ")
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


def test_branches_written_to_each_others_place_are_caught(tmp_path, model_files, monkeypatch):
    # Alike branches swapped: every tensor still equals a source, but Keras would load A's
    # weights into B and compute 0.8 B(x) + 0.2 A(x).
    monkeypatch.setattr(fusion_files, "_write_and_prove", faults.swap_alike_branches)
    with pytest.raises(VerificationError, match="is not where Keras loads that branch"):
        fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "f.keras", [0.8, 0.2])
    assert list(tmp_path.iterdir()) == []


def test_h5_branches_listed_out_of_order_are_caught(tmp_path, model_files, monkeypatch):
    # Keras' .h5 loader pairs groups with layers by their place in `layer_names`, not by name.
    monkeypatch.setattr(fusion_files, "_write_and_prove_flat", faults.list_flat_h5_layers_reversed)
    with pytest.raises(VerificationError, match="Keras would load one layer's weights"):
        fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "f.h5", [0.8, 0.2])
    assert list(tmp_path.iterdir()) == []


def test_an_input_replaced_while_fusing_does_not_reach_the_output(
    tmp_path, model_files, monkeypatch
):
    # Another process saves a different model (same tensor shapes) over an input after it was
    # scanned: the fusion reads the input through the one open of it, so the replacement is
    # never read; the file opened is then no longer the user's, so nothing is kept.
    import keras

    victim = tmp_path / "b.keras"
    victim.write_bytes(model_files["b"].read_bytes())
    other = tmp_path / "other.keras"
    model = keras.models.load_model(model_files["c"])
    model.layers[-1].activation = keras.activations.get("linear")  # tensors alike, config not
    model.save(other)
    replace = faults.ReplaceBeforeWriting(str(other), str(victim))
    monkeypatch.setattr(fusion_files, "_write_and_prove", replace)
    out = tmp_path / "f.keras"
    with pytest.raises(ModelFileError, match="changed while it was being read") as caught:
        fuse_to_file([model_files["a"], victim], out, [0.8, 0.2])
    assert str(victim) in str(caught.value)
    assert not out.exists()
    assert not other.exists()  # it was moved over the input: the replacement did happen


def test_the_cli_reports_a_caught_fault_in_one_line(tmp_path, model_files, monkeypatch):
    # In a .h5 output too (Keras 3 inputs in Keras 2's schema): one tensor off by one.
    monkeypatch.setattr(fusion_files, "_write_and_prove_flat", faults.FlatAddOne("bias:0"))
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(
        cli, ["fuse", str(model_files["a"]), str(model_files["b"]), "-o", str(out)]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Tensor ")
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# -- .h5 output limits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_files(tmp_path_factory, keras):
    d = tmp_path_factory.mktemp("masked")
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        tokens = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(10, 4, mask_zero=True)(tokens)
        y = keras.layers.Dense(3)(keras.layers.GRU(6)(h))
        paths.append(d / f"masked{seed}.keras")
        keras.Model(tokens, y).save(paths[-1])
    return paths


def test_h5_output_of_op_nodes_is_refused_up_front(tmp_path, keras, masked_files):
    # An Embedding's own mask (a `NotEqual` node Keras 3 records) goes into .h5; another
    # operation node does not.
    fuse_to_file(masked_files, tmp_path / "masked.h5")
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(10, 4)(tokens)
    y = keras.layers.Dense(3)(keras.layers.GRU(6)(h * keras.ops.not_equal(tokens, 3)[..., None]))
    keras.Model(tokens, y).save(tmp_path / "ops.keras")
    with pytest.raises(FusecliError) as info:
        fuse_to_file([masked_files[0], tmp_path / "ops.keras"], tmp_path / "f.h5")
    message = str(info.value)
    assert "is an operation node" in message
    assert "write a .keras file instead" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masked.h5", "ops.keras"]


def test_the_same_models_fuse_to_keras(tmp_path, keras, masked_files):
    out = tmp_path / "f.keras"
    fuse_to_file(masked_files, out, [0.6, 0.4])
    tokens = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [9, 8, 7, 6, 5]], dtype="int32")
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), tokens)[0],
        _expected(keras, masked_files, [0.6, 0.4], tokens),
        rtol=1e-5,
        atol=1e-6,
    )


# -- an honest --verify ----------------------------------------------------------------------


def test_verify_says_inconclusive_when_outputs_do_not_vary(tmp_path, keras, model_files):
    keras.utils.set_random_seed(5)
    x = keras.Input((4,))
    flat = keras.layers.Dense(3, activation="softmax", kernel_initializer="zeros")
    constant = keras.Model(x, flat(keras.layers.Dense(8)(x)))  # uniform softmax for every x
    constant.save(tmp_path / "flat.keras")
    out = tmp_path / "f.keras"
    args = ["fuse", str(model_files["a"]), str(tmp_path / "flat.keras"), "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--verify", "--json"])
    assert result.exit_code == 0, result.output
    verify = json.loads(result.stdout)["verify"]
    assert verify["result"] == "inconclusive"
    assert verify["reason"].startswith("model 'flat' gives the same output for every input")
    assert "Warning: the numeric check is inconclusive: model 'flat'" in result.stderr


def test_verify_passes_on_models_that_respond(tmp_path, model_files):
    out = tmp_path / "f.keras"
    report = fuse_to_file([model_files["a"], model_files["b"]], out, [0.8, 0.2], verify=True)
    assert report.verify["result"] == "passed" and report.verify["reason"] is None
    assert report.max_abs_diff < 1e-6


# -- Keras 2 era inputs ----------------------------------------------------------------------

_TF_KERAS = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tf_keras as keras

    out = sys.argv[1]
    x = np.random.default_rng(0).standard_normal((5, 6)).astype("float32")
    keras.utils.set_random_seed(1)
    s = keras.Sequential([
        keras.layers.Dense(8, activation="relu", input_shape=(6,)),
        keras.layers.BatchNormalization(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(4, activation="softmax"),
    ])
    bn = s.layers[1]
    bn.set_weights([np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8), np.linspace(-0.5, 0.5, 8),
                    np.linspace(0.5, 1.5, 8)])
    bn.trainable = False
    s.save(f"{out}/seq.h5")
    keras.utils.set_random_seed(2)
    i = keras.Input((6,))
    h = keras.layers.Reshape((3, 2))(i)
    h = keras.layers.GRU(5)(h)
    f = keras.Model(i, keras.layers.Dense(4, activation="softmax")(h))
    f.save(f"{out}/gru.h5")
    np.savez(f"{out}/expected.npz", x=x, seq=s.predict(x, verbose=0), gru=f.predict(x, verbose=0))
    """
)


@pytest.fixture(scope="module")
def keras2_pair(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed")
    d = tmp_path_factory.mktemp("k2pair")
    done = subprocess.run(
        [sys.executable, "-c", _TF_KERAS, str(d)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(d / "expected.npz") as data:
        return d, data["x"], data["seq"], data["gru"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras2_inputs_fuse_to_what_tf_keras_computes(tmp_path, keras, keras2_pair, suffix):
    d, x, y_seq, y_gru = keras2_pair
    out = tmp_path / f"f{suffix}"
    report = fuse_to_file([d / "seq.h5", d / "gru.h5"], out, [0.3, 0.7])
    # Inlined as files (tests/test_keras2_file_fusion.py): Keras converts nothing.
    assert report.converted == []
    fused = keras.models.load_model(out)
    assert _unique_paths(fused)
    np.testing.assert_allclose(
        predict(fused, x)[0], 0.3 * y_seq + 0.7 * y_gru, rtol=1e-5, atol=1e-6
    )


def test_asset_files_go_under_their_branch(tmp_path, keras, model_files, x4):
    import zipfile

    with_assets = tmp_path / "vocab.keras"
    with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(with_assets, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("assets/layers/dense/vocabulary.txt", "alpha\nbeta\n")
    out = tmp_path / "f.keras"
    fuse_to_file([model_files["b"], with_assets], out, [0.5, 0.5])
    with zipfile.ZipFile(out) as fused:
        # Keras keeps a layer's assets at assets/<its path>: the second branch is "functional_1".
        assert fused.read("assets/layers/functional_1/layers/dense/vocabulary.txt") == (
            b"alpha\nbeta\n"
        )
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), x4)[0],
        _expected(keras, [model_files["b"], model_files["a"]], [0.5, 0.5], x4),
        rtol=1e-6,
        atol=1e-7,
    )


def test_output_shapes_beyond_the_last_layer_rule_need_no_keras(tmp_path, keras):
    """Models ending in a GRU: the shapes come from fusecli.config.shapes, not from Keras."""
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        x = keras.Input((5, 3))
        paths.append(tmp_path / f"gru{seed}.keras")
        keras.Model(x, keras.layers.GRU(4)(keras.layers.Dense(6)(x))).save(paths[-1])
    out = tmp_path / "f.keras"
    code = (
        "import sys\n"
        "from fusecli.fusion.fuse import fuse_to_file\n"
        "fuse_to_file(sys.argv[1:3], sys.argv[3], [0.4, 0.6])\n"
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    x = np.random.default_rng(3).standard_normal((4, 5, 3)).astype("float32")
    np.testing.assert_allclose(
        predict(keras.models.load_model(out), x)[0],
        _expected(keras, paths, [0.4, 0.6], x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_fused_file_is_an_input_like_any_other(tmp_path, keras, model_files, x4):
    # fusecli's archives keep the weights first, after HDF5's user block (formats/archive.py):
    # fuse and merge read them as they read Keras' own, in place.
    from fusecli.merging.merge import merge

    a, b = model_files["a"], model_files["b"]
    fused = tmp_path / "ab.keras"
    fuse_to_file([a, b], fused, [0.8, 0.2])
    with open(fused, "rb") as f:
        head = f.read(520)
    assert head.startswith(b"PK\x03\x04") and head[512:520] == b"\x89HDF\r\n\x1a\n"
    again = tmp_path / "again.keras"
    fuse_to_file([fused, a], again, [0.5, 0.5])
    ya, yb = (predict(keras.models.load_model(p), x4)[0] for p in (a, b))
    got = predict(keras.models.load_model(again), x4)[0]
    np.testing.assert_allclose(got, 0.5 * (0.8 * ya + 0.2 * yb) + 0.5 * ya, rtol=1e-5, atol=1e-6)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "a.keras").write_bytes(b.read_bytes())  # same branch names, other weights
    (twin / "b.keras").write_bytes(a.read_bytes())
    other = tmp_path / "ba.keras"
    fuse_to_file([twin / "a.keras", twin / "b.keras"], other, [0.8, 0.2])
    merged = tmp_path / "merged.keras"
    merge([fused, other], merged)
    expected = [
        0.5 * u + 0.5 * v
        for u, v in zip(
            keras.models.load_model(fused).get_weights(),
            keras.models.load_model(other).get_weights(),
            strict=True,
        )
    ]
    for want, got in zip(expected, keras.models.load_model(merged).get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
