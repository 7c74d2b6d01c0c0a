"""Output-level fusion: one new model whose output is the weighted sum of the models' outputs.

    out = w1 * A(x) + w2 * B(x) + ...                 (at="output", the default)
    out = softmax(w1 * zA(x) + w2 * zB(x) + ...)      (at="logits": z, the logits)

Each branch is scaled by a built-in, serializable layer (`Rescaling`) and the branches are joined
by `Add`, so the fused file loads with a plain `keras.models.load_model` (safe_mode on). The
literal recipe `Lambda(lambda x: x * w)` is available as `scale="lambda"` for those who want it;
its file carries Python bytecode and loads only with safe_mode=False.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

from fusecli import runtime
from fusecli.coefficients import resolve_weights
from fusecli.config.models import config_of, rebuild
from fusecli.errors import InvalidRequest, ModelFileError, VerificationError
from fusecli.fusion.graph import Assembly, Branch, Head, assemble, common_axes, prepare_branch
from fusecli.fusion.naming import identifier, unique
from fusecli.fusion.options import ACTIVATIONS, FUSE_AT, INPUT_MODES, SCALE_MODES
from fusecli.output import atomic_output, check_output_path, model_format
from fusecli.safety.loading import checked_files, load_checked

if TYPE_CHECKING:
    import keras

ModelSource: TypeAlias = "str | os.PathLike[str] | keras.Model"
InputsMode = Literal["auto", "shared", "separate"]
ScaleMode = Literal["rescaling", "lambda"]
FuseAt = Literal["output", "logits"]
Activation = Literal["softmax", "none"]


# Size of the random batch used to check a written file, and the length given to free dimensions.
_VERIFY_BATCH = 4
_FREE_DIM = 32
# Beyond this (relative to the outputs' magnitude) a difference is more than float32 round-off.
_RELATIVE_TOLERANCE = 1e-5
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_ROUNDING_ULPS = 4  # for half-precision outputs, where 1e-5 is below one unit in the last place


@dataclass
class Fusion:
    """A fused model together with what it was built from."""

    model: keras.Model
    sources: list[keras.Model]  # what is scaled and added: the models, or their logits
    branches: list[str]
    weights: tuple[float, ...]
    inputs_mode: Literal["shared", "separate"]
    inputs_reason: str
    scale: ScaleMode
    input_slots: list[list[int]]  # for each branch, its inputs' positions in the fused model's
    at: FuseAt
    activation: Activation
    axes: list[int]  # the softmax axis of each output (at="logits")
    originals: list[keras.Model]  # the models as loaded
    assembly: Assembly  # the fused config it was built from

    @property
    def formula(self) -> str:
        total = "sum(w_i * M_i(x))" if self.at == "output" else "sum(w_i * logits_i(x))"
        return total if self.activation == "none" else f"softmax({total})"


@dataclass
class FusionReport:
    """What `fuse_to_file` wrote; `as_dict()` is the CLI's `--json` document."""

    output: str
    format: str
    models: list[str]
    branches: list[str]
    weights: list[float]
    scale: str
    at: str
    activation: str
    formula: str
    inputs_mode: str
    inputs_reason: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    params: int
    max_abs_diff: float | None  # from the numeric check (verify), else None
    verify: dict[str, Any] | None = None  # the numeric check: result, max_abs_diff, reason
    check: dict[str, Any] | None = None  # what the file-level proof checked
    converted: list[str] = field(default_factory=list)  # inputs Keras loaded to lay them out

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fuse(
    models: Sequence[ModelSource],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    scale: ScaleMode = "rescaling",
    inputs: InputsMode = "auto",
    at: FuseAt = "output",
    activation: Activation | None = None,
    trust: bool = False,
) -> keras.Model:
    """Fuse saved or loaded Keras models into one whose output is sum(w_i * M_i(x)).

    `models` are paths (.keras/.h5) or loaded `keras.Model`s; `weights` default to 1/N each,
    and are rescaled to sum to 1 unless `normalize=False` (as in every command: `--w 1 1`
    averages).
    `inputs`: "shared" feeds one set of inputs to every model, "separate" gives each model its
    own, "auto" picks shared when all models' inputs match.
    `at="logits"` adds the models' outputs before their final softmax; `activation` is then
    applied to the sum ("softmax", the default at the logits, or "none").
    """
    return build_fusion(
        models,
        weights,
        normalize=normalize,
        scale=scale,
        inputs=inputs,
        at=at,
        activation=activation,
        trust=trust,
    ).model


