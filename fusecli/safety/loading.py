"""Loading model files into Keras: the single door every command goes through.

A file is read once, into a private copy (hashed in that read, for the recipe in the files
fusecli writes): a folder only this user can open, which no one else can re-point or rewrite.
The copy is read and scanned without Keras in a child process (`fusecli.safety.scan`,
`fusecli.safety.isolation`); before Keras loads it, its HDF5 is rewritten by value in another
child (`fusecli.safety.rewrite`: Keras then reads only HDF5 that h5py wrote, so a file that
crashes or hangs HDF5 does so in a child), and Keras loads that copy, so what Keras sees is what
was scanned, whatever happens to the path meanwhile. (Keras' own loaders take a path or a file
object; a private path keeps to its public `load_model`, and lets the scanner, which reads
paths, read the very same bytes.)

A broken file raises `ModelFileError`, one that holds code `UnsafeModelError`, and whatever else
a file makes Keras raise becomes a `ModelFileError` too. Keras 2 era `.h5` files go through
`fusecli.formats.keras2`, which rewrites their config for Keras 3; Keras 3 `.h5` files that Keras'
own loader misreads (Attention's `score_mode="dot"`) through `fusecli.formats.keras3_h5`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusecli import runtime
from fusecli.errors import FusecliError, ModelFileError, known_cause
from fusecli.formats import keras2, keras3_h5
from fusecli.formats.modelfile import ModelFile, check_model_path
from fusecli.output import sweep_stale
from fusecli.safety.rewrite import rewrite_hdf5
from fusecli.safety.scan import refuse_unsafe_each
from fusecli.termination import cleanup_on_termination

if TYPE_CHECKING:
    import keras

_COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class CheckedFile:
    """A model file read once into a private copy (or pinned: see `checked_files`) and scanned
    there."""

    source: Path  # the path as the caller gave it: what messages name
    # The private copy, same file name, the input's bytes: what was scanned. For a pinned
    # input, a link in the private folder to the input as opened (its inode, whatever becomes
    # of its path).
    copy: Path
    model_file: ModelFile  # read from the copy (its `path` is the copy)
    # Of the input's bytes as read into the copy: the recipe's digest (None when pinned: hash
    # `copy`, then `check_unchanged`).
    sha256: str | None
    # The copy with its HDF5 rewritten by value: what Keras loads (None until Keras needs it).
    loadable: Path | None = None
    pinned: tuple[int, ...] | None = None  # a pinned input's identity when opened (`_identity`)

    def check_unchanged(self) -> None:
        """A pinned input still holds what it held when it was opened (same inode, size,
        modification and change times: any write changes the change time), else
        `ModelFileError`; call it after the last read, before keeping anything made from it.
        Nothing to check for a copy."""
        if self.pinned is None:
            return
        try:
            now = _identity(os.stat(self.copy))
        except OSError:
            now = None
        if now != self.pinned:
            raise ModelFileError(
                self.source, "changed while it was being read; the result was not kept"
            )


def load_model(path: str | os.PathLike[str], *, trust: bool = False) -> keras.Model:
    """Load a `.keras` or `.h5` model file (Keras 3, or Keras 2 era `.h5`), uncompiled.

    `trust=True` skips the scan for code and loads with safe_mode off; only for trusted files.
    Raises only `FusecliError`s (`ModelFileError` for anything wrong with the file).
    """
    with checked_files([path], trust=trust) as [checked]:
        return load_checked(checked, trust=trust)


@contextlib.contextmanager
def checked_files(
    paths: Sequence[str | os.PathLike[str]], *, trust: bool = False, for_keras: bool = True
) -> Iterator[list[CheckedFile]]:
    """Copy each file once into a private folder, read and scan each copy (in a child process);
    the copies are removed when the block ends, also on SIGTERM.

    Every file is checked before the block starts, so a bad file among several is reported
    before any slow work: with `for_keras`, that includes the rewrite of its HDF5 Keras will
    read. Callers whose files only fusecli's isolated children read, as files, pass False: each
    file is then pinned rather than copied (opened once; `copy` is a link in the private folder
    to that open file, which a file renamed over the path does not change), no rewrite is made
    unless Keras loads one after all, and the caller calls `check_unchanged` on each after its
    last read (a write into the file in place is then refused). Errors raised in the block that
    name a copy name the caller's path instead. Read `CheckedFile.copy`, never the caller's
    path, for anything that must be what the scan saw.
    """
    sources = [Path(p) for p in paths]
    with cleanup_on_termination(), _private_folder() as folder, contextlib.ExitStack() as pins:
        copied = [
            _private_copy(source, folder / str(i), pins if not for_keras else None)
            for i, source in enumerate(sources)
        ]
        copies = [copy for copy, _, _ in copied]
        names = dict(zip(copies, sources, strict=True))
        with _named_as_given(names):
            scanned = refuse_unsafe_each(copies, trust=trust)
            # What Keras will read: HDF5 that h5py wrote, from values, in a child.
            loadables = [rewrite_hdf5(copy) if for_keras else None for copy in copies]
        names.update((m, s) for m, s in zip(loadables, sources, strict=True) if m is not None)
        with _named_as_given(names):
            yield [
                CheckedFile(source, copy, model_file, digest, loadable, pinned)
                for source, (copy, digest, pinned), model_file, loadable in zip(
                    sources, copied, scanned, loadables, strict=True
                )
            ]


def load_checked(checked: CheckedFile, *, trust: bool = False) -> keras.Model:
    """Keras' load of a file `checked_files` has copied and passed, from that copy."""
    source = checked.source
    if source.suffix != source.suffix.lower():
        raise ModelFileError(
            source,
            f"Keras loads only files whose name ends in lower case; rename it to "
            f"{source.stem}{source.suffix.lower()}",
        )
    names = {checked.copy: source}
    with _named_as_given(names):
        clean = checked.loadable or rewrite_hdf5(checked.copy)
    loadable = dataclasses.replace(checked.model_file, path=clean)
    names[clean] = source
    with _named_as_given(names), keras_errors(source):
        if loadable.written_by_keras2 or loadable.keras2_archive:
            return keras2.load_keras2(loadable, trust=trust)
        keras = runtime.keras()
        if loadable.format == "h5" and keras3_h5.misread_layers(loadable.config):
            model = keras3_h5.load(loadable, trust=trust)
        else:
            model = keras.saving.load_model(clean, compile=False, safe_mode=not trust)
        if not isinstance(model, keras.Model):
            raise ModelFileError(source, f"holds a {type(model).__name__}, not a Keras model")
        return model


