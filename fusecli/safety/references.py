"""Functions a config names by reference: which ones are known not to run other code.

A config can name a function instead of holding its bytecode: `{"module": "builtins",
"class_name": "function", "config": "relu"}` (Keras 3), or a Keras 2 Lambda's
`{"module": "tf_keras.src.layers", "config": "sys.exit"}`. Keras looks the name up (among its
own functions, in the module, or among registered custom objects, where `"pkg>fn"` reaches any
function a program registered) and calls it. A reference is therefore code, unless it names one
of Keras' own built-in activations, losses or metrics, looked up where Keras keeps them.
"""

from __future__ import annotations

import re
from typing import Any

# Keras' built-in functions that compute on tensors and nothing else (Keras 3 and tf-keras).
PURE_ACTIVATIONS = frozenset({
    "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish",
    "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink", "softmax", "softplus", "softsign",
    "sparse_plus", "sparsemax", "squareplus", "swish", "tanh", "tanh_shrink", "threshold",
})  # fmt: skip
PURE_LOSSES = frozenset({
    "binary_crossentropy", "binary_focal_crossentropy", "categorical_crossentropy",
    "categorical_focal_crossentropy", "categorical_hinge", "cosine_similarity", "ctc", "dice",
    "hinge", "huber", "kl_divergence", "kld", "kullback_leibler_divergence", "log_cosh",
    "logcosh", "mae", "mape", "mse", "msle", "mean_absolute_error",
    "mean_absolute_percentage_error", "mean_squared_error", "mean_squared_logarithmic_error",
    "poisson", "sparse_categorical_crossentropy", "squared_hinge", "tversky",
})  # fmt: skip
PURE_METRICS = frozenset({
    "accuracy", "binary_accuracy", "categorical_accuracy", "sparse_categorical_accuracy",
    "top_k_categorical_accuracy", "sparse_top_k_categorical_accuracy",
})  # fmt: skip
PURE_FUNCTIONS = PURE_ACTIVATIONS | PURE_LOSSES | PURE_METRICS

# Where Keras keeps them: a name is looked up as an attribute of the module.
_PURE_MODULES = re.compile(r"(tf_)?keras(\.src)?\.(activations|losses|metrics)(\.[a-z_]+)*")


def is_reference(node: dict[str, Any]) -> bool:
    """A serialized object that names a function: class "function", a lower-case class name
    beside a module (Keras resolves any name in a module), or a module and a name without a
    class (what Keras 2 Lambda configs hold)."""
    class_name = node.get("class_name")
    if class_name == "function":
        return True
    if "module" not in node:
        return False
    if isinstance(class_name, str):
        return class_name[:1].islower() and not class_name.startswith("__")
    return class_name is None and isinstance(node.get("config"), str)


def referenced_name(node: dict[str, Any]) -> Any:
    """The function's name as Keras reads it: `config` for class "function", else the class."""
    class_name = node.get("class_name")
    return node.get("config") if class_name in ("function", None) else class_name


def is_pure_reference(node: dict[str, Any]) -> bool:
    """Whether Keras resolves this reference to one of the functions above, and only there."""
    name, module = referenced_name(node), node.get("module")
    registered = node.get("registered_name")
    if not isinstance(name, str) or name not in PURE_FUNCTIONS:
        return False
    if registered not in (None, "function", name):
        return False  # Keras looks a registered name up first, which reaches any function
    if module == "builtins":
        return True
    return isinstance(module, str) and bool(_PURE_MODULES.fullmatch(module))
