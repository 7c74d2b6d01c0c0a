"""Data `.h5` files, read in a child process into private `.npy` files.

An HDF5 file can crash the C library or make it loop forever (a changed byte in a heap or an
index), and can keep an array's bytes in other files (external storage, virtual datasets) that
the reader would open and copy into the output. So a data `.h5` is never opened in fusecli's
own process: a child (`fusecli.safety.isolation`) walks it with fusecli's bounded iterative walk,
refuses external and virtual storage and declared sizes far beyond what is stored, and writes
each numeric array to a `.npy` file in a private folder, which the command then memory-maps.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fusecli.errors import FusecliError, ModelFileError
from fusecli.formats.modelfile import walk_hdf5
from fusecli.limits import GUARD_FLOOR, MAX_EXPANSION
from fusecli.safety.isolation import call_isolated, write_timeout

NUMERIC_KINDS = "biuf"
_ROWS_PER_COPY = 1 << 16


@dataclass(frozen=True)
class H5Array:
    """One dataset of a data `.h5`: its private `.npy` copy, or why it cannot be used."""

    npy: Path | None
    problem: str | None = None


def read_h5_data(path: Path, folder: Path) -> dict[str, H5Array]:
    """Every dataset of `path` by name, copied into `folder` by a child process; errors name
    `path`. The time limit grows with the file's size."""
    limit = write_timeout(path.stat().st_size)
    convert = functools.partial(_convert, folder=folder)
    try:
        return call_isolated(convert, path, timeout=limit)
    except ModelFileError as e:
        raise FusecliError(f"{path}: {e.reason}") from None


def _convert(path: Path, *, folder: Path) -> dict[str, H5Array]:
    """In the child: the walk, the checks, and the copies."""
    arrays: dict[str, H5Array] = {}
    try:
        with h5py.File(path, "r") as h5:
            for entry in walk_hdf5(h5, path):
                if entry.kind == "external":
                    filename, _target = entry.target or ("?", "?")
                    raise ModelFileError(
                        path,
                        f"{entry.name!r} is a link to another file {filename!r}; data is read "
                        "from the file given only",
                    )
                if entry.kind != "dataset":
                    continue
                arrays[entry.name] = _copy(path, entry.node, entry.name, folder, len(arrays))
    except ModelFileError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelFileError(path, f"cannot be read as h5 data ({_short(e)})") from None
    return arrays


def _copy(path: Path, dataset: h5py.Dataset, name: str, folder: Path, index: int) -> H5Array:
    if dataset.is_virtual:
        sources = sorted({m.file_name for m in dataset.virtual_sources()})
        raise ModelFileError(
            path,
            f"array {name!r} is a virtual dataset reading from {sources}; data is read from "
            "the file given only",
        )
    if dataset.external:
        files = sorted({str(e[0]) for e in dataset.external})
        raise ModelFileError(
            path,
            f"array {name!r} keeps its data in other files {files}; data is read from the "
            "file given only",
        )
    if dataset.shape is None:
        return H5Array(None, "is an empty dataset with no shape")
    dtype = np.dtype(dataset.dtype)
    if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
        return H5Array(None, f"holds values of dtype {dtype}, not numbers")
    if len(dataset.shape) == 0:
        return H5Array(None, "is a single number, not an array with rows first")
    declared = math.prod(dataset.shape) * dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > GUARD_FLOOR and declared > MAX_EXPANSION * stored:
        return H5Array(
            None,
            f"declares {declared} bytes but stores {stored} (more than {MAX_EXPANSION} times "
            "less); refusing a possible decompression bomb",
        )
    npy = folder / f"{index}.npy"
    copy = np.lib.format.open_memmap(npy, mode="w+", dtype=dtype, shape=dataset.shape)
    step = max(1, _ROWS_PER_COPY // max(1, math.prod(dataset.shape[1:])))
    for start in range(0, dataset.shape[0], step):
        copy[start : start + step] = dataset[start : start + step]
    copy.flush()
    del copy
    return H5Array(npy)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
