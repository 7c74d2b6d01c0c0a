"""Ways of choosing how to fuse many models' scores, one module each, and their registry.

Each method module holds `PARAMETERS` (its options, declared once: the CLI, the API's checks and
the docs table come from them) and `choose(problem, **parameters) -> Choice`. Adding a method is
one new module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from fusecli.errors import InvalidRequest
from fusecli.scores.methods import greedy, grid, optimize, stack
from fusecli.scores.methods.base import Choice, Parameter, Problem

METHODS: dict[str, ModuleType] = {
    "grid": grid,
    "greedy": greedy,
    "optimize": optimize,
    "stack": stack,
}


def parameters() -> list[Parameter]:
    """Every method's parameters, each name once."""
    seen: dict[str, Parameter] = {}
    for module in METHODS.values():
        for p in module.PARAMETERS:
            seen.setdefault(p.name, p)
    return list(seen.values())


def check_parameters(given: dict[str, Any]) -> dict[str, Any]:
    """`given` checked against the declarations: unknown names and bad values are usage errors."""
    declared = {p.name: p for p in parameters()}
    for name in given:
        if name not in declared:
            raise InvalidRequest(
                f"Unknown tune parameter {name!r}. Expected one of: {', '.join(declared)}"
            )
    return {name: declared[name].check(value) for name, value in given.items()}


def chooser(name: str, given: dict[str, Any] | None = None) -> Callable[[Problem], Choice]:
    """`choose` of method `name` with its parameters from `given` (checked; others ignored)."""
    if name not in METHODS:
        raise InvalidRequest(f"Expected method to be one of {tuple(METHODS)}. Received: {name!r}")
    module = METHODS[name]
    given = given or {}
    kwargs = {p.name: p.check(given[p.name]) for p in module.PARAMETERS if p.name in given}

    def choose(problem: Problem) -> Choice:
        return module.choose(problem, **kwargs)

    return choose
