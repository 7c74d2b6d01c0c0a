"""Hostile data files for `predict` and `tune`: the bytes read are the file's own, HDF5 runs in a
child process, and only files (and pipes) are read.

Each file is crafted here with h5py: an array whose bytes live in another file (external
storage, a virtual dataset), a link to another file, groups nested 10,000 deep (HDF5's
recursive visit hangs on them), and a symlink to /dev/zero.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

# Slow tier: hostile files, whole CLI runs or tf-keras references (docs/development.md).
pytestmark = pytest.mark.slow

SECRET = np.full((4, 4), 7.0, dtype="float32")  # what another file holds


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET.tobytes())
    return path


def _predict(model_files, data, tmp_path, *extra):
    out = tmp_path / "scores.npy"
    result = run_cli("predict", model_files["a"], data, "-o", out, *extra)
    return result, out


def _assert_refused(result, out: Path, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "bug in fusecli" not in lines[0]
    assert not out.exists()


def test_external_storage_is_refused(tmp_path, model_files, secret):
    data = tmp_path / "external.h5"
    with h5py.File(data, "w") as h5:
        h5.create_dataset("x", shape=(4, 4), dtype="float32", external=[(str(secret), 0, 64)])
    with h5py.File(data, "r") as h5:  # the file does read the other file's bytes
        np.testing.assert_array_equal(h5["x"][()], SECRET)
    result, out = _predict(model_files, data, tmp_path)
    _assert_refused(result, out, "keeps its data in other files", "secret.bin")


def test_a_virtual_dataset_is_refused(tmp_path, model_files):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as h5:
        h5["s"] = SECRET
    layout = h5py.VirtualLayout(shape=(4, 4), dtype="float32")
    layout[:] = h5py.VirtualSource(str(source), "s", shape=(4, 4))
    data = tmp_path / "virtual.h5"
    with h5py.File(data, "w") as h5:
        h5.create_virtual_dataset("x", layout)
    result, out = _predict(model_files, data, tmp_path)
    _assert_refused(result, out, "is a virtual dataset", "source.h5")


def test_a_link_to_another_file_is_refused(tmp_path, model_files):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as h5:
        h5["s"] = SECRET
    data = tmp_path / "linked.h5"
    with h5py.File(data, "w") as h5:
        h5["x"] = h5py.ExternalLink(str(source), "s")
    result, out = _predict(model_files, data, tmp_path)
    _assert_refused(result, out, "a link to another file", "source.h5")


@pytest.mark.slow
def test_groups_nested_ten_thousand_deep_are_refused_not_walked(tmp_path, model_files):
    data = tmp_path / "deep.h5"
    with h5py.File(data, "w") as h5:
        h5["x"] = np.ones((2, 4), "float32")
        group = h5
        for _ in range(10_000):
            group = group.create_group("g")
    result, out = _predict(model_files, data, tmp_path)
    _assert_refused(result, out, "nested more than 128 levels deep")


def test_a_crashing_h5_costs_one_error_line(tmp_path, model_files):
    crash = Path(__file__).parent / "data" / "hdf5_crash.h5"
    result, out = _predict(model_files, crash, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


def test_h5_data_is_still_read_and_its_copies_removed(tmp_path, model_files, keras):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    data = tmp_path / "data.h5"
    with h5py.File(data, "w") as h5:
        h5.create_group("inputs")["x"] = x
        h5["x"] = x
        h5["y"] = np.arange(5)
        h5["names"] = np.array([b"a"] * 5)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "scores.npy"
    result = run_cli("predict", model_files["a"], data, "-o", out, env={"TMPDIR": str(tmpdir)})
    assert result.returncode == 0, result.stderr
    model = keras.saving.load_model(model_files["a"])
    np.testing.assert_allclose(np.load(out), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    assert list(tmpdir.iterdir()) == []
    result = run_cli("predict", model_files["a"], data, "--key", "names", "-o", tmp_path / "n.npy")
    assert result.returncode == 1 and "not numbers" in result.stderr


def test_a_symlink_to_a_device_is_refused(tmp_path, model_files):
    data = tmp_path / "zero.npy"
    os.symlink("/dev/zero", data)
    result, out = _predict(model_files, data, tmp_path)
    _assert_refused(result, out, "is not a regular file or a pipe")
    result = run_cli("tune", tmp_path / "s.npy", "--labels", data, "--json")
    assert result.returncode in (1, 2) and "bug in fusecli" not in result.stderr


def _with_unknown_filter(source: Path, target: Path) -> None:
    """`source` (a .keras file) with its first kernel stored through a filter this HDF5 does not
    have: written with LZF (h5py marks it optional), then, in the filter pipeline message (id,
    name length, flags, number of values, then the name), its id set to 32099, which nobody
    registers, and its flags to mandatory."""
    import io
    import zipfile

    with zipfile.ZipFile(source) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    weights = io.BytesIO()
    with (
        h5py.File(io.BytesIO(members["model.weights.h5"]), "r") as src,
        h5py.File(weights, "w") as dst,
    ):
        names: list[str] = []
        src.visit(names.append)
        for name in names:
            if isinstance(src[name], h5py.Group):
                dst.require_group(name)
            elif name.endswith("dense/vars/0"):
                dst.create_dataset(name, data=src[name][()], chunks=True, compression="lzf")
            else:
                dst[name] = src[name][()]
    data = bytearray(weights.getvalue())
    at = data.index(b"lzf\x00") - 8
    assert data[at : at + 2] == (32000).to_bytes(2, "little")
    data[at : at + 2] = (32099).to_bytes(2, "little")
    data[at + 4 : at + 6] = (0).to_bytes(2, "little")
    members["model.weights.h5"] = bytes(data)
    with zipfile.ZipFile(target, "w") as out:
        for name, content in members.items():
            out.writestr(name, content)


@pytest.mark.parametrize("command", ["merge", "fuse"])
def test_a_filter_this_hdf5_lacks_is_refused_naming_its_file(tmp_path, model_files, command):
    # merge named the other input: its write copied this file's filter pipeline and failed.
    bad = tmp_path / "filtered.keras"
    _with_unknown_filter(model_files["a"], bad)
    out = tmp_path / "out.keras"
    result = run_cli(command, bad, model_files["b"], "-o", out)
    _assert_refused(result, out, f"{bad}:", "filter 32099", "cannot be read")
