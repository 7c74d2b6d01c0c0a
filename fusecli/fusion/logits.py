"""Cutting a model just before its final softmax, for fusion at the logits.

Two-stream practice (I3D, TSN) adds the streams' logits and applies one softmax to the sum,
softmax(sum w_i z_i), rather than averaging probabilities. A model ends in a softmax in one of two
ways: the last layer's own activation (Dense(..., activation="softmax")), or a trailing Softmax or
Activation("softmax") layer. Either way we rebuild the model up to the logits, sharing its layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusecli import runtime
from fusecli.errors import FusecliError

if TYPE_CHECKING:
    import keras


def cut_before_softmax(model: keras.Model, name: str) -> tuple[keras.Model, list[int]]:
    """A model named `name` computing `model`'s outputs before their final softmax, and the axis
    each softmax works on. Raises `FusecliError` naming the output that has no final softmax."""
    keras = runtime.keras()
    logits, axes = [], []
    for j, tensor in enumerate(model.outputs):
        layer = tensor._keras_history.operation
        if isinstance(layer, keras.layers.Softmax):
            logits.append(_input_of(layer, name))
            axes.append(_single_axis(layer.axis, name, layer))
        elif isinstance(layer, keras.layers.Activation) and _is_softmax(layer.activation):
            logits.append(_input_of(layer, name))
            axes.append(-1)
        elif _is_softmax(getattr(layer, "activation", None)):
            config = {**layer.get_config(), "activation": "linear"}
            twin = type(layer).from_config(config)  # same name: the original leaves the graph
            logits.append(twin(_input_of(layer, name)))
            twin.set_weights(layer.get_weights())
            axes.append(-1)
        else:
            raise FusecliError(
                f"Model {name!r} has no final softmax to fuse before: output {j} comes from "
                f"layer {layer.name!r} ({type(layer).__name__}"
                f"{_activation_note(layer)}). --at logits needs a last layer with "
                "activation='softmax', or a trailing Softmax or Activation('softmax') layer"
            )
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    outputs = logits[0] if len(logits) == 1 else logits
    return keras.Model(inputs, outputs, name=name), axes


def _is_softmax(activation: Any) -> bool:
    return getattr(activation, "__name__", None) == "softmax"


def _input_of(layer: Any, name: str) -> Any:
    try:
        return layer.input
    except (AttributeError, ValueError) as e:
        raise FusecliError(
            f"Model {name!r}: cannot find the input of its final layer {layer.name!r} ({e})"
        ) from None


def _single_axis(axis: Any, name: str, layer: Any) -> int:
    if isinstance(axis, int):
        return axis
    if isinstance(axis, list | tuple) and len(axis) == 1:
        return int(axis[0])
    raise FusecliError(
        f"Model {name!r}: the final Softmax layer {layer.name!r} works over several axes "
        f"({axis}); --at logits supports one. Received: axis={axis}"
    )


def _activation_note(layer: Any) -> str:
    activation = getattr(layer, "activation", None)
    label = getattr(activation, "__name__", None)
    return f", activation {label!r}" if label else ""
