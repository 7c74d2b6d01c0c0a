"""Fused `.h5` files that tf-keras 2.x and Keras 3 both load: a flat graph in Keras 2's schema.

Each model is inlined (`fusecli.formats.keras2_flat`): every layer named `<branch>_<its path>`,
the branches' inputs merged when shared, then one `Rescaling(w)` per branch and output, an `Add`
per output (and a `Softmax` when asked). The config is Keras 2's (`batch_input_shape`, Keras 2
layer configs, list nodes), with each layer's config one both loaders read alike. Weights are
copied group by group from the inputs' `model_weights/<layer>/` by their `weight_names`
(`fusecli.formats.keras2_weights`), HDF5 object copies, no tensor in memory.

Both loaders pair weight groups with layers by position: the k-th group with weights in
`layer_names` goes to the k-th layer with weights in `model.layers`, which both order by depth
in the graph (`layer_order`, a port of `keras.src.ops.function.map_graph`, which tf-keras'
`_map_graph_network` computes alike).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.config import walker
from fusecli.errors import FusecliError, ModelFileError, VerificationError
from fusecli.formats import archive, keras2, keras3_to_keras2
from fusecli.formats.keras2_flat import FlatModel, NotFlat, both_loaders, check_masks, flatten
from fusecli.formats.keras2_flat import input_layer as input_layer_config
from fusecli.formats.modelfile import ModelFile, open_weights, read_model_file
from fusecli.formats.recipe import Recipe, write_h5_recipe
from fusecli.fusion.graph import LAMBDA_CODE, Assembly
from fusecli.fusion.logits import cut_before_softmax
from fusecli.fusion.writer import H5_WEIGHTS, Placed, Source, Written

# The schema written: Keras 2's. Both loaders read `keras_version` only to convert Keras 1 files.
KERAS2_SCHEMA_VERSION = "2.15.0"
SUGGESTION = "write a .keras file instead (-o fused.keras), which Keras 3 loads"


@dataclass
class FlatPlan:
    """The flat fused model: its config, its layers' order, and where each weight comes from."""

    config: dict[str, Any]
    order: list[str]  # layer names in model.layers order
    weights: dict[str, list[tuple[int, str, str]]]  # layer -> (branch, source path, dataset)
    sources_config: list[dict[str, Any]]  # each input's model config, as read
    scale: str = "rescaling"  # the scaling layers of the head: Rescaling, or Lambda (--scale)


def cannot(reason: str) -> FusecliError:
    """The one-line refusal of a `.h5` output."""
    return FusecliError(
        f"Cannot write a .h5 file that both tf-keras 2.x and Keras 3 load: {reason}; {SUGGESTION}"
    )


def check(model_file: ModelFile, name: str, at: str = "output") -> None:
    """Raise `NotFlat` if this Keras 2 model has no flat form both loaders read alike (and
    `FusecliError` if `at="logits"` and its logits cannot be reached)."""
    flat = flatten(branch_config(model_file.config, name, at)[0], f"{name}_")
    both_loaders(flat.layers, model_file.path)
    check_masks(flat.layers, model_file.path)


def branch_config(config: dict[str, Any], name: str, at: str) -> tuple[dict[str, Any], list[int]]:
    """A Keras 2 model config as it goes into the flat graph: itself, or with `at="logits"` a
    copy cut before its final softmax by the rules every fusion follows
    (`fusecli.fusion.logits`; `FusecliError` where the logits cannot be reached); the softmax
    axis of each output cut."""
    if at != "logits":
        return config, []
    config = walker.copied(config)
    if config.get("class_name") == "Sequential" and isinstance(config.get("config"), list):
        config["config"] = {"name": "sequential", "layers": config["config"]}  # Keras <= 2.1
    return config, cut_before_softmax(config, name)


