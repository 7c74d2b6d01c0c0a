"""Weight-space merging of same-architecture models, streamed from the files.

The methods (linear, slerp, task-arithmetic, ties, dare-linear, dare-ties, breadcrumbs,
model-stock) live in `methods/`, one module each, with their parameters declared there; the
per-tensor values (gradients over the layers, `--set` patterns) are resolved in `settings.py`.

Nothing is built and TensorFlow is never imported. Everything that can be wrong with the request
is found before a tensor is read: the parameters against their declarations, the files' configs
and variable lists against each other, and every tensor's parameter values (patterns that match
nothing, densities that keep nothing). Then one variable at a time is read from every model,
combined, and written. Peak memory is a few copies of the largest tensor.

The output takes the first input of its format as a template: its config, metadata and layout
are copied, its tensors replaced by the merged ones, and training state (optimizer variables,
compile settings) dropped. A .keras output therefore needs a .keras input, an .h5 output an .h5
input; but Keras 2 era `.h5` inputs go into a `.keras` output too, converted as a file
(`fusecli.merging.keras2_convert`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.errors import FusecliError, InvalidRequest, ModelFileError, VerificationError
from fusecli.formats import archive, splice
from fusecli.formats.keras2 import check_keras2_layout, loadable_keras2_config
from fusecli.formats.modelfile import (
    CONFIG_MEMBER,
    NPZ_WEIGHTS_MEMBER,
    WEIGHTS_MEMBER,
    ModelFile,
    held_open,
    open_weights,
    read_model_file,
)
from fusecli.formats.recipe import Pending, Recipe, keras_metadata, write_h5_recipe
from fusecli.formats.weights_layout import (
    TRAINING_STATE_GROUPS,
    Layout,
    Variable,
    architecture_difference,
    read_layout,
    read_tensor,
)
from fusecli.merging.methods import METHODS, MergePlan, Override, plan_merge
from fusecli.merging.relatedness import Relatedness, warnings_from
from fusecli.merging.settings import per_layer_names, resolve_settings, summarize
from fusecli.output import atomic_output, check_output_path, model_format
from fusecli.safety.isolation import call_isolated_each, call_isolated_write
from fusecli.safety.loading import identity
from fusecli.safety.scan import Finding, refuse_findings, refuse_written, scan, scan_config

Progress = Callable[[int, int], None]

DTYPES = ("float32", "float16", "bfloat16")

_H5_WEIGHTS_GROUP = "model_weights"
_H5_TRAINING_ATTRS = ("training_config",)
# Members of the written .keras archive are dated so: the same inputs give the same bytes.
_ARCHIVE_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class MergeReport:
    """What `merge` wrote; `as_dict()` is the CLI's `--json` document."""

    output: str
    format: str
    method: str
    models: list[str]
    base: str | None
    weights: list[float] | None
    t: float | None
    template: str
    tensors: int
    merged: int
    copied: int
    parameters: int
    bytes: int
    verified: bool
    seed: int | None = None
    dtype: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    per_tensor: list[dict[str, Any]] = field(default_factory=list)
    relatedness: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge(
    models: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    weights: Sequence[Any] | None = None,
    *,
    method: str = "linear",
    base: str | os.PathLike[str] | None = None,
    overrides: Iterable[str | Override] = (),
    dtype: str | None = None,
    force: bool = False,
    verify: bool = True,
    trust: bool = False,
    progress: Progress | None = None,
    **parameters: Any,
) -> MergeReport:
    """Merge the weights of same-architecture model files into `output` (.keras or .h5).

    `method` is a name in `fusecli.merging.methods.METHODS`; `parameters` are its parameters by
    name (`t=0.5`, `density=0.5` or a gradient `density=(0.2, 0.8)`, `lambda_=0.9`, `seed=1`,
    ...), checked against its declarations. `weights`: one per model, each a number or a
    gradient. `overrides`: "PATTERN:NAME=VALUE" strings, a parameter for the layers whose path
    matches. `dtype`: "float32", "float16" or "bfloat16" for the merged tensors (default: each
    keeps its own); integer and boolean variables are copied from the first model, never cast.
    Unless `verify` is False, the written file is read back and compared with what was
    computed. `progress(done_bytes, total_bytes)` is called per tensor.
    """
    if isinstance(models, str | os.PathLike):
        raise InvalidRequest(f"Expected a list of model files. Received: models={str(models)!r}")
    fmt = model_format(output)
    plan = plan_merge(
        method,
        len(models),
        weights=weights,
        has_base=base is not None,
        overrides=overrides,
        **parameters,
    )
    _check_dtype(dtype, fmt)
    sources = [Path(m) for m in models] + ([Path(base)] if base is not None else [])
    output = check_output_path(output, inputs=sources, force=force)
    before = [identity(p) for p in sources]
    with _unchanged(sources, before):
        return _merge(
            sources, len(models), output, fmt, plan, before, dtype=dtype, force=force,
            verify=verify, trust=trust, progress=progress, base=base,
        )  # fmt: skip


