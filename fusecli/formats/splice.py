"""A `.keras` weights member made by replacing the tensors' bytes in a copy of another's.

When a written file has exactly its template's HDF5 structure (the same variables in the same
dtypes, nothing dropped), its `model.weights.h5` is the template's, byte for byte, but for each
variable's data block: no HDF5 object is made or copied, each tensor is written once, in the
order of the file, as it is computed, and checksummed (CRC-32) on the way. `verify` reads the
written file back both ways: by HDF5 (every variable where the template had it, of its shape and
dtype) and by bytes (each block holding what was computed, every other byte the template's).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.errors import VerificationError
from fusecli.formats.archive import RawTensors
from fusecli.formats.modelfile import WEIGHTS_MEMBER, open_weights
from fusecli.formats.weights_layout import TRAINING_STATE_GROUPS, Variable

Progress = Callable[[int, int], None]

# Bytes of the template read at a time between two blocks (its HDF5 metadata).
_GAP_CHUNK = 1 << 20


@dataclass(frozen=True)
class Block:
    """Where a variable's values sit in a weights member: one plain run of bytes."""

    index: int  # the variable's place in the layout
    position: int  # from the start of the HDF5 file
    size: int


@dataclass(frozen=True)
class Splice:
    """A template's weights member, and its variables' blocks in file order."""

    template: Path
    start: int  # where the member's bytes start in the template file
    size: int
    blocks: list[Block]


def find_splice(
    path: Path, group: h5py.Group, raw: RawTensors, variables: Sequence[Variable]
) -> Splice | None:
    """How to write a file as the template at `path` (a .keras file, open as `group` and `raw`)
    with its variables' values replaced; None when a written file cannot be the template's
    bytes (training state to drop, a variable chunked, compressed or empty, the weights member
    compressed)."""
    start = raw.start
    if start is None or any(key in group for key in TRAINING_STATE_GROUPS):
        return None
    blocks = []
    for k, variable in enumerate(variables):
        dsid, found = raw.locate(group, variable.dataset)
        if found is None or found[1] != variable.nbytes or dsid.shape != variable.shape:
            return None
        blocks.append(Block(k, found[0] - start, found[1]))
    blocks.sort(key=lambda b: b.position)
    size = _member_size(path)
    end = 0
    for block in blocks:
        if block.position < end:
            return None  # overlapping blocks: no file Keras writes
        end = block.position + block.size
    if end > size:
        return None
    return Splice(path, start, size, blocks)


class SplicedWeights:
    """The template's weights member as a stream (`read`), each block's bytes replaced by the
    tensors `tensors` yields, one per block in file order. `digests[k]` is variable k's digest
    once its tensor went by."""

    def __init__(
        self,
        splice: Splice,
        variables: Sequence[Variable],
        tensors: Iterator[np.ndarray],
        progress: Progress | None = None,
    ) -> None:
        self._splice, self._variables, self._tensors = splice, variables, tensors
        self.size = splice.size  # read by the archive writer: ZIP64 where it must
        self._fd = os.open(splice.template, os.O_RDONLY)
        self._progress = progress
        self._total = sum(b.size for b in splice.blocks)
        self._done = self._pos = self._next = 0
        self._pending = memoryview(b"")  # the rest of the block being written
        self.digests: list[int] = [0] * len(variables)  # CRC-32 of each tensor's bytes

    def __enter__(self) -> SplicedWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def read(self, size: int = -1) -> bytes | memoryview:
        """The next bytes of the member (at most `size`, and not across a block's edge)."""
        size = _GAP_CHUNK if size < 0 else size
        blocks = self._splice.blocks
        if not self._pending and self._next < len(blocks):
            block = blocks[self._next]
            if self._pos == block.position:
                self._pending = self._fill(block)
                self._next += 1
        if self._pending:
            piece, self._pending = self._pending[:size], self._pending[size:]
            self._pos += len(piece)
            return piece
        end = blocks[self._next].position if self._next < len(blocks) else self.size
        n = min(size, end - self._pos)
        if n <= 0:
            return b""
        piece = os.pread(self._fd, n, self._splice.start + self._pos)
        if len(piece) != n:
            raise OSError("the template is shorter than its weights member")
        self._pos += n
        return piece

    def _fill(self, block: Block) -> memoryview:
        variable = self._variables[block.index]
        values = np.asarray(next(self._tensors), dtype=variable.dtype, order="C")
        if values.shape != variable.shape:
            raise AssertionError(f"tensor {block.index} has shape {values.shape}")
        data = values.reshape(-1).view(np.uint8)
        self.digests[block.index] = zlib.crc32(data)
        self._done += block.size
        if self._progress is not None:
            self._progress(self._done, self._total)
        return memoryview(data)


def verify(
    path: Path, splice: Splice, variables: Sequence[Variable], digests: Sequence[int]
) -> None:
    """Read the written file at `path` back: HDF5 finds every variable at its block, of its
    shape and dtype; each block's bytes have the checksum of what was computed (`digests`, by
    variable); every byte outside the blocks is the template's, so the file has the template's
    structure and nothing more."""
    with open_weights(path) as group, RawTensors(path) as raw:
        start = raw.start
        for block in splice.blocks:
            variable = variables[block.index]
            try:
                dsid, found = raw.locate(group, variable.dataset)
                same = dsid.shape == variable.shape and _same_dtype(dsid.dtype, variable.dtype)
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise VerificationError(
                    f"Weight {block.index} (layer {variable.layer!r}) cannot be read back "
                    f"({e}); the file was not kept"
                ) from None
            if start is None or found != (start + block.position, block.size) or not same:
                raise VerificationError(
                    f"Weight {block.index} (layer {variable.layer!r}) is not where it was "
                    "written; the file was not kept"
                )
    if _member_size(path) != splice.size:
        raise VerificationError(
            "The written file's weights differ in size from its template's; the file was not kept"
        )
    buffer = bytearray(max((b.size for b in splice.blocks), default=0))
    with open(path, "rb", buffering=0) as written, open(splice.template, "rb", buffering=0) as t:
        position = 0
        for block in [*splice.blocks, None]:
            end = splice.size if block is None else block.position
            if _pread(written, start + position, end - position) != _pread(
                t, splice.start + position, end - position
            ):
                raise VerificationError(
                    "The written file's HDF5 structure differs from its template's; the file "
                    "was not kept"
                )
            if block is None:
                break
            view = memoryview(buffer)[: block.size]
            if os.preadv(written.fileno(), [view], start + block.position) != block.size or (
                zlib.crc32(view) != digests[block.index]
            ):
                variable = variables[block.index]
                raise VerificationError(
                    f"Weight {block.index} (layer {variable.layer!r}) reads back different "
                    "from what was computed; the file was not kept"
                )
            position = block.position + block.size


def _same_dtype(stored: np.dtype, expected: np.dtype) -> bool:
    """Keras stores bfloat16 as 2 opaque bytes (see `weights_layout._dtype`)."""
    if expected.name == "bfloat16":
        return stored.kind == "V" and stored.itemsize == 2
    return stored == expected


def _member_size(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return archive.getinfo(WEIGHTS_MEMBER).file_size


def _pread(f: Any, position: int, size: int) -> bytes:
    data = os.pread(f.fileno(), size, position)
    if len(data) != size:
        raise VerificationError("The written file is shorter than its weights; it was not kept")
    return data