def fuse_to_file(
    models: Sequence[ModelSource],
    output: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    scale: ScaleMode = "rescaling",
    inputs: InputsMode = "auto",
    at: FuseAt = "output",
    activation: Activation | None = None,
    trust: bool = False,
    force: bool = False,
    verify: bool | None = None,
) -> FusionReport:
    """Fuse `models` (see `fuse` for the options) and write the result to `output` (.keras or
    .h5), atomically.

    Model files are fused as files (`fusecli.fusion.file_fusion`): the written file is then
    re-opened and proved, without Keras, to hold the models' configs, the head asked for and
    every tensor bit for bit. `verify=True` adds the numeric check: the file is loaded in Keras
    and its output on a random batch compared with what it should compute. Loaded
    `keras.Model`s are fused in Keras and numerically verified unless `verify=False`. A file
    that fails is deleted.
    """
    fmt = model_format(output)
    checked = _check_request(
        models,
        weights,
        normalize=normalize,
        scale=scale,
        inputs=inputs,
        at=at,
        activation=activation,
    )
    paths = [m for m in models if isinstance(m, str | os.PathLike)]
    output = check_output_path(output, inputs=paths, force=force)
    if len(paths) == len(models):
        return _fuse_paths(
            paths,
            output,
            fmt,
            checked,
            scale=scale,
            inputs=inputs,
            at=at,
            activation=activation,
            trust=trust,
            force=force,
            verify=bool(verify),
        )
    fusion = _build(
        models, checked, scale=scale, inputs=inputs, at=at, activation=activation, trust=trust
    )
    numeric = None
    with atomic_output(output, force=force) as tmp:
        fusion.model.save(tmp)
        if verify is None or verify:
            numeric = check_numerically(fusion, tmp)
    return FusionReport(
        output=str(output),
        format=fmt,
        models=[_describe_source(m) for m in models],
        branches=fusion.branches,
        weights=list(fusion.weights),
        scale=fusion.scale,
        at=fusion.at,
        activation=fusion.activation,
        formula=fusion.formula,
        inputs_mode=fusion.inputs_mode,
        inputs_reason=fusion.inputs_reason,
        inputs=fusion.assembly.inputs,
        outputs=fusion.assembly.outputs,
        params=int(fusion.model.count_params()),
        max_abs_diff=None if numeric is None else numeric.max_abs_diff,
        verify=None if numeric is None else numeric.as_dict(),
    )


def _fuse_paths(
    paths: list[str | os.PathLike[str]],
    output: Path,
    fmt: str,
    weights: tuple[float, ...],
    *,
    scale: ScaleMode,
    inputs: InputsMode,
    at: FuseAt,
    activation: Activation | None,
    trust: bool,
    force: bool,
    verify: bool,
) -> FusionReport:
    """`fuse_to_file` on model files: at file level, proved; Keras only for `verify`."""
    from fusecli.fusion.file_fusion import fuse_files

    activation = activation or ("softmax" if at == "logits" else "none")
    numeric: list[NumericCheck] = []

    def verify_written(tmp: Path) -> None:
        fusion = _build(
            paths, weights, scale=scale, inputs=inputs, at=at, activation=activation, trust=trust
        )
        numeric.append(check_numerically(fusion, tmp))

    done = fuse_files(
        paths,
        output,
        fmt,
        weights,
        scale=scale,
        inputs=inputs,
        at=at,
        activation=activation,
        trust=trust,
        force=force,
        after_write=verify_written if verify else None,
    )
    assembly = done.assembly
    total = "sum(w_i * M_i(x))" if at == "output" else "sum(w_i * logits_i(x))"
    result = numeric[0] if numeric else None
    return FusionReport(
        output=str(output),
        format=fmt,
        models=[str(p) for p in paths],
        branches=[b.name for b in assembly.branches],
        weights=list(weights),
        scale=scale,
        at=at,
        activation=activation,
        formula=total if activation == "none" else f"softmax({total})",
        inputs_mode=assembly.inputs_mode,
        inputs_reason=assembly.inputs_reason,
        inputs=assembly.inputs,
        outputs=assembly.outputs,
        params=done.params,
        max_abs_diff=None if result is None else result.max_abs_diff,
        verify=None if result is None else result.as_dict(),
        check=done.check,
        converted=done.converted,
    )


