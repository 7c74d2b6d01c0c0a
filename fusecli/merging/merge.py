"""Weight-space merging of same-architecture models, streamed from the files.

    linear:           out = sum(w_i * M_i)                    (weights sum to 1 by default)
    slerp:            out = slerp(t, M_1, M_2)                (per tensor, as in mergekit)
    task-arithmetic:  out = BASE + sum(w_i * (M_i - BASE))

Nothing is built and TensorFlow is never imported: the files' configs and variable lists are
compared first (no tensor is read before the architectures match), then one variable at a time is
read from every model, combined, and written. Peak memory is a few copies of the largest tensor.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.errors import FusecliError, InvalidRequest, ModelFileError, VerificationError
from fusecli.formats import archive
from fusecli.formats.keras2 import check_keras2_layout
from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.modelfile import CONFIG_MEMBER, WEIGHTS_MEMBER, open_weights
from fusecli.formats.recipe import Pending, Recipe, keras_metadata, write_h5_recipe
from fusecli.formats.weights_layout import (
    TRAINING_STATE_GROUPS,
    Layout,
    architecture_difference,
    read_layout,
    read_tensor,
)
from fusecli.merging import keras2_convert
from fusecli.merging.methods import MergePlan, plan_merge
from fusecli.output import atomic_output, check_output_path, model_format
from fusecli.safety.isolation import call_isolated, call_isolated_write
from fusecli.safety.scan import check_written, refuse_unsafe

Progress = Callable[[int, int], None]

_H5_WEIGHTS_GROUP = "model_weights"
_H5_TRAINING_ATTRS = ("training_config",)


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

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def merge(
    models: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    method: str = "linear",
    t: float | None = None,
    base: str | os.PathLike[str] | None = None,
    normalize: bool | None = None,
    force: bool = False,
    verify: bool = True,
    trust: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge the weights of same-architecture model files into `output` (.keras or .h5).

    `method`: "linear" (default; `weights` default to 1/N and are normalized unless
    `normalize=False`), "slerp" (two models, `t` in [0, 1]) or "task-arithmetic" (`base`
    required, `weights` default to 1 each, not normalized). Integer and boolean variables are
    copied from the first model. Unless `verify` is False, the written file is read back and
    compared with what was computed. `progress(done_bytes, total_bytes)` is called per tensor.
    """
    if isinstance(models, str | os.PathLike):
        raise InvalidRequest(f"Expected a list of model files. Received: models={str(models)!r}")
    fmt = model_format(output)
    plan = plan_merge(
        method,
        len(models),
        weights=weights,
        t=t,
        has_base=base is not None,
        normalize=normalize,
    )
    sources = [Path(m) for m in models] + ([Path(base)] if base is not None else [])
    output = check_output_path(output, inputs=sources, force=force)
    layouts = [_read_input(p, trust=trust) for p in sources]
    _check_pairing(layouts)
    _check_architectures(layouts)
    template = _template(layouts, fmt, output)

    request = dict(
        method=method, weights=weights, t=t, has_base=base is not None, normalize=normalize
    )
    with atomic_output(output, force=force) as tmp:
        # The inputs' tensors are read here for the first time: in a child process, so that a
        # file whose data crashes or hangs HDF5 costs an error, not this process.
        call_isolated_write(
            _write_and_verify,
            tmp,
            fmt,
            template,
            layouts,
            (len(models), request),
            verify,
            inputs=sources,
            nbytes=sum(_size(p) for p in sources),
            progress=progress,
        )
        check_written(tmp, trust=trust)

    variables = template.variables
    merged = sum(v.mergeable for v in variables)
    return MergeReport(
        output=str(output),
        format=fmt,
        method=plan.method,
        models=[str(p) for p in sources[: len(models)]],
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
    )


# -- checks before anything heavy ------------------------------------------------------------


def _read_input(path: Path, *, trust: bool) -> Layout:
    """Config and variable list of one input; reads no tensor. A file that carries code is
    refused (unless `trust`): the merged file would carry it on."""
    refuse_unsafe(path, trust=trust)
    layout = call_isolated(read_layout, path)
    check_keras2_layout(layout)  # refuse what load_model and fuse refuse
    return layout


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
    plan_request: tuple[int, dict[str, Any]],
    verify: bool,
    progress: Progress | None,
) -> None:
    """Write the merged file at `tmp` and read it back (run isolated: see `merge`). The plan is
    made again here: its `combine` is a closure, which cannot be sent to another process."""
    n_models, options = plan_request
    plan = plan_merge(options.pop("method"), n_models, **options)
    paths = [layout.path for layout in layouts]  # read in place: hashed as they are
    recipe = Pending("merge", paths, paths, _recipe_options(plan, paths, n_models))
    digests = _write(tmp, fmt, template, layouts, plan, progress, recipe)
    if verify and template.format != fmt:
        keras2_convert.verify(tmp, template, digests)
    elif verify and _flat_h5(template, fmt):
        keras2_convert.verify_h5(tmp, template, digests)
    elif verify:
        _verify(tmp, template, digests)


