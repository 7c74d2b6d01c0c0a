"""Reading model files without TensorFlow: zipfile, json and h5py only.

Two formats exist:
- `.keras` (Keras 3): a zip holding `config.json`, `metadata.json` and `model.weights.h5`, whose
  variables sit under `layers/<name>/vars/<i>` (nested models: `layers/<outer>/layers/<inner>/...`).
- legacy `.h5` (Keras 2 and Keras 3's `save("x.h5")`): one HDF5 file with attributes
  `model_config` and `keras_version`, and weights under `model_weights/<layer>/...`, listed by each
  layer group's `weight_names` attribute.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import h5py
import numpy as np
from h5py import h5d, h5g, h5l, h5o

from fusecli.errors import ModelFileError
from fusecli.limits import (
    GUARD_FLOOR,
    MAX_EXPANSION,
    MAX_HDF5_DEPTH,
    MAX_HDF5_OBJECTS,
    check_config_depth,
    check_inflation,
)

MODEL_FORMATS = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}
MODEL_SUFFIXES = tuple(MODEL_FORMATS)

CONFIG_MEMBER = "config.json"  # inside a .keras archive
_METADATA_FILENAME = "metadata.json"
WEIGHTS_MEMBER = "model.weights.h5"  # inside a .keras archive
NPZ_WEIGHTS_MEMBER = "model.weights.npz"  # Keras 3.6+ can save weights so (NumPy pickles)
# A zip local file header: signature, version, flags, method, time, date, crc, sizes, then the
# lengths of the name and the extra field that come before the member's data.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")

Format = Literal["keras", "h5"]


@dataclass
class ModelFile:
    """What a model file says about itself, read without building the model."""

    path: Path
    format: Format
    config: dict[str, Any]  # the serialized model: {"class_name": ..., "config": ...}
    keras_version: str | None
    backend: str | None
    size: int = 0  # bytes on disk
    members: list[str] = field(default_factory=list)  # names inside a .keras archive

    @property
    def weights_member(self) -> str | None:
        """The archive member holding a .keras file's weights (None for .h5)."""
        if self.format != "keras":
            return None
        return WEIGHTS_MEMBER if WEIGHTS_MEMBER in self.members else NPZ_WEIGHTS_MEMBER

    @property
    def written_by_keras2(self) -> bool:
        """A legacy `.h5` from the tf.keras 2.x years, which Keras 3 often cannot load as is."""
        return self.format == "h5" and (self.keras_version or "").startswith("2.")

    @property
    def keras2_archive(self) -> bool:
        """A `.keras` archive written by tf.keras 2.13 or later (or tf-keras): the layout of
        Keras 3's archives, holding a Keras 2 config, which Keras 3 cannot load at all. Known by
        its metadata or by its config (metadata.json may be missing, or say 3.x)."""
        return self.format == "keras" and (
            (self.keras_version or "").startswith("2.") or keras2_config(self.config)
        )


def keras2_config(config: dict[str, Any]) -> bool:
    """A model config as Keras 2 writes it, by what Keras 3 never writes: a tf.keras module
    (`tf_keras.src.engine.functional`, `keras.src.engine...`), `batch_input_shape`, or a
    Functional's inbound nodes as lists instead of Keras 3's {"args": ...} dicts."""
    module = str(config.get("module") or "")
    if module.startswith(("tf_keras", "keras.engine", "keras.src.engine")):
        return True
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict):
            continue
        conf = layer.get("config")
        if isinstance(conf, dict) and "batch_input_shape" in conf:
            return True
        nodes = layer.get("inbound_nodes")
        if isinstance(nodes, list) and nodes and isinstance(nodes[0], list):
            return True
    return False


# What a broken zip, HDF5 file or JSON document can raise while being read.
_READ_ERRORS = (
    OSError,
    EOFError,
    KeyError,
    ValueError,  # includes json.JSONDecodeError and UnicodeDecodeError
    TypeError,
    RuntimeError,  # includes RecursionError (JSON nested too deeply), encrypted zip members
    NotImplementedError,  # unsupported zip compression
    OverflowError,
    MemoryError,
    SystemError,  # h5py on some corrupted files
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
)


