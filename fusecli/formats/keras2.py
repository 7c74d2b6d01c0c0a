"""Keras 2 era `.h5` files (written by tf.keras 2.x) loaded into Keras 3, computing the same thing.

Keras 3 reads the legacy `.h5` format but not every Keras 2 config. `convert_config` rewrites the
model config (plain JSON, no TensorFlow) into one Keras 3 builds to the same function:
- retired arguments with their neutral value are dropped (GRU/LSTM `time_major=False`,
  DepthwiseConv2D `groups=1`, BatchNormalization `fused`, Embedding `input_length`...); any other
  value is refused, naming the layer;
- Sequential models declared with `input_shape`/`batch_input_shape` get an InputLayer,
  `batch_input_shape` becomes `batch_shape`, `Policy` dicts become dtype policy names;
- functional graphs: calls of nested models are renumbered (Keras 2 counts a nested model's own
  graph as node 0), a one-tensor input/output stays a tensor, and RNN initial states and tensor
  call arguments move to Keras 3's node format;
- TensorFlow functions called on Keras tensors (`TFOpLambda`, `x + y`, `tf.concat`) become the
  `keras.ops` operations that compute them (`keras2_ops`);
- Lambda bytecode is refused unless trusted.
`load_keras2` builds the result in Keras' safe mode (unless trusted), loads the weights from
the same file with Keras' legacy loader (the weight layouts, GRU/LSTM/BatchNormalization
included, are the same in both versions), and makes up for the one activation that changed
meaning, hard_sigmoid, by rescaling the weights that feed it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fusecli import runtime
from fusecli.config import walker
from fusecli.config.walker import MODEL_CLASSES as _MODEL_CLASSES
from fusecli.errors import ModelFileError, UnsafeModelError, known_cause
from fusecli.formats import keras2_masks, keras2_ops
from fusecli.formats.modelfile import ModelFile, file_format, keras2_config, read_model_file

if TYPE_CHECKING:
    import keras

    from fusecli.formats.weights_layout import Layout

# Retired Keras 2 arguments: the value that means "nothing special" (the argument is dropped),
# per layer class. Any other value changes what the layer computes and cannot be converted.
_RNN_CLASSES = ("RNN", "SimpleRNN", "GRU", "LSTM", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
_GROUPS_OF_ONE = (
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
)  # fmt: skip
_RETIRED: dict[str, dict[str, Any]] = {
    **{name: {"time_major": False} for name in _RNN_CLASSES},
    **{name: {"groups": 1} for name in _GROUPS_OF_ONE},
    **{f"SpatialDropout{d}D": {"noise_shape": None} for d in "123"},
    # Keras 3 masks the softmax the way Keras 2 did without robust masking.
    "MultiHeadAttention": {"softmax_robust_masking": False},
    "BatchNormalization": {"virtual_batch_size": None, "adjustment": None},
}
# Arguments Keras 2 stored but that never changed the output (an implementation choice, a
# shape given elsewhere, or one SeparableConv inherited from Conv and ignored); dropped.
_UNSEEN_KERNEL = ("kernel_initializer", "kernel_regularizer", "kernel_constraint")
_NO_EFFECT: dict[str, tuple[str, ...]] = {
    "BatchNormalization": ("fused",),
    "Embedding": ("input_length",),
    "SeparableConv1D": _UNSEEN_KERNEL,
    "SeparableConv2D": _UNSEEN_KERNEL,
    "MultiHeadAttention": ("query_shape", "key_shape", "value_shape"),
    # Keras 3's SpatialDropout takes no `trainable`; it has no weights to train anyway.
    **{f"SpatialDropout{d}D": ("trainable",) for d in "123"},
}
# Arguments renamed in Keras 3.
_RENAMED: dict[str, dict[str, str]] = {
    "LeakyReLU": {"alpha": "negative_slope"},
}
# Keras 2's hard_sigmoid is clip(0.2x + 0.5, 0, 1), Keras 3's is clip(x/6 + 0.5, 0, 1): Keras 3's
# of 1.2x. Where the activation's input is linear in the layer's weights, scaling those weights
# by 1.2 makes Keras 3 compute what Keras 2 did (GRU/LSTM of Keras <= 2.3 and ConvLSTM2D used it
# by default). Elsewhere (an Activation layer, LSTM's cell-state activation) it cannot be matched.
_HARD_SIGMOID = "hard_sigmoid"
_HARD_SIGMOID_SCALE = 1.2
_CONVS = tuple(f"{kind}{d}D" for kind in ("Conv", "DepthwiseConv", "SeparableConv") for d in "123")
_LINEAR_BEFORE_ACTIVATION = (
    "Dense", "EinsumDense", "SimpleRNN", "SimpleRNNCell", "GRU", "GRUCell",
    *_CONVS, *(f"Conv{d}DTranspose" for d in "123"),
)  # fmt: skip
_GATED = ("GRU", "GRUCell", "LSTM", "LSTMCell", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
# For a cell: (number of gate blocks along the weights' last axis, blocks after
# recurrent_activation, blocks after activation).
_CELL_BLOCKS = {
    "SimpleRNNCell": (1, (), (0,)),
    "GRUCell": (3, (0, 1), (2,)),  # z, r | h
    "LSTMCell": (4, (0, 1, 3), ()),  # i, f, o | c
    "ConvLSTMCell": (4, (0, 1, 3), ()),
}
_SHAPE_KEYS = ("batch_input_shape",)  # Keras 2 wrote only this one into layer configs
# dtype policies Keras 2 wrote whose variables (and an inserted InputLayer) are float32.
_PLAIN_DTYPES = ("float16", "float32", "float64", "bfloat16")
_KERAS_CAUSE = "Exception encountered:"
_UNKNOWN_CLASS_MESSAGE = (
    "Keras 3 has no layer of this name; if it is a custom layer, its Python code must be "
    "imported and registered with keras.saving.register_keras_serializable"
)
_HARD_SIGMOID_MESSAGE = (
    "{key}='hard_sigmoid' is clip(0.2x + 0.5) in Keras 2 but clip(x/6 + 0.5) in Keras 3, and "
    "this layer's weights cannot be rescaled to make up for it"
)


def float_embedding(class_name: str, conf: dict[str, Any]) -> None:
    """Keras 2.0 recorded an `Embedding`'s input dtype (`int32`) as the layer's own; its
    embeddings were float32. Neither Keras 3 nor tf-keras builds an Embedding whose dtype is
    an integer ("Need minval < maxval"), so the layer gets its embeddings' dtype back."""
    dtype = conf.get("dtype")
    if class_name == "Embedding" and isinstance(dtype, str) and dtype.startswith(("int", "uint")):
        conf["dtype"] = "float32"


