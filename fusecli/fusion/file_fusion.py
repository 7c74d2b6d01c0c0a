"""Fusing model files as files: read the configs, compose the fused config, copy the tensors,
prove the result. No Keras for Keras 3 `.keras` inputs written to a `.keras` output, nor for
Keras 2 era `.h5` inputs (inlined into a flat graph, `fusecli.fusion.flat_h5`: a `.h5` output in
Keras 2's schema, which tf-keras and Keras 3 both load, or a `.keras` one).

Keras is imported only where the file alone cannot say enough:
- Keras 3 `.h5` inputs going into a `.keras` output, every Keras 3 input of a `.h5` output, and
  Keras 2 files with no flat form going into a `.keras` output: Keras loads the model (through
  `fusecli.safety.loading`, the one door) and its own saver lays its tensors out; the fused file
  is then assembled from that copy, and checked against it;
- a model whose output shape its config does not state (a last layer outside the common ones):
  Keras builds it, without weights, to read the shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusecli.config import walker
from fusecli.errors import FusecliError, ModelFileError, known_cause
from fusecli.formats import keras2, keras3_to_keras2
from fusecli.formats.keras2_flat import NotFlat
from fusecli.formats.modelfile import WEIGHTS_MEMBER, ModelFile, read_model_file
from fusecli.formats.recipe import Pending
from fusecli.fusion import flat_h5, flat_keras, writer
from fusecli.fusion.graph import Assembly, assemble, common_axes, prepare_branch
from fusecli.fusion.naming import identifier, unique
from fusecli.fusion.proof import prove
from fusecli.output import atomic_output, temp_prefix
from fusecli.safety.isolation import call_isolated_each, call_isolated_write
from fusecli.safety.loading import CheckedFile, checked_files, load_checked
from fusecli.termination import cleanup_on_termination

# Keras 3 writes these operations into a functional config as nodes of their own; its legacy .h5
# loader cannot rebuild them.
_OP_MODULES = ("keras.src.ops",)

# What the write child makes the recipe from: see `_recipe`.
_RecipeParts = tuple[list[str], list[Path], list[str | None], dict[str, Any]]


@dataclass
class FileFusion:
    """What `fuse_files` wrote."""

    assembly: Assembly
    weights: tuple[float, ...]
    activation: str
    params: int
    check: dict[str, Any]
    converted: list[str]  # inputs Keras had to load


def fuse_files(
    paths: Sequence[str | os.PathLike[str]],
    output: Path,
    fmt: str,
    weights: tuple[float, ...],
    *,
    scale: str,
    inputs: str,
    at: str,
    activation: str,
    trust: bool,
    force: bool,
    after_write: Any = None,
) -> FileFusion:
    """Fuse model files into `output` (checked, atomically). `after_write(tmp)` runs on the
    written, checked file before it is moved into place (the numeric `--verify`)."""
    names = _branch_names(paths)
    for path in paths:
        _check_name(Path(path))
    if fmt == "h5":
        _check_h5_assets(paths, names)
    if fmt == "h5" or all(_looks_keras2(Path(p)) for p in paths):
        # Read through one open of each input (pinned, `checked_files`), scanned there: a file
        # renamed over an input after its scan is never read, and one changed is refused. A
        # `.h5` output is the flat graph in Keras 2's schema (Keras 3 inputs converted,
        # `fusecli.formats.keras3_to_keras2`), or refused; only tf.keras 2.13+ `.keras`
        # archives still go through Keras into it (in Keras 3's schema).
        with checked_files(paths, trust=trust, for_keras=False) as checked:
            found = [one.model_file for one in checked]
            every_h5 = fmt == "h5" and not any(m.keras2_archive for m in found)
            if every_h5 or all(m.written_by_keras2 for m in found):
                try:
                    return _fuse_keras2_flat(
                        paths, checked, names, output, fmt, weights,
                        scale=scale, inputs=inputs, at=at, activation=activation, trust=trust,
                        force=force, after_write=after_write,
                    )  # fmt: skip
                except NotFlat:
                    pass  # into .keras: Keras converts the inputs, as it did before
    # Keras 3 .keras inputs of a .keras output are read as files, through one open of the
    # input (pinned) and scanned there (a file renamed over the input after its scan is never
    # read; one changed meanwhile is refused); the written file is scanned again, and its tensors
    # compared with the copies', before it is kept. The others go through the door into Keras.
    candidates = [i for i, p in enumerate(paths) if fmt == "keras" and _looks_native(Path(p))]
    with contextlib.ExitStack() as stack:
        stack.enter_context(cleanup_on_termination())  # the scratch folder goes on SIGTERM too
        copied = stack.enter_context(
            checked_files([paths[i] for i in candidates], trust=trust, for_keras=False)
        )
        native = {
            i: one for i, one in zip(candidates, copied, strict=True) if _native(one.model_file)
        }
        others = [i for i in range(len(paths)) if i not in native]
        sources: list[writer.Source | None] = [None] * len(paths)
        configs: list[dict[str, Any]] = [{}] * len(paths)
        # The recipe's SHA-256: of the inputs as given (hashed as they were copied, or else
        # read where they are pinned).
        digests: list[str | None] = [None] * len(paths)
        hashed = [Path(p) for p in paths]
        for i, one in native.items():
            sources[i] = writer.Source(given=Path(paths[i]), path=one.copy)
            configs[i] = one.model_file.config
            digests[i], hashed[i] = one.sha256, one.copy
        if others:
            scratch = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(dir=output.parent, prefix=temp_prefix(output))
                )
            )
            checked = stack.enter_context(checked_files([paths[i] for i in others], trust=trust))
            for i, one in zip(others, checked, strict=True):
                digests[i] = one.sha256
                sources[i], configs[i] = _through_keras(
                    one, scratch / f"{names[i]}.keras", fmt, trust
                )
        branches = [
            prepare_branch(config, name, at=at) for config, name in zip(configs, names, strict=True)
        ]
        _fill_unknown_shapes(branches, configs, trust)
        axes = common_axes(branches) if at == "logits" else None
        if fmt == "h5":
            _check_h5_limits(configs, names)
        assembly = assemble(
            branches, weights, scale=scale, inputs=inputs, activation=activation, axes=axes
        )
        given = [b.given for b in branches]
        ready = [s for s in sources if s is not None]
        recipe = (
            [str(p) for p in paths],
            hashed,
            digests,
            dict(
                weights=list(weights),
                scale=scale,
                inputs=assembly.inputs_mode,
                at=at,
                activation=activation,
            ),
        )
        with atomic_output(output, force=force) as tmp:
            # The inputs' tensors are read here for the first time: in a child process, so
            # that a file whose data crashes or hangs HDF5 costs an error, not this process.
            written, check = call_isolated_write(
                _write_and_prove,
                tmp,
                fmt,
                assembly,
                given,
                ready,
                dict(weights=weights, scale=scale, activation=activation, axes=axes, trust=trust),
                recipe,
                inputs=[s.given for s in ready],
                nbytes=_source_bytes(ready),
            )
            for one in native.values():
                one.check_unchanged()  # pinned: what was read is what was scanned and hashed
            if after_write is not None:
                after_write(tmp)
    return FileFusion(
        assembly=assembly,
        weights=weights,
        activation=activation,
        params=written.params,
        check=check,
        converted=[str(s.given) for s in sources if s is not None and s.converted],
    )


def _fuse_keras2_flat(
    paths: Sequence[str | os.PathLike[str]],
    checked: list[CheckedFile],
    names: list[str],
    output: Path,
    fmt: str,
    weights: tuple[float, ...],
    *,
    scale: str,
    inputs: str,
    at: str,
    activation: str,
    trust: bool,
    force: bool,
    after_write: Any,
) -> FileFusion:
    """Keras 2 `.h5` inputs as a file operation: the flat graph of `fusecli.fusion.flat_h5`,
    written as `.h5` (which tf-keras and Keras 3 both load) or `.keras`. Where there is no
    such graph: a `.h5` output is refused in one line, a `.keras` one raises `NotFlat` (the
    caller lets Keras convert the inputs instead)."""
    files = _as_keras2(checked, fmt)
    configs = [
        one.model_file.config
        if keras3_to_keras2.is_keras3(one.model_file)
        else keras2.convert_config(f.config, f.path, trust=trust)
        for one, f in zip(checked, files, strict=True)
    ]
    try:
        for f, name in zip(files, names, strict=True):
            flat_h5.check(f, name, at)
    except NotFlat as e:
        if fmt == "h5":
            raise flat_h5.cannot(str(e)) from None
        raise
    branches = [prepare_branch(c, n, at=at) for c, n in zip(configs, names, strict=True)]
    for branch in branches:
        if any(shape is None for shape in branch.output_shapes):
            shapes = _shapes_from_config(branch.given)
            if shapes is None or len(shapes) != len(branch.output_shapes):
                reason = f"the output shapes of {branch.name!r} cannot be read from its config"
                raise flat_h5.cannot(reason) if fmt == "h5" else NotFlat(reason)
            branch.output_shapes = shapes
    axes = common_axes(branches) if at == "logits" else None
    assembly = assemble(
        branches, weights, scale=scale, inputs=inputs, activation=activation, axes=axes
    )
    try:
        # The weights' names are read in a child process, as every untrusted read is.
        found = call_isolated_each(
            keras3_to_keras2.read_layer_weights, [Path(f.path) for f in files]
        )
        reason = next((r for r in found if isinstance(r, str)), None)
        if reason is not None:
            raise NotFlat(reason)
        flat = flat_h5.plan(files, assembly, weights, activation, found, at=at, scale=scale)
        flat.sources_config = [one.model_file.config for one in checked]  # as the files hold it
        if fmt == "keras":
            flat_keras.placements(flat)
    except NotFlat as e:
        if fmt == "h5":
            raise flat_h5.cannot(str(e)) from None
        raise
    sources = [writer.Source(given=one.source, path=one.copy) for one in checked]
    options = dict(
        weights=list(weights), scale=scale, inputs=assembly.inputs_mode, at=at,
        activation=activation,
    )  # fmt: skip
    # The user's files as given: pinned (hashed where they are, then checked unchanged) or
    # hashed as they were copied.
    recipe = (
        [str(p) for p in paths],
        [one.copy for one in checked],
        [one.sha256 for one in checked],
        options,
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(cleanup_on_termination())
        tmp = stack.enter_context(atomic_output(output, force=force))
        written, check = call_isolated_write(
            _write_and_prove_flat,
            tmp,
            fmt,
            flat,
            sources,
            weights,
            recipe,
            inputs=[s.given for s in sources],
            nbytes=_source_bytes(sources),
        )
        for one in checked:
            one.check_unchanged()
        if after_write is not None:
            after_write(tmp)
    layer_order = [(str(e["class_name"]), str(e["name"])) for e in flat.config["config"]["layers"]]
    return FileFusion(
        assembly=dataclasses.replace(assembly, config=flat.config, layer_order=layer_order),
        weights=weights,
        activation=activation,
        params=written.params,
        check=check,
        converted=[],
    )


def _as_keras2(checked: list[CheckedFile], fmt: str) -> list[ModelFile]:
    """The inputs' Keras 2 configs (Keras 3 files converted); a `.h5` output is refused in one
    line where one has none."""
    try:
        return [keras3_to_keras2.as_keras2(one.model_file) for one in checked]
    except NotFlat as e:
        if fmt == "h5":
            raise flat_h5.cannot(str(e)) from None
        raise


def _write_and_prove_flat(
    tmp: Path,
    fmt: str,
    flat: flat_h5.FlatPlan,
    sources: list[writer.Source],
    weights: tuple[float, ...],
    recipe: _RecipeParts,
    _report: Any,
) -> tuple[writer.Written, dict[str, Any]]:
    """Write the flat `.h5` or `.keras` at `tmp` and prove it (run isolated: see
    `fuse_files`)."""
    module = flat_h5 if fmt == "h5" else flat_keras
    written = module.write(tmp, flat, sources, _recipe(recipe))
    return written, module.prove(tmp, flat, sources, written, weights)


def _write_and_prove(
    tmp: Path,
    fmt: str,
    assembly: Assembly,
    given: list[dict[str, Any]],
    sources: list[writer.Source],
    options: dict[str, Any],
    recipe: _RecipeParts,
    _report: Any,
) -> tuple[writer.Written, dict[str, Any]]:
    """Write the fused file at `tmp` and prove it (run isolated: see `fuse_files`)."""
    write = writer.write_keras if fmt == "keras" else writer.write_h5
    written = write(tmp, assembly, sources, _recipe(recipe))
    return written, prove(tmp, fmt, assembly, given, sources, written, **options)


def _recipe(recipe: _RecipeParts) -> Pending:
    """The recipe of (files as given, what to hash where a digest is not known, the digests
    taken as the inputs were copied, options)."""
    files, hashed, digests, options = recipe
    return Pending("fuse", files, hashed, options, digests=digests)


def _source_bytes(sources: list[writer.Source]) -> int:
    """The bytes the writer copies: what the time limit of `_write_and_prove` scales with."""
    total = 0
    for path in {s.path for s in sources}:
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    legacy = (values for s in sources for _, values in s.legacy or [])
    return total + sum(values.nbytes for values in legacy)


def _shapes_from_config(config: dict[str, Any]) -> list[list[int | None]] | None:
    """Every output's shape from `fusecli.config.shapes`, or None unless all are known."""
    from fusecli.config.shapes import UNKNOWN, model_outputs

    try:
        specs = [spec for _, spec in model_outputs(config)]
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return None
    shapes = [spec.shape for spec in specs]
    if any(shape is None or UNKNOWN in shape for shape in shapes):
        return None
    return [list(shape) for shape in shapes]