def check_model_path(path: str | os.PathLike[str]) -> Path:
    """Fail early, with the file's name, on paths that cannot be a model file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        raise ModelFileError(path, "is a directory, not a model file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(path, "cannot be read (permission denied)")
    if path.stat().st_size == 0:
        raise ModelFileError(path, "is empty")
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ModelFileError(
            path, f"is not a Keras model file (expected {', '.join(MODEL_SUFFIXES)})"
        )
    return path


def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read a model file's config and metadata; `ModelFileError` for anything broken."""
    path = check_model_path(path)
    fmt = file_format(path)
    if fmt == "keras" and MODEL_FORMATS[path.suffix.lower()] == "h5" and h5py.is_hdf5(path):
        raise ModelFileError(
            path,
            "is an HDF5 file whose user block starts with a zip signature; zip tools and Keras "
            "would read different things, and a file that is two things at once is refused",
        )
    if fmt != MODEL_FORMATS[path.suffix.lower()]:
        # Keras picks the format by the name: what it would read is not what we read here.
        what = "a .keras (zip) archive" if fmt == "keras" else "an HDF5 file"
        raise ModelFileError(
            path, f"is {what} named {path.suffix}; rename it to match what it holds"
        )
    reader = _read_keras if fmt == "keras" else _read_h5
    try:
        model_file = reader(path)
    except ModelFileError:
        raise
    except _READ_ERRORS as e:
        raise ModelFileError(path, f"cannot be read as a model file ({_short(e)})") from None
    model_file.size = path.stat().st_size
    return model_file


def file_format(path: str | os.PathLike[str]) -> Format:
    """'keras' for a zip archive, 'h5' for an HDF5 file: by content, not by name."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror or e})") from None
    if head.startswith(b"PK"):
        return "keras"
    if head == b"\x89HDF\r\n\x1a\n" or h5py.is_hdf5(path):
        return "h5"
    if zipfile.is_zipfile(path):
        # Python's zipfile (and so Keras) finds an archive from its end, whatever precedes it.
        with contextlib.suppress(*_READ_ERRORS), zipfile.ZipFile(path) as archive:
            raise ModelFileError(path, _prefixed(min(i.header_offset for i in archive.infolist())))
        raise ModelFileError(path, _prefixed(None))
    raise ModelFileError(path, "is neither a .keras archive nor an HDF5 file")


def _prefixed(offset: int | None) -> str:
    what = "other data" if offset is None else f"{offset} bytes of other data"
    return (
        f"is a zip archive behind {what}; Keras writes archives from their first byte, and "
        "a file that is two things at once is refused"
    )


@contextlib.contextmanager
def open_weights(path: str | os.PathLike[str]) -> Iterator[h5py.Group]:
    """Open the HDF5 group that holds a model file's weights, read-only.

    `.keras`: the root of `model.weights.h5` inside the zip (read in place, not extracted).
    `.h5`: the `model_weights` group of a full model, or the root of a weights-only file.
    """
    with open_hdf5(path) as h5:
        try:
            group = h5.get("model_weights", h5)
        except _READ_ERRORS as e:
            raise ModelFileError(path, f"weights cannot be read ({_short(e)})") from None
        yield group


_held: dict[Path, h5py.File] = {}


@contextlib.contextmanager
def held_open(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within, `open_hdf5` (and `open_weights`) of `path` give the one HDF5 file opened here:
    a scan and a variable list then read the file's metadata once (HDF5 keeps what it read),
    rather than each through the archive anew."""
    path = check_model_path(path)
    with open_hdf5(path) as h5:
        _held[path] = h5
        try:
            yield
        finally:
            del _held[path]


@contextlib.contextmanager
def open_hdf5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open a model file's HDF5 root read-only: the whole `.h5`, or a `.keras` file's weights.

    Errors raised while the caller reads it (broken objects, bad shapes) become `ModelFileError`.
    """
    path = check_model_path(path)
    try:
        held = _held.get(path)
        if held is not None:
            yield held
        elif file_format(path) == "keras":
            with (
                open_archive(path) as archive,
                _seekable_member(archive, path, _h5_member(archive, path)) as member,
                h5py.File(member, "r") as h5,
            ):
                yield h5
        else:
            with h5py.File(path, "r") as h5:
                yield h5
    except ModelFileError:
        raise
    except _READ_ERRORS as e:
        raise ModelFileError(path, f"weights cannot be read ({_short(e)})") from None


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """A .keras archive, checked so that every reader sees the same bytes, within bounds.

    Refused: data before the first member (zipfile finds an archive from its end), two members
    of one name (zipfile, so Keras and the scan, read the last; other readers the first), a
    stored member whose two sizes differ (readers disagree on where it ends), and a member that
    inflates more than MAX_INFLATION times (a decompression bomb).
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ModelFileError(path, f"is not a valid .keras archive ({_short(e)})") from None
    with archive:
        infos = archive.infolist()
        if infos and min(i.header_offset for i in infos) != 0:
            raise ModelFileError(path, _prefixed(min(i.header_offset for i in infos)))
        names = [info.filename for info in infos]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ModelFileError(
                path,
                f"has {names.count(twice)} members named {twice!r}; readers would disagree on "
                "which one is the file's",
            )
        for info in infos:
            check_inflation(path, info)
        yield archive


