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

from fusecli.errors import ModelFileError
from fusecli.files.isolation import call_isolated
from fusecli.files.modelfile import (
    MODEL_SUFFIXES,
    NPZ_WEIGHTS_MEMBER,
    ModelFile,
    open_hdf5,
    read_model_file,
)
from fusecli.files.safety import scan
from fusecli.files.tensors import count_npz_params

Shape = list[int | None]

_MODEL_CLASSES = {"Functional", "Model", "Sequential"}
# Layers whose output has the shape of their (first) input.
_SAME_SHAPE = {
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "BatchNormalization", "LayerNormalization",
    "GroupNormalization", "UnitNormalization", "RMSNormalization", "Rescaling", "Normalization",
    "Identity", "Masking", "ActivityRegularization", "Add", "Subtract", "Multiply", "Average",
    "Maximum", "Minimum",
}  # fmt: skip
_GLOBAL_POOLING = {f"Global{kind}Pooling{d}D" for kind in ("Average", "Max") for d in (1, 2, 3)}
_RNN = {"GRU", "LSTM", "SimpleRNN", "CuDNNGRU", "CuDNNLSTM"}
_MIXED = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


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
    layers: Counter[str] = Counter()
    _count_layers(config, layers)
    return {
        "name": _str(inner.get("name")),
        "class_name": _str(config.get("class_name")),
        "inputs": _inputs(config),
        "outputs": _outputs(config),
        "layers": dict(sorted(layers.items())),
    }


def _count_layers(model: dict[str, Any], counts: Counter[str]) -> None:
    """Every layer at every depth, by class; a nested model counts itself and its layers."""
    for layer in _layers(model):
        counts[_str(layer.get("class_name")) or "?"] += 1
        _count_layers(layer, counts)
        wrapped = _dict(_dict(layer.get("config")).get("layer"))
        if _str(wrapped.get("class_name")):  # TimeDistributed, Bidirectional...
            counts[_str(wrapped["class_name"]) or "?"] += 1
            _count_layers(wrapped, counts)


def _layers(model: dict[str, Any]) -> list[dict[str, Any]]:
    if _str(model.get("class_name")) not in _MODEL_CLASSES:
        return []
    config = model.get("config")
    layers = config.get("layers") if isinstance(config, dict) else config  # Keras 1: a list
    return [x for x in layers if isinstance(x, dict)] if isinstance(layers, list) else []


def _inputs(model: dict[str, Any]) -> list[dict[str, Any]]:
    layers = _layers(model)
    if model.get("class_name") == "Sequential":
        first = _dict(layers[0].get("config")) if layers else {}
        shape = first.get("batch_shape", first.get("batch_input_shape"))
        if shape is None:  # Sequential(input_shape=...) on a later Keras 3 build
            shape = _dict(model.get("config")).get("build_input_shape")
        name = _str(first.get("name")) if layers and _is_input(layers[0]) else "input"
        return [_tensor(name, shape, _dtype(first.get("dtype")))]
    by_name = {_layer_name(x): x for x in layers}
    result = []
    for ref in _refs(_dict(model.get("config")).get("input_layers")):
        layer = _dict(by_name.get(ref[0]))
        config = _dict(layer.get("config"))
        shape = config.get("batch_shape", config.get("batch_input_shape"))
        result.append(_tensor(ref[0], shape, _dtype(config.get("dtype"))))
    return result


def _outputs(model: dict[str, Any]) -> list[dict[str, Any]]:
    layers = _layers(model)
    if model.get("class_name") == "Sequential":
        if not layers:
            return []
        shape = _sequential_shape(model)
        last = layers[-1]
        return [_tensor(_layer_name(last), shape, _output_dtype(last))]
    graph = _Graph(layers)
    result = []
    for ref in _refs(_dict(model.get("config")).get("output_layers")):
        layer = graph.layers.get(ref[0], {})
        result.append(_tensor(ref[0], graph.shape(ref), _output_dtype(layer)))
    return result


def _sequential_shape(model: dict[str, Any]) -> Shape | None:
    inputs = _inputs(model)
    shape = inputs[0]["shape"] if inputs else None
    for layer in _layers(model):
        if _is_input(layer):
            continue
        built = _dict(layer.get("build_config")).get("input_shape")
        shape = _layer_output(layer, [_shape(built) if built is not None else shape])
    return shape


class _Graph:
    """A functional config's tensor shapes, computed forward through the layers in their order
    (Keras writes them in topological order); Keras 3 also records the shape of every input."""

    def __init__(self, layers: list[dict[str, Any]]) -> None:
        self.layers = {_layer_name(x): x for x in layers}
        self.shapes: dict[tuple[str, int], Shape | None] = {}
        for layer in layers:
            name = _layer_name(layer)
            if _is_input(layer):
                config = _dict(layer.get("config"))
                self.shapes[name, 0] = _shape(
                    config.get("batch_shape", config.get("batch_input_shape"))
                )
                continue
            nodes = layer.get("inbound_nodes")
            for k, node in enumerate(nodes if isinstance(nodes, list) else []):
                inputs = [self._input_shape(t) for t in _node_inputs(node)]
                self.shapes[name, k] = _layer_output(layer, inputs)

    def shape(self, ref: tuple[str, int, int]) -> Shape | None:
        name, node_index, tensor_index = ref
        layer = self.layers.get(name, {})
        if _str(layer.get("class_name")) in _MODEL_CLASSES:  # Keras 2 counts nested models' nodes
            return _layer_output(layer, [])  # differently; their output shape is their own
        return self.shapes.get((name, node_index)) if tensor_index == 0 else None

    def _input_shape(self, tensor: Any) -> Shape | None:
        if isinstance(tensor, dict):  # Keras 3 records the shape of every tensor it passes
            return _shape(_dict(tensor.get("config")).get("shape"))
        return self.shape(tensor)


