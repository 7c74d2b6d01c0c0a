"""Writer faults, defined at module level: the tensors are written in a child process (of the
helper, once Keras is imported), which gets these by name. The first ones go in
`fusecli.formats.archive.fault`; the last ones stand in for
`fusecli.fusion.file_fusion._write_and_prove`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from fusecli.fusion import file_fusion as files
from fusecli.fusion import writer


@dataclass
class FlipOneBit:
    """One bit of one byte of the first tensor whose path ends in `suffix`."""

    suffix: str
    hits: int = 0

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.hits or not name.endswith(self.suffix):
            return values
        self.hits += 1
        damaged = values.copy()
        damaged.reshape(-1).view(np.uint8)[3] ^= 0x01
        return damaged


@dataclass
class AddOne:
    """+1 on the first tensor whose path ends in `suffix`."""

    suffix: str
    hits: int = 0

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.hits or not name.endswith(self.suffix):
            return values
        self.hits += 1
        return values + 1


# Faults in the writer itself, for `fusecli.fusion.file_fusion._write_and_prove` (what the child
# runs):
# each runs the real one with one writer function replaced, in the process that writes.
_REAL_WRITE_AND_PROVE = files._write_and_prove


def swap_alike_branches(*args: Any) -> Any:
    """Two alike branches' weight groups swapped: every tensor still equals a source."""
    right = writer.keras_keys

    def swapped(layer_order: list[tuple[str, str]]) -> list[str]:
        keys = right(layer_order)
        first, second = [i for i, k in enumerate(keys) if k.startswith("functional")][:2]
        keys[first], keys[second] = keys[second], keys[first]
        return keys

    with _replaced("keras_keys", swapped):
        return _REAL_WRITE_AND_PROVE(*args)


def list_h5_branches_reversed(*args: Any) -> Any:
    """A .h5 output whose `layer_names` lists the branches in reverse order."""
    right = writer.write_h5

    def reversed_list(tmp: Any, *rest: Any) -> Any:
        written = right(tmp, *rest)
        with h5py.File(tmp, "r+") as h5:
            group = h5[writer.H5_WEIGHTS]
            group.attrs["layer_names"] = group.attrs["layer_names"][::-1]
        return written

    with _replaced("write_h5", reversed_list):
        return _REAL_WRITE_AND_PROVE(*args)


@dataclass
class ReplaceBeforeWriting:
    """Another process saves `source` over `target` (an input) just before the tensors are read."""

    source: str
    target: str

    def __call__(self, *args: Any) -> Any:
        os.replace(self.source, self.target)
        return _REAL_WRITE_AND_PROVE(*args)


@contextlib.contextmanager
def _replaced(name: str, replacement: Any) -> Iterator[None]:
    right = getattr(writer, name)
    setattr(writer, name, replacement)
    try:
        yield
    finally:
        setattr(writer, name, right)