def plan(
    files: list[ModelFile],
    assembly: Assembly,
    weights: tuple[float, ...],
    activation: str,
    found: list[dict[tuple[str, ...], list[Any]]] | None = None,
    *,
    at: str = "output",
    scale: str = "rescaling",
) -> FlatPlan:
    """Compose the flat fused config for Keras 2 `.h5` inputs, following the decisions (input
    sharing, names, outputs) of `assembly`; `found`: each file's `layer_weights`, if read
    already (in a child process); `at="logits"`: each model cut before its final softmax;
    `scale`: "rescaling" or "lambda" (the scaling layers). Raises `NotFlat`."""
    taken_head = {layer_name for _, layer_name in assembly.layer_order}
    layers: list[dict[str, Any]] = []
    fused_inputs = assembly.inputs
    for spec in fused_inputs:
        conf = input_layer_config(spec["name"], spec["shape"], spec["dtype"])
        layers.append(
            {"class_name": "InputLayer", "config": conf, "name": spec["name"], "inbound_nodes": []}
        )
    sources: dict[str, list[tuple[int, str, str]]] = {}
    branch_outputs: list[list[tuple[str, int, int]]] = []
    for i, (model_file, branch) in enumerate(zip(files, assembly.branches, strict=True)):
        config, axes = branch_config(model_file.config, branch.name, at)
        if axes != branch.axes:  # the cut of the Keras 2 config and of its Keras 3 reading
            raise NotFlat(f"its softmax axes read {axes} in Keras 2 but {branch.axes} in Keras 3")
        flat = flatten(config, f"{branch.name}_")
        both_loaders(flat.layers, model_file.path)
        check_masks(flat.layers, model_file.path)
        slot = assembly.input_slots[i]
        if len(flat.inputs) != len(slot):
            raise NotFlat(f"model {branch.name!r} has {len(flat.inputs)} inputs after inlining")
        to_fused = {t[0]: fused_inputs[k]["name"] for t, k in zip(flat.inputs, slot, strict=True)}
        if found is not None:
            by_origin = found[i]
        else:
            by_origin = keras3_to_keras2.read_layer_weights(Path(model_file.path))
            if isinstance(by_origin, str):
                raise NotFlat(by_origin)
        known = {layer.origin for layer in flat.layers}
        stray = [o for o, names in by_origin.items() if names and o not in known]
        if stray:
            raise NotFlat(f"weights of {'/'.join(stray[0])!r} belong to no layer of its graph")
        for layer in flat.layers:
            if layer.class_name == "InputLayer":
                continue
            if layer.name in taken_head or layer.name in sources:
                raise NotFlat(f"two layers would be named {layer.name!r}")
            spec = layer.spec()
            spec["inbound_nodes"] = _rewire(spec["inbound_nodes"], to_fused)
            layers.append(spec)
            sources[layer.name] = [_placed(i, path) for path in by_origin.get(layer.origin, [])]
        branch_outputs.append([_renamed(t, to_fused) for t in flat.outputs])
    outputs = _head(layers, assembly, branch_outputs, weights, activation, scale)
    config = {
        "class_name": "Functional",
        "config": {
            "name": "fused",
            "trainable": True,
            "layers": layers,
            "input_layers": _one_or_list([[spec["name"], 0, 0] for spec in fused_inputs]),
            "output_layers": _one_or_list(outputs),
        },
    }
    order = layer_order(config)
    unreached = [name for name in sources if name not in order and sources[name]]
    if unreached:
        raise NotFlat(f"layer {unreached[0]!r} holds weights but is not on any output's path")
    return FlatPlan(config, order, sources, [f.config for f in files], scale)


def plan_single(model_file: ModelFile) -> FlatPlan:
    """One model (Keras 2, or Keras 3 converted) inlined as it is (no head, layer names kept
    where not nested), for `merge` into another format. Raises `NotFlat`."""
    as_read = model_file
    model_file = keras3_to_keras2.as_keras2(model_file)
    flat = flatten(model_file.config, "")
    both_loaders(flat.layers, model_file.path)
    check_masks(flat.layers, model_file.path)
    by_origin = keras3_to_keras2.layer_weights(as_read)  # the config as read, not read again
    if isinstance(by_origin, str):
        raise NotFlat(by_origin)
    name = model_file.config.get("config", {})
    name = name.get("name", "model") if isinstance(name, dict) else "model"
    config = {
        "class_name": "Functional",
        "config": {
            "name": name,
            "trainable": True,
            "layers": [layer.spec() for layer in flat.layers],
            "input_layers": _one_or_list([list(t) for t in flat.inputs]),
            "output_layers": _one_or_list([list(t) for t in flat.outputs]),
        },
    }
    weights = {
        layer.name: [_placed(0, path) for path in by_origin.get(layer.origin, [])]
        for layer in flat.layers
    }
    known = {layer.origin for layer in flat.layers}
    if any(names and origin not in known for origin, names in by_origin.items()):
        raise NotFlat("some of its weights belong to no layer of its graph")
    return FlatPlan(config, layer_order(config), weights, [as_read.config])