@contextlib.contextmanager
def _unchanged(paths: list[Path], before: list[tuple[int, ...] | None]) -> Iterator[None]:
    """Refuse, in place of whatever went wrong, an input that changed while merge read it: read
    by path several times (scan, variables, tensors), it could have given a mix of two files."""
    try:
        yield
    except FusecliError:
        _check_unchanged(paths, before)
        raise


def _check_unchanged(paths: list[Path], before: list[tuple[int, ...] | None]) -> None:
    for path, then in zip(paths, before, strict=True):
        if identity(path) != then:
            raise ModelFileError(path, "changed while it was being read; the result was not kept")


def _merge(
    sources: list[Path],
    n_models: int,
    output: Path,
    fmt: str,
    plan: MergePlan,
    before: list[tuple[int, ...] | None],
    *,
    dtype: str | None,
    force: bool,
    verify: bool,
    trust: bool,
    progress: Progress | None,
    base: str | os.PathLike[str] | None,
) -> MergeReport:
    layouts, findings = _read_inputs(sources, trust=trust)
    _check_pairing(layouts)
    _check_architectures(layouts)
    template = _template(layouts, fmt, output)
    resolved = resolve_settings(plan, template.variables)
    values = [None if r is None else r.values for r in resolved]
    names = [p.name for p in sources]
    settings = summarize(plan, resolved)
    recipe_options = _recipe_options(plan, settings, None if base is None else Path(base), dtype)

    with atomic_output(output, force=force) as tmp:
        # The inputs' tensors are read here for the first time: in a child process, so that a
        # file whose data crashes or hangs HDF5 costs an error, not this process.
        evidence = call_isolated_write(
            _write_and_verify,
            tmp,
            fmt,
            template,
            layouts,
            plan,
            values,
            dtype,
            names,
            recipe_options,
            verify,
            trust,
            findings[layouts.index(template)],
            inputs=sources,
            nbytes=sum(_size(p) for p in sources),
            progress=progress,
        )
        _check_unchanged(sources, before)  # before the output is kept

    variables = template.variables
    merged = sum(v.mergeable for v in variables)
    per_layer = per_layer_names(plan)
    return MergeReport(
        output=str(output),
        format=fmt,
        method=plan.method,
        models=[str(p) for p in sources[:n_models]],
        base=None if base is None else str(base),
        weights=None if plan.weights is None else list(plan.weights),
        t=plan.t,
        template=str(template.path),
        tensors=len(variables),
        merged=merged,
        copied=len(variables) - merged,
        parameters=sum(int(np.prod(v.shape, dtype=np.int64)) for v in variables),
        bytes=sum(v.nbytes for v in variables),
        verified=verify,
        seed=plan.seed,
        dtype=dtype,
        settings=settings,
        per_tensor=[r.as_dict(per_layer) for r in resolved if r is not None],
        relatedness=evidence,
        warnings=[] if evidence is None else warnings_from(evidence),
    )


def _check_dtype(dtype: str | None, fmt: str) -> None:
    if dtype is None:
        return
    if dtype not in DTYPES:
        raise InvalidRequest(f"Expected --dtype to be one of {DTYPES}. Received: dtype={dtype!r}")
    if dtype == "bfloat16" and fmt == "h5":
        raise InvalidRequest(
            "--dtype bfloat16 needs a .keras output: Keras stores bfloat16 weights only in "
            "the .keras format (its legacy .h5 loader cannot read them back). Received: "
            "dtype='bfloat16', output format h5"
        )


# -- checks before anything heavy ------------------------------------------------------------


