"""The bytes scanned are the bytes used: an input swapped after its scan cannot reach the output,
a private copy copies data and not holes, and a file the check passes is a file Keras loads.
"""

from __future__ import annotations

import os
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
    replaced by another file of the same config with other tensors. The output holds the
    tensors that were scanned, and says so."""
    a = tmp_path / "a.keras"
    a.write_bytes(model_files["a"].read_bytes())
    write = file_fusion.call_isolated_write

    def swap_then_write(*args, **kwargs):  # every scan is done; the tensors are read next
        os.replace(_copy(model_files["b"], tmp_path / "swap.keras"), a)
        return write(*args, **kwargs)

    monkeypatch.setattr(file_fusion, "call_isolated_write", swap_then_write)
    out = tmp_path / "out.keras"
    fusecli.fuse_to_file([a, model_files["c"]], out)
    original = _kernels(model_files["a"])
    swapped = _kernels(model_files["b"])
    written = _kernels(out)
    assert any(np.array_equal(w, original[0]) for w in written)
    assert not any(np.array_equal(w, swapped[0]) for w in written)


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
        copy = checked.copy.stat()
        assert copy.st_size == sparse.stat().st_size
        assert copy.st_blocks * 512 < 64 << 20  # not the gigabyte of the user block
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