def loadable_keras2_config(config: Any) -> Any:
    """A Keras 2 config (kept in Keras 2's schema) that today's loaders build: every layer
    through `float_embedding`. Returns the config, changed in place."""
    if isinstance(config, dict):
        if isinstance(config.get("config"), dict):
            float_embedding(str(config.get("class_name")), config["config"])
        for value in config.values():
            loadable_keras2_config(value)
    elif isinstance(config, list):
        for value in config:
            loadable_keras2_config(value)
    return config


def is_keras2_h5(path: str | os.PathLike[str]) -> bool:
    """True for an HDF5 model file written by Keras 2 (keras_version "2.x"); False otherwise,
    also for files that cannot be read (the caller's normal path reports those)."""
    try:
        return file_format(path) == "h5" and read_model_file(path).written_by_keras2
    except ModelFileError:
        return False


def load_keras2(source: str | os.PathLike[str] | ModelFile, *, trust: bool = False) -> keras.Model:
    """Load a Keras 2 era file into Keras 3, uncompiled, computing what Keras 2 computes: a
    legacy `.h5`, or the `.keras` archive tf.keras 2.13+ writes (`ModelFile.keras2_archive`).

    `source`: a path, or a `ModelFile` already read (the config is then not read again, and the
    weights come from the same file, `ModelFile.path`: the loading door's private copy).
    `trust=False` refuses Lambda layers carrying bytecode before Keras sees them, and builds the
    model in Keras' safe mode; `trust=True` allows them.
    """
    model_file = source if isinstance(source, ModelFile) else read_model_file(source)
    path = Path(model_file.path)
    config = convert_config(model_file.config, path, trust=trust)
    keras_module = runtime.keras()
    model = _build(config, path, trust=trust)
    if not isinstance(model, keras_module.Model):
        raise ModelFileError(path, f"holds a {type(model).__name__}, not a Keras model")
    if model_file.format == "keras":
        _load_archive_weights(model, path)
    else:
        _load_weights(model, path)
    _match_keras2_hard_sigmoid(model)
    return model