def _h5_member(archive: zipfile.ZipFile, path: Path) -> str:
    names = archive.namelist()
    if WEIGHTS_MEMBER not in names and NPZ_WEIGHTS_MEMBER in names:
        raise ModelFileError(
            path,
            f"keeps its weights in {NPZ_WEIGHTS_MEMBER} (NumPy pickles, which fusecli never "
            "unpickles) rather than model.weights.h5; re-save it with Keras' default weights "
            "format",
        )
    return WEIGHTS_MEMBER


class Hdf5Entry:
    """One link met by `walk_hdf5`: its path below the walked group, and what it leads to
    (`node`, made when asked for: most walks need only the names)."""

    __slots__ = ("name", "kind", "target", "_id", "_node")

    def __init__(
        self,
        name: str,
        kind: Literal["group", "dataset", "external", "soft", "other"],
        id: h5g.GroupID | h5d.DatasetID | None = None,
        target: tuple[str, str] | None = None,  # an external link's file and object
    ) -> None:
        self.name, self.kind, self.target = name, kind, target
        self._id = id
        self._node: h5py.Group | h5py.Dataset | None = None

    @property
    def node(self) -> h5py.Group | h5py.Dataset | None:
        if self._node is None and self._id is not None:
            is_group = isinstance(self._id, h5g.GroupID)
            self._node = h5py.Group(self._id) if is_group else h5py.Dataset(self._id)
        return self._node


def walk_hdf5(root: h5py.Group, path: Path) -> Iterator[Hdf5Entry]:
    """Every link below `root`: a group's links in name order, then its subgroups', depth
    first; each group entered once.

    HDF5's own visitors recurse in C (40,000 nested groups crash the process) and follow hard
    links into loops; this walk keeps its own stack, does not follow soft or external links,
    and refuses files deeper than MAX_HDF5_DEPTH or larger than MAX_HDF5_OBJECTS.
    """
    seen = {root.id}
    stack: list[tuple[h5g.GroupID, str, int]] = [(root.id, "", 0)]
    count = 0
    while stack:
        gid, prefix, depth = stack.pop()
        if depth >= MAX_HDF5_DEPTH:
            raise ModelFileError(
                path, f"its HDF5 groups are nested more than {MAX_HDF5_DEPTH} levels deep"
            )
        children: list[tuple[h5g.GroupID, str, int]] = []
        links = gid.links
        for raw in gid:
            count += 1
            if count > MAX_HDF5_OBJECTS:
                raise ModelFileError(path, f"holds more than {MAX_HDF5_OBJECTS} HDF5 objects")
            name = f"{prefix}{_decode(raw)}"
            link = links.get_info(raw).type
            if link == h5l.TYPE_EXTERNAL:
                filename, target = (_decode(v) for v in links.get_val(raw))
                yield Hdf5Entry(name, "external", target=(filename, target))
                continue
            if link != h5l.TYPE_HARD:
                yield Hdf5Entry(name, "soft" if link == h5l.TYPE_SOFT else "other")
                continue
            oid = h5o.open(gid, raw)
            if isinstance(oid, h5g.GroupID):
                yield Hdf5Entry(name, "group", oid)
                if oid not in seen:
                    seen.add(oid)
                    children.append((oid, f"{name}/", depth + 1))
            elif isinstance(oid, h5d.DatasetID):
                yield Hdf5Entry(name, "dataset", oid)
            else:
                yield Hdf5Entry(name, "other")
        stack.extend(reversed(children))


