"""Writing result files safely: right extension, never over an input, atomically, and no
temporary file left behind, also when the process is interrupted (SIGINT) or terminated
(SIGTERM, SIGHUP: `fusecli.termination`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.files.modelfile import MODEL_FORMATS
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
