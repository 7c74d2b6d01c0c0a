"""Writing the fused file: the assembled config, and every branch's tensors in the output's layout.

`.keras` (Keras 3's saving_lib): `layers/<key>/...`, where `<key>` is the layer's class in snake
case, numbered in layer order (`functional`, `functional_1`, ...). A branch's group holds exactly
what its own `.keras` file holds at its root, so its tensors are copied as they are, slice by slice,
from the input archive's `model.weights.h5` read in place.

`.h5` (Keras' legacy format): `model_weights/<layer>/` with a `weight_names` attribute; a nested
model lists its trainable variables, then its non-trainable ones (Keras' legacy order), which
only Keras knows for sure: those branches come from the models loaded in Keras.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from fusecli.errors import ModelFileError
from fusecli.formats import archive
from fusecli.formats.modelfile import open_weights
from fusecli.formats.recipe import Recipe, keras_metadata, write_h5_recipe
from fusecli.formats.weights_layout import TRAINING_STATE_GROUPS, class_keys
from fusecli.fusion.graph import Assembly
from fusecli.fusion.naming import unique

H5_WEIGHTS = "model_weights"
ASSETS = "assets/"


@dataclass
class Source:
    """Where one branch's tensors come from."""

    given: Path  # the input as the user named it
    path: Path  # the .keras file its tensors are copied from: the input, or Keras' copy of it
    converted: bool = False  # True when Keras loaded the input and saved `path`
    legacy: list[tuple[str, np.ndarray]] | None = None  # for .h5 output: Keras' legacy order


@dataclass
class Placed:
    """One tensor of the output and where it came from."""

    branch: int
    output: str  # dataset path inside the output's weights root
    source: str | None  # dataset path inside the source's weights root (None: from Keras)
    values: int = 0  # how many it holds


@dataclass
class Written:
    placed: list[Placed] = field(default_factory=list)
    assets: list[tuple[str, str, Path]] = field(default_factory=list)  # (output, source, file)

    @property
    def params(self) -> int:
        return sum(p.values for p in self.placed)


def keras_version() -> str:
    """The installed Keras' version, which Keras writes into the files it saves: read from the
    name of its distribution's folder (`keras-3.5.0.dist-info`) beside the `keras` package that
    an import would load (found, not imported); importlib.metadata would cost 12 ms of
    importing. "3" where none is found."""
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        return "3"
    try:
        names = os.listdir(Path(next(iter(spec.submodule_search_locations))).parent)
    except OSError:
        return "3"
    for name in names:
        stem, dot, suffix = name.rpartition(".")
        project, dash, version = stem.partition("-")
        if dot and suffix == "dist-info" and dash and project.lower() == "keras":
            return version
    return "3"


def write_keras(
    tmp: Path, assembly: Assembly, sources: list[Source], recipe: Recipe | None = None
) -> Written:
    metadata = {
        "keras_version": keras_version(),
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
    }
    written = Written()
    keys = class_keys(class_name for class_name, _ in assembly.layer_order)
    branches = {b.name: i for i, b in enumerate(assembly.branches)}
    members = archive.keras_members(
        assembly.config,
        metadata if recipe is None else lambda: keras_metadata(metadata, recipe),
    )
    with contextlib.ExitStack() as stack:
        for key, (_, name) in zip(keys, assembly.layer_order, strict=True):
            if name in branches:
                members += _assets(stack, sources[branches[name]], key, written)
        with archive.keras_archive(tmp, members) as h5:
            h5.create_group("vars").attrs["name"] = "fused"
            layers = h5.create_group("layers")
            for key, (_, name) in zip(keys, assembly.layer_order, strict=True):
                group = layers.create_group(key)
                if name not in branches:
                    group.create_group("vars").attrs["name"] = name
                    continue
                i = branches[name]
                source = sources[i]
                with open_weights(source.path) as root:
                    _copy_branch(root, group, i, source, written, f"layers/{key}")
                group.require_group("vars").attrs["name"] = name
    return written


def _assets(
    stack: contextlib.ExitStack, source: Source, key: str, written: Written
) -> list[tuple[str, archive.MemberSource | None]]:
    """A branch's asset files (vocabularies...), under the branch's place in the fused model:
    Keras keeps a layer's assets at `assets/<the layer's path>/`."""
    source_zip = stack.enter_context(zipfile.ZipFile(source.path))
    out: list[tuple[str, archive.MemberSource | None]] = []
    for info in source_zip.infolist():
        if _is_asset(info):
            name = f"{ASSETS}layers/{key}/{info.filename[len(ASSETS) :]}"
            out.append((name, lambda info=info: source_zip.open(info)))
            written.assets.append((name, info.filename, source.path))
    return out


def asset_members(path: Path) -> list[str]:
    """The asset files in a `.keras` archive (vocabularies...), which its layers load; none in
    any other file."""
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as source_zip:
        return [info.filename for info in source_zip.infolist() if _is_asset(info)]


def _is_asset(info: zipfile.ZipInfo) -> bool:
    return info.filename.startswith(ASSETS) and not info.is_dir()


def write_h5(
    tmp: Path, assembly: Assembly, sources: list[Source], recipe: Recipe | None = None
) -> Written:
    version = keras_version()
    attrs = {
        "backend": "tensorflow",
        "keras_version": version,
        "model_config": json.dumps(assembly.config),
    }
    written = Written()
    with archive.h5_model(tmp, attrs) as h5:
        weights = h5.create_group(H5_WEIGHTS)
        names = [name for _, name in assembly.layer_order]
        weights.attrs["layer_names"] = np.array([n.encode("utf-8") for n in names], dtype=object)
        weights.attrs["backend"] = "tensorflow"
        weights.attrs["keras_version"] = version
        branches = {b.name: i for i, b in enumerate(assembly.branches)}
        for name in sorted(names):
            group = weights.create_group(name)
            if name not in branches:
                group.attrs["weight_names"] = np.array([], dtype=np.float64)
                continue
            i = branches[name]
            legacy = sources[i].legacy or []
            used: set[str] = set()
            dataset_names = []
            for path, values in legacy:
                dataset = unique(f"{name}_{path}", used)
                archive.write_tensor(group, dataset, values)
                dataset_names.append(dataset)
                written.placed.append(Placed(i, f"{name}/{dataset}", None, int(values.size)))
            group.attrs["weight_names"] = np.array(
                [n.encode("utf-8") for n in dataset_names], dtype=object
            )
        top = weights.create_group("top_level_model_weights")
        top.attrs["weight_names"] = np.array([], dtype=np.float64)
        if recipe is not None:
            write_h5_recipe(h5, recipe)
    return written


def _copy_branch(
    root: h5py.Group, target: h5py.Group, i: int, source: Source, written: Written, base: str
) -> None:
    """Copy a model file's weights root (but training state) into `target`."""
    try:
        names = archive.copy_group(root, target, skip=TRAINING_STATE_GROUPS)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ModelFileError(source.given, f"weights cannot be copied ({e})") from None
    for name in names:
        written.placed.append(Placed(i, f"{base}/{name}", name, archive.value_count(target, name)))
