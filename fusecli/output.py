"""Writing result files safely: right extension, never over an input, atomically, and no
temporary file left behind, also when the process is interrupted (SIGINT) or terminated
(SIGTERM, SIGHUP: `fusecli.termination`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.formats.modelfile import MODEL_FORMATS
from fusecli.termination import cleanup_on_termination

# Every temporary name fusecli makes starts so, then its process id: what a run killed by
# SIGKILL (no cleanup can run) leaves behind, the next run removes (`sweep_stale`).
TEMP_PREFIX = ".fusecli-"
# Of an output's name, what a temporary name beside it keeps: the rest of that name (prefix,
# process id, mkstemp's random part, a suffix) takes under 60 of a file name's 255 bytes.
_TEMP_STEM_BYTES = 180
_STALE = re.compile(r"\.?fusecli-(\d+)-")
# Why a write fails that is no bug of ours: the disk, the folder, the limits.
_WRITE_ERRNOS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
    errno.EPERM: "Operation not permitted",
    errno.EIO: "Input/output error",
    errno.ELOOP: "Too many levels of symbolic links",
}
# Libraries that report them in text (HDF5: "errno = 28"; TensorFlow: the strerror).
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def model_format(path: str | os.PathLike[str]) -> str:
    """'keras' or 'h5', from the output path's extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in MODEL_FORMATS:
        raise InvalidRequest(
            "The output must end in .keras, .h5 or .hdf5 (that picks the format). "
            f"Received: output={str(path)!r}"
        )
    if Path(path).suffix != suffix:  # Keras refuses OUT.KERAS: "File format not supported"
        raise InvalidRequest(
            "The output's extension must be lower case: Keras loads only files whose name ends "
            f"in {suffix}. Received: output={str(path)!r}"
        )
    return MODEL_FORMATS[suffix]


def check_output_path(
    path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]], force: bool
) -> Path:
    """Refuse, before any work is done, to write where we must not."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FusecliError(f"{path}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise FusecliError(f"{path}: is a directory")
    if path.exists():
        for source in inputs:
            with contextlib.suppress(OSError):
                if os.path.samefile(path, source):
                    raise FusecliError(f"{path}: is one of the input files; choose another output")
    _refuse_link(path)
    if path.exists() and not force:
        raise FusecliError(f"{path}: already exists (use --force to replace it)")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    Without `force`, the final step is a hard link, which fails rather than replace a file that
    appeared in the meantime. Files the block writes beside the temporary path must be removed
    by the block's own `finally`; a termination signal runs it (`cleanup_on_termination`).
    """
    path = Path(path)
    # Keras picks a format by a lower-case extension only (OUT.KERAS is "not supported").
    suffix = path.suffix.lower()
    with cleanup_on_termination(), writing(path):
        sweep_stale(path.parent)
        sweep_stale(Path(tempfile.gettempdir()))
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=suffix)
        tmp = Path(tmp_name)
        try:
            os.close(fd)
            with _disk_checked(tmp):
                yield tmp
            _refuse_link(path)
            _move_into_place(tmp, path, force=force)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def temp_prefix(path: Path) -> str:
    """The start of a temporary name beside `path`: `.fusecli-<pid>-<name>.`, the name cut so
    that the whole temporary name fits where `path`'s does (255 bytes on most file systems)."""
    stem = path.stem.encode("utf-8")[:_TEMP_STEM_BYTES].decode("utf-8", errors="ignore")
    return f"{TEMP_PREFIX}{os.getpid()}-{stem}."


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """A write that fails for a reason of the disk or the folder (full, too large for the
    file size limit, read-only, not permitted) becomes one `FusecliError` naming `path` and the
    OS's reason, wherever in the block (Keras' save, h5py, TensorFlow) it was raised."""
    try:
        yield
    except Exception as e:
        reason = _write_failure(e, Path(path))
        if reason is None:
            raise
        raise FusecliError(f"{path}: cannot be written ({reason})") from None


@contextlib.contextmanager
def _disk_checked(tmp: Path) -> Iterator[None]:
    """A writer that fails on a full disk without saying so (HDF5 may crash once a write has
    failed, in the child process that writes) still failed for the disk: told by looking."""
    try:
        yield
    except Exception as e:
        refused = _disk_refused(tmp)
        if refused is None:
            raise
        raise OSError(refused, os.strerror(refused)) from e


