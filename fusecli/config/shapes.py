"""A saved model's input and output shapes and dtypes, computed from its config as Keras would.

No TensorFlow and no model built: each layer's output is computed from its config and its input
shapes with the rules of the layer's own `compute_output_shape`, for the layers most models are
made of. A dimension Keras leaves open (the batch, a sequence length) is `None`, as in Keras; a
dimension that cannot be known from the config (a custom layer's) is `"?"`, and a shape of
unknown rank is `None` as a whole.

Each layer of the file is evaluated once per distinct call, through an explicit stack rather than
recursion, so the cost grows with the file's size, not with its depth of nesting.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from fusecli.config import walker
from fusecli.config.walker import MODEL_CLASSES

UNKNOWN = "?"  # a dimension the config does not determine

Dim = int | str | None
Shape = tuple[Dim, ...]

# Layers whose output has the shape of their (first) input.
_SAME_SHAPE = {
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "ThresholdedReLU",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "BatchNormalization", "LayerNormalization",
    "GroupNormalization", "UnitNormalization", "RMSNormalization", "Rescaling", "Normalization",
    "Identity", "Masking", "ActivityRegularization", "RandomFlip", "RandomRotation",
    "RandomZoom", "RandomContrast", "RandomTranslation", "RandomBrightness",
}  # fmt: skip
_ATTENTION = {"Attention", "AdditiveAttention", "MultiHeadAttention"}
# Tensors Keras 2 records among a call's keyword arguments that decide its output's shape: an
# attention layer's value and key, a TensorFlow operation's second operand.
_TENSOR_KWARGS = ("value", "key", "y")
# TensorFlow operations Keras 2 wraps in TFOpLambda layers whose output is their first
# operand's shape, broadcast with the second's: `x / 255.0`, `tf.nn.relu(x)`, `a * b`...
_TF_ELEMENTWISE = {
    "__operators__.add", "__operators__.sub", "math.add", "math.subtract", "math.multiply",
    "math.truediv", "math.divide", "math.maximum", "math.minimum", "math.pow",
    "math.squared_difference", "nn.relu", "nn.relu6", "nn.elu", "nn.selu", "nn.gelu",
    "nn.silu", "nn.swish", "nn.leaky_relu", "nn.softmax", "nn.sigmoid", "math.sigmoid",
    "math.tanh", "nn.tanh", "math.exp", "math.log", "math.abs", "math.sqrt", "math.rsqrt",
    "math.square", "math.negative", "math.softplus", "math.sin", "math.cos", "math.round",
    "math.floor", "math.ceil", "clip_by_value", "identity", "stop_gradient", "cast",
}  # fmt: skip
_ELEMENTWISE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}
# Layers whose output keeps the input's dtype (Keras 3 `compute_output_spec`); others compute in
# their policy's compute dtype.
_KEEP_DTYPE = {"Flatten", "Reshape", "Permute", "Identity"}
_RNN = {"SimpleRNN", "GRU", "LSTM", "CuDNNGRU", "CuDNNLSTM", "RNN"}
_STATES = {"SimpleRNN": 1, "GRU": 1, "CuDNNGRU": 1, "LSTM": 2, "CuDNNLSTM": 2}
_CELL_STATES = {"SimpleRNNCell": 1, "GRUCell": 1, "LSTMCell": 2, "PeepholeLSTMCell": 2}
_ALIASES = {
    "Convolution1D": "Conv1D", "Convolution2D": "Conv2D", "Convolution3D": "Conv3D",
    "Deconvolution2D": "Conv2DTranspose", "Deconv2D": "Conv2DTranspose",
    "Deconvolution3D": "Conv3DTranspose", "Deconv3D": "Conv3DTranspose",
    "SeparableConvolution1D": "SeparableConv1D", "SeparableConvolution2D": "SeparableConv2D",
    "MaxPool1D": "MaxPooling1D", "MaxPool2D": "MaxPooling2D", "MaxPool3D": "MaxPooling3D",
    "AvgPool1D": "AveragePooling1D", "AvgPool2D": "AveragePooling2D",
    "AvgPool3D": "AveragePooling3D",
    **{f"Global{k}Pool{d}D": f"Global{k}Pooling{d}D" for k in ("Max", "Avg") for d in (1, 2, 3)},
    **{f"GlobalAvgPooling{d}D": f"GlobalAveragePooling{d}D" for d in (1, 2, 3)},
    **{f"GlobalAvgPool{d}D": f"GlobalAveragePooling{d}D" for d in (1, 2, 3)},
    **{f"GlobalMaxPool{d}D": f"GlobalMaxPooling{d}D" for d in (1, 2, 3)},
}  # fmt: skip
_MIXED = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
# Beyond this many layer evaluations per layer in the file, nested models are no longer
# re-evaluated for new input shapes (their outputs become unknown): a bound for crafted files.
_EVALUATIONS_PER_LAYER = 8


@dataclass(frozen=True)
class Spec:
    """A tensor's shape (None: unknown rank) and dtype (None: unknown)."""

    shape: Shape | None
    dtype: str | None