def _placed(branch: int, path: str | tuple[str, str]) -> tuple[int, str, str]:
    """(branch, source path, dataset in the output): a Keras 2 file's weight keeps its name
    below the layer's group; a Keras 3 file's comes named (`fusecli.formats.keras3_to_keras2`)."""
    if isinstance(path, tuple):
        return (branch, *path)
    return (branch, path, path.split("/", 1)[1])


def _one_or_list(refs: list[list[Any]]) -> list[Any]:
    """One ref for a model of one input (or output), as Keras 2 wrote it: Keras 3 then takes
    and returns a tensor, not a list of one."""
    return refs[0] if len(refs) == 1 else refs


def _rewire(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, list):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
            return [mapping.get(value[0], value[0]), *value[1:]]
        return [_rewire(v, mapping) for v in value]
    return value


def _renamed(t: tuple[str, int, int], mapping: dict[str, str]) -> tuple[str, int, int]:
    return (mapping.get(t[0], t[0]), t[1], t[2])


def _head(
    layers: list[dict[str, Any]],
    assembly: Assembly,
    branch_outputs: list[list[tuple[str, int, int]]],
    weights: tuple[float, ...],
    activation: str,
    scale: str,
) -> list[list[Any]]:
    """The scaling, adding (and softmax) layers, named as in `assembly`; the output refs."""
    by_name = {
        layer_name: entry
        for entry in assembly.config["config"]["layers"]
        for layer_name in [entry["name"]]
    }
    refs = []
    for j, out in enumerate(assembly.outputs):
        last = by_name[out["name"]]
        add = last if last["class_name"] == "Add" else by_name[_arg_names(last)[0]]
        scaled = _arg_names(add)
        for k, (scale_name, w) in enumerate(zip(scaled, weights, strict=True)):
            source = branch_outputs[k][j]
            conf = {"name": scale_name, "trainable": True, "dtype": "float32"}
            if scale == "lambda":
                layers.append(lambda_entry(conf, w, [[*source, {}]]))
                continue
            conf |= {"scale": w, "offset": 0.0}
            layers.append(_entry("Rescaling", conf, [[*source, {}]]))
        conf = {"name": add["name"], "trainable": True, "dtype": "float32"}
        layers.append(_entry("Add", conf, [[s, 0, 0, {}] for s in scaled]))
        if activation != "none":
            axis = last["config"].get("axis", -1)
            conf = {"name": last["name"], "trainable": True, "dtype": "float32", "axis": axis}
            layers.append(_entry("Softmax", conf, [[add["name"], 0, 0, {}]]))
        refs.append([out["name"], 0, 0])
    return refs


def lambda_entry(conf: dict[str, Any], w: float, node: list[list[Any]]) -> dict[str, Any]:
    """`Lambda(lambda x, w: x * w, arguments={"w": w})` as tf-keras writes it into a `.h5`
    (the bytecode `fusecli.fusion.graph` writes), with no `module` beside its config: Keras 3's
    legacy loader then converts it as it converts tf-keras' own (`function` from a list to its
    `__lambda__` dict), and tf-keras reads it as it wrote it."""
    conf = dict(conf)
    conf |= {
        "function": [LAMBDA_CODE, None, None],
        "function_type": "lambda",
        "module": None,
        "output_shape": None,
        "output_shape_type": "raw",
        "output_shape_module": None,
        "arguments": {"w": w},
    }
    return {"class_name": "Lambda", "config": conf, "name": conf["name"], "inbound_nodes": [node]}


