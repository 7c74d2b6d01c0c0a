"""What a model file holds, read from its config and weight shapes: no TensorFlow, no model built.

`inspect_file` is what `fusecli inspect` prints. It reads the config (zipfile, json) and the
shapes of the stored weights (h5py, without reading their values), so it takes milliseconds on a
100 MB file where `keras.models.load_model` takes seconds.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from fusecli.config import walker
from fusecli.config.shapes import Spec, model_inputs, model_outputs
from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import (
    MODEL_SUFFIXES,
    NPZ_WEIGHTS_MEMBER,
    ModelFile,
    open_hdf5,
    read_model_file,
)
from fusecli.formats.recipe import read_recipe
from fusecli.formats.weights_layout import count_npz_params
from fusecli.safety.isolation import call_isolated
from fusecli.safety.scan import scan


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe one model file as a JSON-ready dict; `ModelFileError` if it is broken."""
    model_file = read_model_file(path)
    findings = scan(model_file)
    try:
        described = _describe_config(model_file)
    except RecursionError:
        raise ModelFileError(model_file.path, "its config is nested too deeply") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a config no Keras wrote
        raise ModelFileError(
            model_file.path, f"its config is malformed ({type(e).__name__}: {e})"
        ) from None
    return {
        "path": str(path),
        "format": model_file.format,
        "keras_version": model_file.keras_version,
        "backend": model_file.backend,
        "size": model_file.size,
        **described,
        "params": count_params(model_file),
        "unsafe": [f.as_dict() for f in findings],
        "recipe": read_recipe(model_file.path, model_file.format),
    }


def inspect_paths(
    paths: list[str | os.PathLike[str]], *, isolate: bool = True
) -> Iterator[tuple[str, dict[str, Any] | ModelFileError]]:
    """For each path (a folder stands for the model files in it): (path, dict or ModelFileError).

    With `isolate`, each file is read in a forked child process: a file crafted (or corrupted)
    to crash the HDF5 C library then costs an error line rather than the whole listing.
    """
    for item in paths:
        try:
            files = expand_paths([item])
        except ModelFileError as e:
            yield str(item), e
            continue
        for path in files:
            try:
                yield (
                    str(path),
                    call_isolated(inspect_file, path) if isolate else inspect_file(path),
                )
            except ModelFileError as e:
                yield str(path), e


def expand_paths(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; folders replaced by the .keras/.h5/.hdf5 files directly in them."""
    out: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()
            )
            if not found:
                raise ModelFileError(item, f"holds no model files ({', '.join(MODEL_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(item)
    return out


def count_params(model_file: ModelFile) -> int | None:
    """The number of weights Keras' `count_params()` reports, from the stored weight shapes.

    `.keras`: the variables under `layers/` (not the optimizer's); `.h5`: the datasets each layer
    group lists in its `weight_names` attribute. None when they are pickled (`.npz` weights).
    """
    if model_file.weights_member == NPZ_WEIGHTS_MEMBER:
        return count_npz_params(model_file.path)
    with open_hdf5(model_file.path) as h5:
        if model_file.format == "keras":
            return _count_keras(h5)
        return _count_h5(h5)


def _count_keras(h5: h5py.File) -> int:
    total = 0
    for top in ("layers", "vars"):
        group = h5.get(top)
        if isinstance(group, h5py.Dataset):
            total += _size(group)
        elif isinstance(group, h5py.Group):
            total += _sum_sizes(group)
    return total


def _sum_sizes(group: h5py.Group) -> int:
    datasets: list[h5py.Dataset] = []
    group.visititems(lambda _name, obj: datasets.append(obj) if _is_data(obj) else None)
    return sum(_size(d) for d in datasets)


def _count_h5(h5: h5py.File) -> int:
    weights = h5.get("model_weights", h5)
    names = weights.attrs.get("layer_names")
    if names is None:
        return 0
    total = 0
    for layer in map(_decode, names):
        group = weights.get(layer)
        if not isinstance(group, h5py.Group):
            continue
        for weight in map(_decode, group.attrs.get("weight_names", [])):
            dataset = group.get(weight)
            if _is_data(dataset):
                total += _size(dataset)
    return total


def _is_data(obj: Any) -> bool:
    return isinstance(obj, h5py.Dataset)


def _size(dataset: h5py.Dataset) -> int:
    shape = dataset.shape or ()
    return math.prod(shape)


def _decode(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


# -- the config ------------------------------------------------------------------------------


def _describe_config(model_file: ModelFile) -> dict[str, Any]:
    config = model_file.config
    inner = _dict(config.get("config"))
    return {
        "name": _str(inner.get("name")) or _str(config.get("name")),
        "class_name": _str(config.get("class_name")),
        "inputs": [_tensor(name, spec) for name, spec in model_inputs(config)],
        "outputs": [_tensor(name, spec) for name, spec in model_outputs(config)],
        "layers": dict(sorted(_count_layers(config).items())),
    }


def _count_layers(model: dict[str, Any]) -> Counter[str]:
    """Every layer at every depth, by class; a nested model counts itself and its layers,
    a wrapper (TimeDistributed, Bidirectional...) itself and the layer it wraps."""
    return Counter(
        _str(layer.get("class_name")) or "?" for _, layer in walker.walk(model, wrapped=True)
    )


def _tensor(name: str, spec: Spec) -> dict[str, Any]:
    shape = None if spec.shape is None else list(spec.shape)
    return {"name": name, "shape": shape, "dtype": spec.dtype}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
