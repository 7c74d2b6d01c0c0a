"""Weight-space merge methods, one module each (as in mergekit's merge_methods/).

Adding a method: a module holding `METHOD = Method(...)` (its parameters drawn from
`parameters.py` or declared there), and one line below. The CLI's options, the checks of
`plan_merge`, `fusecli merge --help` and the table in docs/merge.md are read from the
declarations. Importing this package imports no numpy: each method imports it when it merges.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from fusecli.errors import InvalidRequest
from fusecli.merging.methods import (
    breadcrumbs,
    dare_linear,
    dare_ties,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from fusecli.merging.methods.base import MergePlan, Method, Override
from fusecli.merging.methods.parameters import Parameter

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        linear.METHOD,
        slerp.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare_linear.METHOD,
        dare_ties.METHOD,
        breadcrumbs.METHOD,
        model_stock.METHOD,
    )
}

__all__ = ["METHODS", "MergePlan", "Method", "Override", "all_parameters", "plan_merge"]


def plan_merge(
    method: str,
    n_models: int,
    *,
    weights: Sequence[Any] | None = None,
    has_base: bool = False,
    overrides: Iterable[str | Override] = (),
    **parameters: Any,
) -> MergePlan:
    """Check a merge request against its method's declarations before any file is opened.

    `parameters` are the method's by name (`lambda_` for lambda); None means not given.
    """
    if method not in METHODS:
        raise InvalidRequest(
            f"Expected method to be one of {tuple(METHODS)}. Received: method={method!r}"
        )
    m = METHODS[method]
    if n_models < m.min_models or (m.max_models is not None and n_models > m.max_models):
        raise InvalidRequest(
            f"{method} merges {_count(m)}. Received: {n_models} model{'s' * (n_models != 1)}"
        )
    if m.needs_base and not has_base:
        raise InvalidRequest(f"{method} needs the model the others were fine-tuned from: --base")
    if has_base and not m.needs_base:
        raise InvalidRequest(f"{method} takes no --base{_takes(m)}")
    given: dict[str, Any] = {}
    for key, value in parameters.items():
        if value is None:
            continue
        declared = _declared(m, key)
        if declared is None:
            raise InvalidRequest(
                f"{_flag(key)} is not a parameter of {method}{_takes(m)}. "
                f"Received: {key.rstrip('_')}={_show(value)}"
            )
        given[declared.name] = declared.check(value, method=method)
    if weights is not None:
        declared = m.parameter("weights")
        if declared is None:
            raise InvalidRequest(
                f"{method} takes no weights{_takes(m)}. Received: weights={_show(weights)}"
            )
        checked = declared.check(weights, method=method)
        if len(checked) != n_models:
            raise InvalidRequest(
                f"Expected one weight per model ({n_models} models). "
                f"Received: weights={_show(checked)}"
            )
        given["weights"] = checked
    settings: dict[str, Any] = {}
    for p in m.parameters:
        if p.name in given:
            settings[p.name] = given[p.name]
        elif p.required:
            raise InvalidRequest(f"{method} needs {p.flag} (in {p.range_text()})")
        elif p.name == "weights":
            settings[p.name] = (
                (1.0 / n_models,) * n_models if p.default is None else (p.default,) * n_models
            )
        else:
            settings[p.name] = p.default
    checked_overrides = tuple(_override(m, o, i, n_models) for i, o in enumerate(overrides))
    return MergePlan(
        method=method,
        n_models=n_models,
        settings=settings,
        given=frozenset(given),
        overrides=checked_overrides,
        needs_base=m.needs_base,
    )


def all_parameters() -> list[Parameter]:
    """Every parameter some method takes, once each (the CLI makes one option of each)."""
    seen: dict[str, Parameter] = {}
    for m in METHODS.values():
        for p in m.parameters:
            if p.name in seen and seen[p.name].kind != p.kind:
                raise AssertionError(f"parameter {p.name!r} is declared with two types")
            seen.setdefault(p.name, p)
    return list(seen.values())


def methods_taking(name: str) -> list[Method]:
    return [m for m in METHODS.values() if m.parameter(name) is not None]


def methods_table() -> str:
    """The Markdown table of docs/merge.md: every method, its formula and its parameters."""
    lines = ["| method | result | base | parameters (default) |", "|---|---|---|---|"]
    for m in METHODS.values():
        params = "; ".join(
            f"`{'--w' if p.name == 'weights' else p.flag}` ({p.describe_default()})"
            for p in m.parameters
        )
        base = "required" if m.needs_base else "no"
        lines.append(f"| `{m.name}` | {m.formula} | {base} | {params or 'none'} |")
    return "\n".join(lines)


def parameters_table() -> str:
    """The Markdown table of the parameters: type, range, which methods take them, help."""
    lines = ["| option | values | per layer | methods | meaning |", "|---|---|---|---|---|"]
    for p in all_parameters():
        flag = "--w, --weights" if p.name == "weights" else p.flag
        methods = ", ".join(f"`{m.name}`" for m in methods_taking(p.name))
        per_layer = "yes" if p.per_layer else "no"
        values = "one per model" if p.kind == "weights" else p.range_text().replace("|", ", ")
        lines.append(f"| `{flag}` | {values} | {per_layer} | {methods} | {p.help} |")
    return "\n".join(lines)


def _declared(m: Method, key: str) -> Parameter | None:
    name = key[:-1] if key.endswith("_") else key
    return m.parameter(name.replace("-", "_")) or m.parameter(name)


def _override(m: Method, override: str | Override, order: int, n_models: int) -> Override:
    """`PATTERN:NAME=VALUE` checked against the method's declarations."""
    if isinstance(override, Override):
        pattern, name, value = override.pattern, override.name, override.setting
    else:
        left, eq, value = override.partition("=")
        pattern, colon, name = left.rpartition(":")
        if not (eq and colon and pattern and name and value):
            raise InvalidRequest(
                f"--set takes PATTERN:NAME=VALUE (e.g. 'conv*:density=0.3'). Received: {override!r}"
            )
    declared = _declared(m, name.strip())
    if declared is None:
        raise InvalidRequest(
            f"--set {override if isinstance(override, str) else override.describe()!r}: "
            f"{name} is not a parameter of {m.name}{_takes(m)}"
        )
    if not declared.per_layer:
        raise InvalidRequest(
            f"--set {pattern}:{name}=...: {declared.flag} is one value for the whole model, "
            f"not per layer"
        )
    if declared.kind == "weights" and isinstance(value, str):
        value = parse_weight_list(value)
    setting = declared.check(value, method=m.name)
    if declared.kind == "weights" and len(setting) != n_models:
        raise InvalidRequest(
            f"Expected one weight per model ({n_models} models) in --set {pattern}:weights. "
            f"Received: weights={_show(setting)}"
        )
    return Override(pattern, declared.name, setting, order)


