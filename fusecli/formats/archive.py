"""Writing model files at file level: the one writer `fuse` and `merge` use.

A `.keras` output is a zip of small JSON members and `model.weights.h5`; the HDF5 part is written
in place inside the zip, uncompressed as Keras stores it (no temporary copy), so that readers
can use it in place too. A legacy `.h5` output is
one HDF5 file whose root attributes hold the config.

Tensors are copied in slices of at most `_SLICE_BYTES`, hashed as they go, so peak memory is a
slice or one tensor, never a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from fusecli.formats.crc32 import range_crc32
from fusecli.formats.modelfile import CONFIG_MEMBER, WEIGHTS_MEMBER

METADATA_MEMBER = "metadata.json"

# A member of a .keras archive other than the weights: its bytes, or how to open them.
MemberSource = bytes | Callable[[], BinaryIO]

_SLICE_BYTES = 16 << 20
# A zip local file header; its last two fields are the lengths of what precedes the data.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
# Where a written archive's weights start: HDF5's user block, which holds the member's header.
_HEADER_BLOCK = 512
# An extra field record padding a local header (as Android's zipalign writes one): its id, the
# length of its data, then the alignment it serves and zeros.
_ALIGNMENT_RECORD = struct.Struct("<HHH")
_ALIGNMENT_ID = 0xD935
_RAW_CHUNK = 4 << 20
_COPY_BUFFER = 1 << 20


@contextlib.contextmanager
def keras_archive(
    path: Path,
    members: Sequence[tuple[str, MemberSource | None]],
    date_time: tuple[int, int, int, int, int, int] | None = None,
) -> Iterator[h5py.File]:
    """Write a `.keras` archive at `path`: yields the weights file to fill, written in place
    inside the archive (no temporary copy), stored uncompressed as Keras stores it.

    `members` are the archive's members; the entry named `model.weights.h5` (value None) is
    where the weights go, and it comes first in the archive (readers find members by name): HDF5
    writes its file itself, after a user block of `_HEADER_BLOCK` bytes (HDF5 leaves them to the
    caller, and its addresses start after them), through no Python file object (one call into
    Python for each of its reads and writes cost a third of the writing). Once HDF5 has closed
    the file, the member's header is written into that block, padded to its end by an extra
    field as zipalign pads one (`_ALIGNMENT_RECORD`), and the other members follow the weights.
    Every member is dated `date_time` if given (the same inputs then give the same bytes), else
    now.
    """
    when = date_time or time.localtime()[:6]
    others = [(name, source) for name, source in members if name != WEIGHTS_MEMBER]
    mode = "w-" if _remove_if_empty(path) else "w"
    with h5py.File(path, mode, userblock_size=_HEADER_BLOCK) as h5:
        yield h5
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size - _HEADER_BLOCK
        info = _info(WEIGHTS_MEMBER, when)
        info.file_size = info.compress_size = size
        info.CRC = range_crc32(f.fileno(), _HEADER_BLOCK, size)
        info.header_offset = 0
        data = _HEADER_BLOCK - len(info.FileHeader(zip64=True)) - 4  # a record's id, length
        info.extra = _ALIGNMENT_RECORD.pack(_ALIGNMENT_ID, data, _HEADER_BLOCK) + bytes(data - 2)
        f.write(info.FileHeader(zip64=True))
        info.extra = b""  # the central directory's entry needs no padding
        f.seek(_HEADER_BLOCK + size)
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
            out.filelist.append(info)
            out.NameToInfo[info.filename] = info
            for name, source in others:
                _write_member(out, name, source, when)


def write_archive(
    path: Path,
    members: Sequence[tuple[str, MemberSource]],
    date_time: tuple[int, int, int, int, int, int] | None = None,
) -> None:
    """Write a `.keras` archive at `path` whose every member, the weights too, has its bytes
    (or a reader of them) already: `keras_archive`'s layout, without an HDF5 file to fill."""
    when = date_time or time.localtime()[:6]
    with _created(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
        for name, source in members:
            _write_member(out, name, source, when)


def _created(path: Path) -> BinaryIO:
    """`path` opened for reading and writing as a new file.

    Writers get an empty file `atomic_output` reserved. Opened with "w" (as zipfile and h5py
    open), it is truncated, and ext4 then starts writing the whole file back to disk when it is
    closed (its safeguard for programs that rewrite a file in place): tens of milliseconds per
    hundred megabytes, waited for. An empty file is removed and made anew, exclusively (a
    name taken in between is refused, never followed); any other is truncated as before.
    """
    if _remove_if_empty(path):
        return open(path, "x+b")
    return open(path, "w+b")


def _remove_if_empty(path: Path) -> bool:
    try:
        if os.lstat(path).st_size:
            return False
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


def _write_member(
    out: zipfile.ZipFile,
    name: str,
    source: MemberSource | None,
    when: tuple[int, int, int, int, int, int],
) -> None:
    if isinstance(source, bytes):
        out.writestr(_info(name, when), source)
    elif source is not None:
        with source() as src:
            info = _info(name, when)
            # a source that knows its size says so: zipfile then picks ZIP64 where it must
            info.file_size = getattr(src, "size", 0)
            with out.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _COPY_BUFFER)


