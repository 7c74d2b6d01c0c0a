"""A module imported on first use, so that `--help` can list what needs numpy without it.

    np = LazyModule("numpy")     # numpy is imported at the first `np.something`

Keras does the same (`keras.src.utils.module_utils.LazyModule`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)