def _read_inputs(paths: list[Path], *, trust: bool) -> tuple[list[Layout], list[list[Finding]]]:
    """Config and variable list of every input, read side by side, and what its scan found; no
    tensor is read. A file that carries code is refused (unless `trust`): the merged file would
    carry it on."""
    layouts, found = [], []
    for path, (findings, layout) in zip(
        paths, call_isolated_each(_scan_and_list, paths), strict=True
    ):
        refuse_findings(path, findings, trust=trust)
        if isinstance(layout, ModelFileError):
            raise layout
        check_keras2_layout(layout)  # refuse what load_model and fuse refuse
        layouts.append(layout)
        found.append(findings)
    return layouts, found


def _scan_and_list(path: Path) -> tuple[list[Finding], Layout | ModelFileError]:
    """The safety scan and the variable list of one file, from one reading of it (isolated).
    Where the file carries code, that is what it is refused for first, even if its variables
    cannot be listed either."""
    model_file = read_model_file(path)
    if model_file.weights_member == NPZ_WEIGHTS_MEMBER:
        held: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        held = held_open(path)  # one reading of the HDF5 metadata for both
    with held:
        findings = scan(model_file)
        try:
            return findings, read_layout(path, model_file)
        except ModelFileError as e:
            if not findings:
                raise
            return findings, e


def _check_architectures(layouts: list[Layout]) -> None:
    first = layouts[0]
    for other in layouts[1:]:
        difference = architecture_difference(first, other)
        if difference is not None:
            raise FusecliError(
                f"Models must have the same architecture to be merged; the first difference: "
                f"{difference}"
            )


def _template(layouts: list[Layout], fmt: str, output: Path) -> Layout:
    """The first input in the output's format: its config and layout are copied."""
    for layout in layouts:
        if layout.format == fmt:
            return layout
    if fmt == "keras" and (layouts[0].keras_version or "").startswith("2."):
        return layouts[0]  # converted as a file: see fusecli.merging.keras2_convert
    if fmt == "h5":
        return layouts[0]  # Keras 3 files in Keras 2's schema: see keras2_convert
    other = ".h5" if fmt == "keras" else ".keras"
    raise FusecliError(
        f"Cannot write a {fmt} file from {other} inputs only: the output copies the config of "
        f"an input in its own format. Write {Path(output).with_suffix(other).name} instead, or "
        f"add a .{fmt} input. Received: output={str(output)!r}"
    )


def _check_pairing(layouts: list[Layout]) -> None:
    """Across .keras and .h5, layers with sub-layers list their variables in different orders."""
    if len({layout.format for layout in layouts}) < 2:
        return
    for layout in layouts:
        if layout.composite_layers:
            raise FusecliError(
                f"Cannot pair the weights of layer {layout.composite_layers[0]!r} between .keras "
                "and .h5 files (its sub-layers are stored in different orders); give all models "
                f"in one format. Received: {', '.join(str(x.path) for x in layouts)}"
            )


# -- writing ---------------------------------------------------------------------------------


def _write_and_verify(
    tmp: Path,
    fmt: str,
    template: Layout,
    layouts: list[Layout],
    plan: MergePlan,
    values: list[dict[str, Any] | None],
    dtype: str | None,
    names: list[str],
    recipe_options: dict[str, Any],
    verify: bool,
    trust: bool,
    template_findings: list[Finding],
    progress: Progress | None,
) -> dict[str, Any] | None:
    """Write the merged file at `tmp`, scan it (as `check_written` would) and read it back (run
    isolated: see `merge`); returns the relatedness evidence gathered on the way.

    A file spliced from its template (`fusecli.formats.splice`) is read back whatever `verify`
    says, unless `trust`: that its weights are the template's bytes but for the tensors is what
    makes the template's scan (`template_findings`) hold for them, and only its config and
    member names are scanned again."""
    expected = [_output_variable(v, dtype) for v in template.variables]
    n_models = plan.n_models
    reference = names[-1] if plan.needs_base else names[0]
    compared = names[:n_models] if plan.needs_base else names[1:n_models]
    evidence = Relatedness(compared, reference)
    paths = [layout.path for layout in layouts]  # read in place: hashed as they are
    recipe = Pending("merge", paths, paths, recipe_options)
    digests, spliced = _write(
        tmp, fmt, template, layouts, plan, values, expected, evidence, progress, recipe
    )
    if spliced is not None:
        if verify or not trust:
            splice.verify(tmp, spliced, expected, digests)
        if not trust:
            weights = [f for f in template_findings if f.what != "layer"]
            refuse_written(scan_config(read_model_file(tmp)) + weights)
    elif verify or not trust:
        from fusecli.merging import keras2_convert  # converted templates only: imported then

        written = read_model_file(tmp)
        if not trust:
            refuse_written(scan(written))
        if verify and _flat_h5(template, fmt):
            keras2_convert.verify_h5(tmp, template, digests)
        elif verify and template.format != fmt:
            keras2_convert.verify(tmp, template, digests)
        elif verify:
            _verify(tmp, written, template, expected, digests)
    return evidence.as_dict() if compared else None