@dataclass(frozen=True)
class NpyMember:
    """One array of a .keras file's `model.weights.npz`, from its header only."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pickle: bytes | None  # an object array's data: a pickle, never unpickled here


def read_npz_members(path: Path) -> list[NpyMember]:
    """The headers of `model.weights.npz`'s arrays, and the pickles of object arrays.

    Read with zipfile and numpy's header parser only (no `np.load`): every member is checked
    for inflation, and numeric arrays for declared against stored size.
    """
    members = []
    try:
        with (
            open_archive(path) as archive,
            _seekable_member(archive, path, NPZ_WEIGHTS_MEMBER) as npz_file,
            zipfile.ZipFile(npz_file) as npz,
        ):
            for info in npz.infolist():
                check_inflation(path, info, inside=f"{NPZ_WEIGHTS_MEMBER}:")
                members.append(_npy_member(path, npz, info))
    except ModelFileError:
        raise
    except _READ_ERRORS as e:
        raise ModelFileError(path, f"{NPZ_WEIGHTS_MEMBER} cannot be read ({_short(e)})") from None
    return members


def _npy_member(path: Path, npz: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyMember:
    key = info.filename.removesuffix(".npy")
    with npz.open(info) as f:
        major, _minor = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _fortran, dtype = read_header(f)
        if dtype.hasobject:
            return NpyMember(key, tuple(shape), dtype, f.read())
    declared = math.prod(shape) * dtype.itemsize
    if declared > GUARD_FLOOR and declared > MAX_EXPANSION * info.compress_size:
        raise ModelFileError(
            path,
            f"{NPZ_WEIGHTS_MEMBER} array {key!r} declares {declared} bytes but stores "
            f"{info.compress_size}; refusing a possible decompression bomb",
        )
    return NpyMember(key, tuple(shape), dtype, None)


def _read_keras(path: Path) -> ModelFile:
    try:
        with open_archive(path) as archive:
            members = archive.namelist()
            config = _json_member(archive, path, CONFIG_MEMBER)
            metadata = (
                _json_member(archive, path, _METADATA_FILENAME)
                if _METADATA_FILENAME in archive.namelist()
                else {}
            )
    except zipfile.BadZipFile as e:
        raise ModelFileError(path, f"is not a valid .keras archive ({_short(e)})") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({_short(e)})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelFileError(path, f"{CONFIG_MEMBER} does not describe a Keras object")
    if not isinstance(metadata, dict):
        raise ModelFileError(path, f"{_METADATA_FILENAME} is not a JSON object")
    if WEIGHTS_MEMBER not in members and NPZ_WEIGHTS_MEMBER not in members:
        raise ModelFileError(path, f"is a zip archive without {WEIGHTS_MEMBER}, not a .keras model")
    check_config_depth(path, config, CONFIG_MEMBER)
    return ModelFile(
        path=path,
        format="keras",
        config=config,
        keras_version=_str_or_none(metadata.get("keras_version")),
        backend=_str_or_none(config.get("backend") or metadata.get("backend")),
        members=members,
    )


def _read_h5(path: Path) -> ModelFile:
    try:
        with h5py.File(path, "r") as h5:
            attrs = {
                k: _decode(h5.attrs[k])
                for k in ("model_config", "keras_version", "backend")
                if k in h5.attrs
            }
    except OSError as e:
        raise ModelFileError(path, f"is not a readable HDF5 file ({_short(e)})") from None
    if "model_config" not in attrs:
        raise ModelFileError(path, "is an HDF5 file without a model (no model_config attribute)")
    try:
        config = json.loads(attrs["model_config"])
    except (TypeError, ValueError, RecursionError) as e:
        raise ModelFileError(path, f"its model_config is not valid JSON ({_short(e)})") from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelFileError(path, "its model_config does not describe a Keras model")
    check_config_depth(path, config, "its model_config")
    return ModelFile(
        path=path,
        format="h5",
        config=config,
        keras_version=_str_or_none(attrs.get("keras_version")),
        backend=_str_or_none(attrs.get("backend")),
    )


@contextlib.contextmanager
def _member(archive: zipfile.ZipFile, path: Path, name: str) -> Iterator[Any]:
    if name not in archive.namelist():
        raise ModelFileError(path, f"is a zip archive without {name}, not a .keras model")
    with archive.open(name) as member:
        yield member


@contextlib.contextmanager
def _seekable_member(archive: zipfile.ZipFile, path: Path, name: str) -> Iterator[Any]:
    """A zip member h5py can seek in cheaply.

    zipfile's own member objects re-read (and checksum) the member from its start on every
    backward seek, which makes reading HDF5 metadata quadratic: 15 s for a 100 MB ResNet50.
    Keras stores `model.weights.h5` uncompressed, so it is read in place through a window on
    the archive; a compressed member is decompressed into memory once.
    """
    if name not in archive.namelist():
        raise ModelFileError(path, f"is a zip archive without {name}, not a .keras model")
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        yield io.BytesIO(archive.read(name))
        return
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or not header.startswith(b"PK\x03\x04"):
            raise ModelFileError(path, f"is not a valid .keras archive (bad header for {name})")
        name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > os.fstat(f.fileno()).st_size:
            raise ModelFileError(path, f"is not a valid .keras archive ({name} is truncated)")
        yield _Window(f, start, info.file_size)


class _Window(io.RawIOBase):
    """Read-only view of `size` bytes of a file, starting at `start`."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        if count == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:count]) or 0
        self._pos += got
        return got


def _json_member(archive: zipfile.ZipFile, path: Path, name: str) -> Any:
    with _member(archive, path, name) as member:
        try:
            return json.loads(member.read())
        except (ValueError, RecursionError) as e:
            raise ModelFileError(path, f"{name} is not valid JSON ({_short(e)})") from None


def _decode(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