def check_keras2_layout(layout: Layout) -> None:
    """Refuse (`ModelFileError`, naming the layer) a Keras 2 file whose config Keras 3 cannot be
    made to compute the same way; other files pass. No TensorFlow: `merge` calls it, so that it
    refuses the files `load_model` and `fuse` refuse (they convert the config, which checks
    the same). A tf.keras 2.13+ `.keras` archive is refused too: its variables sit where
    Keras 3's walk of its own config would put them only if converting the config changes no
    layer, which merge, copying tensors without Keras, cannot know (fuse converts it through
    Keras)."""
    if layout.format == "h5" and (layout.keras_version or "").startswith("2."):
        convert_config(layout.config, layout.path, trust=True)  # bytecode: the scan's to refuse
    elif layout.format == "keras" and (
        (layout.keras_version or "").startswith("2.") or keras2_config(layout.config)
    ):
        version = layout.keras_version if (layout.keras_version or "").startswith("2.") else "2"
        raise ModelFileError(
            layout.path,
            f"is a .keras archive written by tf.keras {version}, whose Keras 2 "
            "config Keras 3 cannot load; merge copies an input's config into its output, so it "
            "cannot merge it (save the model as .h5 in tf.keras, which merge converts, or use "
            "fuse, which converts it through Keras)",
        )


def convert_config(
    config: dict[str, Any], path: str | os.PathLike[str] = "<config>", *, trust: bool = False
) -> dict[str, Any]:
    """A copy of a Keras 2 model config rewritten for Keras 3; the input is left untouched.

    Raises `ModelFileError` naming the layer when a layer uses a Keras 2 feature that has no
    Keras 3 equivalent, and `UnsafeModelError` for a Lambda with bytecode unless `trust`.
    """
    try:
        return _Converter(Path(path), trust).layer(walker.copied(config), ())
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        # A config that is JSON but not the shape any Keras wrote.
        raise ModelFileError(
            path, f"its Keras 2 model config is malformed ({type(e).__name__}: {_short(e)})"
        ) from None