def parse_weight_list(text: str) -> tuple[Any, ...]:
    """ "0.5,0.3" or "0.5 0.3": one weight per model; "0.2:0.8" is one model's gradient."""
    weights: list[Any] = []
    for part in text.replace(",", " ").split():
        try:
            points = tuple(float(x) for x in part.split(":"))
        except ValueError:
            raise InvalidRequest(
                f"Weights must be numbers (a gradient's points joined by ':'). "
                f"Received: weights={text!r}"
            ) from None
        weights.append(points if len(points) > 1 else points[0])
    if not weights:
        raise InvalidRequest(f"Expected at least one number. Received: weights={text!r}")
    return tuple(weights)


def _count(m: Method) -> str:
    low = _WORDS.get(m.min_models, str(m.min_models))
    if m.max_models == m.min_models:
        return f"exactly {low} models"
    if m.max_models is None:
        return f"{low} or more model{'s' if m.min_models > 1 else ''}"
    return f"{low} to {_WORDS.get(m.max_models, str(m.max_models))} models"


_WORDS = {1: "one", 2: "two", 3: "three"}


def _takes(m: Method) -> str:
    names = [("--w" if p.name == "weights" else p.flag) for p in m.parameters]
    return f" (it takes {', '.join(names)})" if names else " (it takes no parameters)"


def _flag(key: str) -> str:
    return "--" + key.rstrip("_").replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(
            ":".join(f"{x:g}" for x in v) if isinstance(v, tuple) else _show(v) for v in value
        )
    return f"{value:g}" if isinstance(value, float) else str(value)