def build_fusion(
    models: Sequence[ModelSource],
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    scale: ScaleMode = "rescaling",
    inputs: InputsMode = "auto",
    at: FuseAt = "output",
    activation: Activation | None = None,
    trust: bool = False,
) -> Fusion:
    """Load what needs loading and build the fused model; see `fuse`."""
    checked = _check_request(
        models,
        weights,
        normalize=normalize,
        scale=scale,
        inputs=inputs,
        at=at,
        activation=activation,
    )
    return _build(
        models, checked, scale=scale, inputs=inputs, at=at, activation=activation, trust=trust
    )


def _build(
    models: Sequence[ModelSource],
    weights: tuple[float, ...],
    *,
    scale: ScaleMode,
    inputs: InputsMode,
    at: FuseAt,
    activation: Activation | None,
    trust: bool,
    head: Head | None = None,
) -> Fusion:
    """`build_fusion` for a request `_check_request` has passed (weights resolved).

    The fused graph is decided on configs, by `fusecli.fusion.graph`, as for model files: each
    model's config (cut at the logits if asked) is renamed and nested, the fused model is built
    from the fused config and each branch takes its model's weights. `head`, if given, joins the
    branches' outputs instead of the weighted sum (a tune recipe's, `fusecli.fusion.recipe_head`).
    """
    activation = activation or ("softmax" if at == "logits" else "none")
    originals = _load_sources(models, trust=trust)
    names = _branch_names(models, originals)
    branches = [
        prepare_branch(config_of(model, name), name, at=at)
        for model, name in zip(originals, names, strict=True)
    ]
    for branch, model in zip(branches, originals, strict=True):
        _fill_output_shapes(branch, model)
    axes = common_axes(branches) if at == "logits" else None
    assembly = assemble(
        branches, weights, scale=scale, inputs=inputs, activation=activation, axes=axes, head=head
    )
    fused = rebuild(assembly.config, "fused")
    for branch, model in zip(branches, originals, strict=True):
        fused.get_layer(branch.name).set_weights(model.get_weights())
    sources = originals
    if at == "logits":  # the reference of the numeric check: each model's logits on its own
        sources = [
            rebuild(branch.given, branch.name, model.get_weights())
            for branch, model in zip(branches, originals, strict=True)
        ]
    return Fusion(
        model=fused,
        sources=sources,
        branches=names,
        weights=weights,
        inputs_mode=assembly.inputs_mode,
        inputs_reason=assembly.inputs_reason,
        scale=scale,
        input_slots=assembly.input_slots,
        at=at,
        activation=activation,
        axes=axes or [-1] * len(assembly.outputs),
        originals=originals,
        assembly=assembly,
    )


def _fill_output_shapes(branch: Branch, model: keras.Model) -> None:
    """An output shape the config does not determine is the loaded model's (the cut at the
    logits keeps every output's shape)."""
    if all(shape is not None for shape in branch.output_shapes):
        return
    tensors = runtime.keras().tree.flatten(model.outputs)
    if len(tensors) == len(branch.output_shapes):
        branch.output_shapes = [
            known if known is not None else list(t.shape)
            for known, t in zip(branch.output_shapes, tensors, strict=True)
        ]


@dataclass
class NumericCheck:
    """The numeric check's outcome: "passed", or "inconclusive" (with the reason) when the
    models' outputs on the random batch could not show a wrong weight."""

    result: str
    max_abs_diff: float
    tolerance: float
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def verify_file(fusion: Fusion, path: str | os.PathLike[str]) -> float:
    """Load `path` as a user would; compare its output with act(sum(w_i * M_i(x))) on random
    input (M_i: the models, or their logits with `at="logits"`).

    Returns the largest absolute difference; raises `VerificationError` beyond round-off.
    """
    return check_numerically(fusion, path).max_abs_diff