class _Converter:
    """Walks a config tree; `where` is the path of layer names from the top model down."""

    def __init__(self, path: Path, trust: bool) -> None:
        self.path = path
        self.trust = trust

    def fail(self, where: tuple[str, ...], class_name: str, message: str) -> ModelFileError:
        return ModelFileError(
            self.path,
            f"cannot convert Keras 2 layer {_layer_path(where)!r} ({class_name}): {message}",
        )

    def layer(self, spec: dict[str, Any], parent: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict | list):
            raise ModelFileError(
                self.path,
                f"its Keras 2 model config is malformed (a layer in {_layer_path(parent)!r} "
                "is not a {class_name, config} object)",
            )
        class_name = str(spec.get("class_name"))
        conf = spec["config"]
        if str(spec.get("module")).startswith("tf_keras"):
            # tf.keras 2.13+ archives name tf-keras' own modules (its Functional's); Keras 3
            # finds its built-in classes by name.
            del spec["module"]
        if class_name == "Sequential" and isinstance(conf, list):  # Keras <= 2.1
            conf = spec["config"] = {"name": "sequential", "layers": conf}
        where = (*parent, str(conf.get("name", spec.get("name", "?"))))
        if "dtype" in conf:
            conf["dtype"] = _dtype_name(conf["dtype"])
        if class_name in keras2_ops.CLASSES:
            # Converted once its model's calls are renumbered (functional, below).
            keras2_ops.check(spec, lambda reason: self.fail(where, class_name, reason))
            return spec
        if class_name == "Lambda":
            self.lambda_layer(conf, where)
        if class_name == "InputLayer":
            if "batch_input_shape" in conf:
                conf["batch_shape"] = conf.pop("batch_input_shape")
            return spec
        if class_name in _MODEL_CLASSES and isinstance(conf.get("layers"), list):
            if class_name == "Sequential":
                self.sequential(conf, where)
            else:
                self.functional(conf, where)
            return spec
        self.arguments(class_name, conf, where)
        if class_name in ("Attention", "AdditiveAttention") and conf.pop("causal", False):
            # tf.keras 2.4 to 2.9 took causal masking as an argument; Keras 3 as a call argument.
            for node in spec.get("inbound_nodes") or []:
                keras2_masks.node_kwargs(node)["use_causal_mask"] = True
        # Keras 3 builds layers that name their module with its own deserializer, the one
        # `.keras` files use; its legacy one would turn strings that name a function in
        # keras.layers (Attention's score_mode="dot") into that function.
        spec.setdefault("module", "keras.layers")
        # Every layer is built by being called when its model is wired; a stored build shape
        # (MultiHeadAttention's is only the query's) could only get in the way.
        spec.pop("build_config", None)
        for key in ("layer", "backward_layer", "cell"):  # wrappers and RNN(cell)
            if isinstance(conf.get(key), dict):
                conf[key] = self.layer(conf[key], where)
        for key in ("cell", "cells"):  # RNN([cells]) and StackedRNNCells
            if isinstance(conf.get(key), list):
                conf[key] = [self.layer(c, where) for c in conf[key]]
        return spec

    def arguments(self, class_name: str, conf: dict[str, Any], where: tuple[str, ...]) -> None:
        for key in _SHAPE_KEYS:
            conf.pop(key, None)
        for key, neutral in _RETIRED.get(class_name, {}).items():
            if key not in conf:
                continue
            value = conf.pop(key)
            if value != neutral:
                raise self.fail(
                    where,
                    class_name,
                    f"{key}={value!r} has no Keras 3 equivalent (only {key}={neutral!r} does)",
                )
        for key in _NO_EFFECT.get(class_name, ()):
            conf.pop(key, None)
        if class_name in ("GRU", "GRUCell"):
            conf.setdefault("reset_after", False)  # Keras <= 2.1 had only this behaviour
        float_embedding(class_name, conf)
        for old, new in _RENAMED.get(class_name, {}).items():
            if old in conf:
                conf[new] = conf.pop(old)
        if conf.get("activation") == _HARD_SIGMOID and class_name not in _LINEAR_BEFORE_ACTIVATION:
            raise self.fail(where, class_name, _HARD_SIGMOID_MESSAGE.format(key="activation"))
        if conf.get("recurrent_activation") == _HARD_SIGMOID and class_name not in _GATED:
            raise self.fail(
                where, class_name, _HARD_SIGMOID_MESSAGE.format(key="recurrent_activation")
            )
        axis = conf.get("axis")
        if class_name == "BatchNormalization" and isinstance(axis, list) and len(axis) != 1:
            raise self.fail(where, class_name, f"axis={axis} (several axes) is not supported")
        if isinstance(axis, list) and len(axis) == 1:
            conf["axis"] = int(axis[0])

    def lambda_layer(self, conf: dict[str, Any], where: tuple[str, ...]) -> None:
        carries_code = False
        for key, kind in (("function", "function_type"), ("output_shape", "output_shape_type")):
            value = conf.get(key)
            carries_code |= conf.get(kind) == "lambda"
            if conf.get(kind) == "lambda" and isinstance(value, list) and len(value) == 3:
                code, defaults, closure = value  # Keras 2: marshalled bytecode, base64
                conf[key] = {
                    "class_name": "__lambda__",
                    "config": {"code": code, "defaults": defaults, "closure": closure},
                }
            value = conf.get(key)
            carries_code |= isinstance(value, dict) and value.get("class_name") == "__lambda__"
        for key in ("module", "function_type", "output_shape_type", "output_shape_module"):
            conf.pop(key, None)
        if carries_code and not self.trust:
            raise UnsafeModelError(
                self.path,
                f"layer {_layer_path(where)!r} (Lambda) holds Python bytecode that would run "
                "when the model is built; refused (use --trust only for files you trust)",
            )

    def sequential(self, conf: dict[str, Any], where: tuple[str, ...]) -> None:
        layers = conf["layers"]
        if layers and layers[0].get("class_name") != "InputLayer":
            first = layers[0].get("config", {})
            shape = _declared_input_shape(first)
            if shape is not None:
                dtype = _dtype_name(first.get("dtype", "float32"))
                layers.insert(
                    0,
                    {
                        "class_name": "InputLayer",
                        "config": {
                            "batch_shape": shape,
                            "dtype": dtype if dtype in _PLAIN_DTYPES else "float32",
                            "name": f"{first.get('name', 'sequential')}_input",
                        },
                    },
                )
        conf["layers"] = keras2_masks.sequential_masks([self.layer(s, where) for s in layers])

    def functional(self, conf: dict[str, Any], where: tuple[str, ...]) -> None:
        layers = [self.layer(spec, where) for spec in conf["layers"]]
        conf["layers"] = layers
        # Keras 2 numbers a nested model's calls from 1 (node 0 is the model's own graph);
        # Keras 3 numbers them from 0 when wiring calls, and when resolving the model's inputs
        # and outputs compensates for Functional models only, not Sequential ones.
        nested = {
            spec.get("name", spec["config"].get("name")): spec["class_name"]
            for spec in layers
            if _has_own_node(spec)
        }
        for spec in layers:
            for node in spec.get("inbound_nodes", []):
                for ref in walker.references(node):
                    if ref[0] in nested and ref[1] > 0:
                        ref[1] -= 1
        layers += keras2_masks.explicit_masks(
            layers, lambda name, cls, reason: self.fail((*where, name), cls, reason)
        )
        for i, spec in enumerate(layers):
            if spec.get("class_name") in keras2_ops.CLASSES:
                name, cls = str(spec.get("name")), str(spec["class_name"])
                layers[i] = keras2_ops.convert(
                    spec, lambda reason, n=name, c=cls: self.fail((*where, n), c, reason)
                )
        for spec in layers:
            nodes = spec.get("inbound_nodes", [])
            states_in_inputs = spec.get("class_name") in (*_RNN_CLASSES, "Bidirectional")
            if states_in_inputs:
                self.drop_constants(spec, where)
            spec["inbound_nodes"] = [_keras3_node(node, states_in_inputs) for node in nodes]
        for key in ("input_layers", "output_layers"):
            refs = walker.io_refs(conf.get(key))
            for ref in refs:
                if nested.get(ref[0]) == "Sequential" and ref[1] > 0:
                    ref[1] -= 1
            # A Keras 2 model with one input or output takes or returns a tensor; Keras 3 keeps
            # the list of one it finds in the config, and the next layer would get a list.
            if len(refs) == 1 and conf[key] == [refs[0]]:
                conf[key] = refs[0]

    def drop_constants(self, spec: dict[str, Any], where: tuple[str, ...]) -> None:
        """Keras 2 recorded `constants=None` in RNN calls; Keras 3 RNNs take no constants."""
        for node in spec.get("inbound_nodes") or []:
            for entry in node if isinstance(node, list) else ():
                kwargs = entry[3] if isinstance(entry, list) and len(entry) > 3 else None
                if not isinstance(kwargs, dict) or "constants" not in kwargs:
                    continue
                if kwargs.pop("constants") is not None:
                    raise self.fail(
                        (*where, str(spec.get("name"))),
                        str(spec.get("class_name")),
                        "it is called with constants, which Keras 3 RNN layers do not take",
                    )


