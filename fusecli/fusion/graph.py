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
import marshal
import re
from dataclasses import dataclass, field
from typing import Any

from fusecli.config import walker
from fusecli.config.walker import MODEL_CLASSES, io_refs, is_model, layers
from fusecli.errors import FusecliError
from fusecli.fusion.inputs import choose_mode
from fusecli.fusion.logits import cut_before_softmax
from fusecli.fusion.naming import identifier, unique

# Input names Keras makes up; the fused model says "input" instead.
_GENERIC_INPUT = re.compile(r"(input|input_layer|keras_tensor)(_\d+)?")
_FLOAT32 = {
    "module": "keras",
    "class_name": "DTypePolicy",
    "config": {"name": "float32"},
    "registered_name": None,
}


def _scale(x: Any, w: Any) -> Any:
    return x * w


# What `keras.layers.Lambda(lambda x, w: x * w)` stores: the function's marshalled bytecode.
LAMBDA_CODE = base64.encodebytes(marshal.dumps(_scale.__code__)).decode("ascii")

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
class Head:
    """A tune recipe's head in place of the plain weighted sum (`fusecli.fusion.recipe_head`):
    each branch's output calibrated, softmax(z / T), and/or the branches' outputs stacked into a
    Dense layer (its weights are set once the model is built) followed by a softmax."""

    temperatures: list[float] | None = None
    stack_units: int | None = None


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
    config, axes = _given(config, name, at)
    output_shapes = output_shapes_of(config)
    output_names = _output_layer_names(config)
    inputs = _inputs_of(config, name)
    given = walker.copied(config)
    renames: dict[str, str] = {}
    _rename(config, name, f"{name}_", renames)
    return Branch(name, config, renames, inputs, output_shapes, output_names, axes, given)


def given_config(config: dict[str, Any], name: str, *, at: str = "output") -> dict[str, Any]:
    """`prepare_branch(config, name, at=at).given`, without reading the rest."""
    return _given(config, name, at)[0]


def _given(config: dict[str, Any], name: str, at: str) -> tuple[dict[str, Any], list[int]]:
    """A copy of a model's config as it is nested before the renames (cut at the logits if
    asked), and the softmax axes of the cut."""
    config = walker.copied(config)
    config.pop("compile_config", None)
    inner = config.get("config")
    if config.get("class_name") not in MODEL_CLASSES or not isinstance(inner, dict):
        raise FusecliError(
            f"Model {name!r} is not a functional or Sequential model (its config holds a "
            f"{config.get('class_name')!r}); it cannot be nested in a fused model"
        )
    axes = cut_before_softmax(config, name) if at == "logits" else []
    return config, axes


def assemble(
    branches: list[Branch],
    weights: tuple[float, ...],
    *,
    scale: str,
    inputs: str,
    activation: str,
    axes: list[int] | None,
    head: Head | None = None,
) -> Assembly:
    """The fused model's config; see the module's docstring. `head` replaces the weighted sum."""
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
        sources = [_tensor(b.output_shapes[j], "float32", b.name, tensor=j) for b in branches]
        if head is not None and head.temperatures is not None:
            sources = _calibrated(branches, sources, head.temperatures, shape, taken, scales)
        if head is not None and head.stack_units is not None:
            outputs.append(_stack(sources, head.stack_units, out_name, shape, taken, adds))
            continue
        scaled = []
        for branch, w, source in zip(branches, weights, sources, strict=True):
            scale_name = unique(f"{branch.name}_scale{suffix}", taken)
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


