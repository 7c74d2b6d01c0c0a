"""The fused model's config, composed as JSON from the models' own configs: no Keras.

The result is the config Keras writes for the fused model it builds: a Functional model whose
layers are the inputs, each model nested as one layer (its branch), one scaling layer per branch
and output (`Rescaling`, or the literal `Lambda(lambda x, w: x * w)`), an `Add` per output, and
a `Softmax` when asked for. Two changes to the models' configs, both renames or cuts:

- every layer inside a branch is renamed `<branch>_<name>` (nested models' layers
  `<branch>_<model>_<name>`), so that every variable path in the fused model is unique (Keras
  names a variable `<layer name>/<variable>`, and the torch backend keys parameters by it);
- with `at="logits"`, each model's final softmax is cut: a last layer's `activation="softmax"`
  becomes "linear", or a trailing `Softmax`/`Activation("softmax")` layer is dropped and the
  outputs rewired to its input.
"""

from __future__ import annotations

import base64
import copy
import marshal
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fusecli.errors import FusecliError
from fusecli.fusion.inputs import choose_mode
from fusecli.fusion.naming import identifier, unique

# Input names Keras makes up; the fused model says "input" instead.
_GENERIC_INPUT = re.compile(r"(input|input_layer|keras_tensor)(_\d+)?")
_MODEL_CLASSES = ("Functional", "Sequential", "Model")
_FLOAT32 = {
    "module": "keras",
    "class_name": "DTypePolicy",
    "config": {"name": "float32"},
    "registered_name": None,
}
# Layers whose output has their input's shape.
_SAME_SHAPE = {
    "Activation", "Softmax", "ReLU", "LeakyReLU", "ELU", "PReLU", "Dropout", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
    "Rescaling", "Identity", "ActivityRegularization", "Masking", "Normalization",
}  # fmt: skip
_MERGES = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}
_GLOBAL_POOLS = {f"Global{kind}Pooling{d}D" for kind in ("Average", "Max") for d in "123"}


def _scale(x: Any, w: Any) -> Any:
    return x * w


# What `keras.layers.Lambda(lambda x, w: x * w)` stores: the function's marshalled bytecode.
_LAMBDA_CODE = base64.encodebytes(marshal.dumps(_scale.__code__)).decode("ascii")

Shape = list[int | None]


@dataclass
class BranchInput:
    name: str  # an identifier, made from the InputLayer's name
    shape: list[int | None]  # batch shape
    dtype: str


@dataclass
class Branch:
    """One model as it goes into the fused config."""

    name: str
    config: dict[str, Any]  # the model's config, renamed (and cut), as it is in the fused file
    renames: dict[str, str]  # new layer name -> name in the model's own config (all depths)
    inputs: list[BranchInput]
    output_shapes: list[Shape | None]
    output_names: list[str]
    axes: list[int] = field(default_factory=list)  # softmax axes, at="logits"
    given: dict[str, Any] = field(default_factory=dict)  # the config before the renames


@dataclass
class Assembly:
    """The fused config and what it is made of."""

    config: dict[str, Any]
    branches: list[Branch]
    inputs: list[dict[str, Any]]  # name, shape, dtype of each input of the fused model
    outputs: list[dict[str, Any]]
    input_slots: list[list[int]]  # for each branch, its inputs' positions
    inputs_mode: str
    inputs_reason: str
    layer_order: list[tuple[str, str]]  # (class name, layer name) of the fused model's layers


def prepare_branch(config: dict[str, Any], name: str, *, at: str = "output") -> Branch:
    """A model's config made ready to nest as branch `name`: cut at the logits if asked, every
    inner layer renamed, its inputs and outputs read."""
    config = copy.deepcopy(config)
    config.pop("compile_config", None)
    inner = config.get("config")
    if config.get("class_name") not in _MODEL_CLASSES or not isinstance(inner, dict):
        raise FusecliError(
            f"Model {name!r} is not a functional or Sequential model (its config holds a "
            f"{config.get('class_name')!r}); it cannot be nested in a fused model"
        )
    axes: list[int] = []
    if at == "logits":
        axes = _cut_before_softmax(config, name)
    output_shapes = output_shapes_of(config)
    output_names = _output_layer_names(config)
    inputs = _inputs_of(config, name)
    given = copy.deepcopy(config)
    renames: dict[str, str] = {}
    _rename(config, name, f"{name}_", renames)
    return Branch(name, config, renames, inputs, output_shapes, output_names, axes, given)


