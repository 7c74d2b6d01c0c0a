"""What an exported model takes and returns: the Keras model's own input and output names.

Keras' own export names a SavedModel's outputs `output_0` and an ONNX file's `Identity:0`;
clients then key on a name that means nothing. Here every format serves one function that takes
the model's inputs by their names and returns a dict keyed by its output names (`fused`,
`fused_<head>` for fused models).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fusecli import runtime
from fusecli.errors import FusecliError

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def describe(self) -> str:
        dims = ", ".join("None" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} ({dims}{',' if len(self.shape) == 1 else ''})"


@dataclass
class Signature:
    """A model with the names, shapes and dtypes it is exported under."""

    model: keras.Model
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batch_size: int | None

    def call(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The Keras model's outputs for `feed` (input name -> array), by output name."""
        keras = runtime.keras()
        args = [feed[t.name] for t in self.inputs]
        outs = keras.tree.flatten(self.model(_pack(self.model, args, keras), training=False))
        return {t.name: np.asarray(o) for t, o in zip(self.outputs, outs, strict=True)}

    def tensor_specs(self) -> list[Any]:
        import tensorflow as tf

        return [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in self.inputs]

    def serving_function(self) -> Any:
        """A `tf.function` over the input specs that returns {output name: tensor}."""
        import tensorflow as tf

        keras = runtime.keras()
        model, names = self.model, [t.name for t in self.outputs]

        def serve(*args: Any) -> dict[str, Any]:
            outs = keras.tree.flatten(model(_pack(model, list(args), keras), training=False))
            return {n: tf.identity(o, name=n) for n, o in zip(names, outs, strict=True)}

        return tf.function(serve, input_signature=self.tensor_specs(), autograph=False)


def signature_of(model: keras.Model, batch_size: int | None = None) -> Signature:
    """The served signature of `model`; `batch_size` fixes the first dimension."""
    keras = runtime.keras()
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        inputs = []
    if not inputs:
        raise FusecliError(
            f"Model {model.name!r} has no defined inputs, so there is no signature to export "
            "(build it with keras.Input)"
        )
    outputs = keras.tree.flatten(model.outputs)
    taken: set[str] = set()
    in_info = [
        TensorInfo(_unique(_input_name(t, i), taken), _shape(t, batch_size), _dtype(t))
        for i, t in enumerate(inputs)
    ]
    out_names = _output_names(model, outputs)
    out_info = [
        TensorInfo(_unique(name, taken), _shape(t, batch_size), _dtype(t))
        for name, t in zip(out_names, outputs, strict=True)
    ]
    return Signature(model, in_info, out_info, batch_size)


def _pack(model: keras.Model, args: list[Any], keras: Any) -> Any:
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, args)
    return args[0] if len(args) == 1 else args


def _input_name(tensor: Any, index: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    name = history.operation.name if history else getattr(tensor, "name", None)
    return _identifier(name or f"input_{index}")


def _output_names(model: keras.Model, outputs: list[Any]) -> list[str]:
    """The model's `output_names`, else the layers that make the outputs (a Sequential's)."""
    names = list(getattr(model, "output_names", None) or [])
    if len(names) != len(outputs):
        histories = [getattr(t, "_keras_history", None) for t in outputs]
        names = [h.operation.name if h else f"output_{j}" for j, h in enumerate(histories)]
    return [_identifier(n) for n in names]


def _identifier(text: str) -> str:
    """A name every format accepts (TensorFlow op names may not start with '_')."""
    return re.sub(r"\W+", "_", str(text)).strip("_") or "tensor"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def _shape(tensor: Any, batch_size: int | None) -> tuple[int | None, ...]:
    shape = tuple(None if d is None else int(d) for d in tensor.shape)
    if batch_size is not None and shape:
        shape = (batch_size, *shape[1:])
    return shape


def _dtype(tensor: Any) -> str:
    return str(getattr(tensor.dtype, "name", tensor.dtype))


def describe(infos: Sequence[TensorInfo]) -> str:
    return "; ".join(t.describe() for t in infos)
