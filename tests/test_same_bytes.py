"""The bytes scanned are the bytes used: an input swapped after its scan cannot reach the output,
a private copy copies data and not holes, and a file the check passes is a file Keras loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

import fusecli
from fusecli.errors import ModelFileError
from fusecli.fusion import file_fusion
from fusecli.safety.loading import checked_files
from fusecli.safety.scan import scan


def _kernels(path: Path) -> list[np.ndarray]:
    found: list[np.ndarray] = []

    def keep(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and name.endswith("vars/0"):
            found.append(obj[()])

    with (
        zipfile.ZipFile(path) as archive,
        archive.open("model.weights.h5") as member,
        h5py.File(member, "r") as h5,
    ):
        h5.visititems(keep)
    return found


def test_an_input_renamed_over_after_its_scan_does_not_reach_the_output(
    model_files, tmp_path, monkeypatch
):
    """What an attacker holding the path does between the scan and the write: the input is
    replaced by another file of the same config with other tensors. Inputs fused as files are
    pinned (opened once, read through that descriptor), so the swapped file is never read; the
    pinned file is no longer the user's file either (its change time moved when it lost its
    name), so nothing is kept, and the error names the input."""
    a = tmp_path / "a.keras"
    a.write_bytes(model_files["a"].read_bytes())
    write = file_fusion.call_isolated_write
    read: list[list[np.ndarray]] = []

    def swap_then_write(*args, **kwargs):  # every scan is done; the tensors are read next
        os.replace(_copy(model_files["b"], tmp_path / "swap.keras"), a)
        done = write(*args, **kwargs)
        read.append(_kernels(args[1]))  # what was written, before it is refused
        return done

    monkeypatch.setattr(file_fusion, "call_isolated_write", swap_then_write)
    out = tmp_path / "out.keras"
    with pytest.raises(ModelFileError, match="changed while it was being read"):
        fusecli.fuse_to_file([a, model_files["c"]], out)
    assert not out.exists()
    original = _kernels(model_files["a"])
    swapped = _kernels(model_files["b"])
    assert any(np.array_equal(w, original[0]) for w in read[0])
    assert not any(np.array_equal(w, swapped[0]) for w in read[0])


def test_an_input_rewritten_in_place_after_its_scan_is_refused(model_files, tmp_path, monkeypatch):
    """Inputs fused as files are read where they are (opened once, never copied): a write into
    the same file between the scan and the last read (a training job saving a checkpoint over
    it) is refused rather than fused, and nothing is written."""
    a = tmp_path / "a.keras"
    a.write_bytes(model_files["a"].read_bytes())
    inode = a.stat().st_ino
    write = file_fusion.call_isolated_write

    def rewrite_then_write(*args, **kwargs):
        a.write_bytes(model_files["b"].read_bytes())  # same file, other tensors
        return write(*args, **kwargs)

    monkeypatch.setattr(file_fusion, "call_isolated_write", rewrite_then_write)
    out = tmp_path / "out.keras"
    with pytest.raises(ModelFileError, match="changed while it was being") as caught:
        fusecli.fuse_to_file([a, model_files["c"]], out)
    assert a.stat().st_ino == inode  # it was written in place
    assert str(a) in str(caught.value)
    assert not out.exists()
    assert not list(tmp_path.glob(".*out*"))  # no partial output left beside it


def _copy(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    return target


def test_a_sparse_user_block_costs_its_data_not_its_size(model_files, tmp_path):
    sparse = tmp_path / "sparse.h5"
    with (
        h5py.File(sparse, "w", userblock_size=1 << 30) as dst,
        h5py.File(model_files["a_h5"]) as src,
    ):
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for key in src:
            src.copy(src[key], dst, key)
    if sparse.stat().st_blocks * 512 > 64 << 20:
        pytest.skip("this file system does not keep holes")
    with checked_files([sparse]) as [checked]:
        copy = checked.copy.stat()  # copied with its holes, then rewritten without them
        assert copy.st_blocks * 512 < 64 << 20  # not the gigabyte of the user block
        # The recipe's digest, taken in the same read: of every byte, the holes' zeros too.
        assert checked.sha256 == _sha256(sparse)
        assert _sha256(checked.copy) == checked.sha256
    model = fusecli.load_model(sparse)
    reference = fusecli.load_model(model_files["a_h5"])
    for got, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_kernel_stored_as_a_soft_link_is_refused(model_files, tmp_path):
    """Keras refuses the file; a check that passed it would report a fused file 'checked'."""
    linked = tmp_path / "linked.h5"
    linked.write_bytes(model_files["a_h5"].read_bytes())
    with h5py.File(linked, "a") as h5:
        names: list[str] = []
        h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        kernel = next(n for n in names if "kernel" in n or n.endswith("vars/0"))
        h5["stash"] = h5[kernel][()]
        del h5[kernel]
        h5[kernel] = h5py.SoftLink("/stash")
    with pytest.raises(ModelFileError, match="is a soft link"):
        scan(linked)
    result = run_cli("fuse", linked, model_files["b_h5"], "-o", tmp_path / "out.keras")
    assert result.returncode == 1 and "is a soft link" in result.stderr
    assert not (tmp_path / "out.keras").exists()


def _keras2_dense_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A Keras 2 era `.h5` (x -> Dense(3)) written with h5py, every attribute of fixed length
    except one layer's `weight_names`, which alone lives in the file's global heap: the scan
    never reads it, Keras' loader does."""
    kernel = np.arange(12, dtype="float32").reshape(4, 3) / 10
    bias = np.array([0.1, -0.2, 0.3], dtype="float32")
    config = {
        "class_name": "Functional",
        "config": {
            "name": "model",
            "layers": [
                {
                    "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 4], "dtype": "float32", "name": "x"},
                    "name": "x",
                    "inbound_nodes": [],
                },
                {
                    "class_name": "Dense",
                    "config": {"name": "dense", "trainable": True, "units": 3, "use_bias": True},
                    "name": "dense",
                    "inbound_nodes": [[["x", 0, 0, {}]]],
                },
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": [["dense", 0, 0]],
        },
    }
    with h5py.File(path, "w") as h5:
        h5.attrs["keras_version"] = np.bytes_(b"2.15.0")
        h5.attrs["backend"] = np.bytes_(b"tensorflow")
        h5.attrs["model_config"] = np.bytes_(json.dumps(config).encode())
        weights = h5.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([b"x", b"dense"])
        weights.create_group("x").attrs["weight_names"] = np.array([], dtype="S1")
        dense = weights.create_group("dense")
        dense.attrs["weight_names"] = np.array(
            ["dense/kernel:0", "dense/bias:0"], dtype=h5py.string_dtype()
        )
        dense.create_dataset("dense/kernel:0", data=kernel)
        dense.create_dataset("dense/bias:0", data=bias)
    return kernel, bias


def test_a_file_that_hangs_hdf5_where_only_keras_reads_is_cut_in_a_child(tmp_path):
    """The scan passes it; Keras' loader would loop forever in fusecli's own process (SIGTERM
    ignored). Keras reads only HDF5 a child rewrote, so the loop is the child's, and cut."""
    plain = tmp_path / "plain.h5"
    kernel, bias = _keras2_dense_h5(plain)
    model = fusecli.load_model(plain)
    np.testing.assert_array_equal(model.get_layer("dense").get_weights()[0], kernel)
    np.testing.assert_array_equal(model.get_layer("dense").get_weights()[1], bias)

    data = bytearray(plain.read_bytes())
    assert data.count(b"GCOL") == 1  # the one global heap: weight_names' strings
    start = data.find(b"GCOL")
    end = start + struct.unpack_from("<Q", data, start + 8)[0]
    p = start + 16
    while p + 16 <= end:  # its free-space object made 0 bytes long: HDF5 loops on the heap
        index, size = struct.unpack_from("<H", data, p)[0], struct.unpack_from("<Q", data, p + 8)[0]
        if index == 0:
            struct.pack_into("<Q", data, p + 8, 0)
            break
        p += 16 + (size + 7) // 8 * 8
    hang = tmp_path / "hang.h5"
    hang.write_bytes(bytes(data))
    assert scan(hang) == []  # what the scan reads is fine

    np.save(tmp_path / "x.npy", np.ones((2, 4), "float32"))
    out = tmp_path / "scores.npy"
    result = run_cli(
        "predict", hang, tmp_path / "x.npy", "-o", out, env={"FUSECLI_READ_TIMEOUT": "2"}
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"Error: {hang}: was still being read after 2 s")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