def _entry(class_name: str, conf: dict[str, Any], node: list[list[Any]]) -> dict[str, Any]:
    return {"class_name": class_name, "config": conf, "name": conf["name"], "inbound_nodes": [node]}


def _arg_names(entry: dict[str, Any]) -> list[str]:
    args = entry["inbound_nodes"][0]["args"][0]
    tensors = args if isinstance(args, list) else [args]
    return [t["config"]["keras_history"][0] for t in tensors]


# -- model.layers, as Keras orders them --------------------------------------------------------


def layer_order(config: dict[str, Any]) -> list[str]:
    """The layers of a flat functional config (Keras 2 list nodes) in `model.layers` order:
    by decreasing depth from the outputs, ties by first visit of a depth-first walk from the
    outputs (`keras.src.ops.function.map_graph`)."""
    conf = config["config"]
    specs = {e["name"]: e for e in conf["layers"]}
    finished: set[tuple[str, int]] = set()
    in_progress: set[tuple[str, int]] = set()
    ordered: list[tuple[str, int]] = []
    index: dict[str, int] = {}

    def parents(node: tuple[str, int]) -> list[tuple[str, int]]:
        spec = specs[node[0]]
        if spec["class_name"] == "InputLayer":
            return []
        return [(e[0], e[1]) for e in spec["inbound_nodes"][node[1]]]

    def visit(node: tuple[str, int]) -> None:
        if node in finished:
            return
        if node in in_progress:
            raise NotFlat(f"its graph has a cycle through {node[0]!r}")
        index.setdefault(node[0], len(index))
        in_progress.add(node)
        for parent in parents(node):
            visit(parent)
        finished.add(node)
        in_progress.remove(node)
        ordered.append(node)

    for ref in _refs(conf["output_layers"]):
        visit((ref[0], ref[1]))
    node_depth: dict[tuple[str, int], int] = {}
    layer_depth: dict[str, int] = {}
    for node in reversed(ordered):
        depth = node_depth.setdefault(node, 0)
        depth = max(depth, layer_depth.get(node[0], 0))
        layer_depth[node[0]] = depth
        node_depth[node] = depth
        for parent in parents(node):
            node_depth[parent] = max(depth + 1, node_depth.get(parent, 0))
    for ref in _refs(conf["input_layers"]):
        if ref[0] not in layer_depth:
            layer_depth[ref[0]] = 0
            index[ref[0]] = -1
    return sorted(layer_depth, key=lambda name: (-layer_depth[name], index[name]))


# -- writing and proving ---------------------------------------------------------------------


def write(
    tmp: Path, flat: FlatPlan, sources: list[Source], recipe: Recipe | None = None
) -> Written:
    """The `.h5` file: Keras 2's attributes, the flat config, the weights copied by HDF5, and
    the recipe (`fusecli.formats.recipe`)."""
    attrs = {
        "backend": "tensorflow",
        "keras_version": KERAS2_SCHEMA_VERSION,
        "model_config": json.dumps(flat.config),
    }
    written = Written()
    with contextlib.ExitStack() as stack:
        roots: dict[int, h5py.Group] = {}
        h5 = stack.enter_context(archive.h5_model(tmp, attrs))
        group = h5.create_group(H5_WEIGHTS)
        group.attrs["layer_names"] = np.array([n.encode("utf-8") for n in flat.order], dtype=object)
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = KERAS2_SCHEMA_VERSION
        for name in flat.order:
            layer_group = group.create_group(name)
            names = []
            for branch, source_path, dataset in flat.weights.get(name, []):
                if branch not in roots:
                    roots[branch] = stack.enter_context(open_weights(sources[branch].path))
                try:
                    count = archive.copy_dataset(roots[branch], source_path, layer_group, dataset)
                except (OSError, KeyError, TypeError, ValueError) as e:
                    raise ModelFileError(
                        sources[branch].given, f"weights cannot be copied ({e})"
                    ) from None
                names.append(dataset)
                written.placed.append(Placed(branch, f"{name}/{dataset}", source_path, count))
            layer_group.attrs["weight_names"] = np.array(
                [n.encode("utf-8") for n in names], dtype=object if names else np.float64
            )
        if recipe is not None:
            write_h5_recipe(h5, recipe)
    return written


