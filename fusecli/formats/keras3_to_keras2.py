"""Keras 3 model files in Keras 2's schema, as JSON: the mirror of `fusecli.formats.keras2`.

A Keras 3 config (`.keras`, or a `.h5` Keras 3 wrote) becomes the config tf.keras 2.x would have
written for the same model, which `fusecli.fusion.flat_h5` then inlines into a flat `.h5` that
tf-keras 2.x and Keras 3 both load:
- `batch_shape` becomes `batch_input_shape`, dtype policy objects become dtype names;
- nodes `{"args": [...], "kwargs": {...}}` holding `__keras_tensor__` objects become Keras 2's
  `[[layer, node, tensor, kwargs], ...]`; a call of a nested model is renumbered (Keras 2
  counts a nested model's own graph as its node 0, Keras 3 does not);
- initializers, regularizers and constraints lose `module`/`registered_name`; keys only Keras 3
  knows are dropped where they hold the value that means what Keras 2 does without them, and
  refused otherwise.
Only layer classes whose Keras 2 config and weight order are known to match are converted (the
weights of each in the order tf-keras builds them, named as tf-keras names them); a Keras
3-only layer, an operation node (`keras.ops` called on a Keras tensor), a custom layer, or a
setting Keras 2 does not have raises `NotFlat` with the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.keras_vars import var_paths
from fusecli.formats.modelfile import ModelFile

_MODELS = ("Functional", "Model", "Sequential")
_CONVS = tuple(f"Conv{d}D" for d in "123") + tuple(f"Conv{d}DTranspose" for d in "23")
_CELLS = {"SimpleRNN": "simple_rnn_cell", "GRU": "gru_cell", "LSTM": "lstm_cell"}
_POOLING = tuple(
    f"{kind}Pooling{d}D" for kind in ("Max", "Average", "GlobalMax", "GlobalAverage") for d in "123"
)
_NO_WEIGHTS = (
    *_POOLING, "InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "SpatialDropout3D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Flatten",
    "Activation", "ReLU", "LeakyReLU", "ELU", "Softmax", "Concatenate", "Add", "Subtract",
    "Multiply", "Average", "Maximum", "Minimum", "Rescaling", "Reshape", "Permute",
    "RepeatVector", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D",
    "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "Masking",
)  # fmt: skip
_WITH_WEIGHTS = (
    "Dense", *_CONVS, "DepthwiseConv2D", "SeparableConv2D", "BatchNormalization",
    "LayerNormalization", "Embedding", "PReLU", *_CELLS,
)  # fmt: skip
_WRAPPERS = ("Bidirectional", "TimeDistributed")
LAYERS = frozenset((*_NO_WEIGHTS, *_WITH_WEIGHTS, *_WRAPPERS))
# Keys only Keras 3 writes, with the value that computes what Keras 2 does without the key.
_KERAS3_ONLY: dict[str, Any] = {"quantization_config": None, "lora_rank": None, "lora_alpha": None}
_KERAS3_ONLY_BY_CLASS: dict[str, dict[str, Any]] = {
    "LayerNormalization": {"rms_scaling": False},
    "ZeroPadding1D": {"data_format": "channels_last"},
    "Cropping1D": {"data_format": "channels_last"},
    "UpSampling1D": {"data_format": "channels_last"},
}
# Keys both accept, but where only this value builds the same weights in both.
_REQUIRED: dict[str, dict[str, Any]] = {"BatchNormalization": {"renorm": False}}
_ACTIVATIONS = frozenset(
    (
        "linear", "relu", "sigmoid", "tanh", "softmax", "softplus", "softsign", "selu", "elu",
        "exponential", "gelu", "silu", "swish", "relu6", "mish", "leaky_relu", "log_softmax",
    )
)  # fmt: skip
_OBJECTS = frozenset(
    (
        "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
        "VarianceScaling", "GlorotUniform", "GlorotNormal", "HeUniform", "HeNormal",
        "LecunUniform", "LecunNormal", "Orthogonal", "Identity", "L1", "L2", "L1L2",
        "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm",
    )
)  # fmt: skip
_PLAIN_DTYPES = frozenset(
    ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
     "bool", "string")
)  # fmt: skip


def is_keras3(model_file: ModelFile) -> bool:
    """A file Keras 3 wrote: a `.keras` archive, or a `.h5` recording a Keras 3 version."""
    if model_file.format == "keras":
        return not model_file.keras2_archive
    return model_file.format == "h5" and (model_file.keras_version or "").startswith("3.")


def as_keras2(model_file: ModelFile) -> ModelFile:
    """The file as its Keras 2 config describes it (Keras 2 files as they are). Raises
    `NotFlat`."""
    if not is_keras3(model_file):
        return model_file
    if model_file.format == "keras" and model_file.weights_member != "model.weights.h5":
        raise NotFlat("its weights are stored as .npz, which fusecli copies only into .keras")
    return dataclasses.replace(model_file, config=convert_config(model_file.config))


def convert_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Keras 2 config of a Keras 3 model config (`{"class_name", "config"}`). Raises
    `NotFlat` naming the layer where it has none."""
    try:
        return _Converter().model(config, ())
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise NotFlat(f"its config is not one Keras 3 writes ({type(e).__name__}: {e})") from None


