"""A Keras 2 `.h5` file's weights, layer by layer, read by their recorded `weight_names` (no Keras).

`model_weights/<layer>/` holds a layer's datasets, listed in order by its `weight_names`
attribute: the layer's `trainable_weights + non_trainable_weights`, the order both Kerases' legacy
loaders assign them in. A nested model is one such group for all its layers (at every depth):
its trainable weights first, then the non-trainable ones (BatchNormalization statistics last).
Each weight belongs to the innermost layer its name names (`tower/dense/kernel:0` -> `dense`),
as `fusecli.formats.weights_layout` regroups them; within one layer the file's order is kept,
which is that layer's own order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from fusecli.formats.keras2_flat import NotFlat

Origin = tuple[str, ...]


def layer_weights(root: h5py.Group, config: dict[str, Any]) -> dict[Origin, list[str]]:
    """For every layer (by its path of names, nested models' layers included) the dataset
    paths of its weights below `root` (`model_weights`), in the layer's order. Raises `NotFlat`
    where a nested model's weight cannot be given to one of its layers."""
    if "layer_names" not in root.attrs:
        raise NotFlat("its weights list no layer_names")
    entries = {_name(e): e for e in _layers(config)}
    out: dict[Origin, list[str]] = {}
    for name in _strings(root.attrs["layer_names"]):
        group = root[name]
        names = _strings(group.attrs.get("weight_names", []))
        entry = entries.get(name)
        if entry is None or not _is_model(entry):
            out[(name,)] = [f"{name}/{n}" for n in names]
            continue
        leaves = _leaves(entry, (name,))
        position = {path[-1]: k for k, path in enumerate(leaves)}
        if len(position) != len(leaves):
            raise NotFlat(f"nested model {name!r} has two layers of one name")
        for n in names:
            owners = [position[part] for part in n.split("/")[:-1] if part in position]
            if not owners:
                raise NotFlat(
                    f"weight {n!r} of nested model {name!r} names none of its layers, so which "
                    "layer it belongs to is known only to Keras"
                )
            out.setdefault(leaves[owners[-1]], []).append(f"{name}/{n}")
    return out


def read_layer_weights(path: Path) -> dict[Origin, list[str]] | str:
    """`layer_weights` of a model file, for `fusecli.safety.isolation.call_isolated` (which
    runs it in a child process, so that a hostile file's HDF5 cannot crash the caller): the
    reason as a string where the file's weights cannot be given to its layers."""
    from fusecli.formats.modelfile import open_weights, read_model_file

    config = read_model_file(path).config
    try:
        with open_weights(path) as root:
            return layer_weights(root, config)
    except NotFlat as e:
        return str(e)


def _leaves(entry: dict[str, Any], where: Origin) -> list[Origin]:
    out: list[Origin] = []
    for sub in _layers(entry):
        path = (*where, _name(sub))
        out.extend(_leaves(sub, path) if _is_model(sub) else [path])
    return out


def _layers(config: dict[str, Any]) -> list[dict[str, Any]]:
    conf = config.get("config")
    if isinstance(conf, list):
        return conf
    layers = conf.get("layers") if isinstance(conf, dict) else None
    return [e for e in layers if isinstance(e, dict)] if isinstance(layers, list) else []


def _is_model(entry: dict[str, Any]) -> bool:
    conf = entry.get("config")
    return entry.get("class_name") in ("Functional", "Model", "Sequential") and (
        isinstance(conf, list) or isinstance(conf, dict) and isinstance(conf.get("layers"), list)
    )


def _name(entry: dict[str, Any]) -> str:
    conf = entry.get("config")
    name = conf.get("name") if isinstance(conf, dict) else None
    return str(name if name is not None else entry.get("name"))


def _strings(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