def assemble(
    branches: list[Branch],
    weights: tuple[float, ...],
    *,
    scale: str,
    inputs: str,
    activation: str,
    axes: list[int] | None,
) -> Assembly:
    """The fused model's config; see the module's docstring."""
    names = [b.name for b in branches]
    signatures = [[(i.name, i.shape, i.dtype) for i in b.inputs] for b in branches]
    mode, reason, shared = choose_mode(inputs, signatures, names)
    taken = set(names)
    new_inputs, slots = _fused_inputs(shared, branches, taken)
    _check_outputs_match(branches)
    out_names = _fused_output_names(branches[0], taken)
    layers: list[dict[str, Any]] = [_input_layer(i) for i in new_inputs]
    for branch, slot in zip(branches, slots, strict=True):
        args = [_tensor(new_inputs[i].shape, new_inputs[i].dtype, new_inputs[i].name) for i in slot]
        entry = dict(branch.config)
        entry["compile_config"] = {}  # as Keras writes a model loaded with compile=False
        entry["name"] = branch.name
        entry["inbound_nodes"] = [
            {
                "args": [args[0] if len(args) == 1 else args],
                "kwargs": {"mask": None if len(args) == 1 else [None] * len(args)},
            }
        ]
        layers.append(entry)
    scales, adds, softmaxes, outputs = [], [], [], []
    for j, out_name in enumerate(out_names):
        suffix = "" if len(out_names) == 1 else f"_{j}"
        shape = branches[0].output_shapes[j]
        scaled = []
        for branch, w in zip(branches, weights, strict=True):
            scale_name = unique(f"{branch.name}_scale{suffix}", taken)
            source = _tensor(branch.output_shapes[j], "float32", branch.name, tensor=j)
            scales.append(_scale_layer(scale, w, scale_name, source, shape))
            scaled.append(_tensor(shape, "float32", scale_name))
        add_name = out_name if activation == "none" else unique(f"{out_name}_logits", taken)
        adds.append(_layer("Add", add_name, {}, [scaled], {}, [shape] * len(scaled)))
        if activation != "none":
            axis = axes[j] if axes else -1
            softmaxes.append(
                _layer(
                    "Softmax",
                    out_name,
                    {"axis": axis},
                    [_tensor(shape, "float32", add_name)],
                    {"mask": None},
                    None,
                )
            )
        outputs.append({"name": out_name, "shape": shape, "dtype": "float32"})
    layers += scales + adds + softmaxes
    input_refs = [[i.name, 0, 0] for i in new_inputs]
    output_refs = [[o["name"], 0, 0] for o in outputs]
    config = {
        "module": "keras.src.models.functional",
        "class_name": "Functional",
        "config": {
            "name": "fused",
            "trainable": True,
            "layers": layers,
            "input_layers": input_refs[0] if len(input_refs) == 1 else input_refs,
            "output_layers": output_refs[0] if len(output_refs) == 1 else output_refs,
        },
        "registered_name": "Functional",
        "build_config": {"input_shape": None},
        "compile_config": {},
    }
    return Assembly(
        config=config,
        branches=branches,
        inputs=[{"name": i.name, "shape": i.shape, "dtype": i.dtype} for i in new_inputs],
        outputs=outputs,
        input_slots=slots,
        inputs_mode=mode,
        inputs_reason=reason,
        layer_order=[(str(e["class_name"]), str(e["name"])) for e in layers],
    )


