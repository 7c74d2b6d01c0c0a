"""Keras 2 era `.h5` files (written by tf.keras 2.x) loaded into Keras 3, computing the same thing.

Keras 3 reads the legacy `.h5` format but not every Keras 2 config: arguments it retired
(`time_major`, DepthwiseConv2D's `groups`, BatchNormalization's `fused`...), mixed-precision
policies stored as `Policy` dicts, Sequential models declared with `input_shape` and no
InputLayer (Keras <= 2.3), and node indices of nested models (Keras 2 counts a nested model's own
construction node, Keras 3 does not) all make `keras.saving.load_model` fail.

`convert_config` rewrites the model config (plain JSON, no TensorFlow) into one Keras 3 builds;
`load_keras2_h5` builds it with Keras' own legacy deserializer, safe mode on unless trusted, and
loads the weights from the same file with Keras' legacy weight loader. The weight layout of
GRU, LSTM, BatchNormalization and the rest is the same in both versions; only the config differs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusecli import runtime
from fusecli.errors import ModelFileError, UnsafeModelError
from fusecli.modelfile import file_format, read_model_file

if TYPE_CHECKING:
    import keras

# Retired Keras 2 arguments: the value that means "nothing special" (the argument is dropped),
# per layer class. Any other value changes what the layer computes and cannot be converted.
_RNN_CLASSES = ("RNN", "SimpleRNN", "GRU", "LSTM", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D")
_RETIRED: dict[str, dict[str, Any]] = {
    **{name: {"time_major": False} for name in _RNN_CLASSES},
    "DepthwiseConv1D": {"groups": 1},
    "DepthwiseConv2D": {"groups": 1},
    "SeparableConv1D": {"groups": 1},
    "SeparableConv2D": {"groups": 1},
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
}
# Arguments renamed in Keras 3.
_RENAMED: dict[str, dict[str, str]] = {
    "LeakyReLU": {"alpha": "negative_slope"},
}
_MODEL_CLASSES = ("Functional", "Model", "Sequential")
_SHAPE_KEYS = ("batch_input_shape",)  # Keras 2 wrote only this one into layer configs
_TF_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")
# dtype policies Keras 2 wrote whose variables (and an inserted InputLayer) are float32.
_PLAIN_DTYPES = ("float16", "float32", "float64", "bfloat16")
_KERAS_CAUSE = "Exception encountered:"


def is_keras2_h5(path: str | os.PathLike[str]) -> bool:
    """True for an HDF5 model file written by Keras 2 (keras_version "2.x"); False otherwise,
    also for files that cannot be read (the caller's normal path reports those)."""
    try:
        if file_format(path) != "h5":
            return False
        version = read_model_file(path).keras_version
    except ModelFileError:
        return False
    return version is not None and version.startswith("2.")


def load_keras2_h5(path: str | os.PathLike[str], *, trust: bool = False) -> keras.Model:
    """Load a Keras 2 era `.h5` into Keras 3, uncompiled, computing what Keras 2 computes.

    `trust=False` refuses Lambda layers carrying bytecode before Keras sees them, and builds the
    model in Keras' safe mode; `trust=True` allows them.
    """
    path = Path(path)
    model_file = read_model_file(path)
    config = convert_config(model_file.config, path, trust=trust)
    keras_module = runtime.keras()
    model = _build(config, path, trust=trust)
    if not isinstance(model, keras_module.Model):
        raise ModelFileError(path, f"holds a {type(model).__name__}, not a Keras model")
    _load_weights(model, path)
    return model


def convert_config(
    config: dict[str, Any], path: str | os.PathLike[str] = "<config>", *, trust: bool = False
) -> dict[str, Any]:
    """A copy of a Keras 2 model config rewritten for Keras 3; the input is left untouched.

    Raises `ModelFileError` naming the layer when a layer uses a Keras 2 feature that has no
    Keras 3 equivalent, and `UnsafeModelError` for a Lambda with bytecode unless `trust`.
    """
    return _Converter(Path(path), trust).layer(copy.deepcopy(config), ())


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
        if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
            raise ModelFileError(self.path, f"its model config has a malformed layer in {parent}")
        class_name = str(spec.get("class_name"))
        conf = spec["config"]
        where = (*parent, str(conf.get("name", spec.get("name", "?"))))
        if "dtype" in conf:
            conf["dtype"] = _dtype_name(conf["dtype"])
        if class_name in _TF_OP_CLASSES:
            raise self.fail(
                where,
                class_name,
                "it wraps a raw TensorFlow function (tf.* called on a Keras tensor), which "
                "Keras 3 cannot rebuild; rewrite that step with a Keras layer",
            )
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
        for old, new in _RENAMED.get(class_name, {}).items():
            if old in conf:
                conf[new] = conf.pop(old)
        axis = conf.get("axis")
        if class_name == "BatchNormalization" and isinstance(axis, list):
            if len(axis) != 1:
                raise self.fail(where, class_name, f"axis={axis} (several axes) is not supported")
            conf["axis"] = int(axis[0])

    def lambda_layer(self, conf: dict[str, Any], where: tuple[str, ...]) -> None:
        function = conf.get("function")
        carries_code = conf.get("function_type") == "lambda" or (
            isinstance(function, dict) and function.get("class_name") == "__lambda__"
        )
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
        conf["layers"] = [self.layer(spec, where) for spec in layers]

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
                for ref in _tensor_refs(node):
                    if ref[0] in nested and ref[1] > 0:
                        ref[1] -= 1
        for key in ("input_layers", "output_layers"):
            for ref in _tensor_refs(conf.get(key)):
                if nested.get(ref[0]) == "Sequential" and ref[1] > 0:
                    ref[1] -= 1


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
    """Deserialize the leaf layers one by one to find which one Keras refuses."""
    for where, spec in _leaf_layers(config, ()):
        try:
            saving_utils.model_from_config(copy.deepcopy(spec), custom_objects={})
        except Exception as e:
            return where, str(spec.get("class_name")), _short(e)
    return None


def _leaf_layers(
    spec: dict[str, Any], parent: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
    conf = spec.get("config", {})
    where = (*parent, str(conf.get("name", spec.get("name", "?"))))
    if spec.get("class_name") in _MODEL_CLASSES and isinstance(conf.get("layers"), list):
        for child in conf["layers"]:
            yield from _leaf_layers(child, where)
    else:
        yield where, {"class_name": spec.get("class_name"), "config": conf}


def _load_weights(model: Any, path: Path) -> None:
    """Keras' legacy loader: layers with weights in file order, weights in Keras 2 order
    (trainable, then non-trainable), shapes checked."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            legacy_h5_format.load_weights_from_hdf5_group(group, model)
    except (ValueError, KeyError, OSError) as e:
        raise ModelFileError(
            path, f"its weights do not fit the converted model: {_short(e)}"
        ) from e


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


def _tensor_refs(data: Any) -> Iterator[list[Any]]:
    """The [layer_name, node_index, tensor_index, ...] lists inside a node or I/O spec."""
    if isinstance(data, list):
        if len(data) >= 3 and isinstance(data[0], str) and isinstance(data[1], int):
            yield data
        else:
            for item in data:
                yield from _tensor_refs(item)


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
    text = str(e)
    if _KERAS_CAUSE in text:
        text = text.rsplit(_KERAS_CAUSE, 1)[1]
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
