"""Writing result files safely: right extension, never over an input, atomically, and no
temporary file left behind, also when the process is interrupted (SIGINT) or terminated
(SIGTERM, SIGHUP: `fusecli.termination`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.formats.modelfile import MODEL_FORMATS
from fusecli.termination import cleanup_on_termination


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
        if not force:
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
    with cleanup_on_termination():
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
        tmp = Path(tmp_name)
        try:
            os.close(fd)
            yield tmp
            _move_into_place(tmp, path, force=force)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


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
    with cleanup_on_termination():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            yield tmp
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
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    os.replace(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