def _info(name: str, date_time: tuple[int, int, int, int, int, int]) -> zipfile.ZipInfo:
    """A member's header as `ZipFile.writestr(name, ...)` makes it, with this date."""
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.external_attr = 0o600 << 16
    return info


@contextlib.contextmanager
def h5_model(path: Path, attrs: dict[str, Any]) -> Iterator[h5py.File]:
    """Write a legacy `.h5` model file at `path` with these root attributes (made anew where
    it is empty: see `_created`)."""
    with h5py.File(path, "w-" if _remove_if_empty(path) else "w") as h5:
        for key, value in attrs.items():
            h5.attrs[key] = value
        yield h5


def config_member(config: dict[str, Any]) -> bytes:
    """`config.json` as Keras writes it."""
    return json.dumps(config).encode("utf-8")


def keras_members(
    config: dict[str, Any], metadata: dict[str, Any] | Callable[[], bytes]
) -> list[tuple[str, MemberSource | None]]:
    """The members of a fresh `.keras` archive, in Keras' order; a `metadata` given as a
    function (made once the weights are written) goes after them."""
    if callable(metadata):
        return [
            (CONFIG_MEMBER, config_member(config)),
            (WEIGHTS_MEMBER, None),
            (METADATA_MEMBER, lambda: io.BytesIO(metadata())),
        ]
    return [
        (METADATA_MEMBER, json.dumps(metadata).encode("utf-8")),
        (CONFIG_MEMBER, config_member(config)),
        (WEIGHTS_MEMBER, None),
    ]


def write_tensor(target: h5py.Group, name: str, values: np.ndarray) -> bytes:
    """Write one tensor held in memory; returns its digest."""
    dataset = target.create_dataset(name, shape=values.shape, dtype=values.dtype)
    values = np.ascontiguousarray(values)
    if values.size:
        dataset[()] = values
    return tensor_digest(values)


def overwrite_tensor(dataset: h5py.Dataset, values: np.ndarray) -> bytes:
    """Write a tensor's values over a dataset of its shape and dtype; returns its digest."""
    values = np.ascontiguousarray(values, dtype=dataset.dtype)
    if values.size:
        dataset.write_direct(values)
    return tensor_digest(values)


def copy_group(source: h5py.Group, target: h5py.Group, skip: Sequence[str] = ()) -> list[str]:
    """Copy everything in `source` (but the members named in `skip`) into `target`, by HDF5's
    own object copy: attributes, groups and every dataset, whatever the files. Returns the
    copied datasets' paths, relative to `source`."""
    copy_attrs(source, target)
    for key in source:
        if key not in skip:
            source.copy(source[key], target, name=key)
    return [n for n in dataset_names(target) if n.split("/")[0] not in skip]


def copy_dataset(source: h5py.Group, name: str, target: h5py.Group, target_name: str) -> int:
    """Copy the dataset at `name` (relative to `source`) to `target_name` (relative to `target`,
    its missing groups made), by HDF5's own object copy and calls: an h5py object per tensor
    costs several times more. Returns its number of values."""
    made = h5py.h5p.create(h5py.h5p.LINK_CREATE)  # as h5py makes links: UTF-8 names
    made.set_create_intermediate_group(True)
    made.set_char_encoding(h5py.h5t.CSET_UTF8)
    h5py.h5o.copy(
        source.id, name.encode("utf-8"), target.id, target_name.encode("utf-8"), lcpl=made
    )
    return value_count(target, target_name)


def value_count(group: h5py.Group, name: str) -> int:
    """The number of values of the dataset at `name` (relative to `group`)."""
    return math.prod(h5py.h5d.open(group.id, name.encode("utf-8")).shape)


def dataset_digest(dataset: h5py.Dataset) -> bytes:
    """The digest of a dataset's values, read slice by slice (see `tensor_digest`)."""
    return digest_and_finite(dataset)[0]


def digest_and_finite(dataset: h5py.Dataset) -> tuple[bytes, bool]:
    """The digest of a dataset's values, and whether they are all finite (non-floats are)."""
    digest = hashlib.sha256()
    finite = True
    floating = dataset.dtype.kind == "f"
    for where in _slices(dataset):
        values = dataset[where]
        if floating and finite:
            finite = bool(np.isfinite(values).all())
        digest.update(_bytes(values))
    return digest.digest(), finite