def _build(config: dict[str, Any], path: Path, *, trust: bool) -> Any:
    """Build the Keras 3 model from the converted config, as Keras' own `.h5` loader does."""
    with _legacy_scopes(trust):
        from keras.src.legacy.saving import saving_utils

        try:
            return saving_utils.model_from_config(copy.deepcopy(config), custom_objects={})
        except Exception as e:  # Keras raises many types; name the layer if we can
            error = e
        culprit = _first_failing_layer(config, saving_utils)
    if culprit is not None:
        where, class_name, message = culprit
        raise ModelFileError(
            path, f"cannot convert Keras 2 layer {_layer_path(where)!r} ({class_name}): {message}"
        ) from error
    raise ModelFileError(
        path, f"cannot rebuild the model from its Keras 2 config: {_short(error)}"
    ) from error


def _first_failing_layer(config: dict[str, Any], saving_utils: Any) -> tuple | None:
    """Deserialize the leaf layers one by one, as their model would, to find the culprit."""
    import keras
    from keras.src.saving import serialization_lib

    for where, spec in _leaf_layers(config, ()):
        class_name = str(spec.get("class_name"))
        registered = spec.get("registered_name") or class_name
        if not hasattr(keras.layers, class_name) and not keras.saving.get_registered_object(
            registered
        ):
            return where, class_name, _UNKNOWN_CLASS_MESSAGE
        try:
            if "module" in spec:
                serialization_lib.deserialize_keras_object(copy.deepcopy(spec))
            else:
                saving_utils.model_from_config(copy.deepcopy(spec), custom_objects={})
        except Exception as e:
            return where, str(spec.get("class_name")), _short(e)
    return None