def common_axes(branches: list[Branch]) -> list[int]:
    first = branches[0]
    for branch in branches[1:]:
        if branch.axes != first.axes:
            raise FusecliError(
                f"The final softmax of {first.name!r} works over axes {first.axes}, that of "
                f"{branch.name!r} over {branch.axes}; they must agree to fuse at the logits"
            )
    return first.axes


def undo_renames(config: Any, renames: dict[str, str]) -> Any:
    """A copy of `config` with every renamed layer name (and reference to it) put back."""
    return _map_names(config, renames)


def layer_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else None
    return [e for e in layers if isinstance(e, dict)] if isinstance(layers, list) else []


def is_model(entry: dict[str, Any]) -> bool:
    inner = entry.get("config")
    return (
        entry.get("class_name") in _MODEL_CLASSES
        and isinstance(inner, dict)
        and isinstance(inner.get("layers"), list)
    )


def layer_name(entry: dict[str, Any]) -> str:
    inner = entry.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    return str(name if name is not None else entry.get("name"))


# -- renaming --------------------------------------------------------------------------------


def rename_layers(config: dict[str, Any], name: str) -> dict[str, str]:
    """Rename a model config (in place) to `name`, its layers to `<name>_<layer>` at every
    depth; returns new name -> old name."""
    renames: dict[str, str] = {}
    _rename(config, name, f"{name}_", renames)
    return renames


def _rename(config: dict[str, Any], new_name: str, prefix: str, renames: dict[str, str]) -> None:
    """Rename the model to `new_name` and its layers to `prefix + name`, at every depth."""
    inner = config["config"]
    entries = layer_entries(config)
    mapping = {layer_name(e): f"{prefix}{layer_name(e)}" for e in entries}
    for old, new in mapping.items():
        renames[new] = old
    for entry in entries:
        old = layer_name(entry)
        new = mapping[old]
        if isinstance(entry.get("config"), dict):
            entry["config"]["name"] = new
        if "name" in entry:
            entry["name"] = new
        if "inbound_nodes" in entry:
            entry["inbound_nodes"] = _map_names(entry["inbound_nodes"], mapping)
        if is_model(entry):
            _rename(entry, new, f"{new}_", renames)
    for key in ("input_layers", "output_layers"):
        if key in inner:
            inner[key] = _map_names(inner[key], mapping)
    inner["name"] = new_name


