"""Keras 2's `TFOpLambda` and `SlicingOpLambda` layers as Keras 3 operation nodes.

tf.keras 2 recorded a TensorFlow function called on a Keras tensor (`x + y`, `tf.concat`,
`x[:, 1:]`) as a layer naming the function (`"function": "math.multiply"`) with its other
arguments in the node (`[["dense", 0, 0, {"y": 2.0, "name": null}]]`; a constant first argument
as `["_CONSTANT_VALUE", -1, value, {...}]`). Keras 3 has no such layer. Each one becomes the
`keras.ops` operation that computes the same function, as a node of its own in the functional
config, exactly what Keras 3 writes for `keras.ops.multiply(x, 2.0)` on a Keras tensor: it
names a Keras class and its arguments, carries no code, and loads in safe mode.

Operations rather than layers (`Add`, `Rescaling`, `Activation`...): like a TFOpLambda, an
operation passes no mask on, where those layers would hand a Keras 2 mask to the next layer in
Keras 3 only; and `keras.ops` broadcast as TensorFlow does, where Keras' merge layers do not.
What is converted, argument by argument, is listed in docs/keras2.md; any other function, or an
argument whose value is not the neutral one, is refused naming the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusecli.config import walker

CLASSES = ("TFOpLambda", "SlicingOpLambda")
_CONSTANT = "_CONSTANT_VALUE"
_NUMPY, _NN, _MATH, _CORE = (f"keras.src.ops.{m}" for m in ("numpy", "nn", "math", "core"))

Fail = Callable[[str], Exception]


def _ops(module: str, names: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {function: (module, cls) for function, cls in names.items()}


# f(x, y): the second operand is the node's `y` (a tensor or a constant).
_BINARY = {
    **_ops(
        _NUMPY,
        {
            "__operators__.add": "Add", "math.add": "Add", "math.subtract": "Subtract",
            "math.multiply": "Multiply", "math.truediv": "Divide", "math.divide": "Divide",
            "math.floordiv": "FloorDivide", "compat.v1.floor_div": "FloorDivide",
            "math.floormod": "Mod", "math.maximum": "Maximum", "math.minimum": "Minimum",
            "math.pow": "Power", "math.greater": "Greater", "math.greater_equal": "GreaterEqual",
            "math.less": "Less", "math.less_equal": "LessEqual", "math.equal": "Equal",
            "math.not_equal": "NotEqual", "math.logical_and": "LogicalAnd",
            "math.logical_or": "LogicalOr",
        },
    ),
}  # fmt: skip
# f(x), elementwise.
_UNARY = {
    **_ops(
        _NUMPY,
        {
            "math.abs": "Absolute", "math.negative": "Negative", "math.sqrt": "Sqrt",
            "math.square": "Square", "math.exp": "Exp", "math.log": "Log", "math.log1p": "Log1p",
            "math.expm1": "Expm1", "math.sin": "Sin", "math.cos": "Cos", "math.tan": "Tan",
            "math.tanh": "Tanh", "nn.tanh": "Tanh", "math.floor": "Floor", "math.ceil": "Ceil",
            "math.round": "Round", "math.sign": "Sign", "math.reciprocal": "Reciprocal",
            "math.logical_not": "LogicalNot",
        },
    ),
    **_ops(
        _NN,
        {
            "math.sigmoid": "Sigmoid", "nn.sigmoid": "Sigmoid", "nn.relu": "Relu",
            "nn.relu6": "Relu6", "math.softplus": "Softplus", "nn.softplus": "Softplus",
            "math.softsign": "Softsign", "nn.softsign": "Softsign", "nn.selu": "Selu",
            "nn.elu": "Elu", "nn.silu": "Silu", "nn.swish": "Silu",
        },
    ),
    **_ops(_MATH, {"math.rsqrt": "Rsqrt", "math.erf": "Erf"}),
}  # fmt: skip
# f(x, axis=None, keepdims=False)
_REDUCTIONS = {
    **_ops(
        _NUMPY,
        {
            "math.reduce_sum": "Sum", "math.reduce_mean": "Mean", "math.reduce_max": "Max",
            "math.reduce_min": "Min", "math.reduce_prod": "Prod",
        },
    ),
    **_ops(_MATH, {"math.reduce_logsumexp": "Logsumexp"}),
}  # fmt: skip


# Everything `_special` converts, besides the tables.
_SPECIAL = (
    "nn.softmax", "math.softmax", "nn.log_softmax", "math.log_softmax", "nn.gelu",
    "nn.leaky_relu", "concat", "stack", "reshape", "compat.v1.reshape", "expand_dims",
    "compat.v1.expand_dims", "squeeze", "compat.v1.squeeze", "transpose", "compat.v1.transpose",
    "__operators__.getitem", "strided_slice", "cast", "clip_by_value", "linalg.matmul",
    "__operators__.matmul", "where", "math.argmax", "math.argmin",
)  # fmt: skip
_FUNCTIONS = frozenset((*_BINARY, *_UNARY, *_REDUCTIONS, *_SPECIAL))


def convert(spec: dict[str, Any], fail: Fail) -> dict[str, Any]:
    """The Keras 3 operation node for one TFOpLambda/SlicingOpLambda layer (Keras 2 node format
    in, Keras 3's out; the name and the calls stay, so references to it hold)."""
    function = str((spec.get("config") or {}).get("function"))
    nodes = spec.get("inbound_nodes") or []
    if not nodes:
        raise fail(f"tf.{function} is never called in the model")
    converted = [_operation(function, node, fail) for node in nodes]
    (module, cls, conf) = converted[0][:3]
    if any(c[:3] != converted[0][:3] for c in converted[1:]):
        raise fail(f"tf.{function} is called with different arguments in different places")
    name = spec.get("name") or spec["config"].get("name")
    return {
        "module": module,
        "class_name": cls,
        "config": {"name": name, **conf},
        "registered_name": cls,
        "name": name,
        "inbound_nodes": [{"args": args, "kwargs": {}} for *_, args in converted],
    }


def converts(spec: dict[str, Any]) -> bool:
    """Whether a layer is a TF operation layer naming a function `convert` knows (its arguments
    may still be refused): what is run is then that function's keras.ops equivalent, never the
    name looked up in TensorFlow."""
    conf = spec.get("config")
    function = conf.get("function") if isinstance(conf, dict) else None
    return spec.get("class_name") in CLASSES and function in _FUNCTIONS


def check(spec: dict[str, Any], fail: Fail) -> None:
    """Refuse (`fail(reason)`) a TF operation layer that `convert` would not convert."""
    convert(spec, fail)


def _operation(function: str, node: Any, fail: Fail) -> tuple[str, str, dict[str, Any], list[Any]]:
    """(module, class, config, call args) of one call."""
    first, kwargs = _call(function, node, fail)
    kwargs.pop("name", None)
    args = _Args(function, kwargs, fail)
    if function in _BINARY:
        module, cls = _BINARY[function]
        result = module, cls, {}, [first, args.take("y", required=True)]
    elif function in _UNARY:
        module, cls = _UNARY[function]
        result = module, cls, {}, [first]
    elif function in _REDUCTIONS:
        module, cls = _REDUCTIONS[function]
        axis = args.take("axis")
        conf = {"axis": axis, "keepdims": bool(args.take("keepdims", False))}
        result = module, cls, conf, [first]
    else:
        result = _special(function, first, args, fail)
    args.finish()
    return result


def _special(
    function: str, first: Any, args: _Args, fail: Fail
) -> tuple[str, str, dict[str, Any], list[Any]]:
    if function in ("nn.softmax", "math.softmax", "nn.log_softmax", "math.log_softmax"):
        axis = args.take("axis")
        cls = "LogSoftmax" if "log_" in function else "Softmax"
        return _NN, cls, {"axis": -1 if axis is None else axis}, [first]
    if function == "nn.gelu":
        return _NN, "Gelu", {"approximate": bool(args.take("approximate", False))}, [first]
    if function == "nn.leaky_relu":
        return _NN, "LeakyRelu", {"negative_slope": args.take("alpha", 0.2)}, [first]
    if function in ("concat", "stack"):
        if not isinstance(first, list):
            raise fail(f"tf.{function} is not given a list of tensors")
        axis = args.take("axis", 0, required=function == "concat")
        if axis == 0:
            raise fail(f"tf.{function} along axis 0 (the batch) is not converted")
        return _NUMPY, "Concatenate" if function == "concat" else "Stack", {"axis": axis}, [first]
    if function in ("reshape", "compat.v1.reshape"):
        shape = args.take("shape", required=True)
        if not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            raise fail(f"tf.{function} is given a shape that is not a list of numbers: {shape!r}")
        return _NUMPY, "Reshape", {"newshape": shape}, [first]
    if function in ("expand_dims", "compat.v1.expand_dims"):
        return _NUMPY, "ExpandDims", {"axis": args.take("axis", required=True)}, [first]
    if function in ("squeeze", "compat.v1.squeeze"):
        axis = args.take("axis")
        dims = args.take("squeeze_dims")
        return _NUMPY, "Squeeze", {"axis": axis if axis is not None else dims}, [first]
    if function in ("transpose", "compat.v1.transpose"):
        args.neutral("conjugate", False)
        return _NUMPY, "Transpose", {"axes": args.take("perm")}, [first]
    if function == "__operators__.getitem":
        return _NUMPY, "GetItem", {}, [first, _slice_key(args.take("slice_spec", required=True))]
    if function == "strided_slice":
        return _NUMPY, "GetItem", {}, [first, _strided_key(args, fail)]
    if function == "cast":
        dtype = args.take("dtype", required=True)
        if not isinstance(dtype, str):
            raise fail(f"tf.cast is given a dtype Keras cannot read: {dtype!r}")
        return _CORE, "Cast", {"dtype": dtype}, [first]
    if function == "clip_by_value":
        low = args.take("clip_value_min", required=True)
        high = args.take("clip_value_max", required=True)
        if not all(isinstance(v, int | float) for v in (low, high)):
            raise fail("tf.clip_by_value is converted with constant bounds only")
        return _NUMPY, "Clip", {"x_min": low, "x_max": high}, [first]
    if function in ("linalg.matmul", "__operators__.matmul"):
        other = args.take("b", required=True)
        a = "ji" if args.take("transpose_a", False) else "ij"
        b = "kj" if args.take("transpose_b", False) else "jk"
        for key in ("adjoint_a", "adjoint_b", "a_is_sparse", "b_is_sparse"):
            args.neutral(key, False)
        return _NUMPY, "Einsum", {"subscripts": f"...{a},...{b}->...ik"}, [first, other]
    if function == "where":
        x, y = args.take("x", required=True), args.take("y", required=True)
        return _NUMPY, "Where", {}, [first, x, y]
    if function in ("math.argmax", "math.argmin"):
        axis = args.take("axis")
        args.take("output_type", "int64")  # Keras 3 returns int32: the same indices
        cls = "Argmax" if function == "math.argmax" else "Argmin"
        return _NUMPY, cls, {"axis": 0 if axis is None else axis, "keepdims": False}, [first]
    raise fail(
        f"tf.{function} has no Keras 3 equivalent fusecli converts (docs/keras2.md lists those "
        "it does); rewrite that step with a Keras layer or keras.ops and save the model again"
    )


class _Args:
    """The node's keyword arguments, taken one by one; what is left must be None."""

    def __init__(self, function: str, kwargs: dict[str, Any], fail: Fail) -> None:
        self.function, self.kwargs, self.fail = function, kwargs, fail

    def take(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        if key in self.kwargs:
            return self.kwargs.pop(key)
        if required:
            raise self.fail(f"tf.{self.function} is called without its argument {key!r}")
        return default

    def neutral(self, key: str, value: Any) -> None:
        """An argument converted only at its neutral value."""
        got = self.kwargs.pop(key, value)
        if got is not None and got != value:
            raise self.fail(f"tf.{self.function} with {key}={_short(got)} is not converted")

    def finish(self) -> None:
        for key, value in self.kwargs.items():
            if value is not None:
                raise self.fail(f"tf.{self.function} with {key}={_short(value)} is not converted")


def _call(function: str, node: Any, fail: Fail) -> tuple[Any, dict[str, Any]]:
    """(first argument, keyword arguments) of one Keras 2 node, tensors as Keras 3 refs."""
    if isinstance(node, list) and node and isinstance(node[0], str):
        node = [node]  # one argument tensor: tf-keras writes the entry alone
    if not (isinstance(node, list) and node and all(isinstance(e, list) for e in node)):
        raise fail(f"tf.{function} has a call Keras 2 would not have written: {_short(node)}")
    kwargs = node[-1][3] if len(node[-1]) > 3 and isinstance(node[-1][3], dict) else {}
    kwargs = {k: _value(v) for k, v in kwargs.items()}
    if function in ("concat", "stack") or len(node) > 1:
        return [_entry(e) for e in node], kwargs
    return _entry(node[0]), kwargs


def _entry(entry: list[Any]) -> Any:
    if entry[0] == _CONSTANT:
        return entry[2]
    return walker.keras_tensor(entry)


def _value(value: Any) -> Any:
    if walker.is_ref(value) and len(value) == 3:
        return walker.keras_tensor(value)
    if isinstance(value, list):
        return [_value(v) for v in value]
    return value


def _slice_key(spec: Any) -> list[Any]:
    """tf-keras' slice_spec ({start, stop, step} dicts, ints, None, {"class_name":
    "__ellipsis__"}) as the key Keras 3 serializes for `x[...]`."""
    items = spec if isinstance(spec, list) else [spec]
    key = []
    for item in items:
        if isinstance(item, dict) and item.get("class_name") == "__ellipsis__":
            key.append({"class_name": "__ellipsis__", "config": {}})
        elif isinstance(item, dict):
            parts = {k: item.get(k) for k in ("start", "stop", "step")}
            key.append({"class_name": "__slice__", "config": parts})
        else:
            key.append(item)
    return key


def _strided_key(args: _Args, fail: Fail) -> list[Any]:
    begin = args.take("begin", required=True)
    end = args.take("end", required=True)
    strides = args.take("strides") or [1] * len(begin)
    masks = {k: int(args.take(k, 0) or 0) for k in ("begin_mask", "end_mask", "shrink_axis_mask")}
    for key in ("ellipsis_mask", "new_axis_mask"):
        args.neutral(key, 0)
    if not all(isinstance(v, list) and len(v) == len(begin) for v in (end, strides)):
        raise fail("tf.strided_slice is converted with constant begin, end and strides only")
    key: list[Any] = []
    for i, (b, e, s) in enumerate(zip(begin, end, strides, strict=True)):
        if masks["shrink_axis_mask"] >> i & 1:
            key.append(b)
            continue
        start = None if masks["begin_mask"] >> i & 1 else b
        stop = None if masks["end_mask"] >> i & 1 else e
        key.append({"class_name": "__slice__", "config": {"start": start, "stop": stop, "step": s}})
    return key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
