"""Keras 3 `.h5` files that Keras' own `.h5` loader misreads, loaded as Keras wrote them.

Keras' legacy loader looks each string of a layer's config up among the names of
`keras.layers` and turns one that names a function into that function: an
`Attention(score_mode="dot")` saved as `.h5` (Keras 3.9 and later write it so) reaches the layer
as the function `keras.layers.dot`, which it refuses ("Invalid value for argument score_mode"),
and `keras.saving.load_model` fails on the file its own `save` wrote. Those layers are given
`"module": "keras.layers"` (the one thing Keras' `.h5` writer drops), which makes Keras build
them with the deserializer of `.keras` files, where a string stays a string; the model is then
built and its weights loaded exactly as Keras' `.h5` loader does (safe mode unless trusted).

The same goes for operation nodes (`keras.ops.not_equal(x, 0)` on a Keras tensor, written as a
node `{"class_name": "NotEqual", "config": {"name": ...}}`): Keras' `.h5` loader takes them for
unknown custom layers. Given the module of `keras.ops` that defines them, Keras builds them as
it does from a `.keras` file. An operation's config has no `trainable` (a layer's always has),
which tells `keras.ops.add` from the layer `Add`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fusecli.config import walker
from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import ModelFile

if TYPE_CHECKING:
    import keras

_MODEL_CLASSES = ("Functional", "Model", "Sequential")


_OP_MODULES = ("numpy", "nn", "math", "core", "linalg", "image")


def misread_layers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer entries (at any depth) that Keras' legacy loader would misread or not find."""
    return [spec for spec in _leaf_layers(config) if _module_for(spec) is not None]


def _module_for(spec: dict[str, Any]) -> str | None:
    """The module Keras should build this entry from, where its `.h5` loader would fail."""
    from keras.src import layers

    conf = spec.get("config")
    if "module" in spec or not isinstance(conf, dict):
        return None
    cls = str(spec.get("class_name"))
    if "trainable" not in conf:
        return _op_module(cls)
    if not isinstance(layers.__dict__.get(cls), type):
        return None
    for key, value in conf.items():
        if (
            key != "name"
            and isinstance(value, str)
            and inspect.isfunction(layers.__dict__.get(value))
        ):
            return "keras.layers"
    return None


def _op_module(cls: str) -> str | None:
    import importlib

    from keras.src.ops.operation import Operation

    for name in _OP_MODULES:
        module = importlib.import_module(f"keras.src.ops.{name}")
        found = module.__dict__.get(cls)
        if isinstance(found, type) and issubclass(found, Operation):
            return f"keras.src.ops.{name}"
    return None


def load(model_file: ModelFile, *, trust: bool) -> keras.Model:
    """Build the model from its config with the misread layers marked, and load its weights
    from the same file, as `keras.saving.load_model` would for a file it reads right."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format, saving_options, saving_utils
    from keras.src.saving import serialization_lib

    config = walker.copied(model_file.config)
    for spec in misread_layers(config):
        spec["module"] = _module_for(spec)
        if spec["module"] != "keras.layers":
            spec["registered_name"] = spec["class_name"]
    with (
        saving_options.keras_option_scope(use_legacy_config=True),
        serialization_lib.SafeModeScope(not trust),
    ):
        model = saving_utils.model_from_config(config, custom_objects={})
        with h5py.File(model_file.path, "r") as f:
            group = f.get("model_weights")
            if not isinstance(group, h5py.Group):
                raise ModelFileError(model_file.path, "has no model_weights group")
            legacy_h5_format.load_weights_from_hdf5_group(group, model)
    return model


def _leaf_layers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    conf = spec.get("config")
    if spec.get("class_name") in _MODEL_CLASSES and isinstance(conf, dict):
        for child in conf.get("layers") or []:
            if isinstance(child, dict):
                yield from _leaf_layers(child)
    else:
        yield spec
        for key in ("layer", "backward_layer"):  # wrappers
            if isinstance(conf, dict) and isinstance(conf.get(key), dict):
                yield from _leaf_layers(conf[key])
