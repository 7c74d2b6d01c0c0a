"""Running a model over a data file in batches, to a score array on disk, stdout or in memory.

    predict_to_file("a.keras", "val.npz", "a.npy", batch_size=256)

Data is read batch by batch (see `datafile` for which array feeds which input) and each batch of
scores is written as soon as it is made, so memory holds one batch, whatever the data's size.
A model with several outputs writes a .npz holding one array per output, named after the
outputs (`combine` and `tune` read them as `scores.npz:NAME`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from fusecli import runtime
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.safety.loading import load_model
from fusecli.scores.arrays import check_score_output, npz_output, score_output
from fusecli.scores.datafile import DataFile, model_input_arrays, open_data
from fusecli.scores.options import AT_CHOICES, DEFAULT_BATCH_SIZE

if TYPE_CHECKING:
    import keras

# Bytes one batch may make in the model's widest layer (see `predict_batches`).
ACTIVATION_BUDGET = 1 << 30

# Called after each batch with (rows done, rows in all).
ProgressCallback = Callable[[int, int], None]


@dataclass
class PredictReport:
    """What `predict_to_file` wrote; `as_dict()` is the CLI's `--json` document."""

    model: str
    data: str
    inputs: list[str]
    output: str
    shape: list[int]  # the first output's, for a .npz
    dtype: str
    at: str = "output"
    arrays: dict[str, list[int]] = field(default_factory=dict)  # a .npz's: name -> shape

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def predict_to_file(
    model: str | os.PathLike[str] | keras.Model,
    data: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    key: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    at: str = "output",
    trust: bool = False,
    force: bool = False,
    progress: ProgressCallback | None = None,
    stdout: BinaryIO | None = None,
) -> PredictReport:
    """Run `model` over `data` and write its scores as a .npy to `output` (`-`: stdout), or, to
    a .npz `output`, one array per output named after the model's outputs (a model with several
    outputs needs a .npz).

    `at="logits"` writes the model's scores before its final softmax instead of its output.
    The file appears only once every batch has run; bad data or a NaN score leaves nothing.
    """
    _check_batch_size(batch_size)
    _check_at(at)
    paths = [p for p in (model, data) if isinstance(p, str | os.PathLike)]
    check_score_output(output, inputs=paths, force=force, npz=True)
    to_npz = str(output) != "-" and Path(output).suffix.lower() == ".npz"
    net, out_names = _as_model(model, trust=trust, at=at, several=True)
    if len(out_names) > 1 and not to_npz:
        raise InvalidRequest(
            f"{_describe(model)}: has {len(out_names)} outputs ({', '.join(out_names)}); write "
            "them to a .npz file (-o scores.npz), one array per output"
        )
    with open_data(data) as opened:
        arrays, names = _inputs_for(net, opened, key=key)
        rows = len(arrays[0])
        batches = _output_batches(net, arrays, batch_size=batch_size, progress=progress)
        first = next(batches)
        shapes = [(rows, *f.shape[1:]) for f in first]
        if to_npz:
            specs = [(n, sh, f.dtype) for n, sh, f in zip(out_names, shapes, first, strict=True)]
            context = npz_output(output, specs, force=force)
        else:
            context = _one(
                score_output(output, shapes[0], first[0].dtype, force=force, stdout=stdout)
            )
        with context as writers:
            for batch in itertools.chain([first], batches):
                for writer, values in zip(writers, batch, strict=True):
                    writer.write(values)
    return PredictReport(
        model=_describe(model),
        data=str(data),
        inputs=names,
        output=str(output),
        shape=list(shapes[0]),
        dtype=str(first[0].dtype),
        at=at,
        arrays={n: list(sh) for n, sh in zip(out_names, shapes, strict=True)} if to_npz else {},
    )


