"""A Keras 2 model config inlined into one flat functional graph, as JSON (no Keras).

Nested models (Sequential or functional, at any depth) are replaced by their layers, called on
the tensors the nested model was called on; a nested model called twice gives its layers two
calls each (their weights stay shared). Sequential models become chains from an `InputLayer`.
Every layer keeps where it came from (`origin`: the names from the top model down), which is
how its weights are found in the file (`fusecli.formats.keras2_weights`).

The graph is kept in Keras 2's node format (`[[layer, node, tensor, kwargs], ...]`), which
tf-keras and Keras 3's legacy `.h5` loader both read. `both_loaders` says, per layer, whether the
two compute the same from it, and rewrites its config to one both accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusecli.config import walker
from fusecli.formats import keras2, keras2_masks
from fusecli.fusion.naming import unique

_MODELS = ("Functional", "Model", "Sequential")
Tensor = tuple[str, int, int]  # (flat layer name, node index, tensor index)


class NotFlat(Exception):
    """The model cannot be written as a flat graph both Kerases read the same; says why."""


@dataclass
class FlatLayer:
    name: str
    class_name: str
    config: dict[str, Any]  # the layer's own config, named `name`
    origin: tuple[str, ...]  # layer names from the source's top model down
    nodes: list[list[list[Any]]] = field(default_factory=list)  # Keras 2 node lists

    def spec(self) -> dict[str, Any]:
        # `module` (which tf-keras writes and reads too) has Keras 3 build the layer as from a
        # `.keras` file: its legacy `.h5` reader turns strings naming a function of
        # keras.layers (Attention's score_mode="dot") into that function.
        return {
            "module": "keras.layers",
            "class_name": self.class_name,
            "config": self.config,
            "name": self.name,
            "inbound_nodes": self.nodes,
        }


@dataclass
class FlatModel:
    layers: list[FlatLayer]  # in the order they were first called
    inputs: list[Tensor]
    outputs: list[Tensor]


def flatten(config: dict[str, Any], prefix: str) -> FlatModel:
    """Inline a Keras 2 model config (`{"class_name", "config"}`); every layer is named
    `prefix + <its path of names joined by "_">`. Raises `NotFlat`."""
    flat = _Flattener(prefix)
    try:
        outputs = flat.model(walker.copied(config), (), None)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise NotFlat(f"its config is not one Keras 2 writes ({type(e).__name__}: {e})") from None
    return FlatModel(list(flat.layers.values()), flat.inputs, outputs)


def input_layer(name: str, shape: list[Any], dtype: str) -> dict[str, Any]:
    """An InputLayer config both loaders read (Keras 3 takes `batch_input_shape` too)."""
    return {
        "batch_input_shape": list(shape),
        "dtype": dtype,
        "sparse": False,
        "ragged": False,
        "name": name,
    }


class _Flattener:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.layers: dict[tuple[str, ...], FlatLayer] = {}
        self.taken: set[str] = set()
        self.inputs: list[Tensor] = []

    def new_layer(
        self, class_name: str, conf: dict[str, Any], origin: tuple[str, ...]
    ) -> FlatLayer:
        if origin in self.layers:
            return self.layers[origin]
        name = unique(self.prefix + "_".join(origin), self.taken)
        conf = dict(conf, name=name)
        layer = FlatLayer(name, class_name, conf, origin)
        self.layers[origin] = layer
        return layer

    def model(
        self, spec: dict[str, Any], where: tuple[str, ...], bound: list[Tensor] | None
    ) -> list[Tensor]:
        """Inline one model; `bound`: the tensors it is called on (None: the top model, whose
        inputs become InputLayers)."""
        conf = spec["config"]
        if spec.get("class_name") == "Sequential" and isinstance(conf, list):  # Keras <= 2.1
            conf = {"name": "sequential", "layers": conf}
        if spec.get("class_name") == "Sequential":
            return self.sequential(conf["layers"], where, bound)
        return self.functional(conf, where, bound)

    def input(self, spec: dict[str, Any], origin: tuple[str, ...]) -> Tensor:
        conf = spec.get("config") or {}
        shape = conf.get("batch_input_shape", conf.get("batch_shape"))
        if not isinstance(shape, list):
            raise NotFlat(f"input {'/'.join(origin)!r} declares no shape")
        dtype = keras2._dtype_name(conf.get("dtype", "float32"))
        layer = self.new_layer("InputLayer", input_layer("", shape, str(dtype)), origin)
        tensor = (layer.name, 0, 0)
        self.inputs.append(tensor)
        return tensor

    def sequential(
        self, layers: list[dict[str, Any]], where: tuple[str, ...], bound: list[Tensor] | None
    ) -> list[Tensor]:
        if not layers:
            raise NotFlat(f"Sequential model {'/'.join(where) or 'at the top'} has no layers")
        first = layers[0]
        x: Tensor | None = None
        if first.get("class_name") == "InputLayer":
            layers = layers[1:]
            x = bound[0] if bound else self.input(first, (*where, _name(first)))
        elif bound:
            x = bound[0]
        else:
            shape = keras2._declared_input_shape(first.get("config") or {})
            if shape is not None:
                conf = first.get("config") or {}
                dtype = keras2._dtype_name(conf.get("dtype", "float32"))
                dtype = dtype if dtype in keras2._PLAIN_DTYPES else "float32"
                spec = {"config": {"batch_input_shape": shape, "dtype": dtype}}
                x = self.input(spec, (*where, f"{_name(first)}_input"))
        for spec in layers:
            if x is None:
                if not _is_model(spec):
                    raise NotFlat("its Sequential model declares no input shape")
                outs = self.model(spec, (*where, _name(spec)), None)
            else:
                outs = self.call(spec, where, [[x[0], x[1], x[2], {}]], 0)
            if len(outs) != 1:
                raise NotFlat(f"layer {_name(spec)!r} of a Sequential model has several outputs")
            x = outs[0]
        assert x is not None
        return [x]

    def functional(
        self, conf: dict[str, Any], where: tuple[str, ...], bound: list[Tensor] | None
    ) -> list[Tensor]:
        specs = conf["layers"]
        input_refs = _refs(conf.get("input_layers"))
        resolved: dict[tuple[str, int], list[Tensor]] = {}
        by_name = {_name(s): s for s in specs}
        if bound is not None and len(bound) != len(input_refs):
            raise NotFlat(f"model {'/'.join(where)!r} is called on {len(bound)} tensors")
        for k, ref in enumerate(input_refs):
            spec = by_name[ref[0]]
            if spec.get("class_name") != "InputLayer":
                raise NotFlat(f"input {ref[0]!r} of {'/'.join(where) or 'the model'} is no Input")
            tensor = bound[k] if bound is not None else self.input(spec, (*where, ref[0]))
            resolved[(ref[0], 0)] = [tensor]
        pending = [
            (s, i, node)
            for s in specs
            if s.get("class_name") != "InputLayer"
            for i, node in enumerate(s.get("inbound_nodes") or [])
        ]
        while pending:
            progress = False
            blocked: set[str] = set()
            remaining = []
            for spec, i, node in pending:
                name = _name(spec)
                if name in blocked or not all((e[0], e[1]) in resolved for e in node):
                    blocked.add(name)
                    remaining.append((spec, i, node))
                    continue
                entries = []
                for e in node:
                    if _tensor_kwargs(e):
                        raise NotFlat(
                            f"layer {name!r} is called with tensors as keyword arguments, which "
                            "tf-keras and Keras 3 read differently from a .h5 file"
                        )
                    t = resolved[(e[0], e[1])][e[2]]
                    entries.append([t[0], t[1], t[2], dict(e[3]) if len(e) > 3 else {}])
                offset = 1 if keras2._has_own_node(spec) else 0
                resolved[(name, i + offset)] = self.call(spec, where, entries, i)
                progress = True
            pending = remaining
            if not progress:
                raise NotFlat("its graph has calls whose inputs are never computed")
        return [resolved[(r[0], r[1])][r[2]] for r in _refs(conf["output_layers"])]

    def call(
        self, spec: dict[str, Any], where: tuple[str, ...], entries: list[list[Any]], i: int
    ) -> list[Tensor]:
        """Call a layer (or inline a nested model) on `entries`; its outputs, lazily indexed."""
        name = _name(spec)
        if _is_model(spec):
            return self.model(spec, (*where, name), [tuple(e[:3]) for e in entries])
        layer = self.new_layer(
            str(spec.get("class_name")), spec.get("config") or {}, (*where, name)
        )
        k = len(layer.nodes)
        layer.nodes.append(entries)
        return _Outputs(layer.name, k)


class _Outputs(list):
    """A layer call's outputs: `[j]` is the call's j-th tensor, however many there are."""

    def __init__(self, name: str, node: int) -> None:
        super().__init__([(name, node, 0)])
        self.name, self.node = name, node

    def __getitem__(self, j: Any) -> Any:
        return (self.name, self.node, j)

    def __len__(self) -> int:
        return 1


def _refs(value: Any) -> list[list[Any]]:
    """The [layer, node, tensor] refs of an input/output spec, flattened in order."""
    return [list(ref) for ref in walker.io_refs(value)]


def _tensor_kwargs(entry: list[Any]) -> bool:
    kwargs = entry[3] if len(entry) > 3 and isinstance(entry[3], dict) else {}
    return any(True for _ in walker.references(list(kwargs.values())))


def _is_model(spec: dict[str, Any]) -> bool:
    conf = spec.get("config")
    return spec.get("class_name") in _MODELS and (
        isinstance(conf, list) or isinstance(conf, dict) and isinstance(conf.get("layers"), list)
    )


def _name(spec: dict[str, Any]) -> str:
    conf = spec.get("config")
    name = conf.get("name") if isinstance(conf, dict) else None
    return str(name if name is not None else spec.get("name"))


# -- one config for both loaders -------------------------------------------------------------

_HARD_SIGMOID = "hard_sigmoid"
_RNN = (*keras2._RNN_CLASSES, "Bidirectional")
_NOT_PORTABLE = {
    "Lambda": "a Lambda layer's Python bytecode is stored differently by each Keras",
    "TFOpLambda": "it wraps a raw TensorFlow function, which Keras 3 cannot rebuild",
    "SlicingOpLambda": "it wraps a raw TensorFlow function, which Keras 3 cannot rebuild",
}


def both_loaders(layers: list[FlatLayer], path: Any) -> None:
    """Rewrite every layer's config (in place) to one tf-keras and Keras 3 read alike, or raise
    `NotFlat` naming the layer and why no such config exists."""
    for layer in layers:
        where = "/".join(layer.origin)
        cls = layer.class_name
        if cls == "InputLayer":
            continue
        if cls in _NOT_PORTABLE:
            raise NotFlat(f"layer {where!r} ({cls}): {_NOT_PORTABLE[cls]}")
        _check_hard_sigmoid(layer.config, where, cls)
        conf = keras2.convert_config({"class_name": cls, "config": layer.config}, path, trust=True)[
            "config"
        ]
        if cls == "LeakyReLU" and "negative_slope" in conf:  # tf-keras knows only `alpha`
            conf["alpha"] = conf.pop("negative_slope")
        if cls in ("Attention", "AdditiveAttention") and layer.config.get("causal"):
            raise NotFlat(f"layer {where!r} ({cls}): causal=True is a call argument in Keras 3")
        layer.config = conf
        if cls in _RNN:
            for node in layer.nodes:
                if len(node) > 1:
                    raise NotFlat(
                        f"layer {where!r} ({cls}) is called with initial states, which tf-keras "
                        "and Keras 3 read differently from a .h5 file"
                    )
                if node and node[0][3].pop("constants", None) is not None:
                    raise NotFlat(f"layer {where!r} ({cls}) is called with constants")


def check_masks(layers: list[FlatLayer], path: Any) -> None:
    """Refuse (`NotFlat`) a graph where a layer that reads a mask would get another one from
    Keras 3 than from Keras 2 (`fusecli.formats.keras2_masks` tracks both): the `.keras`
    conversion passes Keras 2's mask explicitly there, a call argument tf-keras reads otherwise."""
    del path
    specs = walker.copied([layer.spec() for layer in layers])

    def fail(name: str, cls: str, reason: str) -> Exception:
        return NotFlat(f"layer {name!r} ({cls}): {reason}")

    graph = keras2_masks._Graph(specs, fail)
    graph.propagate()
    readers = graph.mha_inputs()
    rnn, pooling = keras2_masks.RNN_CLASSES, keras2_masks._POOLING
    for spec in specs:
        cls = str(spec["class_name"])
        for node in spec["inbound_nodes"]:
            keras2_mask = [graph.mask_of(e) for e in node]
            keras3_mask = [graph.mask_of(e, keras3=True) for e in node]
            if cls not in (*rnn, *pooling, *keras2_masks._ATTENTION, keras2_masks._MHA):
                continue
            if all(m is None for m in keras2_mask + keras3_mask):
                continue
            same = (
                cls in (*rnn, *pooling)
                and len(node) == 1
                and keras2_mask == keras3_mask
                and not keras2_masks._combined(keras2_mask[0])
                and tuple(node[0][:3]) not in readers
            )
            if not same:
                raise NotFlat(
                    f"layer {spec['name']!r} ({cls}) reads a mask that Keras 3 computes unlike "
                    "Keras 2"
                )


def _check_hard_sigmoid(conf: dict[str, Any], where: str, cls: str) -> None:
    for key in ("activation", "recurrent_activation"):
        if conf.get(key) == _HARD_SIGMOID:
            raise NotFlat(
                f"layer {where!r} ({cls}): {key}='hard_sigmoid' is clip(0.2x + 0.5) in Keras 2 "
                "and clip(x/6 + 0.5) in Keras 3, so no one file computes the same in both"
            )
    for key in ("layer", "backward_layer", "cell"):
        if isinstance(conf.get(key), dict):
            inner = conf[key]
            _check_hard_sigmoid(inner.get("config") or {}, where, str(inner.get("class_name")))
    for cell in conf.get("cells") or (
        conf.get("cell") if isinstance(conf.get("cell"), list) else []
    ):
        if isinstance(cell, dict):
            _check_hard_sigmoid(cell.get("config") or {}, where, str(cell.get("class_name")))
