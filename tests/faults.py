"""Writer faults, defined at module level: the tensors are written in a child process (of the
helper, once Keras is imported), which gets these by name. Each stands in for
`fusecli.fusion.file_fusion._write_and_prove` (what the child runs), and runs the real one with
one of the writer's real functions replaced, in the process that writes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from fusecli.formats import archive, splice
from fusecli.fusion import file_fusion as files
from fusecli.fusion import flat_h5, writer
from fusecli.merging import merge as merging

_REAL_WRITE_AND_PROVE = files._write_and_prove
_REAL_WRITE_AND_PROVE_FLAT = files._write_and_prove_flat
_REAL_MERGE_WRITE = merging._write_and_verify


@dataclass
class _DamageOneTensor:
    """The first tensor written whose path in the output ends in `suffix` is damaged as it is
    written: by `archive.write_tensor` (tensors Keras loaded, .h5 outputs) or `archive.copy_group`
    (tensors copied from a file)."""

    suffix: str

    def damage(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, *args: Any) -> Any:
        hits = []
        real_write, real_copy = archive.write_tensor, archive.copy_group

        def damaged(name: str, values: np.ndarray) -> np.ndarray:
            if hits or not name.endswith(self.suffix):
                return values
            hits.append(name)
            return self.damage(values)

        def write_tensor(target: h5py.Group, name: str, values: np.ndarray) -> bytes:
            return real_write(target, name, damaged(f"{target.name}/{name}", values))

        def copy_group(source: h5py.Group, target: h5py.Group, skip: Any = ()) -> list[str]:
            names = real_copy(source, target, skip)
            for name in names:
                dataset = target[name]
                values = np.asarray(dataset[()])
                changed = damaged(dataset.name, values)
                if changed is not values:
                    dataset[()] = changed
            return names

        with (
            _replaced(archive, "write_tensor", write_tensor),
            _replaced(archive, "copy_group", copy_group),
        ):
            return _REAL_WRITE_AND_PROVE(*args)


class FlipOneBit(_DamageOneTensor):
    """One bit of one byte of the first tensor whose path ends in `suffix`."""

    def damage(self, values: np.ndarray) -> np.ndarray:
        damaged = values.copy()
        damaged.reshape(-1).view(np.uint8)[3] ^= 0x01
        return damaged


class AddOne(_DamageOneTensor):
    """+1 on the first tensor whose path ends in `suffix`."""

    def damage(self, values: np.ndarray) -> np.ndarray:
        return values + 1


def swap_alike_branches(*args: Any) -> Any:
    """Two alike branches' weight groups swapped: every tensor still equals a source."""
    right = writer.class_keys

    def swapped(class_names: Iterable[str]) -> list[str]:
        keys = right(class_names)
        first, second = [i for i, k in enumerate(keys) if k.startswith("functional")][:2]
        keys[first], keys[second] = keys[second], keys[first]
        return keys

    with _replaced(writer, "class_keys", swapped):
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

    with _replaced(writer, "write_h5", reversed_list):
        return _REAL_WRITE_AND_PROVE(*args)


def list_flat_h5_layers_reversed(*args: Any) -> Any:
    """A flat .h5 output (`_write_and_prove_flat`) whose `layer_names` is reversed."""
    right = flat_h5.write

    def reversed_list(tmp: Any, *rest: Any) -> Any:
        written = right(tmp, *rest)
        with h5py.File(tmp, "r+") as h5:
            group = h5[writer.H5_WEIGHTS]
            group.attrs["layer_names"] = group.attrs["layer_names"][::-1]
        return written

    with _replaced(flat_h5, "write", reversed_list):
        return _REAL_WRITE_AND_PROVE_FLAT(*args)


@dataclass
class FlatAddOne:
    """A flat .h5 output (`_write_and_prove_flat`) whose first tensor ending in `suffix` is
    written +1."""

    suffix: str

    def __call__(self, *args: Any) -> Any:
        right = flat_h5.write

        def damaged(tmp: Any, *rest: Any) -> Any:
            written = right(tmp, *rest)
            with h5py.File(tmp, "r+") as h5:
                names: list[str] = []
                h5[writer.H5_WEIGHTS].visit(names.append)
                name = next(n for n in names if n.endswith(self.suffix))
                dataset = h5[writer.H5_WEIGHTS][name]
                dataset[()] = np.asarray(dataset[()]) + 1
            return written

        with _replaced(flat_h5, "write", damaged):
            return _REAL_WRITE_AND_PROVE_FLAT(*args)


@dataclass
class ReplaceBeforeWriting:
    """Another process saves `source` over `target` (an input) just before the tensors are read."""

    source: str
    target: str

    def __call__(self, *args: Any) -> Any:
        os.replace(self.source, self.target)
        return _REAL_WRITE_AND_PROVE(*args)


@dataclass
class SpliceFlipsOneBit:
    """Stands in for `merging._write_and_verify`: one bit of the `index`-th tensor a `.keras`
    merge writes into its template's bytes flips after the tensor was hashed."""

    index: int

    def __call__(self, *args: Any) -> Any:
        right = splice.SplicedWeights._fill
        seen = []

        def fill(weights: splice.SplicedWeights, block: splice.Block) -> memoryview:
            data = right(weights, block)
            seen.append(block.index)
            if len(seen) - 1 != self.index:
                return data
            damaged = bytearray(data)
            damaged[0] ^= 0x01
            return memoryview(damaged)

        with _replaced(splice.SplicedWeights, "_fill", fill):
            return _REAL_MERGE_WRITE(*args)


@contextlib.contextmanager
def _replaced(module: Any, name: str, replacement: Any) -> Iterator[None]:
    right = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, right)
