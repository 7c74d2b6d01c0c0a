"""Walking a Keras model config of any era: its layers, its calls and the tensors they take.

One place knows how configs spell these, so that a fix reaches every reader:
- a model's layers: `config.layers` (functional models and Sequential ones), or the bare list
  Keras <= 2.1 wrote as a Sequential's config; nested models are layers holding layers;
- a call (an inbound node): Keras 3 writes `{"args": [...], "kwargs": {...}}` with each tensor a
  `__keras_tensor__` whose `keras_history` says where it comes from; Keras 2 writes
  `[[name, node, tensor, kwargs], ...]` (a TFOpLambda's call, one such entry alone);
- a reference `[name, node, tensor]`: a list in JSON, a tuple in the config a live model gives
  (`model.get_config()`, `serialize_keras_object`); both count everywhere here;
- `input_layers`/`output_layers`: references in a nest of lists and dicts, in the order Keras
  flattens them (a dict's by sorted key).

Walks use explicit stacks: a file cannot make them recurse. `keras_tensor` writes the one thing
converters add to configs: a Keras 3 tensor coming from a reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MODEL_CLASSES = frozenset({"Functional", "Model", "Sequential"})
KERAS_TENSOR = "__keras_tensor__"

Ref = list[Any] | tuple[Any, ...]  # [name, node, tensor, ...]
NO_REF = ("", -1, 0)  # where a tensor whose history is unreadable comes from: nowhere


def copied(value: Any) -> Any:
    """A copy of a config (dicts, lists and tuples of plain values) for a caller to change:
    `copy.deepcopy` without its bookkeeping, three times faster. It recurses once per level,
    which `fusecli.limits.check_config_depth` bounds for every config read from a file."""
    kind = type(value)
    if kind is dict:
        return {key: copied(item) for key, item in value.items()}
    if kind is list:
        return [copied(item) for item in value]
    if kind is tuple:
        return tuple(copied(item) for item in value)
    return value


def layers(model: Any) -> list[dict[str, Any]]:
    """The layer entries of a model config; [] for what is not a model."""
    found = _layer_list(model)
    return [e for e in found if isinstance(e, dict)] if found is not None else []


def is_model(entry: Any) -> bool:
    """Whether a layer entry is a model (it holds layers), at any era."""
    return _layer_list(entry) is not None


def name(entry: Any) -> str:
    """A layer entry's name: the entry's own (functional models), else its config's."""
    if not isinstance(entry, dict):
        return ""
    own = entry.get("name")
    if isinstance(own, str):
        return own
    config = entry.get("config")
    inner = config.get("name") if isinstance(config, dict) else None
    return inner if isinstance(inner, str) else ""


def walk(model: Any, *, wrapped: bool = False) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every layer below `model` at every depth, each as (path of names, entry), a nested model
    before its layers. `wrapped`: also the layer a wrapper holds (TimeDistributed's `layer`)."""
    pending: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        ((name(e),), e) for e in reversed(layers(model))
    ]
    while pending:
        path, entry = pending.pop()
        yield path, entry
        children = layers(entry)
        config = entry.get("config")
        inner = config.get("layer") if wrapped and isinstance(config, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("class_name"), str):
            children = [*children, inner]
        pending.extend(((*path, name(c)), c) for c in reversed(children))


def is_ref(value: Any) -> bool:
    """A reference `[name, node, tensor, ...]`, as a list or a tuple."""
    return (
        isinstance(value, list | tuple)
        and len(value) >= 3
        and isinstance(value[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:3])
    )