def _recipe_options(plan: MergePlan, paths: list[Path], n_models: int) -> dict[str, Any]:
    """What the recipe records of a merge: the method and its parameters as resolved."""
    return {
        "method": plan.method,
        "parameters": {"weights": plan.weights, "t": plan.t, "normalize": plan.normalize},
        "base": paths[n_models].name if plan.needs_base else None,
        "seed": None,
    }


def _flat_h5(template: Layout, fmt: str) -> bool:
    """Keras 2 inputs into `.h5`: the flat graph both Kerases load, where the model has one."""
    if fmt != "h5" or not (template.keras_version or "").startswith("2."):
        return False
    try:
        keras2_convert.places(template, "h5")
    except NotFlat:
        return False
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
    progress: Progress | None,
    recipe: Recipe,
) -> list[bytes]:
    with contextlib.ExitStack() as stack:
        groups = [stack.enter_context(open_weights(layout.path)) for layout in layouts]
        tensors = _merged_tensors(layouts, groups, plan)
        if template.format != fmt:
            return keras2_convert.write(tmp, template, tensors, progress, recipe)
        if _flat_h5(template, fmt):
            return keras2_convert.write_h5(tmp, template, tensors, progress, recipe)
        with open_weights(template.path) as template_group:
            if fmt == "h5":
                source = template_group.file
                attrs = {k: v for k, v in source.attrs.items() if k not in _H5_TRAINING_ATTRS}
                with archive.h5_model(tmp, attrs) as out:
                    digests = _write_h5(out, template, template_group, tensors, progress)
                    write_h5_recipe(out, recipe)
                    return digests
            with (
                zipfile.ZipFile(template.path) as source,
                archive.keras_archive(tmp, _template_members(source, recipe)) as out,
            ):
                return _fill(out, template, template_group, tensors, progress)


def _merged_tensors(
    layouts: list[Layout], groups: list[h5py.Group], plan: MergePlan
) -> Iterator[np.ndarray]:
    """The output's variables in order, each computed from one tensor per input."""
    n_models = len(layouts) - (1 if plan.needs_base else 0)
    models = list(zip(layouts[:n_models], groups[:n_models], strict=True))
    first_layout, first_group = models[0]
    for k, variable in enumerate(first_layout.variables):
        if not variable.mergeable:
            yield read_tensor(first_layout.path, first_group, variable)
            continue

        def read(layout: Layout, group: h5py.Group, k: int = k) -> np.ndarray:
            values = read_tensor(layout.path, group, layout.variables[k])
            if not np.isfinite(values).all():
                v = layout.variables[k]
                raise ModelFileError(
                    layout.path,
                    f"weight {k} (layer {v.layer!r}, {v.dataset!r}) holds NaN or infinite "
                    "values, which cannot be merged",
                )
            return values

        base = read(layouts[-1], groups[-1]) if plan.needs_base else None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            result = plan.combine((read(layout, group) for layout, group in models), base)
            values = result.astype(variable.dtype)
        if not np.isfinite(values).all():
            raise FusecliError(
                f"The merged weight {k} (layer {variable.layer!r}) is not finite in "
                f"{variable.dtype} (the weights are too large?). Received: method={plan.method}, "
                f"weights={plan.weights}"
            )
        yield values


def _write_h5(
    out: h5py.File,
    template: Layout,
    template_group: h5py.Group,
    tensors: Iterator[np.ndarray],
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
    return _fill(target, template, template_group, tensors, progress)


def _fill(
    out: h5py.Group,
    template: Layout,
    template_group: h5py.Group,
    tensors: Iterator[np.ndarray],
    progress: Progress | None,
) -> list[bytes]:
    """Copy the template's weights group into `out`, its variables replaced by `tensors`."""
    own = {v.dataset for v in template.variables}
    _copy_structure(template_group, out, own, template_group.name)
    total = sum(v.nbytes for v in template.variables)
    done = 0
    digests = []
    for variable, values in zip(template.variables, tensors, strict=True):
        digests.append(archive.write_tensor(out, variable.dataset, values))
        archive.copy_attrs(template_group[variable.dataset], out[variable.dataset])
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


def _verify(path: Path, template: Layout, digests: list[bytes]) -> None:
    """Read the written file back as a new input: same architecture, the values we computed."""
    try:
        written = read_layout(path)
    except ModelFileError as e:
        raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
    difference = architecture_difference(template, written)
    if difference is not None:
        raise VerificationError(
            f"The written file's architecture differs from its inputs': {difference}"
        )
    with open_weights(path) as group:
        for k, (variable, digest) in enumerate(zip(written.variables, digests, strict=True)):
            if archive.tensor_digest(read_tensor(path, group, variable)) != digest:
                raise VerificationError(
                    f"Weight {k} (layer {variable.layer!r}) reads back different from what was "
                    "computed; the file was not kept"
                )
