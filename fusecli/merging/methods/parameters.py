"""Merge parameters, each declared once: name, type, range, default, help.

A method lists the parameters it takes (mergekit's `ConfigParameterDef`, with a type and a
range); the CLI's options, the API's checks, `--help` and the table in docs/merge.md are all
read from these declarations. A per-layer parameter may be given as a list, a gradient
interpolated over the model's layers in order (`evaluate_setting` in mergekit's config.py), or
set for the layers whose path matches a pattern (`--set 'conv*:density=0.3'`).

Imports nothing heavy: `fusecli merge --help` reads these.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fusecli.errors import InvalidRequest

Kind = Literal["float", "int", "bool", "choice", "weights"]
# A scalar, or a tuple of floats: a gradient over the layers (one weight per model for weights).
Setting = Any


@dataclass(frozen=True)
class Parameter:
    """One parameter a merge method takes."""

    name: str
    kind: Kind
    help: str
    default: Any = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    per_layer: bool = False  # may be a list (a gradient over depth) or set by a --set pattern
    default_text: str | None = None  # how the default reads in --help and the docs
    required: bool = False

    def with_default(self, default: Any, text: str | None = None) -> Parameter:
        return dataclasses.replace(self, default=default, default_text=text)

    def as_required(self) -> Parameter:
        return dataclasses.replace(self, default=None, default_text="required", required=True)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        """The Python keyword argument: `lambda` is spelled `lambda_`."""
        name = self.name.replace("-", "_")
        return name + "_" if keyword.iskeyword(name) else name

    def range_text(self) -> str:
        if self.kind == "choice":
            return "|".join(self.choices)
        if self.kind == "bool":
            return "true|false"
        if self.low is None and self.high is None:
            return "any"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{lo}, {hi}{closing}"

    def describe_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return (
            "none"
            if self.default is None
            else f"{self.default:g}"
            if isinstance(self.default, float)
            else str(self.default)
        )

    def check(self, value: Any, *, method: str) -> Setting:
        """`value` checked against the declaration (a gradient only if per-layer)."""
        if self.kind == "weights":
            return self._weights(value, method)
        if isinstance(value, str) and self.kind in ("float", "int"):
            value = parse_numbers(value, self)
        if isinstance(value, list | tuple) and self.kind != "weights":
            values = tuple(value)
            if not self.per_layer or len(values) == 0:
                raise InvalidRequest(
                    f"{self.flag} takes one value for {method}, not a list. "
                    f"Received: {self.name}={_show(values)}"
                )
            if len(values) == 1:
                return self._scalar(values[0])
            return tuple(self._scalar(v) for v in values)
        return self._scalar(value)

    def _weights(self, value: Any, method: str) -> tuple[Any, ...]:
        """One weight per model, each a number or a gradient (a tuple of numbers)."""
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise InvalidRequest(f"Expected one weight per model. Received: weights={value!r}")
        weights = []
        for w in value:
            if isinstance(w, list | tuple):
                if len(w) == 0:
                    raise InvalidRequest(f"A weight's gradient is empty. Received: weights={value}")
                weights.append(
                    tuple(self._number(x) for x in w) if len(w) > 1 else self._number(w[0])
                )
            else:
                weights.append(self._number(w))
        return tuple(weights)

    def _number(self, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidRequest(f"Weights must be finite numbers. Received: {self.name}={value!r}")
        return float(value)

    def _scalar(self, value: Any) -> Any:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidRequest(
                    f"{self.flag} is true or false. Received: {self.name}={value!r}"
                )
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise InvalidRequest(
                    f"Expected {self.flag} to be one of {self.choices}. "
                    f"Received: {self.name}={value!r}"
                )
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise InvalidRequest(
                        f"{self.flag} is a whole number. Received: {self.name}={value!r}"
                    )
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{self.flag} is a number. Received: {self.name}={value!r}")
        else:
            value = float(value)
        if not math.isfinite(value) or not self._in_range(value):
            raise InvalidRequest(
                f"{self.flag} must be in {self.range_text()}. Received: {self.name}={value:g}"
            )
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (
            self.high is not None and (value > self.high or (self.high_open and value == self.high))
        )


def parse_numbers(text: str, parameter: Parameter) -> float | tuple[float, ...]:
    """ "0.3" -> 0.3; "0.2,0.5,0.8" -> a gradient."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise InvalidRequest(
            f"{parameter.flag} takes a number or a comma-separated list of numbers. "
            f"Received: {parameter.name}={text!r}"
        ) from None
    if not values:
        raise InvalidRequest(f"{parameter.flag} needs a value. Received: {parameter.name}={text!r}")
    return values[0] if len(values) == 1 else values


def interpolate(setting: Setting, t: float) -> Any:
    """A gradient's value at depth `t` in [0, 1], as mergekit's `evaluate_setting` computes it:
    linear between the list's points, spread evenly from the first layer to the last."""
    if not isinstance(setting, tuple):
        return setting
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]


def _show(values: Sequence[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


# -- the declarations every method draws from ------------------------------------------------

WEIGHTS = Parameter(
    "weights",
    "weights",
    "One weight per model (--w 0.5 0.3 0.2); a model's weight may be a gradient over the "
    "layers, its points joined by ':' (--w 0.2:0.8 0.5).",
    default=1.0,
    per_layer=True,
    default_text="1 each",
)
NORMALIZE = Parameter(
    "normalize",
    "bool",
    "Divide the result by the sum of the weights (for ties: of the models that agree in sign, "
    "per entry).",
    default=False,
)
T = Parameter(
    "t",
    "float",
    "Interpolation factor: 0 gives the first model, 1 the second.",
    low=0.0,
    high=1.0,
    per_layer=True,
)
DENSITY = Parameter(
    "density",
    "float",
    "Fraction of each task vector's entries kept, per tensor.",
    default=1.0,
    low=0.0,
    high=1.0,
    low_open=True,
    per_layer=True,
)
GAMMA = Parameter(
    "gamma",
    "float",
    "Fraction of each task vector's largest-magnitude entries dropped as outliers.",
    default=0.01,
    low=0.0,
    high=1.0,
    high_open=True,
    per_layer=True,
)
LAMBDA = Parameter(
    "lambda",
    "float",
    "Scale of the merged task vector before it is added to the base.",
    default=1.0,
    per_layer=True,
)
SEED = Parameter(
    "seed",
    "int",
    "Seed of the random drops: the same seed gives the same file.",
    default=0,
    low=0,
)
RESCALE = Parameter(
    "rescale",
    "choice",
    "How the kept entries are scaled up: l1 matches the task vector's L1 norm (mergekit), "
    "density divides by the density (the DARE paper), none keeps them.",
    default="l1",
    choices=("l1", "density", "none"),
)
FILTER_WISE = Parameter(
    "filter_wise",
    "bool",
    "Compute the interpolation ratio per row of each tensor instead of per tensor.",
    default=False,
)


def too_sparse(values: dict[str, Any], shape: tuple[int, ...]) -> str | None:
    """A density that keeps no entry of a tensor (mergekit stops on it mid-merge; we refuse it
    before any tensor is read)."""
    density = values.get("density", 1.0)
    size = math.prod(shape)
    if density < 1 and int(density * size) < 1:
        return (
            f"--density {density:g} keeps none of its {size} entries (needs {1 / size:.3g} or more)"
        )
    return None
