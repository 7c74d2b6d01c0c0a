"""A model file's variables, listed in Keras' own order without loading any tensor.

Merging pairs the i-th variable of one model with the i-th of another, so both layouts must be
listed in the same order — the order of `model.weights`:

- `.keras`: `model.weights.h5` holds `layers/<key>/vars/<i>`, where `<key>` is made from the
  layer's class (`conv2d`, `conv2d_1`, ...), not its name; the `vars` group's `name` attribute
  gives the layer's name. Nested models hold their own `layers/` group. Layers are listed in the
  config's order, each one's own variables first, then its nested layers.
- legacy `.h5`: `model_weights/<layer>/` lists its datasets in the `weight_names` attribute, in
  the order of the layer group's `layer_names` attribute. A nested model is one layer whose
  `weight_names` put all trainable variables before the non-trainable ones (BatchNormalization
  statistics last); they are regrouped layer by layer to match `model.weights`.

`architecture_difference` compares two files' architectures from their configs and variable lists
(class names, wiring, settings that change what a layer computes, every variable's shape and
dtype; layer names may differ) and describes the first difference.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.config import walker
from fusecli.errors import ModelFileError
from fusecli.formats.archive import RawTensors
from fusecli.formats.keras2 import float_embedding
from fusecli.formats.modelfile import (
    Format,
    ModelFile,
    open_weights,
    read_model_file,
    read_npz_members,
    walk_hdf5,
)
from fusecli.limits import check_dataset_size

# Top-level groups of a weights file that hold training state, not the model.
TRAINING_STATE_GROUPS = ("optimizer", "optimizer_weights")
# Config keys that do not change what a trained layer computes (or that are spelled differently
# in each format); everything else in a layer's config must match for models to be merged.
_IGNORED_KEYS = {
    "name",
    "trainable",
    "module",
    "registered_name",
    "build_config",
    "compile_config",
    "shared_object_id",
    "seed",
    "layers",
    "input_layers",
    "output_layers",
    "inbound_nodes",
}
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


@dataclass(frozen=True)
class Variable:
    """One variable of a model file, where it sits, and what it holds (data not read)."""

    layer: str  # the layer's path by name, e.g. "block/conv2d"
    dataset: str  # the dataset's path inside the weights group
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def mergeable(self) -> bool:
        """Floating-point variables are merged; integer and boolean ones are copied."""
        return self.dtype.kind == "f" or self.dtype.name == "bfloat16"


@dataclass
class Layout:
    """A model file's config and its variables in `model.weights` order."""

    path: Path
    format: Format
    config: dict[str, Any]
    keras_version: str | None
    variables: list[Variable]
    # Layers whose .keras group holds sub-objects (e.g. MultiHeadAttention's dense layers): their
    # order inside the layer follows attribute names, so they cannot be paired with a .h5 file.
    composite_layers: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # a .keras archive's, as read with config

    @property
    def model_file(self) -> ModelFile:
        """The file as it was read for this layout (not read again: the path may have changed)."""
        return ModelFile(
            path=self.path,
            format=self.format,
            config=self.config,
            keras_version=self.keras_version,
            backend=None,
            members=self.members,
        )


def read_layout(path: str | os.PathLike[str], info: ModelFile | None = None) -> Layout:
    """List a model file's variables in `model.weights` order; reads metadata, no tensor.
    `info`: the file as `read_model_file` read it already, if it did."""
    info = read_model_file(path) if info is None else info
    with open_weights(info.path) as group:
        try:
            if info.format == "keras":
                variables, composite = _keras_variables(group, info.config)
            else:
                variables, composite = _h5_variables(group, info.config), []
            for variable in variables:
                dataset = h5py.h5d.open(group.id, variable.dataset.encode("utf-8"))
                check_dataset_size(info.path, dataset, variable.dataset)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ModelFileError(
                info.path, f"its weights do not match its config ({_short(e)})"
            ) from None
        except ModelFileError as e:  # from a walk inside the weights, which knows no path
            raise ModelFileError(info.path, e.reason) from None
    return _layout(info, variables, composite)


def count_npz_params(path: str | os.PathLike[str]) -> int | None:
    """The values held by a `.keras` file's `model.weights.npz`, from the arrays' headers; None
    if any is an object array (Keras pickles every layer's variables so), which is never read."""
    members = read_npz_members(Path(path))
    if any(m.pickle is not None for m in members):
        return None
    return sum(math.prod(m.shape) for m in members)


