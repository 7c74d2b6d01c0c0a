"""Several outputs: `predict` writes one array per output to a .npz, and `combine`/`tune` read
an array of a .npz as `scores.npz:NAME` (or a .npz holding one array)."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from conftest import run_cli

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.arrays import combine_scores, read_scores
from fusecli.scores.prediction import predict_to_file

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_heads(keras, tmp_path_factory):
    keras.utils.set_random_seed(5)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(8, activation="tanh")(x)
    model = keras.Model(
        x,
        [
            keras.layers.Dense(3, activation="softmax", name="classes")(h),
            keras.layers.Dense(2, name="box")(h),
        ],
        name="two_heads",
    )
    d = tmp_path_factory.mktemp("heads")
    model.save(d / "heads.keras")
    data = np.random.default_rng(1).normal(size=(23, 4)).astype("float32")
    np.savez(d / "val.npz", x=data, y=np.random.default_rng(2).integers(0, 3, 23))
    return d, model, data


def test_predict_writes_one_array_per_output_named_after_it(two_heads, tmp_path):
    d, model, data = two_heads
    out = tmp_path / "scores.npz"
    report = predict_to_file(d / "heads.keras", d / "val.npz", out, batch_size=5)
    assert report.arrays == {"classes": [23, 3], "box": [23, 2]}
    want = [np.asarray(a) for a in model(data)]
    with np.load(out) as got:
        assert sorted(got.files) == ["box", "classes"]
        np.testing.assert_allclose(got["classes"], want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["box"], want[1], rtol=1e-5, atol=1e-6)
    assert np.ptp(want[1]) > 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.npz"]  # no part left


def test_cli_refuses_a_npy_for_several_outputs_and_reads_npz_arrays(two_heads, tmp_path):
    d, model, data = two_heads
    result = run_cli("predict", d / "heads.keras", d / "val.npz", "-o", tmp_path / "s.npy")
    assert result.returncode == 2 and not (tmp_path / "s.npy").exists()
    assert result.stderr.splitlines()[-1] == (
        f"Error: {d / 'heads.keras'}: has 2 outputs (classes, box); write them to a .npz file "
        "(-o scores.npz), one array per output"
    )
    scores = tmp_path / "s.npz"
    result = run_cli("predict", d / "heads.keras", d / "val.npz", "-o", scores)
    assert result.returncode == 0, result.stderr
    assert "one array per output: classes (23, 3), box (23, 2)" in result.stderr
    np.save(tmp_path / "other.npy", np.full((23, 3), 0.5, dtype="float32"))
    fused = tmp_path / "fused.npy"
    result = run_cli(
        "combine", f"{scores}:classes", tmp_path / "other.npy", "--w", "0.75", "0.25", "-o", fused
    )
    assert result.returncode == 0, result.stderr
    want = np.asarray(model(data)[0])
    np.testing.assert_allclose(np.load(fused), 0.75 * want + 0.125, rtol=1e-5, atol=1e-6)
    result = run_cli(
        "tune", f"{scores}:classes", tmp_path / "other.npy", "--labels", d / "val.npz", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)


def test_a_npz_of_one_array_needs_no_name_and_others_say_what_they_hold(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 3)), rng.random((6, 3))
    np.savez_compressed(tmp_path / "one.npz", only=a)
    np.savez(tmp_path / "two.npz", rgb=a, pose=b)
    np.testing.assert_array_equal(read_scores(tmp_path / "one.npz"), a)
    np.testing.assert_array_equal(read_scores(f"{tmp_path / 'two.npz'}:pose"), b)
    with pytest.raises(InvalidRequest) as e:
        read_scores(tmp_path / "two.npz")
    assert str(e.value) == (
        f"{tmp_path / 'two.npz'}: holds 2 arrays (pose, rgb); name the one to read as "
        f"{tmp_path / 'two.npz'}:NAME"
    )
    with pytest.raises(InvalidRequest, match=r"has no array 'flow' \(it holds: pose, rgb\)"):
        read_scores(f"{tmp_path / 'two.npz'}:flow")
    report = combine_scores(
        [tmp_path / "one.npz", f"{tmp_path / 'two.npz'}:rgb"], tmp_path / "o.npy"
    )
    assert report.shape == [6, 3]
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), a, rtol=1e-6)


def test_a_member_that_promises_more_than_it_holds_is_refused(tmp_path):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3)}
    )
    buf.write(b"\0" * 48)
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as z:
        z.writestr("s.npy", buf.getvalue())
    with pytest.raises(FusecliError, match=r"liar.npz:s: is truncated"):
        read_scores(tmp_path / "liar.npz")