class RawTensors:
    """Reads the stored bytes of a model file's datasets straight from the file.

    A tensor Keras writes is one contiguous, unfiltered block of the HDF5 file: its bytes are its
    values in C order. `block` finds that block (None for any other layout: chunked, compressed,
    empty), and `same_values` compares two blocks byte for byte with `os.preadv` and memcmp, no
    HDF5 read: ten times faster than hashing both.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._base = _hdf5_offset(path, self._fd)
        self._buffer: bytearray | None = None  # made when a tensor needs a whole chunk

    @property
    def start(self) -> int | None:
        """Where the HDF5 file starts in the file (None: not readable in place)."""
        return self._base

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RawTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block(self, dataset: h5py.Dataset) -> tuple[int, int] | None:
        """(position in the file, size) of a dataset stored as one plain block, else None."""
        return self._block(dataset.id)

    def locate(
        self, group: h5py.Group, name: str
    ) -> tuple[h5py.h5d.DatasetID, tuple[int, int] | None]:
        """The dataset at `name` (relative to `group`) and its `block`, by HDF5's own calls: a
        fifth of the time of making an h5py Dataset. KeyError if there is none."""
        dsid = h5py.h5d.open(group.id, name.encode("utf-8"))
        return dsid, self._block(dsid)

    def read(self, group: h5py.Group, name: str) -> np.ndarray:
        """`values` of the dataset at `name` (relative to `group`), found as `locate` finds it."""
        return self.values(h5py.h5d.open(group.id, name.encode("utf-8")))

    def _block(self, dsid: h5py.h5d.DatasetID) -> tuple[int, int] | None:
        if self._base is None:
            return None
        # HDF5 gives an offset for contiguous data in this file only: not for chunks (the only
        # layout filters apply to), compact data, external files, or space not yet allocated.
        offset = dsid.get_offset()
        if offset is None:
            return None
        nbytes = math.prod(dsid.shape) * dsid.get_type().get_size()
        if nbytes == 0 or dsid.get_storage_size() != nbytes:
            return None
        return self._base + offset, nbytes

    def same_values(
        self, block: tuple[int, int], other: RawTensors, other_block: tuple[int, int], dtype: Any
    ) -> tuple[bool, bool]:
        """Whether two blocks hold the same bytes, and whether the values (of `dtype`) are all
        finite."""
        (position, nbytes), (other_position, other_nbytes) = block, other_block
        if nbytes != other_nbytes:
            return False, True
        dtype = np.dtype(dtype)
        floating = dtype.kind == "f"
        finite = True
        done = 0
        while done < nbytes:
            step = min(_RAW_CHUNK, nbytes - done)
            mine = self._read(position + done, step)
            theirs = other._read(other_position + done, step)
            if mine != theirs:
                return False, finite
            if floating and finite:
                finite = _all_finite(np.frombuffer(mine, dtype=dtype, count=step // dtype.itemsize))
            done += step
        return True, finite

    def values(self, dataset: h5py.Dataset | h5py.h5d.DatasetID) -> np.ndarray:
        """A dataset's values: read straight from the file when stored as one plain block (no
        HDF5 read, no Python file object in between), else by h5py."""
        dsid = dataset if isinstance(dataset, h5py.h5d.DatasetID) else dataset.id
        block = self._block(dsid)
        dtype = dsid.dtype
        if block is None or dtype.kind not in "fiub":
            return np.asarray(h5py.Dataset(dsid)[()])
        position, nbytes = block
        values = np.empty(dsid.shape, dtype=dtype)
        if os.preadv(self._fd, [memoryview(values).cast("B")], position) != nbytes:
            raise OSError("the file is shorter than its datasets say")
        return values

    def _read(self, position: int, size: int) -> bytearray:
        if size == _RAW_CHUNK:
            if self._buffer is None:
                self._buffer = bytearray(_RAW_CHUNK)
            buffer = self._buffer
        else:
            buffer = bytearray(size)
        if os.preadv(self._fd, [buffer], position) != size:
            raise OSError("the file is shorter than its datasets say")
        return buffer


def _all_finite(values: np.ndarray) -> bool:
    """A sum is NaN or infinite when any value is (and rarely when finite values overflow it)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.sum(values)):
            return True
    return bool(np.isfinite(values).all())


def _hdf5_offset(path: Path, fd: int) -> int | None:
    """Where the HDF5 file starts: 0 for an `.h5` file; for a `.keras` archive, the start of its
    `model.weights.h5` member if stored uncompressed (None otherwise)."""
    head = os.pread(fd, 4, 0)
    if not head.startswith(b"PK"):
        return 0
    with zipfile.ZipFile(path) as archive_file:
        try:
            info = archive_file.getinfo(WEIGHTS_MEMBER)
        except KeyError:
            return None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    header = os.pread(fd, _LOCAL_HEADER.size, info.header_offset)
    if len(header) != _LOCAL_HEADER.size or not header.startswith(b"PK\x03\x04"):
        return None
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def tensor_digest(values: np.ndarray) -> bytes:
    """sha256 of the values' bytes in C order: equal digests mean bit-for-bit equal tensors."""
    return hashlib.sha256(_bytes(values)).digest()


def copy_attrs(source: h5py.HLObject, target: h5py.HLObject) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value


def dataset_names(group: h5py.Group) -> list[str]:
    """Paths of every dataset below `group`, relative to it (HDF5's own walk: fast)."""
    names: list[str] = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            names.append(name.decode("utf-8"))

    h5py.h5o.visit(group.id, visit, info=True)
    return names


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
