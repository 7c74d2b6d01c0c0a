"""fusecli: fuse saved Keras models into one.

The public API is imported lazily, so `import fusecli` (and `fusecli --help`) never pulls in
TensorFlow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from fusecli.errors import (
    FusecliError,
    InvalidRequest,
    ModelFileError,
    UnsafeModelError,
    VerificationError,
)

__version__ = "0.1.0"

# Public name -> module that defines it.
_LAZY = {
    "fuse": "fusecli.fusion.fuse",
    "fuse_to_file": "fusecli.fusion.fuse",
    "load_model": "fusecli.safety.loading",
    "merge": "fusecli.merging.merge",
    "export": "fusecli.exporting.export",
    "combine_scores": "fusecli.scores.arrays",
    "predict_to_file": "fusecli.scores.prediction",
    "predict_array": "fusecli.scores.prediction",
    "tune": "fusecli.scores.tuning",
    "tune_scores": "fusecli.scores.tuning",
    "apply_recipe": "fusecli.scores.recipe",
    "load_recipe": "fusecli.scores.recipe",
    "vote_scores": "fusecli.scores.recipe",
    "fuse_recipe_file": "fusecli.fusion.recipe_head",
}

__all__ = [
    "FusecliError",
    "InvalidRequest",
    "ModelFileError",
    "UnsafeModelError",
    "VerificationError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusecli' has no attribute {name!r}")