_NOTHING = Spec(None, None)
# What a rule can raise on a config no Keras wrote (a string for a number, a list too short...).
_MALFORMED = (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError)


def model_inputs(model: dict[str, Any]) -> list[tuple[str, Spec]]:
    """The model's inputs: (name, spec) in the order the model takes them."""
    return _declared_inputs(model)


def model_outputs(model: dict[str, Any]) -> list[tuple[str, Spec]]:
    """The model's outputs: (name of the layer that makes it, spec), in the model's order."""
    return OutputShapes(model).outputs


class OutputShapes:
    """Evaluates a model config's layers; `evaluations` counts the layer calls computed, and
    `first_inputs` holds, by `id` of each evaluated layer's config dict, the shapes of the first
    input it was called on (what sizes its variables)."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.evaluations = 0
        self.first_inputs: dict[int, list[Shape | None]] = {}
        self._memo: dict[tuple[int, tuple[Spec, ...]], list[Spec]] = {}
        self._budget = _EVALUATIONS_PER_LAYER * (_count_layer_entries(model) + 1)
        specs = self._run(model, [])
        names = [ref[0] for ref in _refs(_dict(model.get("config")).get("output_layers"))]
        if _str(model.get("class_name")) == "Sequential":
            layers = walker.layers(model)
            names = [walker.name(layers[-1])] if layers else []
        if len(names) != len(specs):
            specs = [_NOTHING] * len(names)
        self.outputs = list(zip(names, specs, strict=True))

    def _run(self, layer: dict[str, Any], inputs: list[Spec]) -> list[Spec]:
        """Evaluate `layer` on `inputs` with an explicit stack of the layers being evaluated."""
        stack = [(self._evaluate(layer, inputs, {}), self._key(layer, inputs))]
        value: list[Spec] | None = None
        while True:
            generator, key = stack[-1]
            try:
                sub_layer, sub_inputs, sub_kwargs = generator.send(value)  # type: ignore[arg-type]
            except (StopIteration, *_MALFORMED) as done:
                stack.pop()
                # A config no Keras wrote leaves this layer's outputs unknown, nothing more.
                value = done.value if isinstance(done, StopIteration) else []
                if key is not None:
                    self._memo[key] = value  # type: ignore[assignment]
                if not stack:
                    return value  # type: ignore[return-value]
                continue
            key = self._key(sub_layer, sub_inputs)
            if key is not None and key in self._memo:
                value = self._memo[key]
            elif key is not None and self.evaluations >= self._budget:
                value = []
            else:
                stack.append((self._evaluate(sub_layer, sub_inputs, sub_kwargs), key))
                value = None

    @staticmethod
    def _key(layer: dict[str, Any], inputs: list[Spec]) -> tuple[int, tuple[Spec, ...]] | None:
        """Nested models are memoized: a model called twice on the same shapes is walked once."""
        if _str(layer.get("class_name")) in MODEL_CLASSES:
            return id(layer), tuple(inputs)
        return None

    def _evaluate(
        self, layer: dict[str, Any], inputs: list[Spec], call_kwargs: dict[str, Any]
    ) -> _Evaluation:
        self.evaluations += 1
        if isinstance(layer.get("config"), dict):
            shape = inputs[0].shape if inputs else None
            self.first_inputs.setdefault(id(layer["config"]), []).append(shape)
        class_name = _str(layer.get("class_name")) or ""
        class_name = _ALIASES.get(class_name, class_name)
        config = _dict(layer.get("config"))
        if class_name == "Sequential":
            return (yield from self._sequential(layer, inputs))
        if class_name in MODEL_CLASSES:
            return (yield from self._functional(layer, inputs))
        if class_name == "TimeDistributed":
            return (yield from self._time_distributed(config, inputs))
        if class_name == "Bidirectional":
            return (yield from self._bidirectional(config, inputs))
        return layer_outputs(class_name, config, inputs, call_kwargs)

    def _sequential(self, model: dict[str, Any], inputs: list[Spec]) -> _Evaluation:
        layers = walker.layers(model)
        declared = _declared_inputs(model)
        spec = _prefer(inputs[0] if inputs else _NOTHING, declared[0][1] if declared else _NOTHING)
        outputs = [spec]
        for layer in layers:
            if _is_input(layer):
                continue
            built = _shape(_dict(layer.get("build_config")).get("input_shape"))
            spec = _prefer(outputs[0] if outputs else _NOTHING, Spec(built, None))
            outputs = yield layer, [spec], {}
        return outputs[:1]

    def _functional(self, model: dict[str, Any], inputs: list[Spec]) -> _Evaluation:
        config = _dict(model.get("config"))
        layers = walker.layers(model)
        offsets = _node_offsets(layers, config)
        declared = dict(_declared_inputs(model))
        given = dict(zip((r[0] for r in _refs(config.get("input_layers"))), inputs, strict=False))
        # Every call of every layer: computed[name][k] holds the outputs of its k-th inbound node.
        computed: dict[str, list[list[Spec]]] = {}

        def resolve(ref: tuple[str, int, int]) -> Spec:
            name, node, tensor = ref
            calls = computed.get(name, [])
            node -= offsets.get(name, 0)
            if 0 <= node < len(calls) and 0 <= tensor < len(calls[node]):
                return calls[node][tensor]
            return _NOTHING

        for layer in layers:
            name = walker.name(layer)
            if _is_input(layer):
                own = declared.get(name, _input_spec(_dict(layer.get("config"))))
                computed[name] = [[_prefer(given.get(name, _NOTHING), own)]]
                continue
            calls = computed.setdefault(name, [])
            nodes = layer.get("inbound_nodes")
            for node in nodes if isinstance(nodes, list) else []:
                node_inputs = [
                    _prefer(resolve(ref), recorded) for ref, recorded in _node_inputs(node)
                ]
                calls.append((yield layer, node_inputs, walker.call_kwargs(node)))
        return [resolve(ref) for ref in _refs(config.get("output_layers"))]

    def _time_distributed(self, config: dict[str, Any], inputs: list[Spec]) -> _Evaluation:
        inner = _dict(config.get("layer"))
        x = inputs[0].shape if inputs else None
        if x is None or len(x) < 3:
            return [_NOTHING]
        outputs = yield inner, [Spec((x[0], *x[2:]), inputs[0].dtype)], {}
        if len(outputs) != 1 or outputs[0].shape is None or not outputs[0].shape:
            return [Spec(None, outputs[0].dtype if len(outputs) == 1 else None)]
        child = outputs[0].shape
        return [Spec((child[0], x[1], *child[1:]), outputs[0].dtype)]

    def _bidirectional(self, config: dict[str, Any], inputs: list[Spec]) -> _Evaluation:
        forward = _dict(config.get("layer"))
        outputs = yield forward, inputs[:1], {}
        if not outputs:
            return [_NOTHING]
        dtype = _compute_dtype(config.get("dtype"))
        output, states = outputs[0], outputs[1:]
        merge_mode = config.get("merge_mode", "concat")
        shape = output.shape
        if merge_mode == "concat":
            merged = [Spec(None if shape is None else (*shape[:-1], _times(shape[-1], 2)), dtype)]
        elif merge_mode is None:
            merged = [Spec(shape, dtype), Spec(shape, dtype)]
        elif merge_mode in ("sum", "mul", "ave"):
            merged = [Spec(shape, dtype)]
        else:
            return [_NOTHING]
        states = [Spec(s.shape, dtype) for s in states]
        return merged + states + states


# Evaluating a layer yields (layer, input specs, call kwargs) for each layer inside it that must
# be evaluated first (a nested model's, a wrapper's), and returns its output specs.
_Evaluation = Generator[tuple[dict[str, Any], list[Spec], dict[str, Any]], list[Spec], list[Spec]]


# -- one layer ---------------------------------------------------------------------------------


def layer_outputs(
    class_name: str,
    config: dict[str, Any],
    inputs: list[Spec],
    call_kwargs: dict[str, Any] | None = None,
) -> list[Spec]:
    """A plain layer's outputs from its config, input specs and call arguments; unknown ones
    for the layers no rule here knows."""
    if class_name == "InputLayer":
        return [_input_spec(config)]
    if class_name in _ATTENTION:
        return _attention(class_name, config, inputs, call_kwargs or {})
    if class_name == "TFOpLambda":
        return _tf_operation(config, inputs, call_kwargs or {})
    if class_name == "Lambda":
        return [_lambda(config, inputs)]
    rule = _RULES.get(class_name) or _family_rule(class_name)
    if rule is None or not inputs:
        return [_NOTHING]
    dtype = _compute_dtype(config.get("dtype"))
    if class_name in _KEEP_DTYPE:
        dtype = inputs[0].dtype
    shapes = [s.shape for s in inputs]
    if class_name not in _ELEMENTWISE | {"Concatenate", "Dot"}:
        shapes = shapes[:1]
    if any(s is None for s in shapes):
        outputs: list[Shape | None] | None = None
    else:
        try:
            outputs = rule(config, shapes)  # type: ignore[arg-type]
        except _MALFORMED:
            outputs = None  # a config these rules do not understand
    if outputs is None:
        count = _output_count(class_name, config)
        return [Spec(None, dtype)] * count
    return [Spec(None if s is None else tuple(s), dtype) for s in outputs]


def _attention(
    class_name: str, config: dict[str, Any], inputs: list[Spec], call_kwargs: dict[str, Any]
) -> list[Spec]:
    """Attention, AdditiveAttention: (query, value[, key]) -> query's steps, value's features;
    MultiHeadAttention: query's shape with `output_shape` (default: query's features). With
    `return_attention_scores`, the scores follow."""
    dtype = _compute_dtype(config.get("dtype"))
    scores_wanted = bool(call_kwargs.get("return_attention_scores"))
    shapes = [s.shape for s in inputs]
    query = shapes[0] if shapes else None
    value = shapes[1] if len(shapes) > 1 else None
    output: Shape | None = None
    scores: Shape | None = None
    try:
        if class_name == "MultiHeadAttention" and query is not None:
            features = config.get("output_shape")
            if features is None:
                features = [query[-1]]
            elif isinstance(features, int):
                features = [_int(features)]
            output = (*query[:-1], *(_int(d) for d in features))
            key = shapes[2] if len(shapes) > 2 else value
            axes = config.get("attention_axes")
            if isinstance(axes, int):
                axes = [axes]
            if axes is None:
                axes = range(1, len(query) - 1)
            if key is not None:
                steps = [query[_int(a)] for a in axes] + [key[_int(a)] for a in axes]
                scores = (query[0], _int(config["num_heads"]), *steps)
        elif class_name != "MultiHeadAttention" and query is not None and value is not None:
            output = (*query[:-1], value[-1])
            scores = (*query[:-1], value[-2])
    except _MALFORMED:
        output = scores = None
    return [Spec(output, dtype), Spec(scores, dtype)] if scores_wanted else [Spec(output, dtype)]


def _tf_operation(
    config: dict[str, Any], inputs: list[Spec], call_kwargs: dict[str, Any]
) -> list[Spec]:
    """A Keras 2 TFOpLambda: the elementwise TensorFlow operations keep their operands' shape
    (a number as second operand, or a tensor to broadcast with) and dtype; `tf.cast` changes
    the dtype. Other operations are unknown."""
    if config.get("function") not in _TF_ELEMENTWISE or not inputs:
        return [_NOTHING]
    dtype = inputs[0].dtype
    if config.get("function") == "cast":
        dtype = _dtype_name(call_kwargs.get("dtype"))
    y = call_kwargs.get("y")
    if len(inputs) == 1 and (y is None or isinstance(y, int | float)):
        return [Spec(inputs[0].shape, dtype)]
    if len(inputs) == 2 and None not in (inputs[0].shape, inputs[1].shape):
        try:
            return [Spec(tuple(_elementwise(config, [s.shape for s in inputs])[0]), dtype)]
        except _MALFORMED:
            pass
    return [Spec(None, dtype)]


def _lambda(config: dict[str, Any], inputs: list[Spec]) -> Spec:
    """Keras 3 takes a Lambda's declared `output_shape` (without the batch) as its output's
    shape; Keras 2 (whose configs carry `output_shape_type`) ran the function instead."""
    declared = _shape(config.get("output_shape"))
    if "output_shape_type" in config or declared is None or not inputs:
        return _NOTHING
    batch = inputs[0].shape[0] if inputs[0].shape else UNKNOWN
    return Spec((batch, *declared), _compute_dtype(config.get("dtype")))


def _output_count(class_name: str, config: dict[str, Any]) -> int:
    if class_name in _RNN and config.get("return_state"):
        try:
            states = _state_units(class_name, config)
        except (TypeError, KeyError):
            states = None
        return 1 + len(states) if states is not None else 1
    return 1


def _same(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    return [shapes[0]]


def _dense(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    return [(*x[:-1], _int(config["units"]))]


def _category_encoding(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    """Keras' `CategoryEncoding.compute_output_shape`: one slot per token."""
    x, tokens = shapes[0], _int(config["num_tokens"])
    if len(x) <= 1:
        return [(*x, tokens)]
    if config.get("output_mode") == "one_hot" and x[-1] != 1:
        return [(*x, tokens)]
    return [(*x[:-1], tokens)]