@contextlib.contextmanager
def keras_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Whatever Keras (or TensorFlow, h5py) raises in the block because of the model file at
    `path` becomes a `ModelFileError` naming it. Keras raises many types for broken files, and
    a config can make any of them happen (a RecursionError from deep nesting, a TypeError from
    a dtype...); to the user all mean the same: this file cannot be used."""
    try:
        yield
    except FusecliError:
        raise
    except RecursionError as e:
        raise ModelFileError(
            path,
            "is nested too deeply for Keras to load (Python's recursion limit was reached)",
        ) from e
    except MemoryError as e:
        raise ModelFileError(path, "cannot be loaded: it needs more memory than there is") from e
    except Exception as e:
        known = known_cause(e)
        if known is not None:
            raise ModelFileError(path, f"cannot be loaded: {known}") from e
        raise ModelFileError(path, f"cannot be loaded by Keras: {_first_line(e)}") from e


# -- the private copies ----------------------------------------------------------------------


@contextlib.contextmanager
def _private_folder() -> Iterator[Path]:
    try:
        sweep_stale(Path(tempfile.gettempdir()))  # what a killed run left
        folder = Path(tempfile.mkdtemp(prefix=f"fusecli-{os.getpid()}-"))  # 0700: this user only
    except OSError as e:
        raise FusecliError(
            f"Cannot make a private folder for the model files in {tempfile.gettempdir()} "
            f"({e.strerror or e}); set TMPDIR to a folder you can write to"
        ) from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _private_copy(
    source: Path, folder: Path, pins: contextlib.ExitStack | None = None
) -> tuple[Path, str | None, tuple[int, ...] | None]:
    """One read of `source` into `folder/<its name>`, and the SHA-256 of what was read (the
    recipe's: hashed in the same pass, not read again); the copy keeps the name, since Keras
    picks a format by the name's suffix. With `pins`, the file is pinned instead where this
    system allows (see `checked_files`): (link, None, its identity), its descriptor open until
    `pins` closes."""
    check_model_path(source)  # the usual messages: no such file, a folder, empty, unreadable...
    folder.mkdir()
    copy = folder / source.name
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ModelFileError(source, f"cannot be read ({e.strerror or e})") from None
    with open(fd, "rb") as src:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ModelFileError(source, "is not a regular file")
        if pins is not None:
            kept = os.dup(fd)  # the link's target: open until `pins` closes
            if _pin(kept, copy):
                pins.callback(os.close, kept)
                return copy, None, _identity(opened)
            os.close(kept)
        try:
            with open(copy, "xb") as dst:
                digest = _copy_bytes(src, dst)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise ModelFileError(source, f"cannot be read ({e.strerror or e})") from None
            raise ModelFileError(
                source,
                f"cannot be copied to a private folder in {folder.parent.parent} "
                f"({e.strerror}); set TMPDIR to a folder with room for it",
            ) from None
    return copy, digest, None


def _pin(fd: int, link: Path) -> bool:
    """Make `link` name the open file `fd` (through /proc/<pid>/fd: the very inode, for this
    process and its children, whatever becomes of the path it was opened by). False where
    this system has no such names."""
    target = f"/proc/{os.getpid()}/fd/{fd}"
    try:
        os.symlink(target, link)
        if _identity(os.stat(link))[:2] == _identity(os.fstat(fd))[:2]:
            return True
    except OSError:
        pass
    with contextlib.suppress(OSError):
        link.unlink()
    return False


def identity(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """`_identity` of the file at `path` now; None if it cannot be found."""
    try:
        return _identity(os.stat(path))
    except OSError:
        return None


def _identity(info: os.stat_result) -> tuple[int, ...]:
    """What any change to a file changes (its change time, which a write or `touch` sets and
    no one can set back without changing it again), and which file it is."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _copy_bytes(src: object, dst: object) -> str:
    """What the file holds, its holes kept holes: a sparse file (a 20 KB `.h5` declaring a
    1 GiB user block) costs its data, not its size, in `$TMPDIR`. Returns the SHA-256 (hex) of
    the bytes copied, holes read as the zeros they are: hashed in a thread beside the copy
    (hashlib lets other threads run), so a free core hashes while this one copies."""
    src_fd, dst_fd = src.fileno(), dst.fileno()  # type: ignore[attr-defined]
    size = os.fstat(src_fd).st_size
    digest = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=1) as hasher:  # one worker: in order
        copier = _Copier(src_fd, dst_fd, digest, hasher)
        done = 0  # copied (or a hole) up to here
        for start, end in _data_ranges(src_fd, size):
            copier.zeros(start - done)
            done = copier.copy(start, end)
            if done < end:
                break  # the file got shorter meanwhile: the copy is what was there
        copier.zeros(size - done)
    os.ftruncate(dst_fd, size)  # a hole at the end, as in the source
    return digest.hexdigest()


