"""Proving a written fused file without Keras: re-open it and compare it with what was asked.

- the config parses and is exactly the one composed; each branch in it is its model's config as
  given (the renames undone), called on the fused model's inputs;
- the head is what was asked: per output, one scaling layer per branch with that branch's weight
  (offset 0), an `Add` of exactly those, and the activation asked for;
- every tensor equals its source bit for bit, read from the written file and from the input file
  (or from the values Keras loaded, for branches Keras converted): compared byte for byte, or by
  SHA-256 digests where a tensor is not one plain block on disk; every source tensor placed once
  and nothing else written;
- the written file passes the same scan as every input (`fusecli.safety.scan`).
Any difference raises `VerificationError`; the caller deletes the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fusecli.config import walker
from fusecli.errors import FusecliError, ModelFileError, VerificationError
from fusecli.formats import archive
from fusecli.formats.modelfile import open_weights, read_model_file
from fusecli.formats.weights_layout import TRAINING_STATE_GROUPS, snake_case
from fusecli.fusion.graph import Assembly, given_config, undo_renames
from fusecli.fusion.writer import (
    ASSETS,
    H5_WEIGHTS,
    Placed,
    Source,
    Written,
    asset_members,
)
from fusecli.safety.isolation import meanwhile
from fusecli.safety.scan import Finding, scan


def prove(
    path: Path,
    fmt: str,
    assembly: Assembly,
    given: list[dict[str, Any]],
    sources: list[Source],
    written: Written,
    *,
    weights: tuple[float, ...],
    scale: str,
    activation: str,
    axes: list[int] | None,
    trust: bool,
) -> dict[str, Any]:
    """Check the file at `path` (see the module's docstring); returns what was checked."""

    def check_config() -> None:
        try:
            config = read_model_file(path).config
        except ModelFileError as e:
            raise VerificationError(f"The written file cannot be read back: {e.reason}") from None
        if config != assembly.config:
            raise VerificationError("The written file's config differs from the composed one")
        by_name = {walker.name(e): e for e in walker.layers(config)}
        for branch, original in zip(assembly.branches, given, strict=True):
            skip = ("inbound_nodes", "name", "compile_config")
            entry = {k: v for k, v in by_name[branch.name].items() if k not in skip}
            restored = undo_renames(entry, branch.renames)
            restored["config"]["name"] = original["config"].get("name")
            if restored != original:
                raise VerificationError(
                    f"Branch {branch.name!r} in the written file is not its model's config"
                )
        _check_wiring(by_name, assembly)
        _check_head(config, by_name, assembly, weights, scale, activation, axes)
        _check_places(config, fmt, assembly, written)
        if fmt == "h5":
            _check_h5_layer_order(path, config, assembly)

    lambdas = {name for class_name, name in assembly.layer_order if class_name == "Lambda"}
    allowed = lambdas if scale == "lambda" else set()
    tensors, nbytes = _check_tensors(
        path, fmt, sources, written, None if trust else allowed, first=check_config
    )
    config = assembly.config  # the written file's, as check_config found
    _check_assets(path, fmt, _branch_groups(config, fmt, assembly), sources, written)
    _check_sources_unchanged(assembly, given, sources, axes)
    return {
        "config": "as composed; each branch holds its model's config (layers renamed)",
        "head": _formula(assembly, weights, activation),
        "tensors": tensors,
        "bytes": nbytes,
        "scan": "passed" if not trust else "skipped (--trust)",
        "layer_names_unique": _names_unique(config),
    }


def _check_wiring(by_name: dict[str, dict[str, Any]], assembly: Assembly) -> None:
    """Each branch is called once, on the fused model's inputs its slot names, in order."""
    for branch, slot in zip(assembly.branches, assembly.input_slots, strict=True):
        nodes = by_name[branch.name].get("inbound_nodes") or []
        wanted = [assembly.inputs[k]["name"] for k in slot]
        if len(nodes) != 1 or _sources(by_name[branch.name]) != wanted:
            raise VerificationError(
                f"Branch {branch.name!r} is not called once on the inputs {wanted}"
            )
        for name in wanted:
            if by_name.get(name, {}).get("class_name") != "InputLayer":
                raise VerificationError(f"{name!r} is not an input of the written model")


def _check_head(
    config: dict[str, Any],
    by_name: dict[str, dict[str, Any]],
    assembly: Assembly,
    weights: tuple[float, ...],
    scale: str,
    activation: str,
    axes: list[int] | None,
) -> None:
    expected_class = "Lambda" if scale == "lambda" else "Rescaling"
    outputs = config["config"]["output_layers"]
    refs = [outputs] if outputs and isinstance(outputs[0], str) else outputs
    if len(refs) != len(assembly.outputs):
        raise VerificationError("The written model has the wrong number of outputs")
    for j, ref in enumerate(refs):
        last = by_name[ref[0]]
        add = last
        if activation == "softmax":
            axis = axes[j] if axes else -1
            if last["class_name"] != "Softmax" or last["config"].get("axis") != axis:
                raise VerificationError(
                    f"Output {j} of the written model is not softmax(axis={axis})"
                )
            add = by_name[_sources(last)[0]]
        elif last["class_name"] != "Add":
            raise VerificationError(
                f"Output {j} of the written model is not the Add of the branches"
            )
        if add["class_name"] != "Add":
            raise VerificationError(f"Output {j} of the written model does not come from an Add")
        scaled = _sources(add)
        if len(scaled) != len(assembly.branches):
            raise VerificationError(f"The Add of output {j} does not take every branch once")
        for k, (name, branch, w) in enumerate(zip(scaled, assembly.branches, weights, strict=True)):
            layer = by_name[name]
            conf = layer["config"]
            if layer["class_name"] != expected_class:
                raise VerificationError(
                    f"Branch {k} of output {j} is not scaled by {expected_class}"
                )
            got = conf.get("arguments", {}).get("w") if scale == "lambda" else conf.get("scale")
            if got != w or (scale != "lambda" and conf.get("offset") != 0.0):
                raise VerificationError(
                    f"Branch {branch.name!r} is scaled by {got!r} in output {j}, not {w!r}"
                )
            history = layer["inbound_nodes"][0]["args"][0]["config"]["keras_history"]
            if history != [branch.name, 0, j]:
                raise VerificationError(
                    f"Output {j} scales {history[0]!r}'s output {history[2]}, not {branch.name!r}'s"
                )


def _sources(entry: dict[str, Any]) -> list[str]:
    args = entry["inbound_nodes"][0]["args"][0]
    tensors = args if isinstance(args, list) else [args]
    return [t["config"]["keras_history"][0] for t in tensors]


def _check_places(config: dict[str, Any], fmt: str, assembly: Assembly, written: Written) -> None:
    """Each branch's tensors are where Keras will load that branch from, found from the written
    config alone (not from the writer's layer keys): a swap of two alike branches' groups keeps
    every tensor equal to a source, yet computes another function."""
    groups = _branch_groups(config, fmt, assembly)
    for p in written.placed:
        if not p.output.startswith(groups.get(p.branch, "\0")):
            name = assembly.branches[p.branch].name
            raise VerificationError(
                f"Tensor {p.output!r} of branch {name!r} is not where Keras loads that branch's "
                f"weights from ({groups.get(p.branch)!r})"
            )


def _branch_groups(config: dict[str, Any], fmt: str, assembly: Assembly) -> dict[int, str]:
    """Where Keras loads each branch's weights (and, in `.keras`, its assets) from, found from
    the written config: `layers/<class>_<n>/` in `.keras`, `<name>/` in `.h5`."""
    index = {b.name: i for i, b in enumerate(assembly.branches)}
    counts: dict[str, int] = {}
    groups: dict[int, str] = {}
    for entry in walker.layers(config):
        key = snake_case(str(entry.get("class_name")))
        n = counts.get(key, 0)
        counts[key] = n + 1
        name = walker.name(entry)
        if name in index:
            groups[index[name]] = (f"layers/{key}_{n}" if n else f"layers/{key}") + "/"
            if fmt != "keras":
                groups[index[name]] = f"{name}/"
    return groups


def _check_h5_layer_order(path: Path, config: dict[str, Any], assembly: Assembly) -> None:
    """Keras' legacy loader gives the k-th layer listed in `layer_names` (among those with
    weights) to the model's k-th layer with weights, whatever the groups are called: the branches
    must be listed in the written config's order."""
    branches = {b.name for b in assembly.branches}
    wanted = [walker.name(e) for e in walker.layers(config) if walker.name(e) in branches]
    with h5py.File(path, "r") as h5:
        group = h5[H5_WEIGHTS]
        listed = [
            n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]
        ]
        loaded = [n for n in listed if n in group and len(group[n].attrs.get("weight_names", []))]
    if [n for n in loaded if n in branches] != [n for n in wanted if n in loaded] or any(
        n not in branches for n in loaded
    ):
        raise VerificationError(
            f"The written file lists its layers' weights in the order {loaded}, not the "
            f"model's {wanted}: Keras would load one branch's weights into another"
        )


