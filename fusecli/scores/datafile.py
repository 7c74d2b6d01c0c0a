"""Reading a model's input data and labels from .npy, .npz and .h5 files.

Which array feeds which model input:
- `.npy`: the one array, for a model with one input;
- `.npz` / `.h5`: `key` if given (one input), else the array `x`; for a model with several inputs,
  arrays named after its inputs, or else `x0`, `x1`, ... in the model's input order.
Labels are the array `y` of a .npz/.h5 file (or `key`), or a whole .npy file.

The format is told by content, not by name. .npy files are memory-mapped and .h5 datasets read
slice by slice, so only one batch at a time needs to be in memory; .npz members are read whole.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.lib.format as npy_format

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.limits import GUARD_FLOOR
from fusecli.scores.h5data import H5Array, read_h5_data
from fusecli.termination import cleanup_on_termination

DEFAULT_INPUT_KEY = "x"
DEFAULT_LABELS_KEY = "y"
NUMERIC_KINDS = "biuf"
# Deflate, which numpy's savez_compressed uses, inflates at most 1032 times.
_NPZ_INFLATION = 2000

DataFormat = Literal["npy", "npz", "h5"]


@dataclass
class DataFile:
    """An open data file: named arrays (or one unnamed array for .npy), read lazily."""

    path: Path
    format: DataFormat
    _handle: Any

    def names(self) -> list[str]:
        if self.format == "npy":
            return []
        if self.format == "npz":
            return list(self._handle.files)
        return list(self._handle)  # an .h5 file's datasets, copied by `read_h5_data`

    def __contains__(self, key: str) -> bool:
        return key in self.names()

    def array(self, key: str | None) -> Any:
        """The array `key` (None: the .npy file's array), numeric and rows-first, else an error."""
        if self.format == "npy":
            values = self._handle
        else:
            if key not in self:
                listing = ", ".join(self.names()) or "nothing"
                raise FusecliError(f"{self.path}: has no array {key!r} (it holds: {listing})")
            if self.format == "h5":
                return self._h5_array(key)
            try:
                self._check_npz_member(key)
                values = self._handle[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                # an object array in a .npz (allow_pickle is off), or a damaged member
                raise FusecliError(
                    f"{self.path}: array {key!r} cannot be read ({_short(e)})"
                ) from None
        label = f"{self.path}" if key is None else f"{self.path}: array {key!r}"
        if not hasattr(values, "dtype") or not hasattr(values, "shape"):
            # np.load returns the raw bytes of a .npz member that is not a .npy
            raise FusecliError(f"{label} is not a .npy array (got {type(values).__name__})")
        if values.shape is None:  # an h5py.Empty dataset
            raise FusecliError(f"{label} is an empty dataset with no shape")
        dtype = np.dtype(values.dtype)
        if dtype.hasobject or dtype.kind not in NUMERIC_KINDS:
            raise FusecliError(f"{label} holds values of dtype {dtype}, not numbers")
        if len(values.shape) == 0:
            raise FusecliError(f"{label} is a single number, not an array with rows first")
        return values

    def _check_npz_member(self, key: str) -> None:
        """numpy allocates what a member's header declares before reading it: a header that
        promises more than the member holds is refused first (a 300-byte file asked for 4 TiB)."""
        archive = self._handle.zip
        name = key if key in archive.namelist() else f"{key}.npy"
        info = archive.getinfo(name)
        with archive.open(info) as f:
            if f.read(len(npy_format.MAGIC_PREFIX)) != npy_format.MAGIC_PREFIX:
                return  # not a .npy: numpy returns its bytes, which array() refuses
            f.seek(0)
            version = npy_format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                return  # np.load gives the error
            read_header = (
                npy_format.read_array_header_1_0
                if version == (1, 0)
                else npy_format.read_array_header_2_0
            )
            shape, _, dtype = read_header(f)
            header = f.tell()
        if info.file_size > GUARD_FLOOR and info.file_size > _NPZ_INFLATION * info.compress_size:
            raise FusecliError(
                f"{self.path}: array {key!r} inflates to {info.file_size} bytes from "
                f"{info.compress_size} (more than {_NPZ_INFLATION} times, beyond what numpy's "
                "deflate can reach); refusing a possible decompression bomb"
            )
        expected = np.dtype(dtype).itemsize * math.prod(shape)
        if not np.dtype(dtype).hasobject and header + expected > info.file_size:
            raise FusecliError(
                f"{self.path}: array {key!r} is truncated (its header promises {expected} bytes "
                f"of data for shape {tuple(shape)}, the member holds "
                f"{max(info.file_size - header, 0)})"
            )

    def _h5_array(self, key: str) -> np.ndarray:
        """A dataset of an .h5 file, from the private .npy copy the child process made."""
        array: H5Array = self._handle[key]
        if array.npy is None:
            raise FusecliError(f"{self.path}: array {key!r} {array.problem}")
        try:
            return np.load(array.npy, mmap_mode="r", allow_pickle=False)
        except ValueError:  # empty arrays cannot be mapped
            return np.load(array.npy, allow_pickle=False)


@contextlib.contextmanager
def open_data(path: str | os.PathLike[str]) -> Iterator[DataFile]:
    """Open a .npy, .npz or .h5 data file for reading; errors name the file."""
    path = _check_path(path)
    # A named pipe or process substitution can be read once, from the start: read it whole.
    source: Path | io.BytesIO = path if _is_regular(path) else _read_whole(path)
    fmt = _data_format(path, source)
    with contextlib.ExitStack() as stack:
        try:
            if fmt == "npy":
                _check_npy_size(path, source)
            if fmt == "npy" and isinstance(source, io.BytesIO):
                handle = np.load(source, allow_pickle=False)
            elif fmt == "npy":
                try:
                    handle = np.load(path, mmap_mode="r", allow_pickle=False)
                except ValueError:  # empty arrays cannot be mapped; object arrays fail again
                    handle = np.load(path, allow_pickle=False)
            elif fmt == "npz":
                handle = stack.enter_context(np.load(source, allow_pickle=False))
            else:
                folder = stack.enter_context(_private_folder())
                handle = read_h5_data(path, folder)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise FusecliError(f"{path}: cannot be read as {fmt} data ({_short(e)})") from None
        yield DataFile(path, fmt, handle)


def model_input_arrays(
    data: DataFile, input_names: Sequence[str], *, key: str | None = None
) -> list[Any]:
    """The arrays of `data` that feed a model's inputs, in order; see the module doc."""
    n = len(input_names)
    if data.format == "npy":
        if key is not None:
            raise InvalidRequest(f"--key picks an array in a .npz or .h5 file; {data.path} is .npy")
        if n != 1:
            raise FusecliError(
                f"{data.path}: a .npy file holds one array, but the model has {n} inputs "
                f"({', '.join(input_names)}); put them in a .npz named after the inputs "
                f"or x0 ... x{n - 1}"
            )
        return [data.array(None)]
    if key is not None:
        if n != 1:
            raise InvalidRequest(
                f"--key picks one array, but the model has {n} inputs ({', '.join(input_names)}); "
                f"name the arrays after the inputs or x0 ... x{n - 1}. Received: --key {key}"
            )
        return [data.array(key)]
    present = set(data.names())
    if n == 1:
        for candidate in (DEFAULT_INPUT_KEY, input_names[0], "x0"):
            if candidate in present:
                return [data.array(candidate)]
        listing = ", ".join(sorted(present)) or "nothing"
        raise FusecliError(
            f"{data.path}: has no array {DEFAULT_INPUT_KEY!r} (it holds: {listing}); "
            "choose one with --key"
        )
    for names in (list(input_names), [f"x{i}" for i in range(n)]):
        if all(name in present for name in names):
            return [data.array(name) for name in names]
    listing = ", ".join(sorted(present)) or "nothing"
    raise FusecliError(
        f"{data.path}: the model has {n} inputs ({', '.join(input_names)}); expected arrays "
        f"named after them or x0 ... x{n - 1}. Received arrays: {listing}"
    )


def read_labels(
    path: str | os.PathLike[str], *, key: str | None = None, in_data: bool = False
) -> np.ndarray:
    """Labels in memory: a whole .npy file, or the array `key` (default `y`) of a .npz/.h5.

    `in_data`: `path` is the --data file, whose labels are an array beside the inputs; a .npy
    holds only the inputs, which must not be taken for labels.
    """
    with open_data(path) as data:
        if data.format == "npy":
            if in_data:
                raise InvalidRequest(
                    f"--data {data.path} is a .npy file: it holds the inputs, not labels; "
                    "pass the labels with --labels"
                )
            return np.asarray(data.array(None))
        return np.asarray(data.array(key or DEFAULT_LABELS_KEY)[()])


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _private_folder() -> Iterator[Path]:
    """A folder only this user can open, for the copies of an .h5 file's arrays."""
    with cleanup_on_termination():
        try:
            folder = tempfile.mkdtemp(prefix=f"fusecli-{os.getpid()}-data-")
        except OSError as e:
            raise FusecliError(
                f"Cannot make a private folder for the data in {tempfile.gettempdir()} "
                f"({e.strerror or e}); set TMPDIR to a folder you can write to"
            ) from None
        try:
            yield Path(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _check_path(path: str | os.PathLike[str]) -> Path:
    if str(path) == "-":
        raise InvalidRequest("Data and labels are read from files, not from stdin ('-')")
    path = Path(path)
    if not path.exists():
        raise FusecliError(f"{path}: no such file")
    if path.is_dir():
        raise FusecliError(f"{path}: is a directory, not a data file")
    mode = path.stat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        # a device (/dev/zero, /dev/urandom...) or a socket: endless, or not data at all
        raise FusecliError(f"{path}: is not a regular file or a pipe; data is read from files")
    if _is_regular(path) and path.stat().st_size == 0:
        raise FusecliError(f"{path}: is empty")
    return path


def _check_npy_size(path: Path, source: Path | io.BytesIO) -> None:
    """A header may promise more data than the file holds (or a negative size): say so before
    numpy tries to allocate it."""
    with open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source) as f:
        version = npy_format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return  # np.load gives the error
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        if any(int(d) < 0 for d in shape):
            raise FusecliError(f"{path}: has a broken .npy header (negative size in shape {shape})")
        expected = np.dtype(dtype).itemsize * math.prod(shape)
        found = _remaining(f)
        f.seek(0)
    if found < expected:
        raise FusecliError(
            f"{path}: is truncated (its header promises {expected} bytes of data "
            f"for shape {tuple(shape)}, the file holds {found})"
        )


def _remaining(f: Any) -> int:
    here = f.tell()
    end = f.seek(0, os.SEEK_END)
    return end - here


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(path.stat().st_mode)


def _read_whole(path: Path) -> io.BytesIO:
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as e:
        raise FusecliError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not content:
        raise FusecliError(f"{path}: is empty")
    return io.BytesIO(content)


def _data_format(path: Path, source: Path | io.BytesIO) -> DataFormat:
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:8]
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise FusecliError(f"{path}: cannot be read ({e.strerror or e})") from None
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK"):
        return "npz"
    if head == _HDF5_SIGNATURE or (isinstance(source, Path) and _hdf5_after_user_block(path)):
        return "h5"
    raise FusecliError(f"{path}: is not a .npy, .npz or .h5 data file")


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5_after_user_block(path: Path) -> bool:
    """HDF5's signature where HDF5 looks for it after a user block (512 bytes, then each
    power of two), read here without HDF5: the file is not opened in this process."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 512
            while offset + 8 <= size:
                f.seek(offset)
                if f.read(8) == _HDF5_SIGNATURE:
                    return True
                offset *= 2
    except OSError:
        return False
    return False


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
