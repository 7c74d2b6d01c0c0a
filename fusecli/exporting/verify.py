"""Checking an exported artifact against the Keras model it came from, in the artifact's runtime.

The batch is random and large enough in spread that every output varies across its rows by more
than the format's round-off; a check on near-constant outputs (an untrained softmax) would pass
even if the artifact ignored its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusecli.errors import VerificationError
from fusecli.exporting.formats import ExportFormat
from fusecli.exporting.signature import Signature

# Rows in the check batch when the batch size is free; free dimensions other than the batch.
_ROWS = 4
_FREE_DIM = 8
# Input spreads tried in turn until every output varies across rows.
_SPREADS = (1.0, 10.0, 100.0)
_ROUNDING_ULPS = 4  # for half-precision outputs, whose one ulp is already more than 1e-4
# Outputs all smaller than this are held to round-off at this scale (exact zeros stay checkable).
_SMALLEST_SCALE = 1e-6

Runner = Callable[[Path, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class Check:
    rows: int
    max_abs_diff: float  # over all outputs
    tolerance: float  # of the output that came closest to its own tolerance
    outputs_vary: bool
    per_output: list[dict[str, Any]]  # name, max_abs_diff, tolerance


def check_export(signature: Signature, fmt: ExportFormat, run: Runner, path: Path) -> Check:
    """Run the artifact at `path` with `run` and compare with the Keras model; raise
    `VerificationError` if an output differs by more than `fmt.round_off` times its magnitude."""
    feeds, expected, varies, tolerances = _varying_batches(signature, fmt)
    worst = dict.fromkeys(tolerances, 0.0)
    for feed, want in zip(feeds, expected, strict=True):
        try:
            got = run(path, feed)
        except Exception as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise VerificationError(
                f"The exported {fmt.title} does not run in {fmt.runtime}: {detail}; it was not kept"
            ) from e
        for name, diff in _differences(got, want, fmt).items():
            worst[name] = max(worst[name], diff)
    closest = max(worst, key=lambda name: worst[name] / tolerances[name])
    if worst[closest] > tolerances[closest]:
        raise VerificationError(
            f"The exported {fmt.title} differs from the Keras model by up to "
            f"{worst[closest]:.3g} in output {closest!r} (tolerance {tolerances[closest]:.3g}, "
            f"run in {fmt.runtime}); it was not kept"
        )
    return Check(
        rows=sum(len(next(iter(f.values()))) for f in feeds),
        max_abs_diff=max(worst.values()),
        tolerance=tolerances[closest],
        outputs_vary=varies,
        per_output=[
            {"name": n, "max_abs_diff": worst[n], "tolerance": tolerances[n]} for n in worst
        ],
    )


def _varying_batches(
    signature: Signature, fmt: ExportFormat
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], bool, dict[str, float]]:
    """Feeds, the Keras outputs for them and each output's tolerance, with the narrowest input
    spread that makes every output vary; a fixed batch size of 1 gets two feeds, so that there
    are rows to compare."""
    rows = signature.batch_size or _ROWS
    count = 2 if rows == 1 else 1
    first = None
    for spread in _SPREADS:
        feeds = [_random_feed(signature, rows, spread, seed) for seed in range(count)]
        expected = [signature.call(feed) for feed in feeds]
        tolerances = {name: _tolerance(expected, name, fmt) for name in expected[0]}
        if _all_vary(expected, tolerances):
            return feeds, expected, True, tolerances
        first = first or (feeds, expected, False, tolerances)
    return first


def _random_feed(
    signature: Signature, rows: int, spread: float, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for t in signature.inputs:
        shape = [rows, *(_FREE_DIM if d is None else d for d in t.shape[1:])]
        try:
            dtype = np.dtype(t.dtype)
        except TypeError:
            dtype = np.dtype(object)
        if dtype.kind == "f":
            feed[t.name] = (spread * rng.standard_normal(shape)).astype(dtype)
        elif dtype.kind in "iu":  # 0s and 1s: valid indices for any embedding
            feed[t.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feed[t.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise VerificationError(
                f"Cannot make random input of dtype {t.dtype} for input {t.name!r} to check the "
                "export, so it was not kept; use --no-verify to export it unchecked"
            )
    return feed


def _tolerance(expected: list[dict[str, np.ndarray]], name: str, fmt: ExportFormat) -> float:
    """Round-off for one output: relative to its own largest value, so that a softmax over 1000
    classes (values near 0.001) is held to its own scale, not to 1."""
    values = np.concatenate([outputs[name].reshape(-1) for outputs in expected])
    rounding = fmt.round_off
    if values.dtype.kind == "f":
        rounding = max(rounding, _ROUNDING_ULPS * float(np.finfo(values.dtype).eps))
        values = values[np.isfinite(values)]
    magnitude = float(np.max(np.abs(values.astype(np.float64)))) if values.size else 0.0
    return rounding * max(magnitude, _SMALLEST_SCALE)


def _all_vary(expected: list[dict[str, np.ndarray]], tolerances: dict[str, float]) -> bool:
    for name, tolerance in tolerances.items():
        rows = np.concatenate([outputs[name] for outputs in expected]).astype(np.float64)
        rows = rows.reshape(len(rows), -1)
        if not np.isfinite(rows).all() or np.max(np.ptp(rows, axis=0)) <= 10 * tolerance:
            return False
    return True


def _differences(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], fmt: ExportFormat
) -> dict[str, float]:
    """The largest absolute difference of each output."""
    missing = [name for name in expected if name not in got]
    if missing:
        raise VerificationError(
            f"The exported {fmt.title} has no output named {missing[0]!r}. "
            f"Received: outputs {sorted(got)}; it was not kept"
        )
    worst = {}
    for name, want in expected.items():
        have = np.asarray(got[name])
        if have.shape != want.shape:
            raise VerificationError(
                f"Output {name!r} of the exported {fmt.title} has shape {have.shape}, the Keras "
                f"model's {want.shape}; it was not kept"
            )
        want64, have64 = want.astype(np.float64), have.astype(np.float64)
        if not np.array_equal(np.isfinite(want64), np.isfinite(have64)):
            raise VerificationError(
                f"Output {name!r} of the exported {fmt.title} is not finite where the Keras "
                "model's is (or the other way round); it was not kept"
            )
        finite = np.isfinite(want64)
        diffs = np.abs(have64[finite] - want64[finite])
        worst[name] = float(np.max(diffs)) if diffs.size else 0.0
    return worst