def _map_names(value: Any, mapping: dict[str, str]) -> Any:
    """Replace layer names in references ([name, node, tensor] lists, keras_history) and in
    `name` fields."""
    if isinstance(value, list):
        if _is_ref(value) and value[0] in mapping:
            return [mapping[value[0]], *(_map_names(v, mapping) for v in value[1:])]
        return [_map_names(v, mapping) for v in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "name" and isinstance(item, str) and item in mapping:
                out[key] = mapping[item]
            else:
                out[key] = _map_names(item, mapping)
        return out
    return value


def _is_ref(value: list[Any]) -> bool:
    return (
        len(value) >= 3
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and isinstance(value[2], int)
    )


# -- cutting at the logits -------------------------------------------------------------------


def _cut_before_softmax(config: dict[str, Any], name: str) -> list[int]:
    """Cut `config` (in place) before its final softmax; the softmax axis of each output."""
    entries = layer_entries(config)
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
    refs = list(_output_refs(inner.get("output_layers")))
    by_name = {layer_name(e): e for e in entries}
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
            dropped.add(layer_name(layer))
    inner["layers"] = [e for e in inner["layers"] if layer_name(e) not in dropped]
    return axes


def _softmax_end(layer: dict[str, Any], name: str, j: int) -> tuple[int, bool]:
    """(axis, whether the layer is dropped) for a layer that ends in a softmax; refuses others."""
    class_name = layer.get("class_name")
    conf = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    if class_name == "Softmax":
        return _single_axis(conf.get("axis", -1), name, layer), True
    if class_name == "Activation" and _is_softmax(conf.get("activation")):
        return -1, True
    if _is_softmax(conf.get("activation")) and not is_model(layer):
        conf["activation"] = "linear"
        return -1, False
    activation = conf.get("activation")
    note = f", activation {_activation_name(activation)!r}" if activation is not None else ""
    raise FusecliError(
        f"Model {name!r} has no final softmax to fuse before: output {j} comes from "
        f"layer {layer_name(layer)!r} ({class_name}{note}). --at logits needs a last layer with "
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
        f"Model {name!r}: the final Softmax layer {layer_name(layer)!r} works over several axes "
        f"({axis}); --at logits supports one. Received: axis={axis}"
    )


def _uses(entries: list[dict[str, Any]], target: str) -> int:
    count = 0
    for entry in entries:
        for ref in _refs(entry.get("inbound_nodes", [])):
            if ref[0] == target:
                count += 1
    return count


def _input_ref(layer: dict[str, Any], node: int, name: str) -> list[Any]:
    nodes = layer.get("inbound_nodes") or []
    refs = list(_refs(nodes[node] if node < len(nodes) else []))
    if len(refs) != 1:
        raise FusecliError(
            f"Model {name!r}: cannot find the input of its final layer {layer_name(layer)!r}"
        )
    return refs[0]


def _refs(value: Any) -> Iterator[list[Any]]:
    """Every tensor reference in a node: keras_history lists and Keras 2 [name, node, tensor]."""
    if isinstance(value, dict):
        conf = value.get("config")
        if value.get("class_name") == "__keras_tensor__" and isinstance(conf, dict):
            history = conf.get("keras_history")
            if isinstance(history, list):
                yield history
            return
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        if _is_ref(value):
            yield value
            return
        for item in value:
            yield from _refs(item)


def _output_refs(value: Any) -> Iterator[list[Any]]:
    """The references in an input/output spec, in the order keras.tree.flatten gives the
    tensors (a dict's by sorted key)."""
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _output_refs(value[key])
    elif isinstance(value, list):
        if _is_ref(value):
            yield value
        else:
            for item in value:
                yield from _output_refs(item)


# -- inputs and outputs ----------------------------------------------------------------------


def _inputs_of(config: dict[str, Any], name: str) -> list[BranchInput]:
    entries = layer_entries(config)
    if config.get("class_name") == "Sequential":
        found = entries[:1] if entries and entries[0].get("class_name") == "InputLayer" else []
    else:
        inner = config["config"]
        if isinstance(inner.get("input_layers"), dict):
            raise FusecliError(
                f"Model {name!r} takes its inputs as a dict; fuse supports models taking one "
                "input or a list"
            )
        by_name = {layer_name(e): e for e in entries}
        found = [by_name.get(ref[0]) for ref in _output_refs(inner.get("input_layers"))]
    if not found or any(e is None or e.get("class_name") != "InputLayer" for e in found):
        raise FusecliError(f"Model {name!r} has no defined inputs (build it with an Input)")
    out = []
    for entry in found:
        conf = entry["config"]
        shape = conf.get("batch_shape", conf.get("batch_input_shape"))
        if not isinstance(shape, list):
            raise FusecliError(f"Model {name!r}: input {layer_name(entry)!r} has no shape")
        dtype = conf.get("dtype", "float32")
        if isinstance(dtype, dict):
            dtype = dtype.get("config", {}).get("name", "float32")
        out.append(BranchInput(identifier(layer_name(entry)), list(shape), str(dtype)))
    return out


def output_shapes_of(config: dict[str, Any]) -> list[Shape | None]:
    """The shapes of a model's outputs, read from its config where the last layers say them;
    None where they do not."""
    entries = layer_entries(config)
    if config.get("class_name") == "Sequential":
        real = [e for e in entries if e.get("class_name") != "InputLayer"]
        if not real:
            return [None]
        inputs = _sequential_input_shape(config)
        for entry in real:
            inputs = _layer_output(entry, [inputs] if inputs is not None else None, 0)
        return [inputs]
    by_name = {layer_name(e): e for e in entries}
    shapes = []
    for ref in _output_refs(config["config"].get("output_layers")):
        entry = by_name.get(ref[0])
        shapes.append(None if entry is None else _shape_of(entry, by_name, ref[1], ref[2], 0))
    return shapes


def _output_layer_names(config: dict[str, Any]) -> list[str]:
    if config.get("class_name") == "Sequential":
        return [layer_name(layer_entries(config)[-1])] if layer_entries(config) else ["output"]
    value = config["config"].get("output_layers")
    if isinstance(value, dict):
        return [str(k) for k in sorted(value)]
    return [str(ref[0]) for ref in _output_refs(value)]


def _sequential_input_shape(config: dict[str, Any]) -> Shape | None:
    entries = layer_entries(config)
    if entries and entries[0].get("class_name") == "InputLayer":
        shape = entries[0]["config"].get("batch_shape")
        return list(shape) if isinstance(shape, list) else None
    build = config.get("build_config") or {}
    shape = build.get("input_shape")
    return list(shape) if isinstance(shape, list) else None


def _shape_of(
    entry: dict[str, Any], by_name: dict[str, dict[str, Any]], node: int, tensor: int, depth: int
) -> Shape | None:
    if depth > 200:
        return None
    nodes = entry.get("inbound_nodes") or []
    in_shapes = None
    if node < len(nodes):
        in_shapes = [_ref_shape(ref, by_name, depth) for ref in _tensor_configs(nodes[node])]
    return _layer_output(entry, in_shapes, tensor)


def _tensor_configs(node: Any) -> list[dict[str, Any]]:
    """The __keras_tensor__ configs among a node's positional args, in order."""
    args = node.get("args", []) if isinstance(node, dict) else []
    found: list[dict[str, Any]] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__" and isinstance(
                value.get("config"), dict
            ):
                found.append(value["config"])
            return
        if isinstance(value, list):
            for item in value:
                walk(item)

    walk(args)
    return found


