"""Limits on what a file can make fusecli's readers do (docs/safety.md): how deep a config or an
HDF5 tree may nest, and how far a zip member or a dataset may inflate past what it stores."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import h5py

from fusecli.errors import ModelFileError

# A config nested deeper than any Keras model is (28 nested Sequential models: about 90).
MAX_CONFIG_DEPTH = 256
# HDF5 groups nested deeper (a nested model adds two levels), or more objects, than a model has.
MAX_HDF5_DEPTH = 128
MAX_HDF5_OBJECTS = 200_000
# Keras refuses a zip member that inflates more than 100 times (saving_lib's
# _ZIP_MEMBER_MAX_EXPANSION) above 4 GiB; fusecli reads members into memory from 1 MiB on.
MAX_INFLATION = 100
# Keras refuses an HDF5 dataset that declares more than 1000 times what it stores (saving_lib's
# _H5_DATASET_MAX_EXPANSION) above 4 GiB; fusecli from 1 MiB on, for every dataset and .npy.
MAX_EXPANSION = 1000
GUARD_FLOOR = 1 << 20


def check_config_depth(path: Path, config: Any, what: str) -> None:
    """Refuse a config nested deeper than MAX_CONFIG_DEPTH, measured without recursion, so
    that no reader (nor the pickling between processes) recurses without bound."""
    stack = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ModelFileError(
                path,
                f"{what} is nested more than {MAX_CONFIG_DEPTH} levels deep; no Keras model "
                "is, and such a file is refused",
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def check_inflation(path: Path, info: zipfile.ZipInfo, inside: str = "") -> None:
    """Refuse a zip member whose declared size disagrees with, or far exceeds, what it stores."""
    name = f"{inside}{info.filename}"
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise ModelFileError(
            path,
            f"member {name!r} is stored uncompressed but declares {info.file_size} bytes and "
            f"stores {info.compress_size}; readers would disagree on its content",
        )
    if info.file_size > GUARD_FLOOR and info.file_size > MAX_INFLATION * info.compress_size:
        raise ModelFileError(
            path,
            f"member {name!r} inflates to {info.file_size} bytes from {info.compress_size} "
            f"(more than {MAX_INFLATION} times); refusing a possible decompression bomb",
        )


def check_dataset_size(path: Path, dataset: h5py.Dataset | h5py.h5d.DatasetID, where: str) -> int:
    """The number of values `dataset` declares; refused if it declares far more bytes than it
    stores (a compressed or unallocated "shape bomb" that would fill memory when read)."""
    dsid = dataset if isinstance(dataset, h5py.h5d.DatasetID) else dataset.id
    count = math.prod(dsid.shape or ())
    declared = count * dsid.dtype.itemsize
    stored = dsid.get_storage_size()
    if declared > GUARD_FLOOR and declared > MAX_EXPANSION * stored:
        raise ModelFileError(
            path,
            f"HDF5 dataset {where!r} declares {declared} bytes but stores {stored} (more "
            f"than {MAX_EXPANSION} times less); refusing a possible decompression bomb",
        )
    return count
