"""Loaded `keras.Model`s as configs, and models built back from configs: the bridge that lets
the JSON operations (the fused graph, the cut at the logits) work on live models too.

A live model's config is taken as a file would hold it (`serialize_keras_object`, then through
JSON as Keras' saver writes it), so the same code reads both: tuples become lists, numbers and
strings stay as they are.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fusecli import runtime
from fusecli.errors import FusecliError

if TYPE_CHECKING:
    import keras


def config_of(model: keras.Model, name: str) -> dict[str, Any]:
    """`model`'s config as its `.keras` file would hold it; `name` names it in errors."""
    keras = runtime.keras()
    try:
        config = keras.saving.serialize_keras_object(model)
        return json.loads(json.dumps(config))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise FusecliError(
            f"Model {name!r} cannot be described by a config (Keras could not serialize it: "
            f"{e}); fuse takes functional and Sequential models"
        ) from e


def rebuild(config: dict[str, Any], name: str, weights: list[Any] | None = None) -> keras.Model:
    """The model `config` describes, holding `weights` if given (in `get_weights()` order).

    The config comes from models this process already holds (or the fused model made of them),
    so whatever code it carries is already running here: it is built with safe_mode off.
    """
    keras = runtime.keras()
    try:
        with runtime.quiet():
            model = keras.saving.deserialize_keras_object(config, safe_mode=False)
        if weights is not None:
            model.set_weights(weights)
    except Exception as e:  # Keras raises many types for a config it cannot build
        raise FusecliError(f"Model {name!r} cannot be rebuilt from its config: {e}") from e
    return model