def _ref_shape(tensor: dict[str, Any], by_name: dict[str, dict[str, Any]], depth: int) -> Any:
    shape = tensor.get("shape")
    return list(shape) if isinstance(shape, list) else None


def _layer_output(entry: dict[str, Any], in_shapes: list[Any] | None, tensor: int) -> Shape | None:
    """A layer's output shape from its input shapes, for the layers models usually end with."""
    class_name = entry.get("class_name")
    conf = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    if is_model(entry):
        shapes = output_shapes_of(entry)
        return shapes[tensor] if tensor < len(shapes) else None
    if tensor != 0:
        return None
    if not in_shapes or in_shapes[0] is None:
        build = entry.get("build_config") or {}
        shape = build.get("input_shape")
        if not isinstance(shape, list):
            return None
        in_shapes = [shape]
    first = in_shapes[0]
    if not isinstance(first, list) or (first and isinstance(first[0], list)):
        return None
    if class_name in _SAME_SHAPE:
        return list(first)
    if class_name == "Dense" and isinstance(conf.get("units"), int):
        return [*first[:-1], conf["units"]]
    if class_name in _MERGES:
        return list(first)
    if class_name == "Flatten" and first:
        rest = first[1:]
        return [first[0], math.prod(rest) if all(isinstance(d, int) for d in rest) else None]
    if class_name in _GLOBAL_POOLS and len(first) >= 2:
        if conf.get("keepdims"):
            return None
        channels_first = conf.get("data_format") == "channels_first"
        return [first[0], first[1] if channels_first else first[-1]]
    if class_name == "Reshape" and isinstance(conf.get("target_shape"), list):
        target = list(conf["target_shape"])
        if -1 in target:
            known = first[1:]
            if not all(isinstance(d, int) for d in known):
                return None
            rest = math.prod(d for d in target if d != -1)
            target[target.index(-1)] = math.prod(known) // rest if rest else None
        return [first[0], *target]
    if class_name == "EinsumDense" and isinstance(conf.get("output_shape"), list):
        return [first[0], *conf["output_shape"]]
    return None


