"""Keras 2 `.h5` inputs fused into a `.keras` file as a file operation (no Keras).

The fused graph is the flat one of `fusecli.fusion.flat_h5` (every model inlined, its layers
renamed `<branch>_<path>`), its config given what Keras 3's `.keras` loader looks for (`module`
names, `batch_shape`); Keras 3 reads its Keras 2 list nodes as its own legacy loader does. Each
layer's weights, in `.h5` order, go where a `.keras` file keeps them
(`fusecli.formats.keras_vars`): `layers/<key>/...`, the keys made from the layers' classes in
`model.layers` order, as Keras 3's `saving_lib` names them.
"""

from __future__ import annotations

import contextlib
import datetime
from pathlib import Path
from typing import Any

import h5py

from fusecli.config import walker
from fusecli.errors import ModelFileError, VerificationError
from fusecli.formats import archive
from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.keras_vars import var_paths
from fusecli.formats.modelfile import open_weights, read_model_file
from fusecli.formats.recipe import Recipe, keras_metadata
from fusecli.formats.weights_layout import class_keys
from fusecli.fusion.flat_h5 import FlatPlan, layer_order
from fusecli.fusion.writer import Placed, Source, Written, keras_version

_LAMBDA_KERAS2_ONLY = ("module", "function_type", "output_shape_type", "output_shape_module")
_FUNCTIONAL = {"module": "keras.src.models.functional", "registered_name": "Functional"}


def keras3_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat config as a `.keras` file holds it."""
    config = walker.copied(config)
    for spec in config["config"]["layers"]:
        spec["module"] = "keras.layers"
        spec["registered_name"] = None
        conf = spec["config"]
        if spec["class_name"] == "InputLayer" and "batch_input_shape" in conf:
            conf["batch_shape"] = conf.pop("batch_input_shape")
        if spec["class_name"] == "Lambda":
            spec["config"] = _keras3_lambda(conf)
    return {**_FUNCTIONAL, **config, "build_config": {"input_shape": None}}


def _keras3_lambda(conf: dict[str, Any]) -> dict[str, Any]:
    """A Lambda's config in Keras 2's form (the head's, `flat_h5.lambda_entry`) as Keras 3
    writes it: what its legacy `.h5` loader does to one (`saving_utils.model_from_config`)."""
    conf = {k: v for k, v in conf.items() if k not in _LAMBDA_KERAS2_ONLY}
    code, defaults, closure = conf["function"]
    conf["function"] = {
        "class_name": "__lambda__",
        "config": {"code": code, "defaults": defaults, "closure": closure},
    }
    return conf


def placements(flat: FlatPlan) -> dict[str, list[tuple[int, str, str]]]:
    """Layer -> (branch, source dataset, `.keras` dataset) for each of its weights. Raises
    `NotFlat` where a layer's variables cannot be placed without Keras."""
    specs = {e["name"]: e for e in flat.config["config"]["layers"]}
    out: dict[str, list[tuple[int, str, str]]] = {}
    for name, key in zip(flat.order, keys(flat), strict=True):
        weights = flat.weights.get(name, [])
        if not weights:
            continue
        spec = specs[name]
        paths = var_paths(spec["class_name"], spec["config"], len(weights))
        out[name] = [
            (branch, source, f"layers/{key}/{path}")
            for (branch, source, _), path in zip(weights, paths, strict=True)
        ]
    return out


def keys(flat: FlatPlan) -> list[str]:
    """The `.keras` group key of each layer, in `flat.order`."""
    specs = {e["name"]: e for e in flat.config["config"]["layers"]}
    return class_keys(str(specs[name]["class_name"]) for name in flat.order)


def write(
    tmp: Path, flat: FlatPlan, sources: list[Source], recipe: Recipe | None = None
) -> Written:
    metadata = {
        "keras_version": keras_version(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    config = keras3_config(flat.config)
    members = archive.keras_members(
        config, metadata if recipe is None else lambda: keras_metadata(metadata, recipe)
    )
    written = Written()
    placed = placements(flat)
    with contextlib.ExitStack() as stack:
        roots: dict[int, h5py.Group] = {}
        h5 = stack.enter_context(archive.keras_archive(tmp, members))
        h5.create_group("vars")
        layers = h5.create_group("layers")
        for name, key in zip(flat.order, keys(flat), strict=True):
            layers.create_group(key).create_group("vars").attrs["name"] = name
            for branch, source_path, target in placed.get(name, []):
                if branch not in roots:
                    roots[branch] = stack.enter_context(open_weights(sources[branch].path))
                try:
                    count = archive.copy_dataset(roots[branch], source_path, h5, target)
                except (OSError, KeyError, TypeError, ValueError) as e:
                    raise ModelFileError(
                        sources[branch].given, f"weights cannot be copied ({e})"
                    ) from None
                written.placed.append(Placed(branch, target, source_path, count))
    return written


def prove(
    path: Path, flat: FlatPlan, sources: list[Source], written: Written, weights: tuple[float, ...]
) -> dict[str, Any]:
    """The written archive read back, without Keras: its config is the composed one, each
    layer's tensors at the place Keras 3 loads that layer from (computed again from the written
    config), equal to their sources bit for bit; the inputs unchanged."""
    from fusecli.fusion import flat_h5, proof

    def check_config() -> None:
        try:
            model_file = read_model_file(path)
        except ModelFileError as e:
            raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
        if model_file.config != keras3_config(flat.config):
            raise VerificationError("The written file's config differs from the composed one")
        flat_h5._check_head(flat.config, weights)
        again = FlatPlan(flat.config, layer_order(flat.config), flat.weights, flat.sources_config)
        expected = {t for places in placements(again).values() for _, _, t in places}
        if expected != {p.output for p in written.placed}:
            raise VerificationError(
                "The written file's tensors are not where Keras 3 loads its layers' weights from"
            )

    head = flat_h5.head_lambdas(flat.config)  # the written config's, as check_config finds
    tensors, nbytes = proof.check_flat_tensors(
        path, "keras", sources, written, flat.sources_config, head, check_config
    )
    return {
        "config": "as composed; every branch inlined (layers renamed)",
        "layer_order": "as Keras orders the model's layers",
        "tensors": tensors,
        "bytes": nbytes,
        "scan": "passed",
        "layer_names_unique": True,
    }


__all__ = ["NotFlat", "keras3_config", "placements", "prove", "write"]
