"""Which inputs a fused model takes: one set fed to every model, or each model's own.

Decided for the fused graph (`graph.py`), which both ways of fusing (files, loaded models) build.
`auto` shares the inputs when every model declares the same ones (shapes and dtypes equal);
`shared` also accepts shapes that are compatible, dimension by dimension equal or open in one of
them (`(None, None, 1)` and `(None, 4, 1)`): the shared input then takes the more specific
shape, which every model accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusecli.errors import FusecliError

Dim = int | None
# One model's inputs: (name, batch shape, dtype) each.
Signature = Sequence[tuple[str, Sequence[Dim], str]]


def choose_mode(
    requested: str, signatures: Sequence[Signature], names: Sequence[str]
) -> tuple[str, str, list[tuple[Dim, ...]] | None]:
    """(mode, why, the shared inputs' shapes or None) for `--inputs auto|shared|separate`."""
    if requested == "separate":
        return "separate", "asked for", None
    exact = _first_mismatch(signatures, names, unify=False)
    if requested == "shared":
        mismatch = _first_mismatch(signatures, names, unify=True)
        if mismatch:
            raise FusecliError(f"Cannot share inputs: {mismatch}. Use --inputs separate")
        return "shared", "asked for", shared_shapes(signatures)
    if exact:
        return "separate", exact, None
    return "shared", "all models take the same inputs", shared_shapes(signatures)


def unify(a: Sequence[Any], b: Sequence[Any]) -> tuple[Dim, ...] | None:
    """The most specific shape both accept, or None if they are incompatible."""
    if len(a) != len(b):
        return None
    out: list[Dim] = []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None or x == y:
            out.append(x if y is None else y)
        else:
            return None
    return tuple(out)


def shared_shapes(signatures: Sequence[Signature]) -> list[tuple[Dim, ...]]:
    shapes = [tuple(shape) for _, shape, _ in signatures[0]]
    for signature in signatures[1:]:
        shapes = [unify(s, shape) or s for s, (_, shape, _) in zip(shapes, signature, strict=True)]
    return shapes


def _first_mismatch(
    signatures: Sequence[Signature], names: Sequence[str], *, unify: bool
) -> str | None:
    first = signatures[0]
    for name, signature in zip(names[1:], signatures[1:], strict=True):
        if len(signature) != len(first):
            return f"{names[0]!r} takes {len(first)} inputs, {name!r} takes {len(signature)}"
        for k, ((_, s0, d0), (_, s, d)) in enumerate(zip(first, signature, strict=True)):
            same = tuple(s0) == tuple(s) or (unify and _unify(s0, s) is not None)
            if not same or d0 != d:
                return f"input {k} of {names[0]!r} is {_fmt(s0)} {d0}, of {name!r} {_fmt(s)} {d}"
    return None


_unify = unify


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