def architecture_difference(a: Layout, b: Layout) -> str | None:
    """The first way in which `b`'s architecture differs from `a`'s, or None if they match."""
    na, nb = a.path.name, b.path.name
    if na == nb:
        na, nb = str(a.path), str(b.path)
    ca, cb = a.config.get("class_name"), b.config.get("class_name")
    if ca != cb:
        return f"{na} is {_a(ca)} model, {nb} {_a(cb)} model"
    layers_a, layers_b = _flat_layers(a.config), _flat_layers(b.config)
    for i, (la, lb) in enumerate(zip(layers_a, layers_b, strict=False)):
        where = f"layer {i} ({la.path!r} in {na}, {lb.path!r} in {nb})"
        if la.class_name != lb.class_name:
            return f"{where} is {_a(la.class_name)} in {na}, {_a(lb.class_name)} in {nb}"
        if la.edges != lb.edges:
            return (
                f"{where} takes its inputs from layers {_fmt_edges(la.edges, layers_a)} in {na}, "
                f"{_fmt_edges(lb.edges, layers_b)} in {nb}"
            )
        for key in sorted(la.settings.keys() & lb.settings.keys()):
            if la.settings[key] != lb.settings[key]:
                return (
                    f"{where}, {_a(la.class_name)}: {key} is {_fmt(la.settings[key])} in {na}, "
                    f"{_fmt(lb.settings[key])} in {nb}"
                )
    if len(layers_a) != len(layers_b):
        return f"{na} has {len(layers_a)} layers, {nb} has {len(layers_b)}"
    for i, (va, vb) in enumerate(zip(a.variables, b.variables, strict=False)):
        if va.shape != vb.shape or va.dtype != vb.dtype:
            return (
                f"weight {i} (of layer {va.layer!r} in {na}, {vb.layer!r} in {nb}) is "
                f"{_fmt_shape(va.shape)} {va.dtype} in {na}, {_fmt_shape(vb.shape)} {vb.dtype} "
                f"in {nb}"
            )
    if len(a.variables) != len(b.variables):
        return f"{na} has {len(a.variables)} weights, {nb} has {len(b.variables)}"
    return None


def read_tensor(
    path: Path, group: h5py.Group, variable: Variable, raw: RawTensors | None = None
) -> np.ndarray:
    """Read one variable's values; a clean `ModelFileError` if the file is broken. With `raw`
    (the same file opened for raw reads), a plain block is read without HDF5."""
    try:
        if raw is None:
            values = np.asarray(group[variable.dataset][()])
        else:
            values = raw.read(group, variable.dataset)
        if variable.dtype.name == "bfloat16":
            values = values.view(variable.dtype)
    except (KeyError, TypeError, ValueError, OSError) as e:
        reason = f"weight {variable.dataset!r} cannot be read ({_short(e)})"
        raise ModelFileError(path, reason) from None
    if values.shape != variable.shape:
        raise ModelFileError(path, f"weight {variable.dataset!r} changed while it was read")
    return values


# -- .keras ----------------------------------------------------------------------------------


def _keras_variables(root: h5py.Group, config: dict[str, Any]) -> tuple[list[Variable], list[str]]:
    variables: list[Variable] = []
    composite: list[str] = []
    own = root.get("vars")
    if isinstance(own, h5py.Group):
        variables += _vars_of(own, "")
    if walker.is_model(config):
        _walk_keras_model(root, config, "", variables, composite)
    # Keras reads only what the config's layers own. A dataset among the layers' that the walk
    # did not reach is not guessed at (it used to be merged as a variable, bombs included).
    reached = {v.dataset for v in variables}
    for top in ("layers", "vars"):
        node = root.get(top)
        if isinstance(node, h5py.Group):
            for name in _all_datasets(node):
                if f"{top}/{name}" not in reached:
                    raise ValueError(
                        f"dataset '{top}/{name}' belongs to no layer of the config, and Keras "
                        "would not load it"
                    )
    return variables, composite