def _check_tensors(
    path: Path,
    fmt: str,
    sources: list[Source],
    written: Written,
    scan: set[str] | None,
    first: Callable[[], None] = lambda: None,
) -> tuple[int, int]:
    """The written file's tensors and its structure, on two cores: a child checks that the file
    passes the scan its inputs passed (`fusecli.safety.scan`; but for findings in the layers
    named in `scan`, the head's scaling Lambdas with `--scale lambda`: fusecli's own bytecode,
    asked for; None: no scan, `--trust`) and holds the placed tensors and nothing else
    (`_check_inventory`), while this process runs `first` (the caller's other checks) and
    compares each tensor with its source (`_compare`). Where the structure is little work (a
    few large tensors), the child compares a share of them too (`_child_share`). The child's
    verdict is told before this process' comparisons'. Returns (tensors, bytes compared)."""
    share = _child_share(written.placed)
    theirs = [written.placed[i] for i in sorted(share)]
    mine = [p for i, p in enumerate(written.placed) if i not in share]
    child = functools.partial(_check_structure, fmt, sources, written, scan, theirs)
    with meanwhile(child, path) as verdict:
        first()
        try:
            nbytes = _compare(path, fmt, sources, written, mine)
        except FusecliError:
            _counted(verdict())
            raise
        return len(written.placed), nbytes + _counted(verdict())


