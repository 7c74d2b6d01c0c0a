"""The recipe in the file: how fusecli made a model file, written into the file itself.

A recipe is a JSON object: fusecli's version, the command (`fuse`, `merge`), each source's file
name and SHA-256, and the options the command resolved (weights, method, parameters...). A
`.keras` file keeps it in `metadata.json` under the key `fusecli`; a `.h5` file in the root
attribute `fusecli` (a JSON string). Keras ignores both, so the file loads as before.

The sources are hashed as they are read into private copies (`fusecli.safety.loading`), or else
in a forked process while the command reads and writes tensors; the recipe is written last (the
`.keras` archive's `metadata.json` after the weights, the `.h5` attribute when the weights are
in).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py

from fusecli.errors import ModelFileError
from fusecli.formats.archive import METADATA_MEMBER
from fusecli.formats.modelfile import open_archive

KEY = "fusecli"  # the metadata.json key and the .h5 root attribute
_CHUNK = 1 << 20

# What writers take: a function giving the recipe once the sources are hashed.
Recipe = Callable[[], dict[str, Any]]


def make_recipe(
    command: str, files: Sequence[str | Path], digests: Sequence[str], options: dict[str, Any]
) -> dict[str, Any]:
    """A recipe: `files` are the sources as given (only their names are kept, not the folders
    they were in), `digests` their SHA-256 in hex."""
    from fusecli import __version__

    return {
        "version": __version__,
        "command": command,
        "sources": [
            {"file": Path(f).name, "sha256": d} for f, d in zip(files, digests, strict=True)
        ],
        "options": options,
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()


class Pending:
    """A recipe whose sources are being hashed meanwhile; call it for the recipe.

    The hashing runs in a forked process: h5py holds the GIL through a whole HDF5 copy, so a
    thread would wait for the copy instead of running beside it. `hashed` are the files whose
    bytes are hashed (the inputs as read: the user's files, or the private copies the command
    read instead); `files` the names the recipe records. Where a digest is known already
    (computed as the input was read into a private copy: `CheckedFile.sha256`), pass it in
    `digests` (None where not): that file is not read again.
    """

    def __init__(
        self,
        command: str,
        files: Sequence[str | Path],
        hashed: Sequence[Path],
        options: dict[str, Any],
        *,
        digests: Sequence[str | None] | None = None,
    ) -> None:
        self._command, self._files, self._options = command, list(files), options
        known = list(digests) if digests is not None else [None] * len(hashed)
        self._known = known
        self._hashed = [path for path, digest in zip(hashed, known, strict=True) if digest is None]
        self._result: list[str] | OSError | None = None
        self._pid, self._pipe = _start(self._hashed) if self._hashed else (0, -1)

    def __call__(self) -> dict[str, Any]:
        if self._result is None:
            self._result = _finish(self._pid, self._pipe, self._hashed) if self._hashed else []
        if isinstance(self._result, OSError):
            error = self._result
            path = Path(error.filename or self._hashed[0])
            raise ModelFileError(path, f"cannot be read to hash it ({error.strerror})")
        hashed = iter(self._result)
        digests = [digest if digest is not None else next(hashed) for digest in self._known]
        return make_recipe(self._command, self._files, digests, self._options)


def _start(paths: list[Path]) -> tuple[int, int]:
    """Fork a process that writes the files' digests (JSON) to a pipe; (pid, read end), or
    (0, -1) where this process cannot fork (the digests are then computed when asked)."""
    try:
        read, write = os.pipe()
        pid = os.fork()
    except OSError:
        return 0, -1
    if pid:
        os.close(write)
        return pid, read
    status = 0
    try:  # the child: hash, answer, leave without running anything of the parent's
        os.close(read)
        try:
            answer: Any = [sha256_file(p) for p in paths]
        except OSError as e:
            answer = {"filename": e.filename, "errno": e.errno, "strerror": e.strerror}
        data = json.dumps(answer).encode("utf-8")
        while data:
            data = data[os.write(write, data) :]
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _finish(pid: int, pipe: int, paths: list[Path]) -> list[str] | OSError:
    if pid == 0:
        try:
            return [sha256_file(p) for p in paths]
        except OSError as e:
            return e
    chunks = []
    with open(pipe, "rb", closefd=True) as f:
        while chunk := f.read(1 << 16):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        return OSError(0, "the process hashing the inputs ended unexpectedly", str(paths[0]))
    if isinstance(answer, dict):
        return OSError(answer.get("errno") or 0, answer.get("strerror"), answer.get("filename"))
    return [str(d) for d in answer]


def keras_metadata(metadata: dict[str, Any], recipe: Recipe) -> bytes:
    """`metadata.json` with the recipe under `KEY` (an older recipe there is replaced)."""
    return json.dumps({**metadata, KEY: recipe()}).encode("utf-8")


def write_h5_recipe(h5: h5py.File, recipe: Recipe) -> None:
    h5.attrs[KEY] = json.dumps(recipe())


def read_recipe(path: str | Path, fmt: str) -> Any:
    """The recipe stored in a model file (None if there is none). It is file data, unchecked:
    any JSON value (a file written by hand may hold anything there)."""
    path = Path(path)
    try:
        if fmt == "keras":
            with open_archive(path) as archive:  # checked: no bomb, one member per name
                if METADATA_MEMBER not in archive.namelist():
                    return None
                metadata = json.loads(archive.read(METADATA_MEMBER))
            return metadata.get(KEY) if isinstance(metadata, dict) else None
        with h5py.File(path, "r") as h5:
            value = h5.attrs.get(KEY)
    except (OSError, ValueError, RecursionError, zipfile.BadZipFile, RuntimeError) as e:
        raise ModelFileError(path, f"its recipe cannot be read ({e})") from None
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        return json.loads(str(value))
    except ValueError:
        return str(value)  # shown as it is: not a recipe fusecli wrote
