"""The recipe in the file: how fusecli made a model file, written into the file itself.

A recipe is a JSON object: fusecli's version, the command (`fuse`, `merge`), each source's file
name and SHA-256, and the options the command resolved (weights, method, parameters...). A
`.keras` file keeps it in `metadata.json` under the key `fusecli`; a `.h5` file in the root
attribute `fusecli` (a JSON string). Keras ignores both, so the file loads as before.

The sources are hashed in a thread while the command reads and writes tensors (hashlib releases
the GIL), so the hash costs little wall time; the recipe is written last (the `.keras` archive's
`metadata.json` after the weights, the `.h5` attribute when the weights are in).
"""

from __future__ import annotations

import hashlib
import json
import threading
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
    """A recipe whose sources are being hashed in a background thread; call it for the recipe.

    `hashed` are the files whose bytes are hashed (the inputs as read: the user's files, or the
    private copies the command read instead); `files` the names the recipe records.
    """

    def __init__(
        self,
        command: str,
        files: Sequence[str | Path],
        hashed: Sequence[Path],
        options: dict[str, Any],
    ) -> None:
        self._command, self._files, self._options = command, list(files), options
        self._hashed = list(hashed)
        self._digests: list[str] = []
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._hash, name="fusecli-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            self._digests = [sha256_file(p) for p in self._hashed]
        except OSError as e:
            self._error = e

    def __call__(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            path = Path(self._error.filename or self._hashed[0])
            raise ModelFileError(path, f"cannot be read to hash it ({self._error.strerror})")
        return make_recipe(self._command, self._files, self._digests, self._options)


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