class _Copier:
    """Copies ranges of a file through two buffers: one is hashed while the other is filled."""

    def __init__(self, src_fd: int, dst_fd: int, digest: Any, hasher: ThreadPoolExecutor) -> None:
        self._src, self._dst, self._digest, self._hasher = src_fd, dst_fd, digest, hasher
        self._buffers = [memoryview(bytearray(_COPY_CHUNK)) for _ in range(2)]
        self._hashing: list[Future[None] | None] = [None, None]
        self._next = 0

    def copy(self, start: int, end: int) -> int:
        """Copy and hash [start, end); returns where the copy stopped (`end` unless the file
        got shorter meanwhile)."""
        os.lseek(self._dst, start, os.SEEK_SET)
        offset = start
        while offset < end:
            view = self._free()
            got = os.preadv(self._src, [view[: min(len(view), end - offset)]], offset)
            if not got:
                break
            self._hash(view[:got])
            written = 0
            while written < got:
                written += os.write(self._dst, view[written:got])
            offset += got
        return offset

    def zeros(self, count: int) -> None:
        """Hash `count` zero bytes (a hole: nothing to copy)."""
        while count > 0:
            view = self._free()
            step = min(count, len(view))
            view[:step] = bytes(step)
            self._hash(view[:step])
            count -= step

    def _free(self) -> memoryview:
        """The next buffer, once its last hash is done."""
        pending = self._hashing[self._next]
        if pending is not None:
            pending.result()
        return self._buffers[self._next]

    def _hash(self, view: memoryview) -> None:
        self._hashing[self._next] = self._hasher.submit(self._digest.update, view)
        self._next = 1 - self._next


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each stretch of data in the file; the whole file where the file system
    cannot tell data from holes."""
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                return
            yield offset, size  # holes not supported here
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        offset = end


@contextlib.contextmanager
def _named_as_given(copies: dict[Path, Path]) -> Iterator[None]:
    """Errors that name a private copy are about the caller's file: say so with its name."""
    try:
        yield
    except FusecliError as e:
        _rename(e, {str(copy): str(source) for copy, source in copies.items()})
        raise


def _rename(error: FusecliError, names: dict[str, str]) -> None:
    def renamed(text: str) -> str:
        for copy, source in names.items():
            text = text.replace(copy, source)
        return text

    if isinstance(error, ModelFileError):
        error.path = renamed(error.path)
        error.reason = renamed(error.reason)
    error.args = tuple(renamed(a) if isinstance(a, str) else a for a in error.args)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