def _calibrated(
    branches: list[Branch],
    sources: list[dict[str, Any]],
    temperatures: list[float],
    shape: Shape | None,
    taken: set[str],
    layers: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """softmax(z / T) of each branch's output: Rescaling(1 / T), then Softmax."""
    out = []
    for branch, source, t in zip(branches, sources, temperatures, strict=True):
        scaled = unique(f"{branch.name}_temperature", taken)
        layers.append(
            _layer("Rescaling", scaled, {"scale": 1.0 / t, "offset": 0.0}, [source], {}, shape)
        )
        calibrated = unique(f"{branch.name}_calibrated", taken)
        args = [_tensor(shape, "float32", scaled)]
        layers.append(_layer("Softmax", calibrated, {"axis": -1}, args, {"mask": None}, shape))
        out.append(_tensor(shape, "float32", calibrated))
    return out


def _stack(
    sources: list[dict[str, Any]],
    units: int,
    out_name: str,
    shape: Shape | None,
    taken: set[str],
    layers: list[dict[str, Any]],
) -> dict[str, Any]:
    """softmax(Dense(concat(outputs))): the stacking head; the output's description."""
    features = unique("stack_features", taken)
    layers.append(_layer("Concatenate", features, {"axis": -1}, [sources], {}, None))
    joined = None
    if shape is not None and shape and isinstance(shape[-1], int):
        joined = [*shape[:-1], shape[-1] * len(sources)]
    dense = unique("stack", taken)
    args = [_tensor(joined, "float32", features)]
    layers.append(_layer("Dense", dense, {"units": units}, args, {}, joined))
    out_shape = None if shape is None else [*shape[:-1], units]
    args = [_tensor(out_shape, "float32", dense)]
    layers.append(_layer("Softmax", out_name, {"axis": -1}, args, {"mask": None}, out_shape))
    return {"name": out_name, "shape": out_shape, "dtype": "float32"}


def common_axes(branches: list[Branch]) -> list[int]:
    """The softmax axes every branch shares, counted from the end where an output's rank is
    known (Softmax(axis=1) of a (batch, classes) output is its axis -1); the first's as given."""
    first, axes = branches[0], _from_end(branches[0])
    for branch in branches[1:]:
        if _from_end(branch) != axes:
            raise FusecliError(
                f"The final softmax of {first.name!r} works over axes {first.axes}, that of "
                f"{branch.name!r} over {branch.axes}; they must agree to fuse at the logits"
            )
    return first.axes


def _from_end(branch: Branch) -> list[int]:
    shapes = list(branch.output_shapes) + [None] * len(branch.axes)
    return [
        axis - len(shape) if axis >= 0 and shape is not None and axis < len(shape) else axis
        for axis, shape in zip(branch.axes, shapes, strict=False)
    ]


def undo_renames(config: Any, renames: dict[str, str]) -> Any:
    """A copy of `config` with every renamed layer name (and reference to it) put back."""
    return _map_names(config, renames)


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
    entries = layers(config)
    mapping = {walker.name(e): f"{prefix}{walker.name(e)}" for e in entries}
    for old, new in mapping.items():
        renames[new] = old
    for entry in entries:
        old = walker.name(entry)
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
    """Replace layer names in references ([name, node, tensor] lists or tuples, keras_history)
    and in `name` fields."""
    if isinstance(value, list | tuple):
        if walker.is_ref(value) and value[0] in mapping:
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


# -- inputs and outputs ----------------------------------------------------------------------


def _inputs_of(config: dict[str, Any], name: str) -> list[BranchInput]:
    entries = layers(config)
    if config.get("class_name") == "Sequential":
        found = entries[:1] if entries and entries[0].get("class_name") == "InputLayer" else []
    else:
        inner = config["config"]
        if isinstance(inner.get("input_layers"), dict):
            raise FusecliError(
                f"Model {name!r} takes its inputs as a dict; fuse supports models taking one "
                "input or a list"
            )
        by_name = {walker.name(e): e for e in entries}
        found = [by_name.get(ref[0]) for ref in io_refs(inner.get("input_layers"))]
    if not found or any(e is None or e.get("class_name") != "InputLayer" for e in found):
        raise FusecliError(f"Model {name!r} has no defined inputs (build it with an Input)")
    out = []
    for entry in found:
        conf = entry["config"]
        shape = conf.get("batch_shape", conf.get("batch_input_shape"))
        if not isinstance(shape, list | tuple):
            raise FusecliError(f"Model {name!r}: input {walker.name(entry)!r} has no shape")
        dtype = conf.get("dtype", "float32")
        if isinstance(dtype, dict):
            dtype = dtype.get("config", {}).get("name", "float32")
        out.append(BranchInput(identifier(walker.name(entry)), list(shape), str(dtype)))
    return out


def output_shapes_of(config: dict[str, Any]) -> list[Shape | None]:
    """The shapes of a model's outputs as `fusecli.config.shapes` computes them from its config;
    None for one it cannot compute fully."""
    from fusecli.config.shapes import UNKNOWN, model_outputs

    try:
        specs = [spec for _, spec in model_outputs(config)]
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return [None] * len(_output_layer_names(config))
    return [
        None if spec.shape is None or UNKNOWN in spec.shape else list(spec.shape) for spec in specs
    ]


def _output_layer_names(config: dict[str, Any]) -> list[str]:
    if config.get("class_name") == "Sequential":
        return [walker.name(layers(config)[-1])] if layers(config) else ["output"]
    value = config["config"].get("output_layers")
    if isinstance(value, dict):
        return [str(k) for k in sorted(value)]
    return [str(ref[0]) for ref in io_refs(value)]


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
    return walker.keras_tensor([layer, 0, tensor], shape, dtype)


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
            "config": {"code": LAMBDA_CODE, "defaults": None, "closure": None},
        }
        settings = {"function": function, "arguments": {"w": weight}}
        return _layer("Lambda", name, settings, [source], {"mask": None}, shape)
    settings = {"scale": weight, "offset": 0.0}
    return _layer("Rescaling", name, settings, [source], {}, shape)


def fmt_shape(shape: Any) -> str:
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