def _output_variable(variable: Variable, dtype: str | None) -> Variable:
    if dtype is None or not variable.mergeable:
        return variable
    return Variable(variable.layer, variable.dataset, variable.shape, _numpy_dtype(dtype))


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _recipe_options(
    plan: MergePlan, settings: dict[str, Any], base: Path | None, dtype: str | None
) -> dict[str, Any]:
    """What the recipe records of a merge: the method, every parameter as resolved (a
    per-layer one as given, with the range it took, and the --set patterns), seed and dtype."""
    return {
        "method": plan.method,
        "parameters": settings,
        "base": None if base is None else base.name,
        "seed": plan.seed,
        "dtype": dtype,
    }


def _flat_h5(template: Layout, fmt: str) -> bool:
    """Into `.h5`: the flat graph both Kerases load, where the model has one. A Keras 2 model
    with none keeps its own config (which tf-keras loads); a Keras 3 one is refused."""
    if fmt != "h5":
        return False
    from fusecli.formats.keras2_flat import NotFlat
    from fusecli.merging import keras2_convert

    try:
        keras2_convert.places(template, "h5")
    except NotFlat as e:
        if template.format == "h5" and not (template.keras_version or "").startswith("3."):
            return False
        from fusecli.fusion import flat_h5

        raise flat_h5.cannot(str(e)) from None
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _write(
    tmp: Path,
    fmt: str,
    template: Layout,
    layouts: list[Layout],
    plan: MergePlan,
    values: list[dict[str, Any] | None],
    expected: list[Variable],
    evidence: Relatedness,
    progress: Progress | None,
    recipe: Recipe,
) -> tuple[list[Any], splice.Splice | None]:
    """Write the merged file; its tensors' digests (SHA-256, or CRC-32 where spliced), and how
    it was spliced (if it was)."""
    with contextlib.ExitStack() as stack:
        groups = [stack.enter_context(open_weights(layout.path)) for layout in layouts]
        raws = [stack.enter_context(archive.RawTensors(layout.path)) for layout in layouts]
        if _flat_h5(template, fmt) or template.format != fmt:
            # Converted templates only (Keras 2 ones, and Keras 3 ones into .h5): imported then
            from fusecli.merging import keras2_convert

            tensors = _merged_tensors(layouts, groups, raws, plan, values, expected, evidence)
            write = keras2_convert.write_h5 if fmt == "h5" else keras2_convert.write
            return write(tmp, template, tensors, progress, recipe), None
        # the template is one of the inputs, already open
        which = [layout.path for layout in layouts].index(template.path)
        template_group = groups[which]
        spliced = _splice(template, template_group, raws[which], expected, fmt)
        if spliced is not None:
            order = [block.index for block in spliced.blocks]
            tensors = _merged_tensors(
                layouts, groups, raws, plan, values, expected, evidence, order
            )
            with zipfile.ZipFile(template.path) as source:
                members = _template_members(source, recipe)
                weights = splice.SplicedWeights(spliced, expected, tensors, progress)
                members[[name for name, _ in members].index(WEIGHTS_MEMBER)] = (
                    WEIGHTS_MEMBER,
                    lambda: weights,
                )
                archive.write_archive(tmp, members, _ARCHIVE_DATE)
            return weights.digests, spliced
        tensors = _merged_tensors(layouts, groups, raws, plan, values, expected, evidence)
        if fmt == "h5":
            source = template_group.file
            attrs = {k: v for k, v in source.attrs.items() if k not in _H5_TRAINING_ATTRS}
            _loadable_keras2(attrs)
            with archive.h5_model(tmp, attrs) as out:
                digests = _write_h5(out, template, template_group, tensors, expected, progress)
                write_h5_recipe(out, recipe)
                return digests, None
        with (
            zipfile.ZipFile(template.path) as source,
            archive.keras_archive(tmp, _template_members(source, recipe), _ARCHIVE_DATE) as out,
        ):
            return _fill(out, template, template_group, tensors, expected, progress), None


