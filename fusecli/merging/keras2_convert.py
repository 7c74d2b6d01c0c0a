"""Merging Keras 2 era `.h5` files: the template converted as a file, into either format.

The first input's config is inlined into a flat graph (`fusecli.fusion.flat_h5.plan_single`,
no Keras). Into `.keras`: given what Keras 3's `.keras` loader looks for, each merged variable
where a `.keras` file keeps that layer's variables (`fusecli.fusion.flat_keras`); a model with
no such graph (a `hard_sigmoid` whose weights Keras 3 needs rescaled, RNN initial states...) is
refused, naming the reason and suggesting a `.h5` output. Into `.h5`: the flat graph in Keras 2's
schema that tf-keras and Keras 3 both load (as `fuse` writes it); a model with no such graph
keeps its own config (`merge`'s template copy), which tf-keras loads.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from fusecli.errors import FusecliError, ModelFileError, VerificationError
from fusecli.formats import archive
from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.modelfile import open_weights, read_model_file
from fusecli.formats.recipe import Recipe, keras_metadata, write_h5_recipe
from fusecli.formats.weights_layout import Layout
from fusecli.fusion import flat_h5, flat_keras
from fusecli.fusion.writer import keras_version


def places(template: Layout, fmt: str = "keras") -> tuple[flat_h5.FlatPlan, dict[str, str]]:
    """The flat plan of the template, and where each of its variables goes in the output
    (`.keras`: below the weights file's root; `.h5`: below `model_weights`). Raises
    `FusecliError` for a `.keras` output, `NotFlat` for a `.h5` one."""
    try:
        flat = flat_h5.plan_single(template.model_file)  # the config scanned, not read again
        if fmt == "h5":
            placed = {
                name: [(b, source, f"{name}/{dataset}") for b, source, dataset in weights]
                for name, weights in flat.weights.items()
            }
        else:
            placed = flat_keras.placements(flat)
    except NotFlat as e:
        if fmt == "h5":
            raise
        raise FusecliError(
            f"Cannot write a .keras file from these Keras 2 .h5 files: {e}; write a .h5 file "
            f"instead. Received: {template.path}"
        ) from None
    mapping = {source: target for places in placed.values() for _, source, target in places}
    missing = [v.dataset for v in template.variables if v.dataset not in mapping]
    if missing or len(mapping) != len(template.variables):
        if fmt == "h5":
            raise NotFlat("a weight has no place in the flat graph")
        raise FusecliError(
            f"Cannot write a .keras file from these Keras 2 .h5 files: weight "
            f"{(missing or ['?'])[0]!r} has no place in the converted model; write a .h5 file "
            f"instead. Received: {template.path}"
        )
    return flat, mapping


def write(
    tmp: Path,
    template: Layout,
    tensors: Iterator[np.ndarray],
    progress: Callable[[int, int], None] | None,
    recipe: Recipe,
) -> list[bytes]:
    flat, mapping = places(template)
    metadata = {
        "keras_version": keras_version(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    members = archive.keras_members(
        flat_keras.keras3_config(flat.config), lambda: keras_metadata(metadata, recipe)
    )
    total = sum(v.nbytes for v in template.variables)
    done = 0
    digests = []
    with archive.keras_archive(tmp, members) as h5:
        h5.create_group("vars")
        layers = h5.create_group("layers")
        for name, key in zip(flat.order, flat_keras.keys(flat), strict=True):
            layers.create_group(key).create_group("vars").attrs["name"] = name
        for variable, values in zip(template.variables, tensors, strict=True):
            parent, _, leaf = mapping[variable.dataset].rpartition("/")
            digests.append(archive.write_tensor(h5.require_group(parent), leaf, values))
            done += variable.nbytes
            if progress is not None:
                progress(done, total)
    return digests


def write_h5(
    tmp: Path,
    template: Layout,
    tensors: Iterator[np.ndarray],
    progress: Callable[[int, int], None] | None,
    recipe: Recipe,
) -> list[bytes]:
    """The flat graph in Keras 2's `.h5` schema (`fusecli.fusion.flat_h5`), merged weights."""
    flat, mapping = places(template, "h5")
    attrs = {
        "backend": "tensorflow",
        "keras_version": flat_h5.KERAS2_SCHEMA_VERSION,
        "model_config": json.dumps(flat.config),
    }
    total = sum(v.nbytes for v in template.variables)
    done = 0
    digests = []
    with archive.h5_model(tmp, attrs) as h5:
        group = h5.create_group("model_weights")
        group.attrs["layer_names"] = np.array([n.encode() for n in flat.order], dtype=object)
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = flat_h5.KERAS2_SCHEMA_VERSION
        for name in flat.order:
            names = [dataset for _, _, dataset in flat.weights.get(name, [])]
            group.create_group(name).attrs["weight_names"] = np.array(
                [n.encode() for n in names], dtype=object if names else np.float64
            )
        for variable, values in zip(template.variables, tensors, strict=True):
            parent, _, leaf = mapping[variable.dataset].rpartition("/")
            digests.append(archive.write_tensor(group.require_group(parent), leaf, values))
            done += variable.nbytes
            if progress is not None:
                progress(done, total)
        write_h5_recipe(h5, recipe)
    return digests


def verify_h5(path: Path, template: Layout, digests: list[bytes]) -> None:
    """The written `.h5` holds the flat config, its groups in Keras' layer order, and at each
    variable's place the values computed for it, and nothing else."""
    flat, mapping = places(template, "h5")
    with h5py.File(path, "r") as h5:
        if json.loads(h5.attrs["model_config"]) != flat.config:
            raise VerificationError("The written file's config is not the converted one")
        group = h5["model_weights"]
        listed = [
            n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]
        ]
        if listed != flat_h5.layer_order(flat.config):
            raise VerificationError("The written file lists its layers out of Keras' order")
        _check_values(group, template, mapping, digests)


def verify(path: Path, template: Layout, digests: list[bytes]) -> None:
    """The written archive holds the converted config and, at each variable's place, the
    values computed for it, and nothing else."""
    flat, mapping = places(template)
    try:
        config = read_model_file(path).config
    except ModelFileError as e:
        raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
    if config != flat_keras.keras3_config(flat.config):
        raise VerificationError("The written file's config is not the converted one")
    with open_weights(path) as root:
        _check_values(root, template, mapping, digests)


def _check_values(
    root: h5py.Group, template: Layout, mapping: dict[str, str], digests: list[bytes]
) -> None:
    if set(archive.dataset_names(root)) != set(mapping.values()):
        raise VerificationError("The written file holds other tensors than the merged ones")
    for k, (variable, digest) in enumerate(zip(template.variables, digests, strict=True)):
        if archive.tensor_digest(np.asarray(root[mapping[variable.dataset]][()])) != digest:
            raise VerificationError(
                f"Weight {k} (layer {variable.layer!r}) reads back different from what was "
                "computed; the file was not kept"
            )