def _walk_keras_model(
    group: h5py.Group,
    config: dict[str, Any],
    prefix: str,
    variables: list[Variable],
    composite: list[str],
) -> None:
    container = group.get("layers")
    if not isinstance(container, h5py.Group):
        return
    members = {key: container[key] for key in container}
    by_name: dict[str, str] = {}
    for key, member in members.items():
        vars_group = member.get("vars") if isinstance(member, h5py.Group) else None
        if isinstance(vars_group, h5py.Group) and "name" in vars_group.attrs:
            by_name[_decode(vars_group.attrs["name"])] = key
    by_class = _class_keys(config)
    for entry in walker.layers(config):
        name = walker.name(entry)
        key = by_name.get(name) or by_class.get(name)
        layer_group = members.get(key) if key is not None else None
        if not isinstance(layer_group, h5py.Group):
            continue
        path = f"{prefix}{name}"
        base = f"{group.name.rstrip('/')}/layers/{key}".lstrip("/")
        if "vars" in layer_group:
            variables += _vars_of(layer_group["vars"], path, base=f"{base}/vars")
        if walker.is_model(entry):
            _walk_keras_model(layer_group, entry, f"{path}/", variables, composite)
        others = sorted(k for k in layer_group if k not in ("vars", "layers"))
        for other in others:
            node = layer_group[other]
            names = _all_datasets(node) if isinstance(node, h5py.Group) else []
            if names:
                composite.append(path)
            for n in names:
                full = f"{base}/{other}/{n}"
                variables.append(_variable(group.file, full, layer=path))


def _vars_of(vars_group: h5py.Group, layer: str, base: str = "vars") -> list[Variable]:
    """A layer's own variables, by HDF5's low-level calls (an h5py object per dataset costs
    five times as much, and a model has thousands)."""
    gid = vars_group.id
    datasets = {}
    for raw in gid:
        node = h5py.h5o.open(gid, raw)
        if isinstance(node, h5py.h5d.DatasetID):
            datasets[raw.decode("utf-8")] = node
    out = []
    for k in sorted(datasets, key=_int_key):
        node = datasets[k]
        dtype = node.dtype
        if dtype.kind == "V":
            dtype = _dtype(h5py.Dataset(node))
        out.append(Variable(layer, f"{base}/{k}", tuple(node.shape), dtype))
    return out


def _class_keys(config: dict[str, Any]) -> dict[str, str]:
    """Layer name -> group key, the way Keras names layers in .keras files (by class)."""
    sequential = config.get("class_name") == "Sequential"
    entries = [
        entry
        for entry in walker.layers(config)
        if not (sequential and entry.get("class_name") == "InputLayer")
    ]
    keys = class_keys(str(entry.get("class_name", "")) for entry in entries)
    return {walker.name(entry): key for entry, key in zip(entries, keys, strict=True)}


# -- legacy .h5 ------------------------------------------------------------------------------


def _h5_variables(group: h5py.Group, config: dict[str, Any]) -> list[Variable]:
    if "layer_names" not in group.attrs:
        raise ValueError("no layer_names attribute")
    entries = {walker.name(e): e for e in walker.layers(config)}
    variables: list[Variable] = []
    for layer_name in _strings(group.attrs["layer_names"]):
        layer_group = group[layer_name]
        names = _strings(layer_group.attrs.get("weight_names", []))
        entry = entries.get(layer_name)
        if entry is not None and walker.is_model(entry):
            ordered = [
                (f"{layer_name}/{leaf}", n) for leaf, n in _regroup(names, _leaf_layers(entry))
            ]
        else:
            ordered = [(layer_name, n) for n in names]
        for layer, n in ordered:
            variables.append(_variable(group, f"{layer_name}/{n}", layer=layer))
    return variables


def _regroup(names: list[str], leaves: list[str]) -> list[tuple[str, str]]:
    """Order a nested model's weight names layer by layer (as `model.weights` does).

    A weight belongs to the innermost layer named in its path ("sequential/dense/kernel" ->
    "dense"); within a layer the file's order is kept.
    """
    position = {name: i for i, name in enumerate(leaves)}
    keyed = []
    for j, n in enumerate(names):
        owners = [position[part] for part in n.split("/")[:-1] if part in position]
        keyed.append((owners[-1] if owners else len(leaves), j, n))
    keyed.sort()
    return [(leaves[k] if k < len(leaves) else "?", n) for k, _, n in keyed]


def _leaf_layers(entry: dict[str, Any]) -> list[str]:
    return [walker.name(e) for _, e in walker.walk(entry) if not walker.is_model(e)]


# -- architecture ----------------------------------------------------------------------------


@dataclass
class _Layer:
    path: str
    class_name: str
    edges: list[tuple[int, ...]]
    settings: dict[str, Any]


def _flat_layers(config: dict[str, Any], prefix: str = "") -> list[_Layer]:
    """The layers depth-first (a nested model, then its layers), with names replaced by
    positions so that models whose layers are named differently compare equal."""
    entries = walker.layers(config)
    names = {walker.name(e): i for i, e in enumerate(entries)}
    out: list[_Layer] = []
    for entry in entries:
        name = walker.name(entry)
        inner = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        edges = _edges(entry.get("inbound_nodes", []), names)
        if walker.is_model(entry):
            edges += [("in", *e) for e in _edges(inner.get("input_layers", []), _names(entry))]
            edges += [("out", *e) for e in _edges(inner.get("output_layers", []), _names(entry))]
        class_name = str(entry.get("class_name"))
        settings = _settings(inner)
        float_embedding(class_name, settings)  # Keras 2.0's int32 Embedding computes in float32
        out.append(_Layer(f"{prefix}{name}", class_name, edges, settings))
        if walker.is_model(entry):
            out += _flat_layers(entry, f"{prefix}{name}/")
    return out