# A file this close to the size limit, or a folder with this little room, was stopped by it.
_NEAR_LIMIT = 1 << 20


def _disk_refused(tmp: Path) -> int | None:
    """EFBIG if `tmp` (a file, or a folder's files) reached the process's file size limit,
    ENOSPC if its file system is (nearly) full, else None."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError):
            files = [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]
            if any(f.stat().st_size + _NEAR_LIMIT >= soft for f in files):
                return errno.EFBIG
    with contextlib.suppress(OSError):
        room = os.statvfs(tmp.parent)
        if room.f_bavail * room.f_frsize < _NEAR_LIMIT:
            return errno.ENOSPC
    return None


def _write_failure(error: BaseException, path: Path) -> str | None:
    """The OS's reason, if `error` (or what caused it) is a write into `path`'s folder that the
    disk or the folder refused. A `FusecliError`'s own text is ours (it may quote an input's
    failure), so only what caused it is looked at."""
    folder = os.path.abspath(path.parent)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            name = current.filename
            if name is None or os.path.abspath(os.fsdecode(name)).startswith(folder):
                return current.strerror or _WRITE_ERRNOS[current.errno]
        elif not isinstance(current, FusecliError):
            text = str(current)
            match = _ERRNO_IN_TEXT.search(text)
            if match and int(match.group(1)) in _WRITE_ERRNOS:
                return _WRITE_ERRNOS[int(match.group(1))]
            for reason in _WRITE_ERRNOS.values():
                if reason in text:
                    return reason
        current = current.__cause__ or current.__context__
    return None


def sweep_stale(folder: Path) -> None:
    """Remove what a fusecli process killed by SIGKILL left in `folder` (temporary outputs,
    scratch folders, private copies): entries named `[.]fusecli-<pid>-...`, owned by this user,
    whose process no longer runs. A run that cannot remove one leaves it."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def _refuse_link(path: Path) -> None:
    """An output that is a symbolic link is refused: writing through it would put the result
    somewhere the command line does not name, and replacing it would drop the link."""
    if path.is_symlink():
        raise FusecliError(
            f"{path}: is a symbolic link (to {os.readlink(path)!r}); fusecli does not write "
            "through links: remove it or choose another output"
        )


def _move_into_place(tmp: Path, path: Path, *, force: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    if force:
        os.replace(tmp, path)
    else:
        _move_no_clobber(tmp, path)


def _move_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FusecliError(f"{path}: already exists (use --force to replace it)") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FusecliError(f"{path}: already exists (use --force to replace it)") from None
        os.replace(tmp, path)


def check_output_dir(
    path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]], force: bool
) -> Path:
    """`check_output_path` for an output that is a directory (a SavedModel)."""
    path = Path(path)
    _refuse_link(path)
    if not path.parent.is_dir():
        raise FusecliError(f"{path}: the folder {str(path.parent)!r} does not exist")
    if path.exists() and not path.is_dir():
        raise FusecliError(f"{path}: exists and is not a directory")
    for source in inputs:
        with contextlib.suppress(OSError):
            inside = Path(source).resolve().is_relative_to(path.resolve())
            if inside:
                raise FusecliError(f"{path}: holds one of the input files; choose another output")
    if path.exists() and not force:
        raise FusecliError(f"{path}: already exists (use --force to replace it)")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], *, force: bool) -> Iterator[Path]:
    """`atomic_output` for a directory: yield an empty temporary directory beside `path`; move it
    into place only if the block succeeds (with `force`, the old directory is removed after)."""
    path = Path(path)
    with cleanup_on_termination(), writing(path):
        sweep_stale(path.parent)
        sweep_stale(Path(tempfile.gettempdir()))
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=temp_prefix(path)))
        try:
            with _disk_checked(tmp):
                yield tmp
            _refuse_link(path)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            _move_dir(tmp, path, force=force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _move_dir(tmp: Path, path: Path, *, force: bool) -> None:
    if not path.exists():
        os.rename(tmp, path)  # fails rather than replace a directory that is not empty
        return
    if not force:
        raise FusecliError(f"{path}: already exists (use --force to replace it)")
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{temp_prefix(path)}old."))
    try:
        os.replace(path, old)
    except OSError:
        old.rmdir()
        raise
    try:
        os.rename(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
