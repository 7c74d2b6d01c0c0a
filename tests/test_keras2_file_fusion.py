"""Keras 2 `.h5` inputs fused as files (no Keras): into a `.h5` that tf-keras 2.x and Keras 3
both load, and into a `.keras` file.

The inputs are written by tf-keras (tests/legacy_fixtures/make_keras2_h5.py, with tf-keras'
outputs on fixed inputs); a fused `.h5` is loaded by Keras 3 here and by tf-keras in a
subprocess, a fused `.keras` by Keras 3, and each must compute 0.8 A(x) + 0.2 B(x) as tf-keras
computed A and B.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import predict, run_cli
from keras2support import expected, keras2_reference_dir

from fusecli.fusion.fuse import fuse_to_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

_TF_KERAS_PREDICT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np, tensorflow as tf, tf_keras
    model = tf_keras.models.load_model(sys.argv[1], compile=False)
    with np.load(sys.argv[2]) as data:
        xs = [data[f"x{i}"] for i in range(sum(k.startswith("x") for k in data.files))]
    ys = tf.nest.flatten(model(xs if len(xs) > 1 else xs[0], training=False))
    np.savez(sys.argv[3], **{f"y{i}": np.asarray(y) for i, y in enumerate(ys)})
    """
)


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory) -> Path:
    return keras2_reference_dir(tmp_path_factory)