def prove(
    path: Path, flat: FlatPlan, sources: list[Source], written: Written, weights: tuple[float, ...]
) -> dict[str, Any]:
    """The written file read back, without Keras: its config is the composed one, its groups
    listed in the order Keras pairs them with layers, the head as asked, every tensor equal to
    its source bit for bit, the inputs unchanged since they were read."""
    from fusecli.fusion import proof

    def check_config() -> None:
        try:
            model_file = read_model_file(path)
        except ModelFileError as e:
            raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
        if model_file.config != flat.config:
            raise VerificationError("The written file's config differs from the composed one")
        with h5py.File(path, "r") as h5:
            listed = [_text(n) for n in h5[H5_WEIGHTS].attrs["layer_names"]]
        if listed != layer_order(model_file.config):
            raise VerificationError(
                "The written file lists its layers' weights in another order than Keras gives "
                "its layers: Keras would load one layer's weights into another"
            )
        _check_head(model_file.config, weights)

    tensors, nbytes = proof.check_flat_tensors(
        path, "h5", sources, written, flat.sources_config, head_lambdas(flat.config), check_config
    )
    return {
        "config": "as composed; every branch inlined (layers renamed), Keras 2 schema",
        "layer_order": "as Keras orders the model's layers",
        "tensors": tensors,
        "bytes": nbytes,
        "scan": "passed",
        "layer_names_unique": True,
    }


def head_lambdas(config: dict[str, Any]) -> set[str]:
    """The head's scaling Lambdas (`--scale lambda`: fusecli's own bytecode, asked for), whose
    code the written file's scan lets pass."""
    layers = config["config"]["layers"]
    return {
        e["name"] for e in layers if e["class_name"] == "Lambda" and _scaling(e)[2] == LAMBDA_CODE
    }


def _check_head(config: dict[str, Any], weights: tuple[float, ...]) -> None:
    specs = {e["name"]: e for e in config["config"]["layers"]}
    for ref in _refs(config["config"]["output_layers"]):
        last = specs[ref[0]]
        add = last if last["class_name"] == "Add" else specs[last["inbound_nodes"][0][0][0]]
        if add["class_name"] != "Add":
            raise VerificationError(f"Output {ref[0]!r} does not come from an Add")
        scaled = [specs[e[0]] for e in add["inbound_nodes"][0]]
        got = [_scaling(s) for s in scaled]
        if got != [("Rescaling", w, 0.0) for w in weights] and got != [
            ("Lambda", w, LAMBDA_CODE) for w in weights
        ]:
            raise VerificationError(f"Output {ref[0]!r} is not the weighted sum asked for: {got}")


def _scaling(spec: dict[str, Any]) -> tuple[Any, ...]:
    """(class, weight, offset) of a Rescaling, (class, weight, code) of a Lambda: a Lambda
    scales only if it holds fusecli's own bytecode, in either Keras' form of its config."""
    conf = spec["config"]
    if spec["class_name"] != "Lambda":
        return (spec["class_name"], conf.get("scale"), conf.get("offset"))
    function = conf.get("function")
    if isinstance(function, dict):  # Keras 3's form
        inner = function.get("config") if isinstance(function.get("config"), dict) else {}
        function = [inner.get("code"), inner.get("defaults"), inner.get("closure")]
    plain = isinstance(function, list) and len(function) == 3 and function[1:] == [None, None]
    arguments = conf.get("arguments") if isinstance(conf.get("arguments"), dict) else {}
    return ("Lambda", arguments.get("w"), function[0] if plain else None)


def _refs(value: list[Any]) -> list[list[Any]]:
    return [value] if value and isinstance(value[0], str) else value


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def keras2_config(config: dict[str, Any], path: Any) -> dict[str, Any]:
    """The Keras 3 reading of a Keras 2 config, for the shapes and names the plan decides on."""
    return keras2.convert_config(config, path, trust=True)


def flat_model(config: dict[str, Any], prefix: str) -> FlatModel:
    return flatten(config, prefix)