# What each part of `_check_tensors` costs, measured (two ResNet50: 640 tensors, 51 M values;
# two 4 x Dense(8192): 8 tensors, 268 M values), only to share the work between two cores.
_STRUCTURE_SECONDS_PER_TENSOR = 3.6e-4  # scan and inventory, for each tensor's objects
_COMPARE_SECONDS_PER_TENSOR = 2.5e-4  # finding it in both files
_COMPARE_SECONDS_PER_VALUE = 1.0e-9  # reading it from both, comparing, checking it is finite


def _child_share(placed: list[Placed]) -> set[int]:
    """The tensors (by index) the child compares after the structure: the largest first, until
    both processes have about half the work."""
    costs = [_COMPARE_SECONDS_PER_TENSOR + _COMPARE_SECONDS_PER_VALUE * p.values for p in placed]
    structure = _STRUCTURE_SECONDS_PER_TENSOR * len(placed)
    room = (structure + sum(costs)) / 2 - structure
    share: set[int] = set()
    for i in sorted(range(len(placed)), key=lambda i: -costs[i]):
        if costs[i] <= room:
            share.add(i)
            room -= costs[i]
    return share


def written_findings(path: Path, allowed: set[str]) -> list[Finding]:
    """The scan's findings in the written file at `path`, but in the layers named in
    `allowed`."""
    return [f for f in scan(path) if f.path.split("/")[-1] not in allowed]


def _check_structure(
    fmt: str,
    sources: list[Source],
    written: Written,
    scan: set[str] | None,
    placed: list[Placed],
    path: Path,
) -> FusecliError | int:
    """The child's part of `_check_tensors`: its verdict as it was raised, or the bytes it
    compared."""
    try:
        if scan is not None:
            try:
                findings = written_findings(path, scan)
            except FusecliError as e:
                raise VerificationError(f"The written file cannot be scanned: {e}") from None
            if findings:
                raise VerificationError(
                    f"The written file does not pass the scan: {findings[0].describe()}"
                )
        _check_inventory(path, fmt, sources, written)
        return _compare(path, fmt, sources, written, placed)
    except FusecliError as e:
        return e


def _counted(verdict: FusecliError | int) -> int:
    if isinstance(verdict, FusecliError):
        raise verdict
    return verdict


def _check_inventory(path: Path, fmt: str, sources: list[Source], written: Written) -> None:
    """The written file holds exactly the placed tensors, one at each path, and every tensor
    of every source read as a file (but its training state) is placed."""
    with _weights_root(path, fmt) as out_root:
        out_names = set(_datasets(out_root))
    placed_out = [p.output for p in written.placed]
    extra = sorted(out_names - set(placed_out))
    if extra:
        raise VerificationError(f"The written file holds a tensor nobody asked for: {extra[0]}")
    if len(set(placed_out)) != len(placed_out):
        raise VerificationError("The writer placed two tensors at one path")
    missing = [name for name in placed_out if name not in out_names]
    if missing:
        raise VerificationError(f"Tensor {missing[0]!r} is missing from the written file")
    for branch in sorted({p.branch for p in written.placed if p.source is not None}):
        with open_weights(sources[branch].path) as root:
            expected = set(_datasets(root, skip_training=True))
        unplaced = expected - {p.source for p in written.placed if p.branch == branch}
        if unplaced:
            raise VerificationError(
                f"Tensor {sorted(unplaced)[0]!r} of {sources[branch].given} was not written"
            )


