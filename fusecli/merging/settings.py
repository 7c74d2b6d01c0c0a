"""Each tensor's parameter values: gradients over the layers, and `--set` patterns.

A gradient (`--density 0.2,0.5,0.8`) is interpolated over the layers that hold merged tensors, in
the model's order: the i-th of L such layers sits at depth i / (L - 1), and every tensor of a
layer gets the layer's value (mergekit's gradients, over Keras layers instead of transformer
blocks). A `--set PATTERN:NAME=VALUE` applies to the layers whose path (`block/conv2d_1`) matches
the shell-style PATTERN; where several match, the most specific (most characters that are not
wildcards) wins, and among equals the last given. A pattern that matches no layer is refused, as
is a value a tensor cannot take (a density that keeps none of its entries): all before any
tensor is read.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusecli.errors import InvalidRequest
from fusecli.formats.weights_layout import Variable
from fusecli.merging.methods import METHODS, MergePlan
from fusecli.merging.methods.base import Override
from fusecli.merging.methods.parameters import interpolate


@dataclass(frozen=True)
class TensorSettings:
    """The values one merged tensor gets, and where each came from."""

    index: int
    layer: str
    depth: float
    values: dict[str, Any]
    overrides: dict[str, str]  # parameter -> the --set pattern that decided it

    def as_dict(self, per_layer: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor": self.index, "layer": self.layer, "depth": self.depth}
        out.update({name: _plain(self.values[name]) for name in per_layer})
        if self.overrides:
            out["set_by"] = dict(self.overrides)
        return out


def resolve_settings(plan: MergePlan, variables: Sequence[Variable]) -> list[TensorSettings | None]:
    """The values of every merged tensor (None for tensors copied from the first model)."""
    method = METHODS[plan.method]
    layers = _merged_layers(variables)
    depth = {
        layer: (i / (len(layers) - 1) if len(layers) > 1 else 0.0) for i, layer in enumerate(layers)
    }
    matches = {layer: _matching(plan.overrides, layer) for layer in layers}
    for override in plan.overrides:
        if not any(override in found for found in matches.values()):
            raise InvalidRequest(
                f"--set {override.describe()!r}: the pattern matches no layer. The merged layers "
                f"are named like {_examples(layers)}"
            )
    resolved: list[TensorSettings | None] = []
    problems: list[str] = []
    for k, variable in enumerate(variables):
        if not variable.mergeable:
            resolved.append(None)
            continue
        t = depth[variable.layer]
        values: dict[str, Any] = {}
        decided: dict[str, str] = {}
        for name, setting in plan.settings.items():
            override = _winner(matches[variable.layer], name)
            if override is not None:
                setting = override.setting
                decided[name] = override.pattern
            values[name] = _evaluate(setting, t, name)
        if method.check_tensor is not None:
            problem = method.check_tensor(values, variable.shape)
            if problem is not None:
                problems.append(f"weight {k} (layer {variable.layer!r}): {problem}")
        resolved.append(TensorSettings(k, variable.layer, round(t, 6), values, decided))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InvalidRequest(
            f"{len(problems)} tensors cannot take their values: {'; '.join(problems[:3])}{more}. "
            "Give those layers other values with --set 'PATTERN:NAME=VALUE'"
        )
    return resolved


def summarize(plan: MergePlan, resolved: Sequence[TensorSettings | None]) -> dict[str, Any]:
    """Every parameter as resolved: its value, or, where it varies over the tensors (a gradient,
    a --set pattern), what was given and the range it took; the --set patterns last."""
    summary: dict[str, Any] = {}
    for name, setting in plan.settings.items():
        taken = [s.values[name] for s in resolved if s is not None]
        if not taken or all(t == taken[0] for t in taken):
            summary[name] = _plain(taken[0] if taken else setting)
        elif name == "weights":
            summary[name] = {
                "setting": _plain(setting),
                "min": [min(w[i] for w in taken) for i in range(plan.n_models)],
                "max": [max(w[i] for w in taken) for i in range(plan.n_models)],
            }
        else:
            summary[name] = {"setting": _plain(setting), "min": min(taken), "max": max(taken)}
    if plan.overrides:
        summary["set"] = [o.describe() for o in plan.overrides]
    return summary


def per_layer_names(plan: MergePlan) -> list[str]:
    method = METHODS[plan.method]
    return [p.name for p in method.parameters if p.per_layer]


def _merged_layers(variables: Sequence[Variable]) -> list[str]:
    layers: dict[str, None] = {}
    for v in variables:
        if v.mergeable:
            layers.setdefault(v.layer, None)
    return list(layers)


def _matching(overrides: Sequence[Override], layer: str) -> list[Override]:
    return [o for o in overrides if fnmatch.fnmatchcase(layer, o.pattern)]


def _winner(found: Sequence[Override], name: str) -> Override | None:
    candidates = [o for o in found if o.name == name]
    if not candidates:
        return None
    return max(candidates, key=lambda o: (o.specificity, o.order))


def _evaluate(setting: Any, t: float, name: str) -> Any:
    if name == "weights":
        return tuple(float(interpolate(w, t)) for w in setting)
    value = interpolate(setting, t)
    return float(value) if isinstance(setting, tuple) else value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _examples(layers: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in layers[:4])
    return shown + (f" ... ({len(layers)} layers)" if len(layers) > 4 else "")
