"""Cutting a model just before its final softmax, for fusion at the logits.

Two-stream practice (I3D, TSN) adds the streams' logits and applies one softmax to the sum,
softmax(sum w_i z_i), rather than averaging probabilities. A model ends in a softmax in one of two
ways: the last layer's own activation (Dense(..., activation="softmax")), or a trailing Softmax or
Activation("softmax") layer. The cut is made on the model's config (the activation becomes
"linear", or the trailing layer is dropped and the outputs rewired to its input), for model files
and loaded models alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fusecli.config import walker
from fusecli.errors import FusecliError

if TYPE_CHECKING:
    import keras


def logits_model(model: keras.Model, name: str) -> tuple[keras.Model, list[int]]:
    """A model named `name` computing `model`'s outputs before their final softmax (built from
    its cut config, holding its weights), and the axis each softmax works on."""
    from fusecli.config.models import config_of, rebuild

    config = config_of(model, name)
    config.pop("compile_config", None)
    axes = cut_before_softmax(config, name)
    config["config"]["name"] = name
    return rebuild(config, name, model.get_weights()), axes


def cut_before_softmax(config: dict[str, Any], name: str) -> list[int]:
    """Cut a model config (in place) before its final softmax; the softmax axis of each output.
    Raises `FusecliError` naming the output that has no final softmax."""
    entries = walker.layers(config)
    if config["class_name"] == "Sequential":
        real = [e for e in entries if e.get("class_name") != "InputLayer"]
        if not real:
            raise FusecliError(f"Model {name!r} has no layers")
        last = real[-1]
        axis, drop = _softmax_end(last, name, 0)
        if drop:
            if len(real) == 1:
                raise FusecliError(f"Model {name!r} is only a softmax; it has no logits")
            config["config"]["layers"].remove(last)
        return [axis]
    inner = config["config"]
    refs = list(walker.io_refs(inner.get("output_layers")))
    by_name = {walker.name(e): e for e in entries}
    axes = []
    dropped: set[str] = set()
    for j, ref in enumerate(refs):
        layer = by_name.get(ref[0])
        if layer is None:
            raise FusecliError(f"Model {name!r}: output {j} names no layer ({ref[0]!r})")
        uses = _uses(entries, ref[0]) + sum(1 for r in refs if r[0] == ref[0])
        axis, drop = _softmax_end(layer, name, j)
        axes.append(axis)
        if uses > 1:
            raise FusecliError(
                f"Model {name!r}: the output of its final layer {ref[0]!r} is also used "
                "elsewhere in the model; --at logits cannot cut it"
            )
        if drop:
            source = _input_ref(layer, ref[1], name)
            ref[:3] = source[:3]
            dropped.add(walker.name(layer))
    inner["layers"] = [e for e in inner["layers"] if walker.name(e) not in dropped]
    return axes


def _softmax_end(layer: dict[str, Any], name: str, j: int) -> tuple[int, bool]:
    """(axis, whether the layer is dropped) for a layer that ends in a softmax; refuses others."""
    class_name = layer.get("class_name")
    conf = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    if class_name == "Softmax":
        return _single_axis(conf.get("axis", -1), name, layer), True
    if class_name == "Activation" and _is_softmax(conf.get("activation")):
        return -1, True
    if _is_softmax(conf.get("activation")) and not walker.is_model(layer):
        conf["activation"] = "linear"
        return -1, False
    activation = conf.get("activation")
    note = f", activation {_activation_name(activation)!r}" if activation is not None else ""
    raise FusecliError(
        f"Model {name!r} has no final softmax to fuse before: output {j} comes from "
        f"layer {walker.name(layer)!r} ({class_name}{note}). --at logits needs a last layer with "
        "activation='softmax', or a trailing Softmax or Activation('softmax') layer"
    )


def _is_softmax(activation: Any) -> bool:
    return _activation_name(activation) == "softmax"


def _activation_name(activation: Any) -> Any:
    if isinstance(activation, dict):  # {"class_name": "function", "config": "softmax", ...}
        inner = activation.get("config")
        return inner if isinstance(inner, str) else activation.get("class_name")
    return activation


def _single_axis(axis: Any, name: str, layer: dict[str, Any]) -> int:
    if isinstance(axis, int):
        return axis
    if isinstance(axis, list | tuple) and len(axis) == 1 and isinstance(axis[0], int):
        return int(axis[0])
    raise FusecliError(
        f"Model {name!r}: the final Softmax layer {walker.name(layer)!r} works over several axes "
        f"({axis}); --at logits supports one. Received: axis={axis}"
    )


def _uses(entries: list[dict[str, Any]], target: str) -> int:
    count = 0
    for entry in entries:
        for ref in walker.references(entry.get("inbound_nodes", [])):
            if ref[0] == target:
                count += 1
    return count


def _input_ref(layer: dict[str, Any], node: int, name: str) -> list[Any]:
    nodes = layer.get("inbound_nodes") or []
    refs = list(walker.references(nodes[node] if node < len(nodes) else []))
    if len(refs) != 1:
        raise FusecliError(
            f"Model {name!r}: cannot find the input of its final layer {walker.name(layer)!r}"
        )
    return refs[0]
