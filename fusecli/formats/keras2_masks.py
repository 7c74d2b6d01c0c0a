"""Keras 2's masks in a converted Keras 3 functional graph: made explicit, or the file refused.

Keras 3 computes masks differently from Keras 2 in places, and silently:
- an RNN (or Bidirectional) layer called with `initial_state` gets no mask at all (Keras 3 looks
  for the mask only when the layer has one tensor argument);
- merge layers (Add, Multiply, ...) combine masks with OR and drop them when one input has none;
  Keras 2 combined the inputs that had a mask with AND;
- MultiHeadAttention removes the masks of its input tensors, so a layer that reads the same
  tensor after it sees no mask.

Where Keras 2's mask at a layer that uses it comes from `Embedding(mask_zero=True)` (the mask is
`ids != 0`), it is rebuilt from the ids with standard, weightless Keras 3 layers
(`Discretization(bin_boundaries=[0.5])`, `Minimum` for AND, `Concatenate(axis=1)` for a
concatenation in time) and passed to the layer explicitly, as Keras 3's own call arguments
(`mask=`, `query_mask=`, ...): nothing custom is written. Where the mask comes from elsewhere
(`Masking`, a nested model) and Keras 3 would not hand the layer the same one, the file is
refused, naming the layer.

The walk reads only the JSON config (no TensorFlow), so `merge` runs it too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusecli.config import walker
from fusecli.config.walker import MODEL_CLASSES as _MODELS

# Layers whose call reads a mask (the output depends on it).
RNN_CLASSES = (
    "RNN", "SimpleRNN", "GRU", "LSTM", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "Bidirectional",
)  # fmt: skip
_ATTENTION = ("Attention", "AdditiveAttention")
_MHA = "MultiHeadAttention"
_POOLING = ("GlobalAveragePooling1D",)
# Layers that hand their first input's mask on unchanged in Keras 2 (tf-keras' supports_masking).
_PASS = frozenset(
    (
        "Activation", "ActivityRegularization", "AlphaDropout", "BatchNormalization", "Dense",
        "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "ELU",
        "GaussianDropout", "GaussianNoise", "GroupNormalization", "LayerNormalization",
        "LeakyReLU", "PReLU", "ReLU", "Softmax", "ThresholdedReLU", "UnitNormalization",
        "TimeDistributed",
    )
)  # fmt: skip
# Layers that pass a mask on in Keras 3 but not in Keras 2.
_KERAS3_PASS = ("Rescaling", "Normalization")
_MERGE = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
SUFFIX = "_keras2_mask"  # layers that build a mask
NO_MASK_SUFFIX = "_keras2_nomask"  # layers that drop one
ADDED_SUFFIXES = (SUFFIX, NO_MASK_SUFFIX)

# A mask, symbolically: None (no mask), ("ids", ref): ids != 0 of the tensor `ref`;
# ("opaque", what): one Keras 3 computes itself; ("and", parts, partial): Keras 2's AND of the
# inputs' masks (partial: some input had none); ("time", parts): masks concatenated in time.
Mask = tuple | None
Ref = tuple[str, int, int]
Fail = Callable[[str, str, str], Exception]


def explicit_masks(layers: list[dict[str, Any]], fail: Fail) -> list[dict[str, Any]]:
    """Rewrite a functional model's layer list (nodes in Keras 2's list format, nested-model
    calls already renumbered) so that every layer that reads a mask gets Keras 2's.

    Returns the layers to add (weightless mask builders); adds `mask`-type call arguments to the
    nodes that need them (as [layer, node, tensor] refs, in the node's last entry's kwargs).
    `fail(layer_name, class_name, reason)` makes the error raised for what cannot be rebuilt.
    """
    return _Graph(layers, fail).rewrite()


def sequential_masks(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A Sequential model's layer list with a mask-dropping `Permute` inserted before each layer
    that reads a mask Keras 2 did not give it but Keras 3 would (a chain has no other
    difference: no initial_state, no merges, no MultiHeadAttention)."""
    out: list[dict[str, Any]] = []
    keras2 = keras3 = False
    taken = {walker.name(spec) for spec in layers}
    for spec in layers:
        cls = str(spec.get("class_name"))
        conf = spec.get("config") or {}
        reads = cls in (*RNN_CLASSES, *_POOLING)
        if reads and keras3 and not keras2:
            name, n = f"{walker.name(spec)}{NO_MASK_SUFFIX}", 1
            while name in taken:
                n += 1
                name = f"{walker.name(spec)}{NO_MASK_SUFFIX}_{n}"
            taken.add(name)
            rank = _input_rank(cls)
            out.append(
                {
                    "class_name": "Permute",
                    "module": "keras.layers",
                    "config": {"name": name, "dims": list(range(1, rank))},
                }
            )
            keras3 = False
        out.append(spec)
        if cls == "Embedding":
            keras2 = keras3 = bool(conf.get("mask_zero"))
        elif cls == "Masking":
            keras2 = keras3 = True
        elif cls in RNN_CLASSES:
            inner = conf.get("layer") if cls == "Bidirectional" else None
            inner = inner.get("config") or {} if isinstance(inner, dict) else conf
            if not inner.get("return_sequences"):
                keras2 = keras3 = False
        elif cls in _KERAS3_PASS:
            keras2 = False
        elif cls not in _PASS:
            keras2 = keras3 = False
    return out


