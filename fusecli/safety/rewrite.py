"""Rewriting a model file's HDF5 in a child process, so that Keras reads only HDF5 we wrote.

Keras' load runs in the caller's process, and HDF5 can crash or loop forever on a file crafted
for it (a global heap's size byte, an attribute datatype), on parts the scan never reads (Keras
reads every attribute of every layer group). So before Keras sees a private copy, a child process
(`fusecli.safety.isolation`) reads every group, dataset and attribute of its HDF5 (the whole
`.h5`, or a `.keras` file's `model.weights.h5`) with fusecli's bounded walk, and writes them
into a fresh file with h5py: values, not structures. A file that crashes or hangs HDF5 does so
in the child, which costs one error line; Keras then loads a file whose every byte h5py wrote.
Links to other files are not carried (the scan reports them); soft links are refused there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import h5py

from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import WEIGHTS_MEMBER, file_format, walk_hdf5
from fusecli.safety.isolation import call_isolated


def rewrite_hdf5(path: Path) -> None:
    """Replace `path` (a private copy) by the same model with its HDF5 rewritten, in a child
    process with the usual time limit; `ModelFileError` if HDF5 crashes, hangs or fails on it."""
    call_isolated(_rewrite, Path(path))


def _rewrite(path: Path) -> None:
    """In the child: rewrite, then move over the copy."""
    fresh = path.with_name(f".{path.name}.rewritten")
    try:
        if file_format(path) == "keras":
            _rewrite_archive(path, fresh)
        else:
            _copy_hdf5(path, fresh, path)
        os.replace(fresh, path)
    finally:
        fresh.unlink(missing_ok=True)


def _rewrite_archive(path: Path, fresh: Path) -> None:
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(fresh, "w") as target:
        for info in source.infolist():
            if info.filename != WEIGHTS_MEMBER:
                target.writestr(info, source.read(info))
                continue
            with tempfile.TemporaryDirectory(dir=path.parent) as work:
                raw, clean = Path(work) / "raw.h5", Path(work) / "clean.h5"
                with source.open(info) as member, open(raw, "wb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
                _copy_hdf5(raw, clean, path)
                target.write(clean, info.filename, compress_type=info.compress_type)


def _copy_hdf5(source: Path, target: Path, named: Path) -> None:
    """Every group, dataset and attribute of `source`, by value, into a new `target`."""
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        _copy_attrs(src, dst)
        for entry in walk_hdf5(src, named):
            if entry.kind == "group":
                _copy_attrs(entry.node, dst.require_group(entry.name))
            elif entry.kind == "dataset":
                _copy_dataset(entry.node, dst, entry.name)
            elif entry.kind in ("soft", "other"):
                raise ModelFileError(named, f"HDF5 object {entry.name!r} is a {entry.kind} link")
            # external links are not carried: the scan reports them, Keras never sees them


def _copy_dataset(dataset: h5py.Dataset, dst: h5py.File, name: str) -> None:
    if dataset.shape is None:
        copy = dst.create_dataset(name, data=h5py.Empty(dataset.dtype))
    else:
        copy = dst.create_dataset(name, data=dataset[()], dtype=dataset.dtype)
    _copy_attrs(dataset, copy)


def _copy_attrs(source: h5py.HLObject, target: h5py.HLObject) -> None:
    for key in source.attrs:
        target.attrs[key] = source.attrs[key]