def _node_inputs(node: Any) -> list[Any]:
    """Input tensors of an inbound node: Keras 3 `{"args": [...]}`, Keras 2 `[[n, i, j, {}]]`."""
    if isinstance(node, dict):
        found: list[Any] = []
        _keras_tensors(node.get("args"), found)
        return found
    if isinstance(node, list) and len(node) >= 3 and isinstance(node[0], str):
        node = [node]  # TFOpLambda-style single reference
    refs = []
    for item in node if isinstance(node, list) else []:
        ref = _ref(item)
        if ref is not None:
            refs.append(ref)
    return refs


def _keras_tensors(value: Any, found: list[Any]) -> None:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            found.append(value)
        else:
            for v in value.values():
                _keras_tensors(v, found)
    elif isinstance(value, list):
        for v in value:
            _keras_tensors(v, found)


def _layer_output(layer: dict[str, Any], inputs: list[Shape | None]) -> Shape | None:
    """A layer's output shape from its input shapes, for the layers that end most models."""
    class_name = _str(layer.get("class_name"))
    config = _dict(layer.get("config"))
    if class_name in _MODEL_CLASSES:
        outputs = _outputs(layer)
        return outputs[0]["shape"] if len(outputs) == 1 else None
    if not inputs or any(s is None for s in inputs):
        return None
    first: Shape = list(inputs[0])  # type: ignore[arg-type]
    if class_name in _SAME_SHAPE:
        return first
    if class_name == "Dense" and isinstance(config.get("units"), int) and first:
        return [*first[:-1], config["units"]]
    if class_name == "Embedding" and isinstance(config.get("output_dim"), int):
        return [*first, config["output_dim"]]
    if class_name in _RNN and isinstance(config.get("units"), int) and len(first) == 3:
        time = first[:2] if config.get("return_sequences") else first[:1]
        return [*time, config["units"]]
    if class_name == "Flatten" and first:
        rest = first[1:]
        return [first[0], math.prod(rest) if all(isinstance(d, int) for d in rest) else None]
    if class_name in _GLOBAL_POOLING and len(first) >= 2:
        channels = first[1] if config.get("data_format") == "channels_first" else first[-1]
        return [first[0], channels]
    if class_name == "Concatenate" and isinstance(config.get("axis", -1), int):
        return _concatenate(inputs, config.get("axis", -1))  # type: ignore[arg-type]
    if class_name == "Reshape" and isinstance(config.get("target_shape"), list) and first:
        return [first[0], *config["target_shape"]]
    return None


def _concatenate(shapes: list[Shape], axis: int) -> Shape | None:
    rank = len(shapes[0])
    if not -rank <= axis < rank or any(len(s) != rank for s in shapes):
        return None
    out = list(shapes[0])
    sizes = [s[axis] for s in shapes]
    out[axis] = sum(sizes) if all(isinstance(d, int) for d in sizes) else None  # type: ignore
    return out


def _output_dtype(layer: dict[str, Any]) -> str | None:
    if _str(layer.get("class_name")) in _MODEL_CLASSES:
        outputs = _outputs(layer)
        return outputs[0]["dtype"] if len(outputs) == 1 else None
    return _dtype(_dict(layer.get("config")).get("dtype"))


def _dtype(value: Any) -> str | None:
    """ "float32", or a dtype policy {"class_name": "DTypePolicy", "config": {"name": ...}}."""
    if isinstance(value, dict):
        value = _dict(value.get("config")).get("name")
    if not isinstance(value, str):
        return None
    return _MIXED.get(value, value)


def _refs(value: Any) -> list[tuple[str, int, int]]:
    """`input_layers`/`output_layers`: one [name, node, tensor], a list of them, or a dict."""
    single = _ref(value)
    if single is not None:
        return [single]
    if isinstance(value, dict):
        value = list(value.values())
    if not isinstance(value, list):
        return []
    return [r for r in (_ref(v) for v in value) if r is not None]


def _ref(value: Any) -> tuple[str, int, int] | None:
    if (
        isinstance(value, list)
        and len(value) >= 3
        and isinstance(value[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:3])
    ):
        return value[0], value[1], value[2]
    return None


def _tensor(name: str, shape: Any, dtype: str | None) -> dict[str, Any]:
    return {"name": name, "shape": _shape(shape), "dtype": dtype}


def _shape(value: Any) -> Shape | None:
    if not isinstance(value, list):
        return None
    if not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
        return None
    return list(value)


def _is_input(layer: dict[str, Any]) -> bool:
    return layer.get("class_name") == "InputLayer"


def _layer_name(layer: dict[str, Any]) -> str:
    name = layer.get("name", _dict(layer.get("config")).get("name"))
    return name if isinstance(name, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
