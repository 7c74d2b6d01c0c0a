"""Score arrays: reading and writing .npy files and streams in row chunks, and their weighted sum.

A score array is a .npy file whose first axis is rows (samples), e.g. (N, classes), or one array
of a .npz (`scores.npz:NAME`, or a .npz holding one array; `predict` writes one array per output
of a model with several). Files, .npz members and stdin (`-`) are read the same way: the .npy
header is parsed, then rows are read chunk by chunk into a reused buffer, so arrays of any size -
and pipes, which cannot be memory-mapped - go through in bounded memory. Plain reads rather than
a memory map keep the process' resident memory bounded too: pages of a map stay resident (and
counted) until it is closed.

    combine_scores(["a.npy", "b.npy"], "fused.npy", weights=(0.6, 0.4), labels="y.npy")
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format

from fusecli.coefficients import resolve_weights
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.output import atomic_output, check_output_path

STDIO = "-"
# Bytes of all inputs read per step: large enough for fast I/O, small against any RAM.
DEFAULT_CHUNK_BYTES = 32 * 1024 * 1024
NUMERIC_KINDS = "biuf"


@dataclass
class ScoreReader:
    """One score array, read once from the start in row chunks; see `open_scores`."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: BinaryIO | None = None
    fortran: bool = False  # a Fortran-ordered file (seekable), read column block by block
    _data_start: int = 0
    _rows_read: int = 0

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    def read_rows(self, count: int) -> np.ndarray:
        """The next `count` rows (fewer at the end), as a new array."""
        start = self._rows_read
        count = max(0, min(count, self.rows - start))
        self._rows_read += count
        if self.fortran:
            return self._read_fortran_rows(start, count)
        out = np.empty((count, *self.shape[1:]), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        got = 0
        while got < len(view):
            n = self.stream.readinto(view[got:])
            if not n:
                raise FusecliError(
                    f"{self.name}: the .npy data ends early (expected {self.rows} rows of "
                    f"{self.row_bytes} bytes, it stops in row {start + got // self.row_bytes})"
                )
            got += n
        return out

    def read_all(self) -> np.ndarray:
        return self.read_rows(self.rows - self._rows_read)

    def _read_fortran_rows(self, start: int, count: int) -> np.ndarray:
        """Rows of a Fortran-ordered file: each of its columns holds `count` contiguous values.

        Plain reads of one run per column keep memory to the chunk (a map would stay resident).
        """
        columns = math.prod(self.shape[1:])
        block = np.empty((columns, count), dtype=self.dtype)
        size = self.dtype.itemsize
        for j in range(columns if count else 0):
            self.stream.seek(self._data_start + (j * self.rows + start) * size)
            view = memoryview(block[j].view(np.uint8))
            got = 0
            while got < len(view):
                n = self.stream.readinto(view[got:])
                if not n:
                    raise FusecliError(f"{self.name}: the .npy data ends early")
                got += n
        rows = np.reshape(block.T, (count, *self.shape[1:]), order="F")
        return np.ascontiguousarray(rows)


@contextlib.contextmanager
def open_scores(
    path: str | os.PathLike[str], *, stdin: BinaryIO | None = None
) -> Iterator[ScoreReader]:
    """Open a .npy score array (a file, or `-` for stdin) for reading in row chunks.

    Checks, before any row is read, that it holds numbers with rows first; a file must also be
    as long as its header says.
    """
    name = str(path)
    archive = npz_part(name)
    if archive is not None:
        with _open_npz_member(*archive) as reader:
            yield reader
        return
    if name == STDIO:
        stream = stdin if stdin is not None else sys.stdin.buffer
        shape, fortran, dtype = _read_header(stream, "-")
        if fortran and len(shape) > 1:
            raise FusecliError(
                "-: a Fortran-ordered .npy cannot be read from a stream in rows; "
                "save it as C-ordered (np.ascontiguousarray) or pass it as a file"
            )
        yield ScoreReader("-", _check_shape(shape, "-"), dtype, stream=stream)
        return
    path = _check_input_path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise FusecliError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        shape, fortran, dtype = _read_header(f, name)
        shape = _check_shape(shape, name)
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            # a named pipe or process substitution: no size to check, no seeking, no map
            if fortran and len(shape) > 1:
                raise FusecliError(
                    f"{name}: a Fortran-ordered .npy cannot be read from a pipe in rows; "
                    "save it as C-ordered (np.ascontiguousarray) or pass it as a regular file"
                )
            yield ScoreReader(name, shape, dtype, stream=f)
            return
        expected = dtype.itemsize * math.prod(shape)
        found = os.fstat(f.fileno()).st_size - f.tell()
        if found < expected:
            raise FusecliError(
                f"{path}: is truncated (its header promises {expected} bytes of data "
                f"for shape {shape}, the file holds {found})"
            )
        if fortran and len(shape) > 1:
            yield ScoreReader(name, shape, dtype, stream=f, fortran=True, _data_start=f.tell())
            return
        yield ScoreReader(name, shape, dtype, stream=f)


def read_scores(path: str | os.PathLike[str], *, stdin: BinaryIO | None = None) -> np.ndarray:
    """A whole score array in memory (for arrays that must be held anyway, as in `tune`)."""
    with open_scores(path, stdin=stdin) as reader:
        values = reader.read_all()
    check_finite(values, reader.name)
    return values


def map_scores(path: str | os.PathLike[str], *, stdin: BinaryIO | None = None) -> np.ndarray:
    """A score array to work on in place: a regular C-ordered .npy file is memory-mapped (rows
    are read from disk as they are used, so many large arrays fit); stdin, pipes and
    Fortran-ordered files are read into memory. Checked as `open_scores` checks, not for NaN
    (the caller checks the rows it reads)."""
    name = str(path)
    if (
        name == STDIO
        or npz_part(name) is not None
        or not Path(path).exists()
        or not stat.S_ISREG(os.stat(path).st_mode)
    ):
        return read_scores(path, stdin=stdin)
    with open_scores(path) as reader:
        fortran = reader.fortran
    if fortran:
        return read_scores(path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FusecliError(f"{path}: cannot be mapped ({e})") from None


class ScoreWriter:
    """Writes a .npy array row chunk by row chunk to an open binary file or stream."""

    def __init__(self, stream: BinaryIO, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.stream = stream
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        header = {
            "descr": npy_format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": shape,
        }
        try:
            npy_format.write_array_header_1_0(stream, header)
        except ValueError:  # a header too long for version 1.0
            npy_format.write_array_header_2_0(stream, header)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise FusecliError(
                f"Rows of shape {rows.shape[1:]} do not fit an array of shape {self.shape}"
            )
        if self.rows_written + len(rows) > self.shape[0]:
            raise FusecliError(f"More rows than the {self.shape[0]} announced")
        self.stream.write(memoryview(rows.reshape(-1).view(np.uint8)) if rows.size else b"")
        self.rows_written += len(rows)

    def close(self) -> None:
        if self.rows_written != self.shape[0]:
            raise FusecliError(f"Wrote {self.rows_written} rows of the {self.shape[0]} announced")
        self.stream.flush()


@contextlib.contextmanager
def score_output(
    output: str | os.PathLike[str],
    shape: tuple[int, ...],
    dtype: np.dtype,
    *,
    force: bool,
    stdout: BinaryIO | None = None,
) -> Iterator[ScoreWriter]:
    """A `ScoreWriter` for `output`: `-` streams to stdout; a file appears (atomically) only if
    the block succeeds. Call `check_output_path` before any work, then this to write."""
    if str(output) == STDIO:
        writer = ScoreWriter(stdout if stdout is not None else sys.stdout.buffer, shape, dtype)
        yield writer
        writer.close()
        return
    with atomic_output(output, force=force) as tmp, open(tmp, "wb") as f:
        writer = ScoreWriter(f, shape, dtype)
        yield writer
        writer.close()


def check_score_output(
    output: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str]],
    force: bool,
    npz: bool = False,
) -> None:
    """Refuse a bad output path before any work: not over an input, not over a file unasked;
    `npz`: a .npz (one array per output) is allowed too."""
    if str(output) == STDIO:
        return
    if Path(output).suffix.lower() not in ((".npy", ".npz") if npz else (".npy",)):
        what = "a .npy or .npz file" if npz else "a .npy file"
        raise InvalidRequest(
            f"The output must be {what} (or - for stdout). Received: output={str(output)!r}"
        )
    check_output_path(output, inputs=[p for p in inputs if str(p) != STDIO], force=force)


@contextlib.contextmanager
def npz_output(
    output: str | os.PathLike[str],
    arrays: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    *,
    force: bool,
) -> Iterator[list[ScoreWriter]]:
    """One `ScoreWriter` per (name, shape, dtype), written row chunk by row chunk to files beside
    `output`, then stored (uncompressed) as the arrays of one .npz that appears atomically."""
    with atomic_output(output, force=force) as tmp:
        parts = [tmp.with_name(f"{tmp.name}.{i}.npy") for i in range(len(arrays))]
        try:
            with contextlib.ExitStack() as stack:
                files = [stack.enter_context(open(p, "wb")) for p in parts]
                writers = [
                    ScoreWriter(f, shape, dtype)
                    for f, (_, shape, dtype) in zip(files, arrays, strict=True)
                ]
                yield writers
                for writer in writers:
                    writer.close()
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for part, (name, _, _) in zip(parts, arrays, strict=True):
                    z.write(part, arcname=f"{name}.npy")
        finally:
            for part in parts:
                part.unlink(missing_ok=True)


def check_finite(values: np.ndarray, name: str, *, first_row: int = 0) -> None:
    """Scores with NaN or infinities would silently poison a sum: refuse them, saying where."""
    if values.dtype.kind != "f" or values.size == 0:
        return
    finite = np.isfinite(values)
    if finite.all():
        return
    bad_rows = ~finite.reshape(len(values), -1).all(axis=1)
    row = first_row + int(np.argmax(bad_rows))
    raise FusecliError(f"{name}: holds NaN or infinite values (first in row {row})")


# -- combining ----------------------------------------------------------------------------------


@dataclass
class CombineReport:
    """What `combine_scores` did; `as_dict()` is the CLI's `--json` document."""

    inputs: list[str]
    weights: list[float]
    output: str | None
    shape: list[int]
    dtype: str
    labels: str | None = None
    # name -> {"top1": ..., "top5": ...} for each input and for "fused"; empty without labels.
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def combine_scores(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None,
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    labels: str | os.PathLike[str] | np.ndarray | None = None,
    labels_key: str | None = None,
    force: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    fuse_rows: Callable[[list[np.ndarray]], np.ndarray] | None = None,
) -> CombineReport:
    """Write sum(w_i * scores_i) to `output` (.npy, or `-` for stdout), chunk by chunk.

    `fuse_rows`, if given, computes the fused rows from the inputs' rows instead of the weighted
    sum (a tune recipe, a hard vote; see `fusecli.scores.recipe`).

    Weights default to 1/N each, and are rescaled to sum to 1 unless `normalize=False`. With
    `labels` (class ids or one-hot rows, see `metrics`), also
    measures top-1 (and, with 5+ classes, top-5) accuracy of each input and of the sum; labels are
    a .npy file, the `labels_key` (default `y`) array of a .npz/.h5, or an array. `output` may be
    None when only the accuracies are wanted.
    """
    from fusecli.scores import metrics

    if not inputs:
        raise InvalidRequest("Expected at least one score array. Received: none")
    weights = resolve_weights(weights, len(inputs), normalize=normalize)
    names = [str(p) for p in inputs]
    if names.count(STDIO) > 1:
        raise InvalidRequest(
            f"Only one input can be read from stdin ('-'). Received: inputs={tuple(names)}"
        )
    if output is not None:
        extra = [labels] if isinstance(labels, str | os.PathLike) else []
        check_score_output(output, inputs=[*inputs, *extra], force=force)

    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(open_scores(p, stdin=stdin)) for p in inputs]
        shape = _common_shape(readers)
        classes = None
        if labels is not None:
            if shape[0] == 0:
                raise FusecliError(
                    "Accuracy needs at least one row of scores. "
                    f"Received: {readers[0].name} has shape {shape}"
                )
            from fusecli.scores.datafile import read_labels

            raw = labels if isinstance(labels, np.ndarray) else read_labels(labels, key=labels_key)
            classes = metrics.class_labels(raw, shape, source=_label_name(labels))
        dtype = output_dtype([r.dtype for r in readers])
        row_bytes = max(
            1, sum(r.row_bytes for r in readers) + dtype.itemsize * math.prod(shape[1:])
        )
        step = max(1, chunk_bytes // row_bytes)
        ks = metrics.accuracy_ks(shape)
        correct = np.zeros((len(readers) + 1, len(ks)), dtype=np.int64)

        with (
            score_output(output, shape, dtype, force=force, stdout=stdout)
            if output is not None
            else contextlib.nullcontext()
        ) as writer:
            for start in range(0, shape[0], step):
                fused = None
                chunks = []
                for i, (reader, w) in enumerate(zip(readers, weights, strict=True)):
                    chunk = reader.read_rows(step)
                    check_finite(chunk, reader.name, first_row=start)
                    if classes is not None:
                        correct[i] += metrics.topk_correct(
                            chunk, classes[start : start + len(chunk)], ks
                        )
                    if fuse_rows is not None:
                        chunks.append(chunk)
                        continue
                    # Overflow is caught below, row by row, rather than warned about.
                    with np.errstate(over="ignore", invalid="ignore"):
                        term = chunk.astype(dtype, copy=False) * np.float64(w).astype(dtype)
                        fused = term if fused is None else np.add(fused, term, out=fused)
                if fuse_rows is not None:
                    fused = np.asarray(fuse_rows(chunks), dtype=dtype)
                _check_fused(fused, dtype, first_row=start)
                if classes is not None:
                    correct[-1] += metrics.topk_correct(
                        fused, classes[start : start + len(fused)], ks
                    )
                if writer is not None:
                    writer.write(fused)
            if shape[0] == 0 and writer is not None:
                writer.write(np.empty(shape, dtype))

    accuracy: dict[str, dict[str, float]] = {}
    if classes is not None:
        for name, counts in zip([*names, "fused"], correct, strict=True):
            accuracy[name] = {
                f"top{k}": float(c) / max(1, shape[0]) for k, c in zip(ks, counts, strict=True)
            }
    return CombineReport(
        inputs=names,
        weights=list(weights),
        output=None if output is None else str(output),
        shape=list(shape),
        dtype=str(dtype),
        labels=None if labels is None else _label_name(labels),
        accuracy=accuracy,
    )


def output_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """float64 if any input is float64, else float32: scores rarely need more."""
    wide = any(np.dtype(d).kind == "f" and np.dtype(d).itemsize >= 8 for d in dtypes)
    return np.dtype(np.float64 if wide else np.float32)


# -- .npz members ------------------------------------------------------------------------------


def npz_part(name: str) -> tuple[Path, str | None] | None:
    """(archive, array name or None) for `scores.npz` or `scores.npz:NAME`; None for others."""
    lower = name.lower()
    if lower.endswith(".npz"):
        return Path(name), None
    at = lower.rfind(".npz:")
    if at < 0:
        return None
    return Path(name[: at + 4]), name[at + 5 :]


def is_score_path(name: str) -> bool:
    """A .npy file, a .npz (or one of its arrays, `scores.npz:NAME`), or `-`."""
    return name == STDIO or Path(name).suffix.lower() == ".npy" or npz_part(name) is not None


@contextlib.contextmanager
def _open_npz_member(archive: Path, key: str | None) -> Iterator[ScoreReader]:
    from fusecli.limits import check_inflation

    path = _check_input_path(archive)
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise FusecliError(f"{path}: is not a regular file")
    try:
        npz = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FusecliError(f"{path}: is not a .npz archive ({e})") from None
    with npz:
        arrays = {
            i.filename.removesuffix(".npy"): i
            for i in npz.infolist()
            if i.filename.endswith(".npy")
        }
        names = ", ".join(sorted(arrays)) or "none"
        if key is None:
            if len(arrays) != 1:
                raise InvalidRequest(
                    f"{path}: holds {len(arrays)} arrays ({names}); name the one to read as "
                    f"{path}:NAME"
                )
            key = next(iter(arrays))
        if key not in arrays:
            raise InvalidRequest(f"{path}: has no array {key!r} (it holds: {names})")
        info = arrays[key]
        label = f"{path}:{key}"
        check_inflation(path, info)
        with npz.open(info) as stream:
            shape, fortran, dtype = _read_header(stream, label)
            shape = _check_shape(shape, label)
            if fortran and len(shape) > 1:
                raise FusecliError(
                    f"{label}: a Fortran-ordered array cannot be read in rows from a .npz; "
                    "save it as C-ordered (np.ascontiguousarray)"
                )
            expected = dtype.itemsize * math.prod(shape)
            if expected > info.file_size:
                raise FusecliError(
                    f"{label}: is truncated (its header promises {expected} bytes of data for "
                    f"shape {shape}, the member holds {info.file_size})"
                )
            yield ScoreReader(label, shape, dtype, stream=stream)


# -- helpers ---------------------------------------------------------------------------------


def _check_input_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise FusecliError(f"{path}: no such file")
    if path.is_dir():
        raise FusecliError(f"{path}: is a directory, not a .npy file")
    return path


def _read_header(stream: BinaryIO, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(stream)
    except ValueError as e:
        empty = "got 0" in str(e)
        if name == STDIO:
            what = "stdin is empty (expected a .npy stream)" if empty else "is not a .npy stream"
        elif empty:
            what = "is empty"
        elif name.lower().endswith(".npz") or "PK" in str(e):
            what = "is a .npz archive, not a .npy array; save each score array with np.save"
        else:
            what = "is not a .npy array"
        raise FusecliError(f"{name}: {what}") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise FusecliError(f"{name}: .npy format version {version} is not supported")
    except ValueError as e:
        raise FusecliError(f"{name}: has a broken .npy header ({e})") from None
    if any(int(d) < 0 for d in shape):
        raise FusecliError(f"{name}: has a broken .npy header (negative size in shape {shape})")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FusecliError(f"{name}: holds Python objects, not numbers")
    if dtype.kind not in NUMERIC_KINDS:
        raise FusecliError(f"{name}: holds values of dtype {dtype}, not numbers")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _check_shape(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    if not shape:
        raise FusecliError(f"{name}: is a single number, not an array of scores with rows first")
    return shape


def _common_shape(readers: Sequence[ScoreReader]) -> tuple[int, ...]:
    first = readers[0]
    for r in readers[1:]:
        if r.shape != first.shape:
            raise FusecliError(
                "Score arrays must have the same shape to be combined. "
                f"Received: {first.name} has shape {first.shape}, {r.name} has shape {r.shape}"
            )
    return first.shape


def _check_fused(fused: np.ndarray, dtype: np.dtype, *, first_row: int) -> None:
    """Finite inputs can still sum to infinity (big weights, scores near the dtype's limit)."""
    finite = np.isfinite(fused)
    if finite.all():
        return
    row = first_row + int(np.argmax(~finite.reshape(len(fused), -1).all(axis=1)))
    raise FusecliError(
        f"The fused scores overflow {dtype} in row {row} (the weighted sum is beyond "
        f"{np.finfo(dtype).max:.4g}); use smaller weights or float64 scores"
    )


def _label_name(labels: Any) -> str:
    return "<array>" if isinstance(labels, np.ndarray) else str(labels)