def check_numerically(fusion: Fusion, path: str | os.PathLike[str]) -> NumericCheck:
    """`verify_file`, saying also whether the comparison could have seen a wrong weight.

    It could not when a model's output barely varies across the batch (an untrained softmax
    net gives uniform outputs whatever its weights), or when two models whose weights differ give
    the same outputs (their weights could be swapped unseen): "inconclusive", with the reason.
    """
    keras = runtime.keras()
    try:
        loaded = keras.saving.load_model(path, safe_mode=fusion.scale != "lambda")
    except Exception as e:
        raise VerificationError(f"The written model does not load back: {e}") from e
    batch = random_batch(fusion.model.inputs)
    got = [np.asarray(o) for o in keras.tree.flatten(loaded(batch, training=False))]
    expected, magnitude, rounding = None, 0.0, _rounding(got)
    terms_by_model = []
    for i, (model, w, slot) in enumerate(
        zip(fusion.sources, fusion.weights, fusion.input_slots, strict=True)
    ):
        args = [batch[k] for k in slot]
        raw = _call(model, args, keras)
        rounding = max(rounding, _rounding(raw))
        outs = [np.asarray(o, dtype=np.float64) for o in raw]
        if fusion.at == "logits":
            _check_cut(fusion, i, args, outs, rounding, keras)
        magnitude = max([magnitude, *(_finite_max_abs(o) * abs(w) for o in outs)])
        terms_by_model.append(outs)
        terms = [w * o for o in outs]
        expected = (
            terms if expected is None else [e + t for e, t in zip(expected, terms, strict=True)]
        )
    if fusion.activation == "softmax":
        expected = [_softmax(e, axis) for e, axis in zip(expected, fusion.axes, strict=True)]
        magnitude = 1.0
    tolerance = rounding * max(1.0, magnitude) * len(fusion.sources)
    worst = _largest_difference(got, expected)
    if worst > tolerance:
        raise VerificationError(
            f"The written model differs from {fusion.formula} by up to {worst:.3g} "
            f"(tolerance {tolerance:.3g}); the file was not kept"
        )
    reason = _why_inconclusive(fusion, terms_by_model, tolerance)
    return NumericCheck(
        result="passed" if reason is None else "inconclusive",
        max_abs_diff=worst,
        tolerance=tolerance,
        reason=reason,
    )


def _why_inconclusive(
    fusion: Fusion, outputs: list[list[np.ndarray]], tolerance: float
) -> str | None:
    """Why a difference within `tolerance` does not show the weights are right, if it does not."""
    for name, w, outs in zip(fusion.branches, fusion.weights, outputs, strict=True):
        spread = max((_spread(o) for o in outs), default=0.0)
        if w != 0 and spread * abs(w) <= 10 * tolerance:
            return (
                f"model {name!r} gives the same output for every input of the random batch "
                f"(spread {spread:.3g}, tolerance {tolerance:.3g}), so wrong weights in it would "
                "not show; check with inputs it responds to"
            )
    for i in range(len(outputs)):
        for k in range(i + 1, len(outputs)):
            if fusion.weights[i] == fusion.weights[k]:
                continue
            gap = max(_finite_max_abs(a - b) for a, b in zip(outputs[i], outputs[k], strict=True))
            if gap * abs(fusion.weights[i] - fusion.weights[k]) <= 10 * tolerance:
                return (
                    f"models {fusion.branches[i]!r} and {fusion.branches[k]!r} give the same "
                    f"outputs on the random batch (largest difference {gap:.3g}), so swapped "
                    "weights would not show"
                )
    return None


def _spread(values: np.ndarray) -> float:
    """How much an output varies across the batch (axis 0)."""
    if values.ndim == 0 or values.shape[0] < 2:
        return 0.0
    finite = np.where(np.isfinite(values), values, 0.0)
    return float(np.max(np.max(finite, axis=0) - np.min(finite, axis=0)))


def _check_cut(
    fusion: Fusion, i: int, args: list, logits: list[np.ndarray], rounding: float, keras: Any
) -> None:
    """softmax(logits) must give back the original model's output: the cut is right."""
    original = [np.asarray(o, dtype=np.float64) for o in _call(fusion.originals[i], args, keras)]
    recomputed = [_softmax(z, axis) for z, axis in zip(logits, fusion.axes, strict=True)]
    worst = _largest_difference(recomputed, original)
    if worst > rounding * len(fusion.sources):
        raise VerificationError(
            f"softmax of the logits of {fusion.branches[i]!r} differs from its output by "
            f"{worst:.3g}; cannot fuse it at the logits"
        )


def _rounding(outputs: Sequence[Any]) -> float:
    """The relative difference that is still round-off for these outputs: _RELATIVE_TOLERANCE
    for float32 and wider; a few units in the last place for float16 and bfloat16 outputs
    (mixed precision)."""
    return max([_RELATIVE_TOLERANCE, *(_ROUNDING_ULPS * _eps(o) for o in outputs)])