class _Graph:
    def __init__(self, layers: list[dict[str, Any]], fail: Fail) -> None:
        self.fail = fail
        self.specs = {walker.name(spec): spec for spec in layers}
        self.masks: dict[Ref, Mask] = {}
        self.masks3: dict[Ref, Mask] = {}
        self.added: list[dict[str, Any]] = []
        self.built: dict[Mask, Ref] = {}
        self.unmasked: dict[Ref, Ref] = {}
        self.taken = set(self.specs)

    def rewrite(self) -> list[dict[str, Any]]:
        self.propagate()
        readers = self.mha_inputs()
        for name, spec in self.specs.items():
            for index, node in enumerate(spec.get("inbound_nodes") or []):
                if walker.keras2_entries(node) is not None:
                    self.fix_call(name, spec, index, node, readers)
        return self.added

    # -- Keras 2's masks ------------------------------------------------------------------

    def propagate(self) -> None:
        """Every layer output's mask in Keras 2 and whether Keras 3 gives it one; passes until
        nothing changes (configs list layers in call order, so one pass is the rule)."""
        for _ in range(len(self.specs) + 1):
            changed = False
            for name, spec in self.specs.items():
                for index, node in enumerate(spec.get("inbound_nodes") or []):
                    entries = walker.keras2_entries(node)
                    if entries is None:
                        continue
                    for keras3, table in ((False, self.masks), (True, self.masks3)):
                        for position, mask in enumerate(self.outputs(spec, entries, keras3)):
                            key = (name, index, position)
                            if table.get(key, ()) != mask:
                                table[key] = mask
                                changed = True
            if not changed:
                return

    def mask_of(self, ref: list[Any], keras3: bool = False) -> Mask:
        return (self.masks3 if keras3 else self.masks).get((ref[0], ref[1], ref[2]))

    def outputs(self, spec: dict[str, Any], entries: list[list[Any]], keras3: bool) -> list[Mask]:
        """The masks of one call's outputs (as many as the call can have), in Keras 2, or as
        far as Keras 3 differs in whether there is one."""
        cls = spec.get("class_name")
        conf = spec.get("config") or {}
        first = self.mask_of(entries[0], keras3)
        masks = [self.mask_of(e, keras3) for e in entries]
        if keras3 and cls in _KERAS3_PASS:
            return [first]
        if cls == "Embedding":
            return [("ids", tuple(entries[0][:3])) if conf.get("mask_zero") else None]
        if cls == "Masking":
            return [("opaque", f"Masking layer {walker.name(spec)!r}")]
        if cls in RNN_CLASSES:
            inner = conf.get("layer") if cls == "Bidirectional" else None
            inner = inner.get("config") or {} if isinstance(inner, dict) else conf
            sequences = bool(inner.get("return_sequences"))
            out = first if sequences else None
            pair = cls == "Bidirectional" and conf.get("merge_mode") is None
            return [out, out] if pair else [out]
        if cls in _MERGE:
            return [_and(masks)]
        if cls == "Concatenate":
            axis = conf.get("axis", -1)
            if all(m is None for m in masks):
                return [None]
            if axis == 1:
                return [("time", tuple(masks))]
            if axis == -1:
                return [_and(masks)]
            return [("opaque", f"Concatenate layer {walker.name(spec)!r} (axis={axis})")]
        if cls in (*_ATTENTION, _MHA, *_PASS):
            return [first]
        if cls == "Lambda":
            return [("opaque", f"Lambda layer {walker.name(spec)!r}") if conf.get("mask") else None]
        if cls in _MODELS:
            if all(m is None for m in masks):
                return [None]
            return [("opaque", f"nested model {walker.name(spec)!r}")]
        return [None]

    def mha_inputs(self) -> set[Ref]:
        """Tensors read by a MultiHeadAttention, which strips their masks in Keras 3."""
        found: set[Ref] = set()
        for spec in self.specs.values():
            if spec.get("class_name") != _MHA:
                continue
            for node in spec.get("inbound_nodes") or []:
                entries = walker.keras2_entries(node) or []
                for entry in entries:
                    found.add(tuple(entry[:3]))
                for value in walker.call_kwargs(entries).values():
                    if walker.is_ref(value):
                        found.add(tuple(value[:3]))
        return found

    # -- each call that reads a mask --------------------------------------------------------

    def fix_call(
        self, name: str, spec: dict[str, Any], index: int, node: Any, readers: set[Ref]
    ) -> None:
        cls = spec.get("class_name")
        entries = walker.keras2_entries(node)
        kwargs = walker.call_kwargs(entries)
        if cls in _MODELS:
            self.check_nested(name, spec, entries)
            return
        self.drop_keras3_masks(cls, entries, kwargs)
        if cls in RNN_CLASSES:
            wanted = {"mask": self.mask_of(entries[0])}
            keras3_sees = len(entries) == 1 and not _has_ref(kwargs.get("initial_state"))
            why = "which Keras 3 does not pass to an RNN layer called with initial_state"
        elif cls in _ATTENTION:
            masks = [self.mask_of(e) for e in entries[:2]]
            wanted = {"mask": masks if any(m is not None for m in masks) else None}
            keras3_sees = True
            why = ""
        elif cls == _MHA:
            value = kwargs.get("value")
            key = kwargs.get("key")
            wanted = {
                "query_mask": self.mask_of(entries[0]),
                "value_mask": self.mask_of(value if walker.is_ref(value) else entries[-1]),
                "key_mask": self.mask_of(key) if walker.is_ref(key) else None,
            }
            keras3_sees = True
            why = ""
        elif cls in _POOLING:
            wanted = {"mask": self.mask_of(entries[0])}
            keras3_sees = True
            why = ""
        else:
            return
        flat = [
            m for value in wanted.values() for m in (value if isinstance(value, list) else [value])
        ]
        if all(m is None for m in flat):
            return
        if all(_buildable(m) for m in flat if m is not None):
            extra = {}
            for key, value in wanted.items():
                if isinstance(value, list):
                    extra[key] = [None if m is None else list(self.build(m)) for m in value]
                elif value is not None:
                    extra[key] = list(self.build(value))
            node_kwargs(node).update(extra)
            return
        # Keras 2's mask is one Keras 3 computes itself: the same, unless Keras 3 drops or
        # changes it on the way.
        if not keras3_sees:
            raise self.fail(name, cls, f"its input carries a mask ({_describe(flat)}), {why}")
        if any(_combined(m) for m in flat):
            raise self.fail(
                name,
                cls,
                f"its input's mask ({_describe(flat)}) combines several masks, which Keras 2 "
                "does with AND over the inputs that have one and Keras 3 with OR (and not at "
                "all when one input has none)",
            )
        shared = [tuple(e[:3]) for e in entries if tuple(e[:3]) in readers and cls != _MHA]
        if shared:
            raise self.fail(
                name,
                cls,
                f"its input {shared[0][0]!r} carries a mask ({_describe(flat)}) and is also read "
                "by a MultiHeadAttention layer, which removes it in Keras 3",
            )

    def drop_keras3_masks(self, cls: str, entries: list[list[Any]], kwargs: dict[str, Any]) -> None:
        """Where Keras 2 gives a layer no mask and Keras 3 would give it one, route the input
        through `Permute` by the identity, which Keras 3 passes no mask through."""
        if cls in RNN_CLASSES:
            read = [entries[0]]
        elif cls in (*_ATTENTION, *_POOLING):
            read = entries
        elif cls == _MHA:
            read = [entries[0], *(v for v in kwargs.values() if walker.is_ref(v))]
        else:
            return
        rank = _input_rank(cls)
        for ref in read:
            if self.mask_of(ref) is None and self.mask_of(ref, keras3=True) is not None:
                source = tuple(ref[:3])
                if source not in self.unmasked:
                    spec = self.layer(
                        f"{source[0]}{NO_MASK_SUFFIX}",
                        "Permute",
                        {"dims": list(range(1, rank))},
                        [[*source, {}]],
                    )
                    self.unmasked[source] = (walker.name(spec), 0, 0)
                ref[:3] = list(self.unmasked[source])

    def check_nested(self, name: str, spec: dict[str, Any], entries: list[list[Any]]) -> None:
        """A masked input handed to a nested model: its own layers were converted without
        knowing it, so refuse if a layer inside could get a mask unlike Keras 2's."""
        masks = [self.mask_of(e) for e in entries]
        if all(m is None for m in masks):
            return
        for inner, inner_cls in _risky_layers(spec):
            raise self.fail(
                name,
                str(spec.get("class_name")),
                f"it is handed a masked input ({_describe(masks)}), and Keras 3 would not give "
                f"its layer {inner!r} ({inner_cls}) the mask Keras 2 gives it",
            )

    # -- building a mask from ids with weightless layers ------------------------------------

    def build(self, mask: Mask) -> Ref:
        """The ref of a tensor holding `mask` (1 where Keras 2's mask is True), adding layers."""
        if mask in self.built:
            return self.built[mask]
        kind = mask[0]
        if kind == "ids":
            source = mask[1]
            spec = self.layer(
                f"{source[0]}{SUFFIX}",
                "Discretization",
                {"bin_boundaries": [0.5], "output_mode": "int"},
                [[source[0], source[1], source[2], {}]],
            )
        elif kind == "and" and len(mask[1]) == 1:
            return self.build(next(iter(mask[1])))
        elif kind == "and":
            parts = [self.build(p) for p in sorted(mask[1], key=repr)]
            spec = self.layer(f"and{SUFFIX}", "Minimum", {}, [[*p, {}] for p in parts])
        else:  # "time"
            parts = [self.build(p) for p in mask[1]]
            spec = self.layer(
                f"concatenate{SUFFIX}", "Concatenate", {"axis": 1}, [[*p, {}] for p in parts]
            )
        ref = (walker.name(spec), 0, 0)
        self.built[mask] = ref
        return ref

    def layer(
        self, base: str, cls: str, config: dict[str, Any], inputs: list[list[Any]]
    ) -> dict[str, Any]:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        spec = {
            "class_name": cls,
            "module": "keras.layers",
            "name": name,
            "config": {"name": name, **config},
            "inbound_nodes": [inputs],
        }
        self.added.append(spec)
        return spec