def _looks_keras2(path: Path) -> bool:
    """An HDF5 file (by its first bytes): worth reading as a Keras 2 `.h5`."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False  # the door reports it


def _looks_native(path: Path) -> bool:
    """A `.keras` name on a zip: worth reading as a Keras 3 archive."""
    try:
        with open(path, "rb") as f:
            return path.suffix.lower() == ".keras" and f.read(2) == b"PK"
    except OSError:
        return False  # the door reports it


def _native(model_file: ModelFile) -> bool:
    """A Keras 3 `.keras` file, whose weights go into a `.keras` output as they are (not a
    tf.keras 2 archive: its config is Keras 2's, which Keras converts on the way)."""
    return (
        model_file.format == "keras"
        and WEIGHTS_MEMBER in model_file.members
        and not model_file.keras2_archive
    )


def _check_name(path: Path) -> None:
    if path.suffix != path.suffix.lower():
        raise ModelFileError(
            path,
            f"Keras loads only files whose name ends in lower case; rename it to "
            f"{path.stem}{path.suffix.lower()}",
        )


def _branch_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    taken: set[str] = set()
    return [unique(identifier(Path(p).stem), taken) for p in paths]


def _through_keras(
    checked: CheckedFile, copy: Path, fmt: str, trust: bool
) -> tuple[writer.Source, dict[str, Any]]:
    """Load a model in Keras (from the door's private copy) and save it as `.keras`: its config
    and tensors then come from that copy (and, for a `.h5` output, its tensors in Keras' legacy
    order)."""
    from fusecli import runtime

    model = load_checked(checked, trust=trust)
    for variable in model.weights:
        values = np.asarray(variable)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ModelFileError(
                checked.source, f"weight {variable.path!r} holds NaN or infinite values"
            )
    with runtime.quiet():
        model.save(copy)
    legacy = None
    if fmt == "h5":
        legacy = [
            (str(v.path), np.asarray(v))
            for v in model.trainable_weights + model.non_trainable_weights
        ]
    config = read_model_file(copy).config
    source = writer.Source(given=checked.source, path=copy, converted=True, legacy=legacy)
    return source, config


def _fill_unknown_shapes(branches: list[Any], configs: list[dict[str, Any]], trust: bool) -> None:
    """Where `fusecli.config.shapes` cannot compute an output's shape from the config (a layer
    outside the ones it knows), Keras builds the model (without weights) to find it."""
    for branch, config in zip(branches, configs, strict=True):
        if all(shape is not None for shape in branch.output_shapes):
            continue
        shapes = _shapes_from_keras(config, branch.name, trust)
        if len(shapes) != len(branch.output_shapes):
            continue
        branch.output_shapes = [
            known if known is not None else shape
            for known, shape in zip(branch.output_shapes, shapes, strict=True)
        ]


def _shapes_from_keras(config: dict[str, Any], name: str, trust: bool) -> list[list[int | None]]:
    from fusecli import runtime

    keras = runtime.keras()
    try:
        with runtime.quiet():
            model = keras.saving.deserialize_keras_object(config, safe_mode=not trust)
        return [list(t.shape) for t in keras.tree.flatten(model.outputs)]
    except Exception as e:  # Keras raises many types; the message says which layer
        reason = known_cause(e) or e
        raise FusecliError(
            f"Model {name!r} cannot be built to read its output shapes: {reason}"
        ) from e


def _check_h5_limits(configs: list[dict[str, Any]], names: list[str]) -> None:
    """Keras 3 cannot rebuild from `.h5` a functional config holding operation nodes."""
    for name, config in zip(names, configs, strict=True):
        op = _first_op(config)
        if op is not None:
            raise FusecliError(
                f"Model {name!r} holds an operation node ({op}) in its config, which Keras 3 "
                "cannot load back from a .h5 file (a plain model.save('x.h5') fails the same "
                "way); write a .keras file instead"
            )


def _check_h5_assets(paths: Sequence[str | os.PathLike[str]], names: list[str]) -> None:
    """A `.h5` file holds no asset files: a model that needs one (a TextVectorization's or
    StringLookup's vocabulary) would load without it and fail when called. Said before any
    model is loaded."""
    for name, path in zip(names, paths, strict=True):
        try:
            needed = writer.asset_members(Path(path))
        except (OSError, zipfile.BadZipFile):
            continue  # the door reports a file it cannot read
        if needed:
            raise FusecliError(
                f"Model {name!r} needs asset files ({needed[0]}: a vocabulary or lookup table) "
                "that a .h5 file cannot hold (a plain model.save('x.h5') loses them the same "
                f"way); write a .keras file instead. Received: {path}"
            )


def _first_op(config: dict[str, Any]) -> str | None:
    for _, entry in walker.walk(config):
        module = str(entry.get("module") or "")
        if module.startswith(_OP_MODULES):
            return f"{entry.get('class_name')} {entry.get('name')!r}"
    return None