def _fused_inputs(
    shared: list[tuple[int | None, ...]] | None, branches: list[Branch], taken: set[str]
) -> tuple[list[BranchInput], list[list[int]]]:
    if shared is not None:
        new_inputs = [
            BranchInput(
                unique("input" if _GENERIC_INPUT.fullmatch(i.name) else i.name, taken),
                list(shape),
                i.dtype,
            )
            for i, shape in zip(branches[0].inputs, shared, strict=True)
        ]
        return new_inputs, [list(range(len(new_inputs))) for _ in branches]
    new_inputs, slots = [], []
    for branch in branches:
        slots.append([])
        for i in branch.inputs:
            label = f"{branch.name}_{'input' if _GENERIC_INPUT.fullmatch(i.name) else i.name}"
            slots[-1].append(len(new_inputs))
            new_inputs.append(BranchInput(unique(label, taken), i.shape, i.dtype))
    return new_inputs, slots


def _check_outputs_match(branches: list[Branch]) -> None:
    first = branches[0]
    for branch in branches[1:]:
        if len(branch.output_shapes) != len(first.output_shapes):
            raise FusecliError(
                f"Models must have the same number of outputs to be fused. "
                f"Received: {first.name!r} has {len(first.output_shapes)}, {branch.name!r} has "
                f"{len(branch.output_shapes)}"
            )
        for j, (a, b) in enumerate(zip(first.output_shapes, branch.output_shapes, strict=True)):
            if a != b:
                raise FusecliError(
                    f"Output {j} of {first.name!r} has shape {fmt_shape(a)} but output "
                    f"{j} of {branch.name!r} has shape {fmt_shape(b)}; outputs are fused "
                    "position by position and must match"
                )


def _fused_output_names(branch: Branch, taken: set[str]) -> list[str]:
    count = len(branch.output_shapes)
    if count == 1:
        return [unique("fused", taken)]
    names = branch.output_names if len(branch.output_names) == count else []
    names = names or [str(j) for j in range(count)]
    return [unique(f"fused_{identifier(n)}", taken) for n in names]


# -- layer entries ---------------------------------------------------------------------------


def _tensor(shape: Shape | None, dtype: str, layer: str, tensor: int = 0) -> dict[str, Any]:
    return {
        "class_name": "__keras_tensor__",
        "config": {"shape": shape, "dtype": dtype, "keras_history": [layer, 0, tensor]},
    }


def _input_layer(spec: BranchInput) -> dict[str, Any]:
    return {
        "module": "keras.layers",
        "class_name": "InputLayer",
        "config": {
            "batch_shape": spec.shape,
            "dtype": spec.dtype,
            "sparse": False,
            "ragged": False,
            "name": spec.name,
            "optional": False,
        },
        "registered_name": None,
        "name": spec.name,
        "inbound_nodes": [],
    }


def _layer(
    class_name: str,
    name: str,
    settings: dict[str, Any],
    args: list[Any],
    kwargs: dict[str, Any],
    input_shape: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "module": "keras.layers",
        "class_name": class_name,
        "config": {"name": name, "trainable": True, "dtype": dict(_FLOAT32), **settings},
        "registered_name": None,
    }
    if input_shape is not None:
        entry["build_config"] = {"input_shape": input_shape}
    entry["name"] = name
    entry["inbound_nodes"] = [{"args": args, "kwargs": kwargs}]
    return entry


def _scale_layer(
    scale: str, weight: float, name: str, source: dict[str, Any], shape: Shape | None
) -> dict[str, Any]:
    if scale == "lambda":
        function = {
            "class_name": "__lambda__",
            "config": {"code": _LAMBDA_CODE, "defaults": None, "closure": None},
        }
        settings = {"function": function, "arguments": {"w": weight}}
        return _layer("Lambda", name, settings, [source], {"mask": None}, shape)
    settings = {"scale": weight, "offset": 0.0}
    return _layer("Rescaling", name, settings, [source], {}, shape)


def fmt_shape(shape: Any) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