def _names(config: dict[str, Any]) -> dict[str, int]:
    return {walker.name(e): i for i, e in enumerate(walker.layers(config))}


def _edges(nodes: Any, names: dict[str, int]) -> list[tuple[Any, ...]]:
    """Every reference [layer_name, node, tensor, ...] in `nodes`, as (position, node, tensor).

    Works for Keras 3 (`keras_history`) and Keras 2 (`[[name, node, tensor, kwargs]]`) configs.
    """
    return [(names[r[0]], r[1], r[2]) for r in walker.references(nodes) if r[0] in names]


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _normalized(value, key)
        for key, value in config.items()
        if key not in _IGNORED_KEYS and not key.endswith(_IGNORED_SUFFIXES)
    }


def _normalized(value: Any, key: str = "") -> Any:
    """Spell a config value the same way whichever format it was read from."""
    if key == "dtype" and isinstance(value, dict):
        inner = value.get("config")
        return inner.get("name") if isinstance(inner, dict) else value.get("class_name")
    if isinstance(value, dict):  # also the configs of layers inside wrappers (Bidirectional...)
        return {
            k: _normalized(v, k)
            for k, v in value.items()
            if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)
        }
    if isinstance(value, list | tuple):
        return [_normalized(v) for v in value]
    return value


# -- helpers ---------------------------------------------------------------------------------


def _layout(info: ModelFile, variables: list[Variable], composite: list[str]) -> Layout:
    return Layout(
        path=info.path,
        format=info.format,
        config=info.config,
        keras_version=info.keras_version,
        variables=variables,
        composite_layers=composite,
        members=info.members,
    )


def _variable(root: h5py.Group, dataset: str, *, layer: str) -> Variable:
    """`dataset` is a path relative to `root`, the group every tensor is read from."""
    node = root[dataset]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{dataset!r} is not a dataset")
    return Variable(layer=layer, dataset=dataset, shape=tuple(node.shape), dtype=_dtype(node))


def _dtype(node: h5py.Dataset) -> np.dtype:
    """The dataset's dtype; Keras stores bfloat16 as 2 opaque bytes marked dtype="bfloat16"."""
    if (
        node.dtype.kind == "V"
        and node.dtype.itemsize == 2
        and node.attrs.get("dtype")
        in (
            "bfloat16",
            b"bfloat16",
        )
    ):
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return node.dtype


def _all_datasets(group: h5py.Group) -> list[str]:
    names = [e.name for e in walk_hdf5(group, Path(group.file.filename)) if e.kind == "dataset"]
    return sorted(names, key=lambda n: [_int_key(p) for p in n.split("/")])


def snake_case(name: str) -> str:
    """`keras.src.utils.naming.to_snake_case`, the same in every Keras 3 version: a digit starts
    no new word (`Conv2D` -> `conv2d`, `DepthwiseConv2D` -> `depthwise_conv2d`)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def class_keys(class_names: Iterable[str]) -> list[str]:
    """The keys a `.keras` file keeps these objects' variables under, in order: the class in
    snake case, numbered from the second of a class on (`dense`, `dense_1`, `conv2d`...)."""
    used: dict[str, int] = {}
    keys = []
    for class_name in class_names:
        key = snake_case(class_name)
        if key in used:
            used[key] += 1
            key = f"{key}_{used[key]}"
        else:
            used[key] = 0
        keys.append(key)
    return keys


def _int_key(text: str) -> tuple[int, int | str]:
    return (0, int(text)) if text.isdigit() else (1, text)


def _strings(values: Any) -> list[str]:
    return [_decode(v) for v in np.asarray(values).reshape(-1).tolist()]


def _decode(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _a(noun: Any) -> str:
    """'a Dense', 'an InputLayer'."""
    return f"{'an' if str(noun)[:1].lower() in 'aeiou' else 'a'} {noun}"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _fmt_edges(edges: list[tuple[Any, ...]], layers: list[_Layer]) -> str:
    return "[" + ", ".join(str(e[0]) if isinstance(e[0], int) else str(e) for e in edges) + "]"


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