def _splice(
    template: Layout,
    group: h5py.Group,
    raw: archive.RawTensors,
    expected: list[Variable],
    fmt: str,
) -> splice.Splice | None:
    """A `.keras` output with its template's structure (each variable in its own dtype, no
    training state to drop) is the template's bytes with the tensors replaced."""
    if fmt != "keras" or template.format != "keras":
        return None
    if any(e.dtype != v.dtype for e, v in zip(expected, template.variables, strict=True)):
        return None
    return splice.find_splice(template.path, group, raw, expected)


def _loadable_keras2(attrs: dict[str, Any]) -> None:
    """A Keras 2 template's config as today's loaders build it (see `loadable_keras2_config`)."""
    version = attrs.get("keras_version")
    version = version.decode() if isinstance(version, bytes) else str(version or "")
    if version.startswith("2.") and "model_config" in attrs:
        config = attrs["model_config"]
        config = json.loads(config.decode() if isinstance(config, bytes) else config)
        attrs["model_config"] = json.dumps(loadable_keras2_config(config))


def _merged_tensors(
    layouts: list[Layout],
    groups: list[h5py.Group],
    raws: list[archive.RawTensors],
    plan: MergePlan,
    values: list[dict[str, Any] | None],
    expected: list[Variable],
    evidence: Relatedness,
    order: Sequence[int] | None = None,
) -> Iterator[np.ndarray]:
    """The output's variables in order (or in `order`, by index), each computed from one
    tensor per input."""
    method = METHODS[plan.method]
    n_models = plan.n_models
    models = list(zip(layouts[:n_models], groups[:n_models], raws[:n_models], strict=True))
    first_layout, first_group, first_raw = models[0]
    for k in range(len(first_layout.variables)) if order is None else order:
        variable = first_layout.variables[k]
        settings = values[k]
        if settings is None:
            yield read_tensor(first_layout.path, first_group, variable, first_raw)
            continue

        def read(
            layout: Layout, group: h5py.Group, raw: archive.RawTensors, k: int = k
        ) -> np.ndarray:
            values = read_tensor(layout.path, group, layout.variables[k], raw)
            if not np.isfinite(values).all():
                v = layout.variables[k]
                raise ModelFileError(
                    layout.path,
                    f"weight {k} (layer {v.layer!r}, {v.dataset!r}) holds NaN or infinite "
                    "values, which cannot be merged",
                )
            return values

        base = read(layouts[-1], groups[-1], raws[-1]) if plan.needs_base else None
        inputs = [read(layout, group, raw) for layout, group, raw in models]
        if base is not None:
            evidence.add(variable.layer, base, inputs)
        else:
            evidence.add(variable.layer, inputs[0], inputs[1:])
        rng = np.random.default_rng([settings["seed"], k]) if method.random else None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            result = method.combine(iter(inputs), base, settings, rng)
            out = result.astype(expected[k].dtype)
        del inputs
        if not np.isfinite(out).all():
            raise FusecliError(
                f"The merged weight {k} (layer {variable.layer!r}) is not finite in "
                f"{expected[k].dtype} (the weights are too large?). Received: method="
                f"{plan.method}, weights={plan.weights}"
            )
        yield out


def _write_h5(
    out: h5py.File,
    template: Layout,
    template_group: h5py.Group,
    tensors: Iterator[np.ndarray],
    expected: list[Variable],
    progress: Progress | None,
) -> list[bytes]:
    """A legacy .h5 file: the template's groups, the merged weights."""
    source = template_group.file
    weights_name = template_group.name.strip("/")
    for key in source:
        if key in TRAINING_STATE_GROUPS or key == weights_name:
            continue
        source.copy(source[key], out, name=key)
    target = out.require_group(weights_name) if weights_name else out
    return _fill(target, template, template_group, tensors, expected, progress)


