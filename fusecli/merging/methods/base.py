"""What every merge method declares, and a merge request checked against it.

A method is one module holding one `Method`: its name, its formula, the parameters it takes
(declared in `parameters.py`, with its own defaults) and `combine`, which merges one tensor.
The registry in `__init__.py` lists them; nothing else needs to know a method by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusecli.merging.methods.parameters import Parameter, Setting

if TYPE_CHECKING:
    import numpy as np

# combine(models' tensors in order, read lazily; the base's tensor or None; this tensor's
# parameter values; a seeded generator for methods that take --seed, else None) -> float64 array.
Combine = Callable[
    [Iterable["np.ndarray"], "np.ndarray | None", Mapping[str, Any], "np.random.Generator | None"],
    "np.ndarray",
]
# check_tensor(this tensor's parameter values, its shape) -> what is wrong, or None.
CheckTensor = Callable[[Mapping[str, Any], tuple[int, ...]], "str | None"]


@dataclass(frozen=True)
class Method:
    """A merge method: everything the CLI, the API, --help and the docs know about it."""

    name: str
    formula: str
    parameters: tuple[Parameter, ...]
    combine: Combine
    needs_base: bool = False
    min_models: int = 2
    max_models: int | None = None
    reference: str = ""
    check_tensor: CheckTensor | None = None

    def parameter(self, name: str) -> Parameter | None:
        for p in self.parameters:
            if p.name == name:
                return p
        return None

    @property
    def random(self) -> bool:
        return self.parameter("seed") is not None


@dataclass(frozen=True)
class Override:
    """`--set PATTERN:NAME=VALUE`: a parameter's setting for the layers whose path matches."""

    pattern: str
    name: str
    setting: Setting
    order: int  # among the --set options, for ties in specificity (the later one wins)

    @property
    def specificity(self) -> int:
        """Characters that are not wildcards: the more, the more specific."""
        return sum(c not in "*?[]" for c in self.pattern)

    def describe(self) -> str:
        return f"{self.pattern}:{self.name}={_show(self.setting)}"


@dataclass(frozen=True)
class MergePlan:
    """A merge request checked against its method before any file is opened."""

    method: str
    n_models: int
    settings: dict[str, Setting]  # every parameter the method takes: given, or its default
    given: frozenset[str]
    overrides: tuple[Override, ...] = field(default_factory=tuple)
    needs_base: bool = False

    @property
    def weights(self) -> tuple[float, ...] | None:
        """The weights as the report states them: scalars, normalized if the method says so."""
        weights = self.settings.get("weights")
        if weights is None or any(isinstance(w, tuple) for w in weights):
            return None
        if self.method == "linear" and self.settings.get("normalize"):
            total = sum(weights)
            return tuple(w / total for w in weights)
        return tuple(weights)

    @property
    def t(self) -> float | None:
        t = self.settings.get("t")
        return t if isinstance(t, float) else None

    @property
    def normalize(self) -> bool:
        return bool(self.settings.get("normalize"))

    @property
    def seed(self) -> int | None:
        return self.settings.get("seed")


def _show(setting: Setting) -> str:
    if isinstance(setting, tuple):
        return ",".join(_show(s) if isinstance(s, tuple) else f"{s:g}" for s in setting)
    return f"{setting:g}" if isinstance(setting, float) else str(setting)