class _Converter:
    def __init__(self) -> None:
        # The model being converted's `NotEqual` nodes that only give an Embedding's mask.
        self.masks: frozenset[str] = frozenset()

    def fail(self, where: tuple[str, ...], cls: str, reason: str) -> NotFlat:
        return NotFlat(f"layer {'/'.join(where)!r} ({cls}) {reason}")

    def model(self, spec: dict[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
        conf = spec["config"]
        cls = str(spec.get("class_name"))
        if cls not in _MODELS or not isinstance(conf.get("layers"), list):
            raise NotFlat("its top-level object is not a Functional or Sequential model")
        name = str(conf.get("name", "model"))
        if cls == "Sequential":
            layers = [self.layer(entry, where, None) for entry in conf["layers"]]
            return {"class_name": "Sequential", "config": {"name": name, "layers": layers}}
        entries = conf["layers"]
        own_node = {
            _name(e): _has_own_node(e)
            for e in entries
            if isinstance(e, dict) and e.get("class_name") in _MODELS
        }
        outer, self.masks = self.masks, _embedding_masks(entries)
        layers = [
            self.layer(entry, where, own_node)
            for entry in entries
            if _name(entry) not in self.masks
        ]
        self.masks = outer
        return {
            "class_name": "Functional",
            "config": {
                "name": name,
                "trainable": bool(conf.get("trainable", True)),
                "layers": layers,
                "input_layers": _io(conf.get("input_layers"), {}),
                "output_layers": _io(conf.get("output_layers"), own_node),
            },
        }

    def layer(
        self, spec: dict[str, Any], parent: tuple[str, ...], own_node: dict[str, bool] | None
    ) -> dict[str, Any]:
        """One entry of a model's `layers`; `own_node` given in a functional model (its
        entries carry their calls), None in a Sequential one."""
        cls = str(spec.get("class_name"))
        conf = spec.get("config")
        if not isinstance(conf, dict):
            raise NotFlat(f"a layer of {'/'.join(parent) or 'the model'} has no config")
        where = (*parent, str(conf.get("name", spec.get("name"))))
        if cls in _MODELS and isinstance(conf.get("layers"), list):
            out = self.model(spec, where)
        else:
            out = {"class_name": cls, "config": self.layer_config(spec, where)}
        if own_node is not None:
            out["name"] = where[-1]
            out["inbound_nodes"] = [
                self.node(node, where, cls, own_node) for node in spec.get("inbound_nodes") or []
            ]
        return out

    def layer_config(self, spec: dict[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
        cls = str(spec.get("class_name"))
        conf = dict(spec["config"])
        module = str(spec.get("module") or "")
        if module.startswith("keras.src.ops") or ("trainable" not in conf and cls != "InputLayer"):
            raise self.fail(
                where, cls, "is an operation node (a keras.ops function called on a Keras "
                "tensor), which tf-keras cannot build",
            )  # fmt: skip
        registered = spec.get("registered_name")
        if module not in ("", "keras.layers") or registered not in (None, cls):
            raise self.fail(where, cls, f"is a custom layer ({registered or module})")
        if cls not in LAYERS:
            raise self.fail(where, cls, "has no Keras 2 form fusecli can vouch for")
        if cls == "InputLayer":
            return self.input_layer(conf, where)
        for key, neutral in {**_KERAS3_ONLY, **_KERAS3_ONLY_BY_CLASS.get(cls, {})}.items():
            if key in conf and conf.pop(key) != neutral:
                raise self.fail(where, cls, f"sets {key}, which Keras 2 does not have")
        for key, needed in _REQUIRED.get(cls, {}).items():
            if conf.get(key, needed) != needed:
                raise self.fail(where, cls, f"sets {key}={conf[key]!r}, which tf-keras builds "
                                "with other weights")  # fmt: skip
        out: dict[str, Any] = {}
        for key, value in conf.items():
            if key in ("layer", "backward_layer") and cls in _WRAPPERS:
                out[key] = self.inner_layer(value, where)
            elif key == "dtype":
                out[key] = self.dtype(value, where, cls)
            elif key in ("activation", "recurrent_activation"):
                out[key] = self.activation(value, where, cls, key)
            else:
                out[key] = self.value(value, where, cls, key)
        return out

    def inner_layer(self, spec: Any, where: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise NotFlat(f"wrapper {'/'.join(where)!r} holds no layer config")
        cls = str(spec.get("class_name"))
        inner = (*where, str(spec["config"].get("name")))
        if cls in _MODELS or cls in _WRAPPERS:
            raise self.fail(inner, cls, "is wrapped in another layer")
        return {"class_name": cls, "config": self.layer_config(spec, inner)}

    def input_layer(self, conf: dict[str, Any], where: tuple[str, ...]) -> dict[str, Any]:
        shape = conf.get("batch_shape", conf.get("batch_input_shape"))
        if not isinstance(shape, list):
            raise self.fail(where, "InputLayer", "declares no shape")
        if conf.get("sparse") or conf.get("ragged") or conf.get("optional"):
            raise self.fail(where, "InputLayer", "is sparse, ragged or optional")
        return {
            "batch_input_shape": list(shape),
            "dtype": self.dtype(conf.get("dtype", "float32"), where, "InputLayer"),
            "sparse": False,
            "ragged": False,
            "name": where[-1],
        }

    def dtype(self, value: Any, where: tuple[str, ...], cls: str) -> str:
        if isinstance(value, dict):
            inner = value.get("config")
            value = inner.get("name") if isinstance(inner, dict) else None
        if value is None:
            return "float32"
        if value not in _PLAIN_DTYPES:
            raise self.fail(where, cls, f"computes in dtype policy {value!r}, which this "
                            "conversion does not carry")  # fmt: skip
        return str(value)

    def activation(self, value: Any, where: tuple[str, ...], cls: str, key: str) -> Any:
        if value is None:
            return value
        if value == "hard_sigmoid":
            raise self.fail(
                where, cls, f"uses {key}='hard_sigmoid', clip(x/6 + 0.5) in Keras 3 and "
                "clip(0.2x + 0.5) in Keras 2, so no one file computes the same in both",
            )  # fmt: skip
        if not isinstance(value, str) or value not in _ACTIVATIONS:
            raise self.fail(where, cls, f"uses {key} {value!r}, which tf-keras may not know")
        return value

    def value(self, value: Any, where: tuple[str, ...], cls: str, key: str) -> Any:
        """A config value: initializers, regularizers and constraints in Keras 2's form."""
        if isinstance(value, list):
            return [self.value(v, where, cls, key) for v in value]
        if not isinstance(value, dict):
            return value
        name = value.get("class_name")
        conf = value.get("config")
        if name == "__tuple__" and isinstance(conf, dict):
            return [self.value(v, where, cls, key) for v in conf.get("value", [])]
        if name not in _OBJECTS or not isinstance(conf, dict):
            raise self.fail(where, cls, f"sets {key} to {name or value!r}, which this "
                            "conversion does not carry")  # fmt: skip
        if value.get("module") not in (None, "keras.initializers", "keras.regularizers",
                                       "keras.constraints"):  # fmt: skip
            raise self.fail(where, cls, f"sets {key} to a custom {name}")
        conf = dict(conf)
        for axes in ("input_axes", "output_axes"):  # Keras 3's fan axes; None: Keras 2's own
            if axes in conf and conf.pop(axes) is not None:
                raise self.fail(where, cls, f"sets {key} with {axes}, which Keras 2 lacks")
        return {"class_name": name, "config": conf}

    def implicit(self, key: str, value: Any) -> bool:
        """A call argument Keras 2's config leaves out: None, or an Embedding's own mask."""
        history = _history(value)
        return value is None or key == "mask" and bool(history) and history[0] in self.masks

    def node(
        self, node: Any, where: tuple[str, ...], cls: str, own_node: dict[str, bool]
    ) -> list[list[Any]]:
        """A Keras 3 call as Keras 2's `[[layer, node, tensor, kwargs], ...]`."""
        if not isinstance(node, dict):
            raise self.fail(where, cls, "has a call in a format Keras 3 does not write")
        args = node.get("args") or []
        kwargs = {k: v for k, v in (node.get("kwargs") or {}).items() if not self.implicit(k, v)}
        if any(_is_tensor(v) or isinstance(v, list | dict) for v in kwargs.values()):
            raise self.fail(where, cls, "is called with tensors as keyword arguments, which "
                            "tf-keras reads differently")  # fmt: skip
        if len(args) != 1:
            raise self.fail(where, cls, f"is called with {len(args)} positional arguments, "
                            "which Keras 2's call format cannot hold")  # fmt: skip
        arg = args[0]
        tensors = arg if isinstance(arg, list) else [arg]
        if (isinstance(arg, list) and len(arg) < 2) or not all(map(_is_tensor, tensors)):
            raise self.fail(where, cls, "is called on something other than a tensor or a "
                            "list of tensors")  # fmt: skip
        entries = []
        for t in tensors:
            layer, index, k = t["config"]["keras_history"]
            entries.append([layer, int(index) + own_node.get(layer, False), int(k), dict(kwargs)])
        return entries


def _io(value: Any, own_node: dict[str, bool]) -> Any:
    """A model's input/output refs, renumbered where they name a nested model's output."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        return [value[0], int(value[1]) + own_node.get(value[0], False), int(value[2])]
    if isinstance(value, list):
        return [_io(v, own_node) for v in value]
    if isinstance(value, dict) and value.get("class_name") == "__tuple__":
        return _io(value["config"]["value"], own_node)
    return value


def _has_own_node(spec: dict[str, Any]) -> bool:
    """Whether Keras 2 counts this nested model's own graph as its node 0 (a Functional, or a
    Sequential that starts with an InputLayer)."""
    if spec.get("class_name") != "Sequential":
        return True
    layers = spec["config"].get("layers") or [{}]
    return layers[0].get("class_name") == "InputLayer"


def _embedding_masks(entries: list[Any]) -> frozenset[str]:
    """The `not_equal(ids, 0)` operation nodes Keras 3 records for an `Embedding(mask_zero=True)`
    called on `ids`, used only as the `mask` of later calls: Keras 2 (and Keras 3 building a
    Keras 2 config) passes that mask on by itself, so the node and those arguments are dropped
    (`fusecli.formats.keras2_flat.check_masks` then checks both Kerases pass it alike)."""
    embedded = [
        _history(node["args"][0])
        for e in entries
        if isinstance(e, dict) and e.get("class_name") == "Embedding"
        and (e.get("config") or {}).get("mask_zero")
        for node in e.get("inbound_nodes") or []
        if isinstance(node, dict) and len(node.get("args") or []) == 1
    ]  # fmt: skip
    found = set()
    for e in entries:
        nodes = e.get("inbound_nodes") if isinstance(e, dict) else None
        conf = e.get("config") if isinstance(e, dict) else None
        if (
            e.get("class_name") != "NotEqual"
            or "trainable" in (conf or {})
            or len(nodes or []) != 1
        ):
            continue
        args = nodes[0].get("args") or []
        if len(args) == 2 and args[1] == 0 and _history(args[0]) in embedded:
            found.add(_name(e))
    used = {
        h[0]
        for e in entries
        if isinstance(e, dict)
        for node in e.get("inbound_nodes") or []
        if isinstance(node, dict)
        for h in _histories(node.get("args"))
    }
    return frozenset(found - used)


def _history(value: Any) -> list[Any]:
    return list(value["config"]["keras_history"]) if _is_tensor(value) else []


def _histories(value: Any) -> list[list[Any]]:
    if _is_tensor(value):
        return [_history(value)]
    if isinstance(value, list):
        return [h for v in value for h in _histories(v)]
    if isinstance(value, dict):
        return [h for v in value.values() for h in _histories(v)]
    return []


def _is_tensor(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("class_name") == "__keras_tensor__"
        and isinstance(value.get("config"), dict)
        and isinstance(value["config"].get("keras_history"), list)
    )


def _name(spec: dict[str, Any]) -> str:
    conf = spec.get("config")
    name = conf.get("name") if isinstance(conf, dict) else None
    return str(name if name is not None else spec.get("name"))


# -- weights ---------------------------------------------------------------------------------

Origin = tuple[str, ...]


def weight_names(cls: str, conf: dict[str, Any], name: str) -> list[str]:
    """A layer's weights as tf-keras names them (below its group), in tf-keras' order."""
    if cls == "Bidirectional":
        out = []
        for key, side in (("layer", "forward"), ("backward_layer", "backward")):
            inner = conf.get(key) or conf["layer"]
            inner_name = str(inner["config"]["name"])
            inner_name = inner_name if inner_name.startswith(side) else f"{side}_{inner_name}"
            out += weight_names(str(inner["class_name"]), inner["config"], inner_name)
        return [f"{name}/{n}" for n in out]
    if cls == "TimeDistributed":
        inner = conf["layer"]
        inner_names = weight_names(str(inner["class_name"]), inner["config"], "")
        return [f"{name}/{inner['config']['name']}{n}" for n in inner_names]
    own = _own_weights(cls, conf)
    if own is None:
        raise NotFlat(f"layer {name!r} ({cls}) holds weights whose tf-keras order is not known")
    return [f"{name}/{n}:0" for n in own]


def _own_weights(cls: str, conf: dict[str, Any]) -> list[str] | None:
    """A layer's weights in the order tf-keras builds them (Keras 3 stores them so too)."""
    bias = ["bias"] if conf.get("use_bias", True) else []
    norm = [*(["gamma"] if conf.get("scale", True) else []),
            *(["beta"] if conf.get("center", True) else [])]  # fmt: skip
    if cls == "Dense" or cls in _CONVS:
        return ["kernel", *bias]
    if cls == "DepthwiseConv2D":
        return ["depthwise_kernel", *bias]
    if cls == "SeparableConv2D":
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if cls == "BatchNormalization":
        return [*norm, "moving_mean", "moving_variance"]
    if cls == "LayerNormalization":
        return norm
    if cls == "Embedding":
        return ["embeddings"]
    if cls == "PReLU":
        return ["alpha"]
    if cls in _CELLS:
        return [f"{_CELLS[cls]}/{n}" for n in ("kernel", "recurrent_kernel", *bias)]
    return None


def read_layer_weights(path: Path) -> dict[Origin, list[Any]] | str:
    """`layer_weights` of the file at `path`, for `call_isolated` (a child process reads the
    untrusted HDF5)."""
    from fusecli.formats.modelfile import read_model_file

    return layer_weights(read_model_file(path))


def layer_weights(model_file: ModelFile) -> dict[Origin, list[Any]] | str:
    """For every layer (by its path of names) its weights, by the config as read (`model_file`):
    the dataset paths below the file's weights root for a Keras 2 file
    (`fusecli.formats.keras2_weights`), (source path, name in the output) pairs for a Keras 3
    one; the reason as a string where the weights cannot be given to layers."""
    from fusecli.formats import keras2_weights
    from fusecli.formats.modelfile import open_weights

    path = Path(model_file.path)
    try:
        with open_weights(path) as root:
            if not is_keras3(model_file):
                return keras2_weights.layer_weights(root, model_file.config)
            entries = _leaf_entries(model_file.config, ())
            if model_file.format == "h5":
                found = keras2_weights.layer_weights(root, model_file.config)
                return _named_h5(found, entries)
            return _keras_weights(path, model_file, entries)
    except NotFlat as e:
        return str(e)


def _leaf_entries(config: dict[str, Any], where: Origin) -> dict[Origin, dict[str, Any]]:
    out: dict[Origin, dict[str, Any]] = {}
    for entry in config["config"].get("layers") or []:
        origin = (*where, _name(entry))
        if entry.get("class_name") in _MODELS and isinstance(entry["config"].get("layers"), list):
            out |= _leaf_entries(entry, origin)
        else:
            out[origin] = entry
    return out


def _named_h5(
    found: dict[Origin, list[str]], entries: dict[Origin, dict[str, Any]]
) -> dict[Origin, list[tuple[str, str]]]:
    out = {}
    for origin, paths in found.items():
        if not paths:
            continue
        entry = entries.get(origin)
        if entry is None:
            raise NotFlat(f"weights of {'/'.join(origin)!r} belong to no layer of its graph")
        names = weight_names(str(entry["class_name"]), entry["config"], origin[-1])
        if len(names) != len(paths):
            raise NotFlat(
                f"layer {'/'.join(origin)!r} holds {len(paths)} weights, where tf-keras builds "
                f"{len(names)}"
            )
        out[origin] = list(zip(paths, names, strict=True))
    return out


def _keras_weights(
    path: Path, model_file: ModelFile, entries: dict[Origin, dict[str, Any]]
) -> dict[Origin, list[tuple[str, str]]]:
    from fusecli.errors import ModelFileError
    from fusecli.formats.weights_layout import read_layout

    try:
        layout = read_layout(path, model_file)
    except ModelFileError as e:
        raise NotFlat(e.reason) from None
    by_layer: dict[Origin, list[str]] = {}
    for variable in layout.variables:
        by_layer.setdefault(tuple(variable.layer.split("/")), []).append(variable.dataset)
    out = {}
    for origin, datasets in by_layer.items():
        entry = entries.get(origin)
        if entry is None:
            raise NotFlat(f"weights of {'/'.join(origin)!r} belong to no layer of its graph")
        cls, conf = str(entry["class_name"]), entry["config"]
        names = weight_names(cls, conf, origin[-1])
        rels = var_paths(cls, conf, len(datasets))
        if len(names) != len(datasets):
            raise NotFlat(
                f"layer {'/'.join(origin)!r} holds {len(datasets)} weights, where tf-keras "
                f"builds {len(names)}"
            )
        first = datasets[0]
        base = next((first[: -len(r)] for r in rels if first.endswith("/" + r)), None)
        ordered = [f"{base}{r}" for r in rels]
        if base is None or sorted(ordered) != sorted(datasets):
            raise NotFlat(f"the weights of layer {'/'.join(origin)!r} are not where Keras 3 "
                          "puts them")  # fmt: skip
        out[origin] = list(zip(ordered, names, strict=True))
    return out