def _compare(
    path: Path, fmt: str, sources: list[Source], written: Written, placed: list[Placed]
) -> int:
    """Each of `placed` against its source, read from both files: byte for byte where both
    are plain blocks on disk (what Keras and fusecli write), else by SHA-256 digests (the
    source's in a second thread). A non-finite tensor is its input's fault: `ModelFileError`
    naming the input. Returns the bytes compared."""
    nbytes = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        out_root = stack.enter_context(_weights_root(path, fmt))
        out_raw = stack.enter_context(archive.RawTensors(path))
        raws: dict[Path, archive.RawTensors] = {}
        roots: dict[Path, h5py.Group] = {}
        legacy = _legacy_values(sources, written)
        for p in placed:
            source = sources[p.branch]
            # Found by HDF5's own calls: an h5py object per tensor costs several times more.
            try:
                got, got_block = out_raw.locate(out_root, p.output)
            except KeyError:
                raise VerificationError(
                    f"Tensor {p.output!r} is missing from the written file"
                ) from None
            if p.source is None:  # from the values Keras loaded
                if p.output not in legacy:
                    raise VerificationError(f"Tensor {p.output!r} has no source")
                pending = pool.submit(archive.tensor_digest, legacy[p.output])
            else:
                if source.path not in roots:
                    roots[source.path] = stack.enter_context(open_weights(source.path))
                    raws[source.path] = stack.enter_context(archive.RawTensors(source.path))
                raw = raws[source.path]
                try:
                    origin, origin_block = raw.locate(roots[source.path], p.source)
                except KeyError:
                    raise VerificationError(
                        f"Tensor {p.output!r} has no source: {source.given} holds no {p.source!r}"
                    ) from None
                dtype = got.dtype
                if origin.shape != got.shape or origin.dtype != dtype:
                    raise VerificationError(f"Tensor {p.output!r} has the wrong shape or dtype")
                if got_block is not None and origin_block is not None:
                    same, finite = out_raw.same_values(got_block, raw, origin_block, dtype)
                    _judge(same, finite, p, source)
                    nbytes += got_block[1]
                    continue
                pending = pool.submit(archive.dataset_digest, h5py.Dataset(origin))
            digest, finite = archive.digest_and_finite(h5py.Dataset(got))
            _judge(digest == pending.result(), finite, p, source)
            nbytes += _nbytes(got)
    return nbytes


def _nbytes(dataset: h5py.h5d.DatasetID) -> int:
    shape = dataset.shape or ()
    return int(np.prod(shape, dtype=np.int64)) * dataset.dtype.itemsize


def _check_sources_unchanged(
    assembly: Assembly,
    given: list[dict[str, Any]],
    sources: list[Source],
    axes: list[int] | None,
) -> None:
    """Inputs read as files still hold the config the fused one was composed from. Their tensors
    were just compared with the file as it is now; an input replaced in between (by a training
    job saving a checkpoint, say) would give one model's config with another's weights."""
    at = "output" if axes is None else "logits"
    for branch, original, source in zip(assembly.branches, given, sources, strict=True):
        if source.converted:  # Keras' private copy: nobody else writes it
            continue
        check_source_unchanged(
            source, original, lambda config, name=branch.name: given_config(config, name, at=at)
        )


def check_flat_tensors(
    path: Path,
    fmt: str,
    sources: list[Source],
    written: Written,
    configs: list[Any],
    scan: set[str],
    first: Callable[[], None],
) -> tuple[int, int]:
    """The scan and the tensors of a flat fused file (`fusecli.fusion.flat_h5`, `flat_keras`),
    as `_check_tensors` checks them (`first` meanwhile), then each source still holding the
    config its branch was inlined from."""
    tensors, nbytes = _check_tensors(path, fmt, sources, written, scan, first)
    for source, config in zip(sources, configs, strict=True):
        check_source_unchanged(source, config)
    return tensors, nbytes