def _eps(values: Any) -> float:
    dtype = np.asarray(values).dtype
    if dtype.name == "bfloat16":  # ml_dtypes' type, which np.finfo does not know
        return 2.0**-7
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _largest_difference(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    worst = 0.0
    for j, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise VerificationError(
                f"Output {j} of the written model has shape {g.shape}, expected {e.shape}"
            )
        if not np.array_equal(np.isfinite(g), np.isfinite(e)):
            raise VerificationError(
                f"Output {j} of the written model is not finite where the expected output is "
                "(or the other way round)"
            )
        finite = np.isfinite(e)
        if finite.any():
            worst = max(worst, float(np.max(np.abs(g[finite] - e[finite]))))
    return worst


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def random_batch(inputs: Sequence[Any], *, seed: int = 0) -> list[np.ndarray]:
    """A small random batch for `inputs` (symbolic tensors): free dimensions get a modest size,
    integer inputs get 0s and 1s (valid indices for any embedding)."""
    rng = np.random.default_rng(seed)
    batch = []
    for tensor in inputs:
        shape = [
            _VERIFY_BATCH if i == 0 and d is None else (d or _FREE_DIM)
            for i, d in enumerate(tensor.shape)
        ]
        if str(tensor.dtype) == "string":  # StringLookup, TextVectorization...: short words
            batch.append(rng.choice(np.array(["0", "1", "a", ""], dtype=object), size=shape))
            continue
        try:
            dtype = np.dtype(str(tensor.dtype))
        except TypeError:  # a dtype numpy does not know
            dtype = np.dtype(object)
        if dtype.kind == "f":
            batch.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind in "iu":
            batch.append(rng.integers(0, 2, size=shape).astype(dtype))
        elif dtype.kind == "b":
            batch.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            raise VerificationError(
                f"Cannot make random input of dtype {tensor.dtype} to check the written model; "
                "use --no-verify"
            )
    return batch


# -- helpers ---------------------------------------------------------------------------------


def _check_request(
    models: Sequence[ModelSource],
    weights: Sequence[float] | None,
    *,
    normalize: bool,
    scale: str,
    inputs: str,
    at: str,
    activation: str | None,
) -> tuple[float, ...]:
    if at not in FUSE_AT:
        raise InvalidRequest(f"Expected at to be one of {FUSE_AT}. Received: {at!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise InvalidRequest(
            f"Expected activation to be one of {ACTIVATIONS}. Received: {activation!r}"
        )
    if len(models) < 2:
        raise InvalidRequest(f"Expected two or more models to fuse. Received: {len(models)}")
    if scale not in SCALE_MODES:
        raise InvalidRequest(f"Expected scale to be one of {SCALE_MODES}. Received: {scale!r}")
    if inputs not in INPUT_MODES:
        raise InvalidRequest(f"Expected inputs to be one of {INPUT_MODES}. Received: {inputs!r}")
    resolved = resolve_weights(weights, len(models), normalize=normalize)
    if any(abs(w) > _FLOAT32_MAX for w in resolved):
        raise InvalidRequest(
            "Weights must fit in float32, the type the fused model scales by. "
            f"Received: weights={resolved}"
        )
    return resolved


def _load_sources(models: Sequence[ModelSource], *, trust: bool) -> list[keras.Model]:
    # Every file is read and scanned before the first (slow) Keras load, so a bad file among
    # several is reported at once; Keras loads the very bytes that were scanned.
    paths = [item for item in models if isinstance(item, str | os.PathLike)]
    with checked_files(paths, trust=trust) as files:
        loaded = [load_checked(checked, trust=trust) for checked in files]
    keras = runtime.keras()
    sources: list[keras.Model] = []
    for item in models:
        if isinstance(item, str | os.PathLike):
            model = loaded.pop(0)
            _check_finite(model, item)
        elif isinstance(item, keras.Model):
            model = item
        else:
            raise InvalidRequest(
                f"Expected model file paths or keras.Model objects. Received: {type(item)}"
            )
        sources.append(model)
    return sources


def _check_finite(model: keras.Model, path: str | os.PathLike[str]) -> None:
    for variable in model.weights:
        values = np.asarray(variable)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ModelFileError(path, f"weight {variable.path!r} holds NaN or infinite values")


def _branch_names(models: Sequence[ModelSource], sources: list[keras.Model]) -> list[str]:
    taken: set[str] = set()
    names = []
    for item, model in zip(models, sources, strict=True):
        base = Path(item).stem if isinstance(item, str | os.PathLike) else model.name
        names.append(unique(identifier(base), taken))
    return names


def _pack_inputs(model: keras.Model, args: list[Any], keras: Any) -> Any:
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, args)
    return args[0] if len(args) == 1 else args


def _call(model: keras.Model, args: list[Any], keras: Any) -> list[Any]:
    return keras.tree.flatten(model(_pack_inputs(model, args, keras), training=False))


def _finite_max_abs(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def _describe_source(item: ModelSource) -> str:
    return str(item) if isinstance(item, str | os.PathLike) else f"<model {item.name}>"