def _leaf_layers(
    config: dict[str, Any], parent: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    top = (*parent, str(config.get("config", {}).get("name", "?")))
    for path, spec in walker.walk(config):
        if not walker.is_model(spec):
            yield (
                (*top, *path),
                {k: v for k, v in spec.items() if k not in ("name", "inbound_nodes")},
            )


def _load_weights(model: Any, path: Path) -> None:
    """Keras' legacy loader: layers with weights in file order, weights in Keras 2 order
    (trainable, then non-trainable), shapes checked."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    # Rebuilt masks add layers, which can change Keras 3's order of the layers; weights are
    # then matched by layer name, and every layer with weights must find its own.
    by_name = any(layer.name.endswith(keras2_masks.ADDED_SUFFIXES) for layer in model.layers)
    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            if by_name:
                saved = legacy_h5_format.load_attributes_from_hdf5_group(group, "layer_names")
                for layer in model.layers:
                    if layer.weights and layer.name not in saved:
                        raise ValueError(f"no saved weights for layer {layer.name!r}")
                legacy_h5_format.load_weights_from_hdf5_group_by_name(group, model)
            else:
                legacy_h5_format.load_weights_from_hdf5_group(group, model)
    except Exception as e:  # Keras and h5py raise many types for weights that do not fit
        raise ModelFileError(
            path, f"its weights do not fit the converted model: {_short(e)}"
        ) from e


def _load_archive_weights(model: Any, path: Path) -> None:
    """A tf.keras 2.13+ archive keeps its variables where Keras 3 keeps them (the two share
    the `.keras` saver's walk): Keras 3's own reader, which raises on a layer whose variables
    are missing or do not fit."""
    from keras.src.saving import saving_lib

    try:
        saving_lib.load_weights_only(model, str(path))
    except Exception as e:  # Keras and h5py raise many types for weights that do not fit
        raise ModelFileError(
            path, f"its weights do not fit the converted model: {_short(e)}"
        ) from e


def _match_keras2_hard_sigmoid(model: Any) -> None:
    """Scale the weights feeding a hard_sigmoid by 1.2 (see _HARD_SIGMOID_SCALE); the config
    check has already refused the places where that is not possible."""
    for layer in model._flatten_layers(include_self=False):
        if hasattr(layer, "cell"):  # an RNN layer: its cell is visited on its own
            continue
        after_activation = _is_hard_sigmoid(getattr(layer, "activation", None))
        after_recurrent = _is_hard_sigmoid(getattr(layer, "recurrent_activation", None))
        if not (after_activation or after_recurrent):
            continue
        class_name = type(layer).__name__
        if class_name in _CELL_BLOCKS:
            count, recurrent_blocks, activation_blocks = _CELL_BLOCKS[class_name]
            blocks = (recurrent_blocks if after_recurrent else ()) + (
                activation_blocks if after_activation else ()
            )
            names = ("kernel", "recurrent_kernel", "bias")
        else:  # Dense, convolutions: the whole pre-activation (depthwise part excepted)
            count, blocks = 1, (0,)
            names = ("kernel", "pointwise_kernel", "bias")
        for variable in layer.weights:
            if variable.name in names:
                variable.assign(_scale_blocks(np.asarray(variable), count, blocks))


def _scale_blocks(values: np.ndarray, count: int, blocks: tuple[int, ...]) -> np.ndarray:
    values = values.copy()
    size = values.shape[-1] // count
    for block in blocks:
        values[..., block * size : (block + 1) * size] *= _HARD_SIGMOID_SCALE
    return values


def _is_hard_sigmoid(function: Any) -> bool:
    return getattr(function, "__name__", None) == _HARD_SIGMOID


class _legacy_scopes:
    """Keras' legacy-config scope and safe mode (on unless trusted), as its `.h5` loader uses."""

    def __init__(self, trust: bool) -> None:
        from keras.src.legacy.saving import saving_options
        from keras.src.saving import serialization_lib

        self._scopes = [
            saving_options.keras_option_scope(use_legacy_config=True),
            serialization_lib.SafeModeScope(not trust),
        ]

    def __enter__(self) -> None:
        for scope in self._scopes:
            scope.__enter__()

    def __exit__(self, *exc: object) -> None:
        for scope in reversed(self._scopes):
            scope.__exit__(*exc)


def _declared_input_shape(conf: dict[str, Any]) -> list[Any] | None:
    if isinstance(conf.get("batch_input_shape"), list):
        return list(conf["batch_input_shape"])
    if isinstance(conf.get("input_shape"), list):
        return [conf.get("batch_size"), *conf["input_shape"]]
    if conf.get("input_dim") is not None:
        return [conf.get("batch_size"), conf["input_dim"]]
    return None


def _has_own_node(spec: dict[str, Any]) -> bool:
    """Whether Keras 2 gave this nested model a node 0 of its own (a graph network)."""
    if spec.get("class_name") in ("Functional", "Model"):
        return True
    if spec.get("class_name") == "Sequential":
        layers = spec["config"].get("layers") or [{}]
        return layers[0].get("class_name") == "InputLayer"
    return False


def _keras3_node(node: Any, states_in_inputs: bool) -> Any:
    """Rewrite a Keras 2 node in Keras 3's node format where Keras 3 would misread it.

    Keras 3 reads tensors only from the inputs of a Keras 2 node, so call kwargs holding tensors
    (MultiHeadAttention's value) would reach the layer as [layer, node, tensor] lists; and a
    Keras 2 RNN called with initial_state lists the states among its inputs, which a Keras 3
    RNN does not accept.
    """
    if not (isinstance(node, list) and node and all(isinstance(e, list) for e in node)):
        return node
    kwargs = node[-1][3] if len(node[-1]) > 3 and isinstance(node[-1][3], dict) else {}
    tensor_kwargs = next(walker.references(list(kwargs.values())), None) is not None
    if not (tensor_kwargs or states_in_inputs and len(node) > 1):
        return node
    tensors = [walker.keras_tensor(entry) for entry in node]
    kwargs = {key: _map_refs(value) for key, value in kwargs.items()}
    if states_in_inputs and len(tensors) > 1:
        tensors, kwargs["initial_state"] = tensors[:1], tensors[1:]
    return {"args": [tensors[0] if len(tensors) == 1 else tensors], "kwargs": kwargs}


def _map_refs(data: Any) -> Any:
    if isinstance(data, list):
        if len(data) == 3 and isinstance(data[0], str) and isinstance(data[1], int):
            return walker.keras_tensor(data)
        return [_map_refs(item) for item in data]
    return data


def _dtype_name(dtype: Any) -> Any:
    """Keras 2 stored mixed-precision policies as {"class_name": "Policy", "config": {"name"}}."""
    if isinstance(dtype, dict) and isinstance(dtype.get("config"), dict):
        name = dtype["config"].get("name")
        if isinstance(name, str):
            return name
    return dtype


def _layer_path(where: tuple[str, ...]) -> str:
    """Layer path below the top model: 'tower/dense_1'."""
    return "/".join(where[1:]) if len(where) > 1 else where[0]


def _short(e: BaseException) -> str:
    """One line; of Keras' "Error when deserializing ... config={...} Exception encountered: X",
    only X."""
    known = known_cause(e)
    if known is not None:
        return known
    text = str(e)
    if _KERAS_CAUSE in text:
        text = text.rsplit(_KERAS_CAUSE, 1)[1]
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