def check_source_unchanged(
    source: Source, expected: Any, view: Callable[[dict[str, Any]], Any] = lambda c: c
) -> None:
    """`source` still holds the config (seen through `view`) that the fused one was composed
    from; else the fused file is not kept (the one check for every way of fusing files)."""
    try:
        now = view(read_model_file(source.path).config)
    except FusecliError:
        now = None
    if now != expected:
        raise ModelFileError(
            source.given, "changed while it was being fused; the fused file was not kept"
        )


def _judge(same: bool, finite: bool, placed: Placed, source: Source) -> None:
    if not same:
        raise VerificationError(
            f"Tensor {placed.output!r} of the written file differs from its source in "
            f"{source.given}; the file was not kept"
        )
    if not finite:  # the same as its source: the input holds it
        raise ModelFileError(
            source.given,
            f"weight {_describe(placed.source or placed.output)} holds NaN or infinite values",
        )


def _check_assets(
    path: Path, fmt: str, groups: dict[int, str], sources: list[Source], written: Written
) -> None:
    """Every asset file of every branch (a vocabulary...: without it the layer does not load,
    or loads empty) is in the written archive where Keras looks for it, under the branch's own
    path, byte for byte; nothing else is. A `.h5` file holds no assets: none may be needed."""
    wanted = set()
    for i, source in enumerate(sources):
        for name in asset_members(source.path):
            if fmt != "keras":
                raise VerificationError(
                    f"{source.given} needs asset file {name!r}, which a .h5 file cannot hold"
                )
            wanted.add(f"{ASSETS}{groups.get(i, '?/')}{name[len(ASSETS) :]}")
    placed = {name for name, _, _ in written.assets}
    if placed != wanted:
        missing = sorted(wanted - placed) or sorted(placed - wanted)
        raise VerificationError(
            f"Asset {missing[0]!r} is not where Keras loads it from in the written file"
        )
    if not written.assets:
        return
    with zipfile.ZipFile(path) as out:
        for name, source_name, source_path in written.assets:
            with zipfile.ZipFile(source_path) as source:
                if _member_digest(out, name) != _member_digest(source, source_name):
                    raise VerificationError(f"Asset {name!r} differs from its source")


def _member_digest(archive_file: zipfile.ZipFile, name: str) -> bytes:
    digest = hashlib.sha256()
    try:
        with archive_file.open(name) as member:
            while chunk := member.read(1 << 20):
                digest.update(chunk)
    except KeyError:
        raise VerificationError(f"Asset {name!r} is missing from the written file") from None
    return digest.digest()


def _describe(path: str) -> str:
    """'layers/dense/vars/0' -> "0 of layer 'dense' (layers/dense/vars/0)"."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[-2] == "vars":
        layer = "/".join(p for p in parts[:-2] if p != "layers")
        return f"{parts[-1]} of layer {layer!r} ({path})"
    return repr(path)


def _legacy_values(sources: list[Source], written: Written) -> dict[str, Any]:
    """For branches Keras loaded: output dataset path -> the values it must hold, named as
    `writer.write_h5` names them, derived here independently of what the writer recorded."""
    groups = {p.branch: p.output.split("/", 1)[0] for p in written.placed if p.source is None}
    values: dict[str, Any] = {}
    for branch, group in groups.items():
        used: set[str] = set()
        for name, tensor in sources[branch].legacy or []:
            candidate, n = f"{group}_{name}", 1
            while candidate in used:
                n += 1
                candidate = f"{group}_{name}_{n}"
            used.add(candidate)
            values[f"{group}/{candidate}"] = tensor
    return values


@contextlib.contextmanager
def _weights_root(path: Path, fmt: str) -> Any:
    if fmt == "keras":
        with open_weights(path) as root:
            yield root
    else:
        with h5py.File(path, "r") as h5:
            yield h5[H5_WEIGHTS]


def _datasets(root: h5py.Group, *, skip_training: bool = False) -> list[str]:
    names = archive.dataset_names(root)
    if skip_training:
        names = [n for n in names if n.split("/")[0] not in TRAINING_STATE_GROUPS]
    return names


def _names_unique(config: dict[str, Any]) -> bool:
    names = [walker.name(entry) for _, entry in walker.walk(config)]
    return len(names) == len(set(names))


def _formula(assembly: Assembly, weights: tuple[float, ...], activation: str) -> str:
    total = " + ".join(f"{w:g}*{b.name}" for b, w in zip(assembly.branches, weights, strict=True))
    return f"softmax({total})" if activation == "softmax" else total