def _input_rank(cls: str) -> int:
    """The rank of what a mask-reading layer takes: ConvLSTM<n>D n + 3, the others 3."""
    if cls.startswith("ConvLSTM") and cls[len("ConvLSTM")].isdigit():
        return 3 + int(cls[len("ConvLSTM")])
    return 3


def _risky_layers(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """Layers of a (converted) nested model whose mask Keras 3 can compute unlike Keras 2."""
    found = []
    for layer in walker.layers(spec):
        cls = str(layer.get("class_name"))
        nodes = layer.get("inbound_nodes") or []
        if cls in RNN_CLASSES and any(isinstance(n, dict) for n in nodes):
            found.append((walker.name(layer), cls))  # called with initial_state or a mask
        elif cls in (*_MERGE, "Concatenate", _MHA, *_KERAS3_PASS, *_MODELS):
            found.append((walker.name(layer), cls))
    return found


def _and(masks: list[Mask]) -> Mask:
    present = frozenset(m for m in masks if m is not None)
    if not present:
        return None
    partial = len(present) < len(masks) and any(m is None for m in masks)
    if len(present) == 1 and not partial:
        return next(iter(present))
    return ("and", present, partial)


def _buildable(mask: Mask) -> bool:
    if mask is None:
        return False
    if mask[0] == "ids":
        return True
    if mask[0] == "and":
        return all(_buildable(p) for p in mask[1])
    if mask[0] == "time":
        return all(p is not None and _buildable(p) for p in mask[1])
    return False


def _combined(mask: Mask) -> bool:
    return mask is not None and mask[0] in ("and", "time")


def _describe(masks: list[Mask]) -> str:
    """The first mask of `masks`, in words."""
    for mask in masks:
        if mask is None:
            continue
        if mask[0] == "opaque":
            return f"from the {mask[1]}"
        if mask[0] == "ids":
            return f"ids != 0 of {mask[1][0]!r}"
        names = " and ".join(_source(p) for p in sorted(mask[1], key=repr) if p is not None)
        kind = "the AND" if mask[0] == "and" else "a concatenation in time"
        return f"{kind} of the masks of {names}"
    return "none"


def _source(mask: Mask) -> str:
    if mask[0] == "opaque":
        return f"the {mask[1]}"
    if mask[0] == "ids":
        return f"the ids {mask[1][0]!r}"
    return f"({_describe([mask])})"


def _has_ref(value: Any) -> bool:
    return next(walker.references(value), None) is not None


def node_kwargs(node: list[list[Any]]) -> dict[str, Any]:
    """The call kwargs of a Keras 2 node (its last entry's fourth item), created if missing."""
    last = node[-1]
    if len(last) < 4 or not isinstance(last[3], dict):
        del last[3:]
        last.append({})
    return last[3]