def predict_array(
    model: str | os.PathLike[str] | keras.Model,
    data: str | os.PathLike[str],
    *,
    key: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    at: str = "output",
    trust: bool = False,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """`model`'s scores (or logits, see `predict_to_file`) on `data`, in memory (for `tune`,
    which needs them all at once)."""
    _check_batch_size(batch_size)
    _check_at(at)
    net, _ = _as_model(model, trust=trust, at=at)
    with open_data(data) as opened:
        arrays, _ = _inputs_for(net, opened, key=key)
        return np.concatenate(
            list(predict_batches(net, arrays, batch_size=batch_size, progress=progress))
        )


def predict_batches(
    model: keras.Model,
    arrays: Sequence[Any],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
) -> Iterator[np.ndarray]:
    """Yield the model's scores batch by batch; `arrays` feed its inputs, rows first."""
    for outputs in _output_batches(model, arrays, batch_size=batch_size, progress=progress):
        yield outputs[0]


def _output_batches(
    model: keras.Model,
    arrays: Sequence[Any],
    *,
    batch_size: int,
    progress: ProgressCallback | None,
) -> Iterator[list[np.ndarray]]:
    """Every output of the model, batch by batch.

    A batch holds at most ACTIVATION_BUDGET bytes in the model's widest layer: a model whose
    layers make large activations per row (an image resized to 8192 x 8192) runs in smaller
    batches rather than allocate gigabytes."""
    rows = len(arrays[0])
    batch_size = min(batch_size, max(1, ACTIVATION_BUDGET // max(1, row_bytes(model))))
    dtypes = [np.dtype(str(t.dtype)) for t in model.inputs]
    for start in range(0, rows, batch_size):
        batch = [
            np.asarray(a[start : start + batch_size]).astype(d, copy=False)
            for a, d in zip(arrays, dtypes, strict=True)
        ]
        got = model.predict_on_batch(batch[0] if len(batch) == 1 else batch)
        outs = [np.asarray(o) for o in runtime.keras().tree.flatten(got)]
        for out in outs:
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1)
                raise FusecliError(
                    f"The model's output is NaN or infinite for row {start + int(np.argmax(bad))} "
                    "(check the input data)"
                )
        yield outs
        if progress is not None:
            progress(min(start + batch_size, rows), rows)


def input_names(model: keras.Model) -> list[str]:
    """The names of a model's inputs (its InputLayers'), in order."""
    names = []
    for i, tensor in enumerate(model.inputs):
        history = getattr(tensor, "_keras_history", None)
        names.append(history.operation.name if history else f"x{i}")
    return names


# -- helpers ---------------------------------------------------------------------------------


def _as_model(
    model: str | os.PathLike[str] | keras.Model,
    *,
    trust: bool,
    at: str = "output",
    several: bool = False,
) -> tuple[keras.Model, list[str]]:
    """The model to run (cut before its softmax for `at="logits"`) and its outputs' names;
    `several`: a model may have more than one output."""
    net = load_model(model, trust=trust) if isinstance(model, str | os.PathLike) else model
    keras = runtime.keras()
    out_names = output_names(net)
    if at == "logits":
        from fusecli.fusion.logits import logits_model

        name = Path(model).stem if isinstance(model, str | os.PathLike) else net.name
        net, axes = logits_model(net, name)
        if any(a not in (-1, len(t.shape) - 1) for a, t in zip(axes, net.outputs, strict=True)):
            raise FusecliError(
                f"Model {name!r}: its final softmax is not over the last axis (axis={axes[0]}); "
                "score arrays keep classes on the last axis"
            )
    try:
        outputs = keras.tree.flatten(net.outputs)
    except (AttributeError, ValueError):
        raise FusecliError(
            f"{_describe(model)}: the model has no defined inputs and outputs"
        ) from None
    if len(outputs) != 1 and not several:
        raise FusecliError(
            f"{_describe(model)}: has {len(outputs)} outputs; tuning fuses one score array per "
            "model, so it needs a model with one output"
        )
    if len(out_names) != len(outputs):
        out_names = [f"output_{i}" for i in range(len(outputs))]
    return net, out_names


def output_names(model: keras.Model) -> list[str]:
    """The names of a model's outputs (the layers that make them), as identifiers, unique."""
    from fusecli.fusion.naming import identifier, unique

    taken: set[str] = set()
    names = []
    for i, tensor in enumerate(runtime.keras().tree.flatten(getattr(model, "outputs", []) or [])):
        history = getattr(tensor, "_keras_history", None)
        names.append(
            unique(identifier(history.operation.name if history else f"output_{i}"), taken)
        )
    return names


@contextlib.contextmanager
def _one(context: Any) -> Iterator[list[Any]]:
    with context as writer:
        yield [writer]


def _inputs_for(
    model: keras.Model, data: DataFile, *, key: str | None
) -> tuple[list[Any], list[str]]:
    names = input_names(model)
    arrays = model_input_arrays(data, names, key=key)
    rows = len(arrays[0])
    for name, array, tensor in zip(names, arrays, model.inputs, strict=True):
        expected = tuple(tensor.shape)
        got = tuple(array.shape)
        if len(got) != len(expected) or any(
            e is not None and e != g for e, g in zip(expected[1:], got[1:], strict=True)
        ):
            raise FusecliError(
                f"{data.path}: data of shape {got} does not fit the model's input {name!r} of "
                f"shape {_fmt_shape(expected)}"
            )
        if len(array) != rows:
            raise FusecliError(
                f"{data.path}: the model's inputs must have as many rows as each other. "
                f"Received: {names[0]!r} has {rows} rows, {name!r} has {len(array)}"
            )
    if rows == 0:
        raise FusecliError(f"{data.path}: the data has no rows")
    return arrays, names


def _check_at(at: str) -> None:
    if at not in AT_CHOICES:
        raise InvalidRequest(f"Expected at to be one of {AT_CHOICES}. Received: at={at!r}")


def row_bytes(model: keras.Model) -> int:
    """The most bytes one row makes in any layer's output (as far as the model's symbolic
    shapes say), nested models included."""
    widest = 0
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    for layer in layers:
        try:
            tensors = [*keras_tree_flatten(layer.input), *keras_tree_flatten(layer.output)]
        except (AttributeError, ValueError, RuntimeError, TypeError):
            continue  # a layer called more than once, or never: its shapes are not one
        for tensor in tensors:
            dims = [d for d in tuple(getattr(tensor, "shape", ()) or ())[1:] if d]
            itemsize = np.dtype(str(getattr(tensor, "dtype", "float32"))).itemsize
            widest = max(widest, math.prod(dims) * itemsize)
    return widest


def keras_tree_flatten(value: Any) -> list[Any]:
    return runtime.keras().tree.flatten(value)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InvalidRequest(f"Expected a batch size of 1 or more. Received: {batch_size}")


def _describe(model: Any) -> str:
    return str(model) if isinstance(model, str | os.PathLike) else f"<model {model.name}>"


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