def _resizing(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
    """Resizing, CenterCrop: images of `height` x `width`, channels kept."""
    x = shapes[0]
    if len(x) != 4:
        return None
    size = (_int(config["height"]), _int(config["width"]))
    if config.get("data_format") == "channels_first":
        return [(x[0], x[1], *size)]
    return [(x[0], *size, x[3])]


def _embedding(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    return [(*shapes[0], _int(config["output_dim"]))]


def _elementwise(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    """Keras' `Merge.compute_output_shape`: broadcast the non-batch dimensions."""
    out: Shape = tuple(shapes[0][1:])
    for shape in shapes[1:]:
        a, b = (out, tuple(shape[1:])) if len(out) >= len(shape) - 1 else (tuple(shape[1:]), out)
        lead = list(a[: len(a) - len(b)])
        for i, j in zip(a[len(a) - len(b) :], b, strict=True):
            if UNKNOWN in (i, j):
                lead.append(UNKNOWN)
            elif i is None or j is None:
                lead.append(None)
            else:
                lead.append(j if i == 1 else i)
        out = tuple(lead)
    batches = {s[0] for s in shapes} - {None}
    return [(batches.pop() if len(batches) == 1 else None, *out)]


def _concatenate(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
    axis = _int(config.get("axis", -1))
    rank = len(shapes[0])
    if not -rank <= axis < rank or any(len(s) != rank for s in shapes):
        return None
    out = list(shapes[0])
    out[axis] = _combine([s[axis] for s in shapes], sum)
    return [tuple(out)]


def _dot(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
    if len(shapes) != 2:
        return None
    a, b = list(shapes[0]), list(shapes[1])
    axes = config.get("axes")
    if isinstance(axes, int):
        axes = [axes % len(a), axes % len(b)] if axes < 0 else [axes, axes]
    a.pop(_int(axes[0]))
    b.pop(_int(axes[1]))
    b.pop(0)
    out = a + b
    return [tuple(out + [1] if len(out) == 1 else out)]


def _flatten(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    return [(x[0], _combine(list(x[1:]), math.prod))]


def _reshape(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
    x, target = shapes[0], [_int(d) for d in config["target_shape"]]
    if target.count(-1) > 1:
        return None
    rest = list(x[1:])
    if -1 not in target:
        return [(x[0], *target)]
    if UNKNOWN in rest or None in rest:
        missing = UNKNOWN if UNKNOWN in rest else None
        return [(x[0], *(missing if d == -1 else d for d in target))]
    known = math.prod(d for d in target if d != -1)
    return [(x[0], *(math.prod(rest) // known if d == -1 else d for d in target))]  # type: ignore


def _permute(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    return [(x[0], *(x[_int(d)] for d in config["dims"]))]


def _repeat_vector(config: dict[str, Any], shapes: list[Shape]) -> list[Shape]:
    x = shapes[0]
    return [(x[0], _int(config["n"]), *x[1:])]


def _recurrent(class_name: str) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != 3:
            return None
        time_major = bool(config.get("time_major"))
        batch, steps = (x[1], x[0]) if time_major else (x[0], x[1])
        units = _units(class_name, config)
        if config.get("return_sequences"):
            output = (steps, batch, units) if time_major else (batch, steps, units)
        else:
            output = (batch, units)
        if not config.get("return_state"):
            return [output]
        states = _state_units(class_name, config)
        if states is None:
            return None
        return [output, *((batch, size) for size in states)]

    return rule


def _units(class_name: str, config: dict[str, Any]) -> Dim:
    if class_name != "RNN":
        return _int(config["units"])
    cell = _dict(config.get("cell"))
    cell_config = _dict(cell.get("config"))
    if cell.get("class_name") == "StackedRNNCells":
        cells = cell_config.get("cells")
        cell_config = _dict(cells[-1].get("config")) if isinstance(cells, list) and cells else {}
    units = cell_config.get("units")
    return units if isinstance(units, int) and not isinstance(units, bool) else UNKNOWN


def _state_units(class_name: str, config: dict[str, Any]) -> list[Dim] | None:
    """The size of each state a recurrent layer returns (stacked cells: every cell's, in order)."""
    if class_name != "RNN":
        count = _STATES.get(class_name)
        return None if count is None else [_int(config["units"])] * count
    cell = _dict(config.get("cell"))
    cells = [cell]
    if cell.get("class_name") == "StackedRNNCells":
        cells = [_dict(c) for c in _dict(cell.get("config")).get("cells") or []]
    sizes: list[Dim] = []
    for c in cells:
        count = _CELL_STATES.get(_str(c.get("class_name")) or "")
        units = _dict(c.get("config")).get("units")
        if count is None or not isinstance(units, int) or isinstance(units, bool):
            return None
        sizes += [units] * count
    return sizes


def _conv(rank: int, kind: str) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    """Conv{rank}D (kind "conv"), its transpose ("transpose"), separable and depthwise ones."""

    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != rank + 2:
            return None
        first = config.get("data_format") == "channels_first"
        spatial, channels = (x[2:], x[1]) if first else (x[1:-1], x[-1])
        kernel = _ints(config["kernel_size"], rank)
        strides = _ints(config.get("strides", 1), rank)
        dilation = _ints(config.get("dilation_rate", 1), rank)
        padding = config.get("padding", "valid")
        if kind == "transpose":
            out_pad = config.get("output_padding")
            out_pad = [None] * rank if out_pad is None else _ints(out_pad, rank)
            lengths = [
                _deconv_length(n, k, padding, p, s, d)
                for n, k, s, d, p in zip(spatial, kernel, strides, dilation, out_pad, strict=True)
            ]
        else:
            lengths = [
                _conv_length(n, k, padding, s, d)
                for n, k, s, d in zip(spatial, kernel, strides, dilation, strict=True)
            ]
        if kind == "depthwise":
            filters = _combine([channels, _int(config.get("depth_multiplier", 1))], math.prod)
        else:
            filters = _int(config["filters"])
        return [(x[0], filters, *lengths) if first else (x[0], *lengths, filters)]

    return rule


def _conv_lstm(rank: int) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    conv = _conv(rank, "conv")

    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != rank + 3:
            return None
        step = conv(config, [(x[0], *x[2:])])
        if step is None:
            return None
        state = step[0]
        output = (x[0], x[1], *state[1:]) if config.get("return_sequences") else state
        return [output, state, state] if config.get("return_state") else [output]

    return rule


def _pooling(rank: int) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != rank + 2:
            return None
        first = config.get("data_format") == "channels_first"
        spatial = x[2:] if first else x[1:-1]
        pool = _ints(config.get("pool_size", 2), rank)
        strides = config.get("strides")
        strides = pool if strides is None else _ints(strides, rank)
        padding = config.get("padding", "valid")
        lengths = [
            _conv_length(n, k, padding, s, 1)
            for n, k, s in zip(spatial, pool, strides, strict=True)
        ]
        return [(x[0], x[1], *lengths) if first else (x[0], *lengths, x[-1])]

    return rule


def _global_pooling(rank: int) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != rank + 2:
            return None
        first = config.get("data_format") == "channels_first"
        channels = x[1] if first else x[-1]
        if not config.get("keepdims"):
            return [(x[0], channels)]
        ones = (1,) * rank
        return [(x[0], channels, *ones) if first else (x[0], *ones, channels)]

    return rule


def _spatial(
    rank: int, key: str, change: Callable[[Dim, tuple[int, int] | int], Dim]
) -> Callable[[dict[str, Any], list[Shape]], list[Shape] | None]:
    """ZeroPadding, Cropping (pairs per dimension) and UpSampling (a factor per dimension)."""

    def rule(config: dict[str, Any], shapes: list[Shape]) -> list[Shape] | None:
        x = shapes[0]
        if len(x) != rank + 2:
            return None
        first = config.get("data_format") == "channels_first"
        spatial = x[2:] if first else x[1:-1]
        value = config[key]
        amounts = _ints(value, rank) if key == "size" else _pairs(value, rank)
        lengths = [change(n, a) for n, a in zip(spatial, amounts, strict=True)]
        return [(x[0], x[1], *lengths) if first else (x[0], *lengths, x[-1])]

    return rule


def _pad(n: Dim, pair: Any) -> Dim:
    return _combine([n, pair[0], pair[1]], sum)


def _crop(n: Dim, pair: Any) -> Dim:
    return _combine([n, -pair[0], -pair[1]], sum)


def _upsample(n: Dim, factor: Any) -> Dim:
    return _combine([n, factor], math.prod)


_Rule = Callable[[dict[str, Any], list[Shape]], list[Shape] | None]
_RULES: dict[str, _Rule] = {
    **{name: _same for name in _SAME_SHAPE},
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _recurrent(name) for name in _RNN},
    "Dense": _dense,
    "Embedding": _embedding,
    "CategoryEncoding": _category_encoding,
    "Resizing": _resizing,
    "CenterCrop": _resizing,
    "Concatenate": _concatenate,
    "Dot": _dot,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Permute": _permute,
    "RepeatVector": _repeat_vector,
}


def _family_rule(class_name: str) -> _Rule | None:
    """Rules for the layers that come in 1D, 2D and 3D."""
    match = re.fullmatch(r"(\w+?)([123])D(Transpose)?", class_name)
    if match is None:
        return None
    rank, base = int(match[2]), match[1] + (match[3] or "")
    families: dict[str, Callable[[], _Rule]] = {
        "Conv": lambda: _conv(rank, "conv"),
        "ConvTranspose": lambda: _conv(rank, "transpose"),
        "SeparableConv": lambda: _conv(rank, "conv"),
        "LocallyConnected": lambda: _conv(rank, "conv"),
        "DepthwiseConv": lambda: _conv(rank, "depthwise"),
        "ConvLSTM": lambda: _conv_lstm(rank),
        "MaxPooling": lambda: _pooling(rank),
        "AveragePooling": lambda: _pooling(rank),
        "GlobalMaxPooling": lambda: _global_pooling(rank),
        "GlobalAveragePooling": lambda: _global_pooling(rank),
        "ZeroPadding": lambda: _spatial(rank, "padding", _pad),
        "Cropping": lambda: _spatial(rank, "cropping", _crop),
        "UpSampling": lambda: _spatial(rank, "size", _upsample),
    }
    make = families.get(base)
    return make() if make is not None else None


def _conv_length(n: Dim, kernel: int, padding: Any, stride: int, dilation: int) -> Dim:
    """Keras' `conv_output_length`."""
    if not isinstance(n, int):
        return n
    dilated = kernel + (kernel - 1) * (dilation - 1)
    lengths = {"same": n, "causal": n, "valid": n - dilated + 1, "full": n + dilated - 1}
    if padding not in lengths:
        return UNKNOWN
    length = (lengths[padding] + stride - 1) // stride
    return length if length > 0 else UNKNOWN


def _deconv_length(
    n: Dim, kernel: int, padding: Any, output_padding: int | None, stride: int, dilation: int
) -> Dim:
    """Keras' `deconv_output_length`."""
    if not isinstance(n, int):
        return n
    kernel = kernel + (kernel - 1) * (dilation - 1)
    if output_padding is None:
        lengths = {
            "valid": n * stride + max(kernel - stride, 0),
            "same": n * stride,
            "full": n * stride - (stride + kernel - 2),
        }
        return lengths.get(padding, UNKNOWN)
    pads = {"same": kernel // 2, "valid": 0, "full": kernel - 1}
    if padding not in pads:
        return UNKNOWN
    return (n - 1) * stride + kernel - 2 * pads[padding] + output_padding


# -- specs from the config ---------------------------------------------------------------------


def _declared_inputs(model: dict[str, Any]) -> list[tuple[str, Spec]]:
    """Inputs as the model declares them (its InputLayers, or its first layer's input shape)."""
    layers = walker.layers(model)
    if _str(model.get("class_name")) == "Sequential":
        first = _dict(layers[0].get("config")) if layers else {}
        spec = _input_spec(first)
        if spec.shape is None:  # Sequential(input_shape=...) on a later Keras 3 build
            build = _dict(model.get("config")).get("build_input_shape")
            spec = Spec(_shape(build), spec.dtype)
        if spec.shape is None and layers:  # built by its first call: Keras 3 records it
            built = _dict(layers[0].get("build_config")).get("input_shape")
            spec = Spec(_shape(built), spec.dtype)
        name = _str(first.get("name")) if layers and _is_input(layers[0]) else None
        return [(name or "input", spec)]
    by_name = {walker.name(x): x for x in layers}
    return [
        (ref[0], _input_spec(_dict(_dict(by_name.get(ref[0])).get("config"))))
        for ref in _refs(_dict(model.get("config")).get("input_layers"))
    ]


def _input_spec(config: dict[str, Any]) -> Spec:
    """An InputLayer's (or a Keras 2 first layer's) batch shape and dtype."""
    shape = _shape(config.get("batch_shape", config.get("batch_input_shape")))
    if shape is None and isinstance(config.get("input_shape"), list):
        shape = _shape([None, *config["input_shape"]])
    if shape is None and isinstance(config.get("input_dim"), int):  # Keras 1: Dense(input_dim=)
        shape = (None, config["input_dim"])
    dtype = _dtype_name(config.get("dtype")) if config.get("dtype") is not None else "float32"
    if dtype is not None and dtype.startswith("mixed_"):
        dtype = "float32"  # an input holds the policy's variable dtype
    return Spec(shape, dtype)


def _node_inputs(node: Any) -> list[tuple[tuple[str, int, int], Spec]]:
    """A call's input tensors: where each comes from, and the spec Keras 3 recorded for it.

    Keras 3 writes `{"args": [...], "kwargs": {...}}` with a `__keras_tensor__` for each tensor;
    Keras 2 writes `[[name, node, tensor, kwargs], ...]`. Of the tensors in kwargs only an
    attention layer's `value` and `key` decide an output's shape (initial states and masks do
    not); they follow the positional ones.
    """
    kwargs = walker.call_kwargs(node)
    extra = [kwargs[k] for k in _TENSOR_KWARGS if k in kwargs]
    found = [*walker.call_inputs(node), *walker.tensors(extra)]
    return [((ref[0], ref[1], ref[2]), _recorded(config)) for ref, config in found]


def _recorded(tensor: dict[str, Any] | None) -> Spec:
    """The spec Keras 3 recorded for a tensor (Keras 2 records none)."""
    if tensor is None:
        return _NOTHING
    return Spec(_shape(tensor.get("shape")), _dtype_name(tensor.get("dtype")))


def _node_offsets(layers: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, int]:
    """Nested functional models own a node 0 that configs do not list, so references to their
    k-th listed call say k + 1. Which models do depends on the Keras version; the references
    tell: a model whose calls are referenced up to index len(inbound_nodes) is shifted by one."""
    nested = {walker.name(x): x for x in layers if _str(x.get("class_name")) in MODEL_CLASSES}
    if not nested:
        return {}
    highest: dict[str, int] = {}
    refs = [r for r, _ in (i for x in layers for n in _nodes(x) for i in _node_inputs(n))]
    for name, node, _tensor in refs + _refs(config.get("output_layers")):
        if name in nested:
            highest[name] = max(highest.get(name, 0), node)
    return {
        name: 1
        for name, layer in nested.items()
        if highest.get(name, 0) >= 1 and highest[name] == len(_nodes(layer))
    }


def _nodes(layer: dict[str, Any]) -> list[Any]:
    nodes = layer.get("inbound_nodes")
    return nodes if isinstance(nodes, list) else []


def _prefer(computed: Spec, recorded: Spec) -> Spec:
    """The computed spec where it is known, dimension by dimension; the recorded one elsewhere."""
    shape = computed.shape
    if shape is None or (recorded.shape is not None and len(recorded.shape) != len(shape)):
        shape = recorded.shape if recorded.shape is not None else shape
    elif recorded.shape is not None:
        shape = tuple(r if c == UNKNOWN else c for c, r in zip(shape, recorded.shape, strict=True))
    return Spec(shape, computed.dtype if computed.dtype is not None else recorded.dtype)


def _compute_dtype(policy: Any) -> str | None:
    """The dtype a layer computes in, from its dtype or dtype policy ("mixed_float16": float16).

    Keras 3 `{"class_name": "DTypePolicy", "config": {"name": ...}}`, Keras 2 `Policy` dicts and
    plain names; quantized policies ("int8_from_mixed_bfloat16") compute in their source's dtype.
    A layer without one uses Keras' default, float32.
    """
    name = _dtype_name(policy) if policy is not None else "float32"
    if name is None:
        return None
    name = name.rsplit("_from_", 1)[-1]
    return _MIXED.get(name, name)


def _dtype_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = _dict(value.get("config")).get("name")
    return value if isinstance(value, str) else None


def _count_layer_entries(model: dict[str, Any]) -> int:
    return 1 + sum(1 for _ in walker.walk(model, wrapped=True))


def _refs(value: Any) -> list[tuple[str, int, int]]:
    """`input_layers`/`output_layers` as (name, node, tensor), in Keras' order."""
    return [(ref[0], ref[1], ref[2]) for ref in walker.io_refs(value)]


def _shape(value: Any) -> Shape | None:
    if not isinstance(value, list | tuple):
        return None
    if not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in value):
        return None
    return tuple(value)


def _is_input(layer: dict[str, Any]) -> bool:
    return layer.get("class_name") == "InputLayer"


def _combine(dims: list[Any], operation: Callable[[list[int]], int]) -> Dim:
    """`operation` of known dimensions; unknown if any is, None (open) if any is open."""
    if UNKNOWN in dims:
        return UNKNOWN
    if any(d is None for d in dims):
        return None
    return operation([_int(d) for d in dims])


def _times(dim: Dim, factor: int) -> Dim:
    return _combine([dim, factor], math.prod)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, received {value!r}")
    return value


def _ints(value: Any, rank: int) -> list[int]:
    """A kernel size, stride...: one int for every dimension, or one per dimension."""
    if isinstance(value, int):
        return [_int(value)] * rank
    if isinstance(value, list | tuple) and len(value) == rank:
        return [_int(v) for v in value]
    raise ValueError(f"expected {rank} integers, received {value!r}")


def _pairs(value: Any, rank: int) -> list[tuple[int, int]]:
    """Padding or cropping: an int, one int per dimension, or a (before, after) pair per one."""
    if isinstance(value, int):
        return [(_int(value), _int(value))] * rank
    if rank == 1 and isinstance(value, list | tuple) and len(value) == 2:
        return [(_int(value[0]), _int(value[1]))]
    if isinstance(value, list | tuple) and len(value) == rank:
        return [
            (_int(v), _int(v)) if isinstance(v, int) else (_int(v[0]), _int(v[1])) for v in value
        ]
    raise ValueError(f"expected padding for {rank} dimensions, received {value!r}")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