def tf_keras_outputs(model: Path, xs: list[np.ndarray], tmp: Path) -> list[np.ndarray]:
    """The model loaded and run by tf-keras, in its own process."""
    np.savez(tmp / "x.npz", **{f"x{i}": x for i, x in enumerate(xs)})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _TF_KERAS_PREDICT,
            str(model),
            str(tmp / "x.npz"),
            str(tmp / "y.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp / "y.npz") as data:
        return [data[f"y{i}"] for i in range(len(data.files))]


def loaders_compute(keras, fused: Path, xs, wanted, tmp: Path) -> None:
    """Keras 3 (and, for a .h5, tf-keras) computes `wanted` from the fused file."""
    got3 = predict(keras.models.load_model(fused, compile=False), xs if len(xs) > 1 else xs[0])
    got2 = tf_keras_outputs(fused, xs, tmp) if fused.suffix == ".h5" else got3
    assert len(got3) == len(got2) == len(wanted)
    for a, b, y in zip(got3, got2, wanted, strict=True):
        np.testing.assert_allclose(a, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_two_different_streams(tmp_path, keras, keras2_dir, suffix):
    # A GRU stream (reset_after both ways, go_backwards) and an LSTM stream on one input.
    xa, ya = expected(keras2_dir, "gru")
    xb, yb = expected(keras2_dir, "lstm")
    np.testing.assert_array_equal(xa[0], xb[0])
    assert not np.allclose(ya[0], yb[0], atol=1e-3)
    out = tmp_path / f"fused{suffix}"
    report = fuse_to_file([keras2_dir / "gru.h5", keras2_dir / "lstm.h5"], out, [0.8, 0.2])
    assert report.converted == [] and report.inputs_mode == "shared"
    loaders_compute(keras, out, xa, [0.8 * ya[0] + 0.2 * yb[0]], tmp_path)
    if suffix == ".keras":
        return
    with h5py.File(out, "r") as f:
        config = json.loads(f.attrs["model_config"])
        assert f.attrs["keras_version"].startswith("2.")
        names = [layer["name"] for layer in config["config"]["layers"]]
        assert all(
            layer["class_name"] not in ("Sequential", "Functional")
            for layer in config["config"]["layers"]
        )
        assert "batch_input_shape" in config["config"]["layers"][0]["config"]
    assert {"gru_gru", "lstm_lstm"} <= set(names)


# name -> what it covers; each fused with a copy of itself (0.8 + 0.2), so a weight given to
# the wrong layer inside a branch shows.
SAME = {
    "multi_io": "two inputs, two outputs, nested Model and nested Sequential with frozen BN",
    "siamese": "a nested Sequential called twice (shared weights), nested models as outputs",
    "transfer": "a frozen functional base with BatchNormalization inside a Sequential",
    "masked": "Embedding(mask_zero) -> Bidirectional(LSTM) -> GRU: the mask carries through",
    "gru_old": "a Sequential with no InputLayer in its config (Keras <= 2.3)",
    "assorted": "LeakyReLU(alpha), Normalization, RNN([GRUCell, LSTMCell]), Rescaling...",
    "mixed_precision": "a mixed_float16 Policy dict",
    "conv": "Conv2D, DepthwiseConv2D, SeparableConv2D, BatchNormalization",
}


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
@pytest.mark.parametrize("name", sorted(SAME))
def test_keras2_models_inlined(tmp_path, keras, keras2_dir, name, suffix):
    xs, ys = expected(keras2_dir, name)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copyfile(keras2_dir / f"{name}.h5", a)
    shutil.copyfile(keras2_dir / f"{name}.h5", b)
    out = tmp_path / f"fused{suffix}"
    assert fuse_to_file([a, b], out, [0.8, 0.2]).converted == []
    loaders_compute(keras, out, xs, ys, tmp_path)


@pytest.mark.parametrize("name", ["hard_sigmoid", "s2s_masked", "rescaled_mask"])
def test_into_keras_what_has_no_flat_form_is_converted_by_keras(tmp_path, keras, keras2_dir, name):
    # hard_sigmoid (weights rescaled), RNN initial states, Keras 3-only mask layers: Keras
    # converts these as it did before the file path existed.
    xs, ys = expected(keras2_dir, name)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copyfile(keras2_dir / f"{name}.h5", a)
    shutil.copyfile(keras2_dir / f"{name}.h5", b)
    out = tmp_path / "fused.keras"
    assert fuse_to_file([a, b], out, [0.8, 0.2]).converted == [str(a), str(b)]
    loaders_compute(keras, out, xs, ys, tmp_path)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("hard_sigmoid", "hard_sigmoid"),
        ("s2s_masked", "initial states"),
        ("rescaled_mask", "mask"),
    ],
)
def test_what_no_h5_computes_alike_is_refused_in_one_line(tmp_path, keras2_dir, name, why):
    out = tmp_path / "fused.h5"
    result = run_cli("fuse", keras2_dir / f"{name}.h5", keras2_dir / f"{name}.h5", "-o", out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "both tf-keras 2.x and Keras 3" in result.stderr and why in result.stderr
    assert ".keras" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_no_keras_is_imported(tmp_path, keras2_dir, suffix):
    code = (
        "import sys\n"
        "from fusecli.fusion.fuse import fuse_to_file\n"
        "fuse_to_file(sys.argv[1:3], sys.argv[3], [0.8, 0.2])\n"
        "print([m for m in ('keras', 'tensorflow', 'tf_keras') if m in sys.modules])\n"
    )
    args = [str(keras2_dir / "gru.h5"), str(keras2_dir / "lstm.h5"), str(tmp_path / f"f{suffix}")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


# -- merge -----------------------------------------------------------------------------------


def _halved(source: Path, target: Path) -> Path:
    """A copy of a Keras 2 file with every float weight halved (variances kept positive)."""
    shutil.copyfile(source, target)

    def halve(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f" and "variance" not in name:
            obj[...] = obj[...] * 0.5

    with h5py.File(target, "r+") as f:
        f["model_weights"].visititems(halve)
    return target


@pytest.mark.parametrize("name", ["gru", "multi_io", "masked"])
def test_merge_keras2_into_both_formats(tmp_path, keras, keras2_dir, name):
    # The .keras computes in Keras 3 what the .h5 (Keras 2's schema, flat) computes in
    # tf-keras and in Keras 3: the same merged weights, each in its layer.
    from fusecli.merging.merge import merge

    xs, ys = expected(keras2_dir, name)
    a, b = keras2_dir / f"{name}.h5", _halved(keras2_dir / f"{name}.h5", tmp_path / "b.h5")
    merge([a, b], tmp_path / "m.keras", [0.5, 0.5])
    merge([a, b], tmp_path / "m.h5", [0.5, 0.5])
    got = predict(keras.models.load_model(tmp_path / "m.keras"), xs if len(xs) > 1 else xs[0])
    reference = tf_keras_outputs(tmp_path / "m.h5", xs, tmp_path)
    assert not np.allclose(reference[0], ys[0], atol=1e-4)  # the merge changed the model
    for g, r in zip(got, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    got_h5 = predict(keras.models.load_model(tmp_path / "m.h5"), xs if len(xs) > 1 else xs[0])
    for g, r in zip(got_h5, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_merge_into_keras_refuses_what_has_no_flat_form(tmp_path, keras2_dir):
    result = run_cli(
        "merge", keras2_dir / "hard_sigmoid.h5", keras2_dir / "hard_sigmoid.h5", "-o",
        tmp_path / "m.keras",
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "hard_sigmoid" in result.stderr and "write a .h5 file instead" in result.stderr
    assert not (tmp_path / "m.keras").exists()


# -- the proof -------------------------------------------------------------------------------


def _flat_plan(paths: list[Path]):
    from fusecli.formats import keras2
    from fusecli.formats.modelfile import read_model_file
    from fusecli.fusion import file_fusion, flat_h5
    from fusecli.fusion.graph import assemble, prepare_branch

    files = [read_model_file(p) for p in paths]
    branches = [
        prepare_branch(keras2.convert_config(f.config, f.path), name)
        for f, name in zip(files, ("a", "b"), strict=True)
    ]
    for branch in branches:
        branch.output_shapes = file_fusion._shapes_from_config(branch.given)
    assembly = assemble(
        branches, (0.8, 0.2), scale="rescaling", inputs="auto", activation="none", axes=None
    )
    return flat_h5.plan(files, assembly, (0.8, 0.2), "none")


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_the_proof_catches_what_would_load_wrong(tmp_path, keras2_dir, suffix):
    from fusecli.errors import VerificationError
    from fusecli.fusion import flat_h5, flat_keras
    from fusecli.fusion.writer import Source

    paths = [keras2_dir / "multi_io.h5", keras2_dir / "multi_io.h5"]
    flat = _flat_plan(paths)
    sources = [Source(given=p, path=p) for p in paths]
    module = flat_h5 if suffix == ".h5" else flat_keras
    out = tmp_path / f"f{suffix}"
    written = module.write(out, flat, sources)
    assert module.prove(out, flat, sources, written, (0.8, 0.2))["tensors"] == len(written.placed)
    with pytest.raises(VerificationError, match="weighted sum"):
        module.prove(out, flat, sources, written, (0.2, 0.8))
    # Groups listed in another order than Keras gives its layers: Keras would pair them wrongly.
    if suffix == ".h5":
        with h5py.File(out, "r+") as f:
            names = list(f["model_weights"].attrs["layer_names"])
            f["model_weights"].attrs["layer_names"] = names[::-1]
        with pytest.raises(VerificationError, match="order"):
            module.prove(out, flat, sources, written, (0.8, 0.2))
        written = module.write(out, flat, sources)
    # One tensor off by a little: caught bit for bit.
    placed = written.placed[0].output
    if suffix == ".h5":
        with h5py.File(out, "r+") as f:
            f["model_weights"][placed][...] = f["model_weights"][placed][...] + 1e-6
    else:
        out = _tamper_keras(out, placed, tmp_path)
    with pytest.raises(VerificationError, match="differs from its source"):
        module.prove(out, flat, sources, written, (0.8, 0.2))


def _tamper_keras(path: Path, dataset: str, tmp_path: Path) -> Path:
    import io
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as f:
        f[dataset][...] = f[dataset][...] + 1e-6
    members["model.weights.h5"] = buffer.getvalue()
    out = tmp_path / "tampered.keras"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out