def _fill(
    out: h5py.Group,
    template: Layout,
    template_group: h5py.Group,
    tensors: Iterator[np.ndarray],
    expected: list[Variable],
    progress: Progress | None,
) -> list[bytes]:
    """Copy the template's weights group into `out`, its variables replaced by `tensors`.

    When every tensor keeps its dtype, the whole group is copied by HDF5's own object copy (one
    call, in C) and each variable's values written over the copy's; otherwise the groups are
    copied one by one and the variables made anew in their new dtype.
    """
    total = sum(v.nbytes for v in expected)
    done = 0
    digests = []
    same = all(e.dtype == v.dtype for e, v in zip(expected, template.variables, strict=True))
    if same:
        archive.copy_attrs(template_group, out)
        for key in template_group:
            if key not in TRAINING_STATE_GROUPS:
                template_group.copy(template_group[key], out, name=key)
    else:
        own = {v.dataset for v in template.variables}
        _copy_structure(template_group, out, own, template_group.name)
    for variable, values in zip(template.variables, tensors, strict=True):
        if same:
            digests.append(archive.overwrite_tensor(out[variable.dataset], values))
        else:
            digests.append(archive.write_tensor(out, variable.dataset, values))
            archive.copy_attrs(template_group[variable.dataset], out[variable.dataset])
            if values.dtype.name == "bfloat16":  # how Keras marks them (saving_lib.H5IOStore)
                out[variable.dataset].attrs["dtype"] = "bfloat16"
        done += variable.nbytes
        if progress is not None:
            progress(done, total)
    return digests


def _copy_structure(source: h5py.Group, out: h5py.Group, skip: set[str], root: str) -> None:
    """Groups and attributes, and datasets that are not variables (copied as they are).

    `skip` holds the variables' paths relative to `root`, the weights group's name.
    """
    for key, value in source.attrs.items():
        out.attrs[key] = value
    for key in source:
        if source.name == root and key in TRAINING_STATE_GROUPS:
            continue
        node = source[key]
        if isinstance(node, h5py.Group):
            _copy_structure(node, out.require_group(key), skip, root)
        elif node.name[len(root) :].lstrip("/") not in skip:
            source.copy(node, out, name=key)


def _template_members(
    source: zipfile.ZipFile, recipe: Recipe
) -> list[tuple[str, archive.MemberSource | None]]:
    """The template's members, its weights to be replaced, its compile config dropped; its
    metadata, with the recipe, goes last (written once the inputs are hashed)."""
    members: list[tuple[str, archive.MemberSource | None]] = []
    metadata: dict[str, Any] = {}
    for info in source.infolist():
        if info.filename == archive.METADATA_MEMBER:
            found = json.loads(source.read(info))
            metadata = found if isinstance(found, dict) else {}
        elif info.filename == WEIGHTS_MEMBER:
            members.append((WEIGHTS_MEMBER, None))
        elif info.filename == CONFIG_MEMBER:
            config = json.loads(source.read(info))
            if isinstance(config, dict):
                config.pop("compile_config", None)
            members.append((CONFIG_MEMBER, archive.config_member(config)))
        else:
            members.append((info.filename, lambda info=info: source.open(info)))
    members.append((archive.METADATA_MEMBER, lambda: io.BytesIO(keras_metadata(metadata, recipe))))
    return members


# -- verification ----------------------------------------------------------------------------


def _verify(
    path: Path,
    model_file: ModelFile,
    template: Layout,
    expected: list[Variable],
    digests: list[bytes],
) -> None:
    """Read the written file back as a new input: same architecture, the values we computed.
    `model_file`: the written file as read for its scan."""
    try:
        written = read_layout(path, model_file)
    except ModelFileError as e:
        raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
    template = Layout(
        template.path, template.format, template.config, template.keras_version, expected
    )
    difference = architecture_difference(template, written)
    if difference is not None:
        raise VerificationError(
            f"The written file's architecture differs from its inputs': {difference}"
        )
    with open_weights(path) as group, archive.RawTensors(path) as raw:
        for k, (variable, digest) in enumerate(zip(written.variables, digests, strict=True)):
            if archive.tensor_digest(read_tensor(path, group, variable, raw)) != digest:
                raise VerificationError(
                    f"Weight {k} (layer {variable.layer!r}) reads back different from what was "
                    "computed; the file was not kept"
                )
