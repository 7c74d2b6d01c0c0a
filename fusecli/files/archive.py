"""Writing model files at file level: the one writer `fuse` and `merge` use.

A `.keras` output is a zip of small JSON members and `model.weights.h5`; the HDF5 part is written
to a temporary file beside the output first (h5py needs to seek), then stored in the zip
uncompressed, as Keras stores it, so that readers can use it in place. A legacy `.h5` output is
one HDF5 file whose root attributes hold the config.

Tensors are copied in slices of at most `_SLICE_BYTES`, hashed as they go, so peak memory is a
slice or one tensor, never a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from fusecli.files.modelfile import CONFIG_MEMBER, WEIGHTS_MEMBER

# A member of a .keras archive other than the weights: its bytes, or how to open them.
MemberSource = bytes | Callable[[], BinaryIO]

_SLICE_BYTES = 64 << 20
_COPY_BUFFER = 1 << 20

# A fault to inject while tensors are written (tests only): called with the dataset's path in the
# output and the slice about to be written; returns what is written instead.
fault: Callable[[str, np.ndarray], np.ndarray] | None = None


@contextlib.contextmanager
def keras_archive(
    path: Path, members: Sequence[tuple[str, MemberSource | None]]
) -> Iterator[h5py.File]:
    """Write a `.keras` archive at `path`: yields the weights file to fill, then zips it.

    `members` are the archive's members in order; the entry named `model.weights.h5` (value
    None) is where the weights go.
    """
    weights_file = path.with_name(path.name + ".weights.h5")
    try:
        with h5py.File(weights_file, "w") as h5:
            yield h5
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as out:
            for name, source in members:
                if name == WEIGHTS_MEMBER:
                    with (
                        open(weights_file, "rb") as src,
                        out.open(name, "w", force_zip64=True) as dst,
                    ):
                        shutil.copyfileobj(src, dst, _COPY_BUFFER)
                elif isinstance(source, bytes):
                    out.writestr(name, source)
                elif source is not None:
                    with source() as src, out.open(name, "w") as dst:
                        shutil.copyfileobj(src, dst, _COPY_BUFFER)
    finally:
        with contextlib.suppress(FileNotFoundError):
            weights_file.unlink()


@contextlib.contextmanager
def h5_model(path: Path, attrs: dict[str, Any]) -> Iterator[h5py.File]:
    """Write a legacy `.h5` model file at `path` with these root attributes."""
    with h5py.File(path, "w") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = value
        yield h5


def config_member(config: dict[str, Any]) -> bytes:
    """`config.json` as Keras writes it."""
    return json.dumps(config).encode("utf-8")


def keras_members(
    config: dict[str, Any], metadata: dict[str, Any]
) -> list[tuple[str, MemberSource | None]]:
    """The members of a fresh `.keras` archive, in Keras' order."""
    return [
        ("metadata.json", json.dumps(metadata).encode("utf-8")),
        (CONFIG_MEMBER, config_member(config)),
        (WEIGHTS_MEMBER, None),
    ]


def write_tensor(target: h5py.Group, name: str, values: np.ndarray) -> bytes:
    """Write one tensor held in memory; returns its digest."""
    dataset = target.create_dataset(name, shape=values.shape, dtype=values.dtype)
    values = _faulty(dataset.name, np.ascontiguousarray(values))
    if values.size:
        dataset[()] = values
    return tensor_digest(values)


def copy_tensor(source: h5py.Dataset, target: h5py.Group, name: str) -> bool:
    """Copy a dataset slice by slice (same dtype, shape and attributes). Returns False if a
    floating-point tensor holds NaN or infinite values (it is copied all the same)."""
    dataset = target.create_dataset(name, shape=source.shape, dtype=source.dtype)
    copy_attrs(source, dataset)
    finite = True
    floating = source.dtype.kind == "f"
    for where in _slices(source):
        values = np.ascontiguousarray(source[where])
        if floating and finite:
            finite = bool(np.isfinite(values).all())
        values = _faulty(dataset.name, values)
        if values.size:
            dataset[where] = values
    return finite


def dataset_digest(dataset: h5py.Dataset) -> bytes:
    """The digest of a dataset's values, read slice by slice (see `tensor_digest`)."""
    digest = hashlib.sha256()
    for where in _slices(dataset):
        digest.update(_bytes(dataset[where]))
    return digest.digest()


def tensor_digest(values: np.ndarray) -> bytes:
    """sha256 of the values' bytes in C order: equal digests mean bit-for-bit equal tensors."""
    return hashlib.sha256(_bytes(values)).digest()


def copy_attrs(source: h5py.HLObject, target: h5py.HLObject) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value


def _slices(dataset: h5py.Dataset) -> Iterator[Any]:
    """Index expressions covering the dataset in C order, each at most about `_SLICE_BYTES`."""
    if dataset.ndim == 0 or dataset.size == 0:
        yield ()
        return
    row_bytes = max(1, dataset.nbytes // dataset.shape[0])
    step = max(1, _SLICE_BYTES // row_bytes)
    for start in range(0, dataset.shape[0], step):
        yield np.s_[start : min(start + step, dataset.shape[0])]


def _bytes(values: Any) -> np.ndarray:
    return np.ascontiguousarray(values).reshape(-1).view(np.uint8)


def _faulty(name: str, values: np.ndarray) -> np.ndarray:
    return values if fault is None else fault(name, values)