def references(value: Any) -> Iterator[Ref]:
    """Every tensor reference in `value` (a node, a list of nodes, any part of a config), in
    document order: `keras_history` of Keras 3 tensors, and Keras 2 references (with those in
    their call kwargs)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            history = _history(item)
            if history is not None:
                yield history
            elif item.get("class_name") != KERAS_TENSOR:
                pending.extend(reversed(list(item.values())))
        elif isinstance(item, list | tuple):
            if is_ref(item):
                yield item
                pending.extend(reversed(item[3:]))
            else:
                pending.extend(reversed(item))


def io_refs(value: Any) -> list[Ref]:
    """The references of an `input_layers`/`output_layers` spec, flattened as Keras flattens a
    model's inputs and outputs (a dict's by sorted key)."""
    found, pending = [], [value]
    while pending:
        item = pending.pop()
        if is_ref(item):
            found.append(item)
        elif isinstance(item, list | tuple):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            pending.extend(item[k] for k in sorted(item, key=str, reverse=True))
    return found


def call_inputs(node: Any) -> list[tuple[Ref, dict[str, Any] | None]]:
    """The tensors a call takes positionally: where each comes from, and the tensor config Keras
    3 recorded for it (None in a Keras 2 node)."""
    if isinstance(node, dict):
        return [(ref, config) for ref, config in tensors(node.get("args")) if config is not None]
    entries = keras2_entries(node)
    if entries is None and is_ref(node):
        entries = [node]  # a TFOpLambda's call: one entry, not in a list
    return [(entry, None) for entry in entries or []]


def call_kwargs(node: Any) -> dict[str, Any]:
    """A call's keyword arguments: Keras 3 keeps them in `kwargs`; Keras 2 with the call's last
    entry, `[[name, node, tensor, {...}], ...]`."""
    if isinstance(node, dict):
        kwargs = node.get("kwargs")
    else:
        entries = keras2_entries(node)
        if entries is None and is_ref(node):
            entries = [node]
        last = entries[-1] if entries else ()
        kwargs = last[3] if len(last) > 3 else None
    return kwargs if isinstance(kwargs, dict) else {}


def tensors(value: Any) -> list[tuple[Ref, dict[str, Any] | None]]:
    """The tensors in `value` (call arguments): Keras 3 tensors as (keras_history, their config),
    Keras 2 references as (reference, None); not looking inside references. A Keras 3 tensor
    whose history is unreadable comes from `NO_REF`."""
    found: list[tuple[Ref, dict[str, Any] | None]] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("class_name") == KERAS_TENSOR and isinstance(item.get("config"), dict):
                found.append((_history(item) or NO_REF, item["config"]))
            elif item.get("class_name") != KERAS_TENSOR:
                pending.extend(reversed(list(item.values())))
        elif is_ref(item):
            found.append((item, None))
        elif isinstance(item, list | tuple):
            pending.extend(reversed(item))
    return found


def keras2_entries(node: Any) -> list[Any] | None:
    """A Keras 2 node's entries `[name, node, tensor, kwargs]`, or None if it is not one."""
    if isinstance(node, list | tuple) and node and all(is_ref(e) for e in node):
        return node if isinstance(node, list) else list(node)  # the node's own list: editable
    return None


def keras_tensor(ref: Ref, shape: Any = (), dtype: str = "float32") -> dict[str, Any]:
    """A Keras 3 `__keras_tensor__` coming from `ref`. Keras takes the real tensor from the
    history when it wires a model: `shape` and `dtype` say what it will be, or are placeholders."""
    return {
        "class_name": KERAS_TENSOR,
        "config": {
            "shape": list(shape) if shape is not None else None,
            "dtype": dtype,
            "keras_history": [ref[0], ref[1], ref[2]],
        },
    }


def _layer_list(entry: Any) -> list[Any] | None:
    if not isinstance(entry, dict):
        return None
    config = entry.get("config")
    if isinstance(config, dict):
        found = config.get("layers")
        return found if isinstance(found, list) else None
    if isinstance(config, list) and entry.get("class_name") in MODEL_CLASSES:
        return config  # Keras <= 2.1: a Sequential's config is its list of layers
    return None


def _history(item: dict[str, Any]) -> Ref | None:
    config = item.get("config")
    if item.get("class_name") != KERAS_TENSOR or not isinstance(config, dict):
        return None
    history = config.get("keras_history")
    return history if is_ref(history) else None
