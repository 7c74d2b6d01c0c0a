"""Finding code in a model file before Keras reads it: zipfile, json and h5py only.

Loading a model file can run code that came with it: a Lambda layer's Python bytecode
(CVE-2024-3660), classes imported from any module the config names (CVE-2025-1550), a
TorchModuleWrapper's pickle. Keras' own `safe_mode` depends on the installed version (it ignored
`.h5` files until 3.11.3, and tf-keras 2.x has none), and scanners such as modelscan look only at
the top-level layers, so a Lambda inside a nested model (exactly what a fused model is) passes.

`scan` walks the whole config, at every depth, in both formats (bytecode wherever it sits,
modules, registered names), the HDF5 weights for links that would make the reader open other
files, and `model.weights.npz` for pickles; it refuses (`ModelFileError`) files beyond the
readers' limits (declared sizes far beyond what is stored, configs sizing layers far beyond the
weights). `refuse_unsafe` is what every loading command calls before Keras sees the file, and
`check_written` what a command calls on its output before moving it into place.
"""

from __future__ import annotations

import binascii
import builtins
import math
import os
import pickletools
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py

from fusecli.config.shapes import OutputShapes, Shape
from fusecli.errors import ModelFileError, UnsafeModelError, VerificationError
from fusecli.formats import keras2_ops
from fusecli.formats.modelfile import (
    NPZ_WEIGHTS_MEMBER,
    WEIGHTS_MEMBER,
    ModelFile,
    open_hdf5,
    read_model_file,
    read_npz_members,
    walk_hdf5,
)
from fusecli.limits import check_dataset_size
from fusecli.safety.isolation import call_isolated, call_isolated_each
from fusecli.safety.references import is_pure_reference, is_reference, referenced_name

# Layers that call code outside the model's config, whatever their arguments (a TFOpLambda naming
# a TensorFlow function that fusecli converts to its keras.ops equivalent excepted: that function
# is never looked up).
_UNSAFE_CLASSES = {
    "TFOpLambda": "is a TFOpLambda layer, which calls a TensorFlow function named in the file",
    "SlicingOpLambda": "is a SlicingOpLambda layer, which calls a TensorFlow function named in "
    "the file",
    "TFSMLayer": "is a TFSMLayer, which loads and runs a TensorFlow SavedModel from disk",
    "TorchModuleWrapper": "is a TorchModuleWrapper, whose PyTorch module is a pickle that runs "
    "code when loaded",
}
# Keras 2 Lambda configs say how each callable was stored; "lambda" means bytecode.
_KERAS2_CALLABLES = {
    "function": "function_type",
    "output_shape": "output_shape_type",
    "mask": "mask_type",
}
_BYTECODE = "__lambda__"
# Base64 text of a marshalled code object: even `lambda: 0` takes 132 characters; names,
# which also start lists (Keras 2 `inbound_nodes`), are far shorter.
_MIN_CODE_TEXT = 64
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_LAMBDA_CONFIG, _LAMBDA_FIELD = 1, 2  # parts of a Lambda's config that it checks itself
# Modules a serialized Keras function may come from (not keras.utils.get_file and the like).
_MODELING_FUNCTIONS = re.compile(
    r"(tf_)?keras(\.src)?\.(activations|losses|metrics|ops|initializers|regularizers|constraints|"
    r"layers|random)(\.|$)"
)
# Keras namespaces that hold no modeling code: nothing a model file needs comes from them.
_NON_MODELING = re.compile(
    r"(tf_)?keras(\.src)?\.(utils|saving|callbacks|datasets|applications|export|distribution|"
    r"visualization)(\.|$)"
)
# Keras 3, and tf-keras (Keras 2), whose .keras files name it as the model's module.
_KERAS_PACKAGES = {"keras", "tf_keras"}
# Python built-ins that share a name with a Keras function (keras.ops.abs...): harmless to call.
_HARMLESS_BUILTINS = {"abs", "all", "any", "divmod", "max", "min", "pow", "round", "sum"}
_HDF5_WHAT = "HDF5 object"


@dataclass(frozen=True)
class Finding:
    """One reason not to load a file: where (`outer/inner/layer`), what, and why."""

    path: str
    class_name: str
    reason: str
    what: str = "layer"  # "layer", "HDF5 object" or "archive member"

    def describe(self) -> str:
        return f"{self.what} {self.path!r} {self.reason}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def scan(model_file: ModelFile | str | os.PathLike[str]) -> list[Finding]:
    """Everything in a model file that could run code or read other files when it is loaded.

    Takes a path or an already read `ModelFile`; raises `ModelFileError` for a broken file.
    """
    if not isinstance(model_file, ModelFile):
        model_file = read_model_file(model_file)
    findings = list(_scan_config(model_file.config))
    findings.extend(_scan_members(model_file.members))
    scan_weights = _scan_npz if model_file.weights_member == NPZ_WEIGHTS_MEMBER else _scan_hdf5
    weight_findings, values = scan_weights(model_file)
    findings.extend(weight_findings)
    _check_declared_sizes(model_file, values)
    unique: dict[Finding, None] = dict.fromkeys(findings)
    return list(unique)


def scan_config(model_file: ModelFile) -> list[Finding]:
    """`scan`'s findings in the config and the archive's member names, the weights left out:
    for a written file whose weights are, but for the tensors' values, those of a file `scan`
    read already (a merged `.keras` file is its template's bytes with the tensors replaced)."""
    findings = [*_scan_config(model_file.config), *_scan_members(model_file.members)]
    return list(dict.fromkeys(findings))


def _unsafe_class_reason(node: dict[str, Any], class_name: str) -> str:
    reason = _UNSAFE_CLASSES[class_name]
    if class_name in keras2_ops.CLASSES:
        function = (node.get("config") or {}).get("function")
        reason = (
            f"is a {class_name} layer, which calls the TensorFlow function "
            f"{_printable(f'tf.{function}')} named in the file (fusecli converts only the "
            "functions listed in docs/keras2.md)"
        )
    return reason


def _printable(text: str) -> str:
    return text if len(text) <= 80 and text.isprintable() else repr(text[:80])


def refuse_unsafe(path: str | os.PathLike[str], *, trust: bool = False) -> ModelFile:
    """Read `path` and refuse it (`UnsafeModelError`) if it holds code, unless `trust`.

    Returns the `ModelFile`, so a loader can look at its config without reading it twice. The
    file is read in a child process, with a time limit (`fusecli.safety.isolation`). A file
    beyond the readers' limits (`ModelFileError`) is refused even with `trust`.
    """
    model_file, findings = call_isolated(_read_and_scan, Path(path))
    refuse_findings(path, findings, trust=trust)
    return model_file


def refuse_unsafe_each(
    paths: Sequence[str | os.PathLike[str]], *, trust: bool = False
) -> list[ModelFile]:
    """`refuse_unsafe` for several files, read side by side (one child each); the first file's
    refusal is the one raised, as one after another."""
    scanned = call_isolated_each(_read_and_scan, [Path(p) for p in paths])
    for path, (_model_file, findings) in zip(paths, scanned, strict=True):
        refuse_findings(path, findings, trust=trust)
    return [model_file for model_file, _findings in scanned]


def refuse_findings(
    path: str | os.PathLike[str], findings: list[Finding], *, trust: bool = False
) -> None:
    """`refuse_unsafe`'s verdict on findings made elsewhere (by a caller that scanned the file
    in a child of its own, with other reading)."""
    if findings and not trust:
        more = len(findings) - 1
        also = f" (and {more} more: see `fusecli inspect {path}`)" if more else ""
        raise UnsafeModelError(
            path,
            f"{findings[0].describe()}{also}; refusing (use --trust to load it anyway)",
        )


def check_written(path: str | os.PathLike[str], *, trust: bool = False) -> None:
    """Scan a file a command has just written, before it is renamed into place.

    Its inputs were scanned, so a finding here means the writer carried something the input
    scan did not see; the caller deletes the file. With `trust`, inputs may carry code on.
    """
    if trust:
        return
    _model_file, findings = call_isolated(_read_and_scan, Path(path))
    refuse_written(findings)


def refuse_written(findings: list[Finding]) -> None:
    """`check_written`'s verdict on findings made elsewhere (in the child that wrote the file)."""
    if findings:
        raise VerificationError(
            f"The written file would run code when loaded: {findings[0].describe()}; it was "
            "not kept"
        )


def _read_and_scan(path: Path) -> tuple[ModelFile, list[Finding]]:
    model_file = read_model_file(path)
    return model_file, scan(model_file)


# -- the config ------------------------------------------------------------------------------


def _scan_config(config: dict[str, Any]) -> Iterator[Finding]:
    """Every value of the config, visited with an explicit stack (a file cannot make it recurse),
    in document order; each value knows the layer it sits in (`path`), that layer's class, and
    the field it came from."""
    inner = config.get("config")
    name = inner.get("name") if isinstance(inner, dict) else None
    root = _Place((name if isinstance(name, str) else "model",), _text(config.get("class_name")))
    yield from _check_object(config, root, key="")
    # `part` marks a Lambda's config (_LAMBDA_CONFIG) and the values of its fields
    # (_LAMBDA_FIELD), which `_check_keras2_lambda` reads, so they are not reported twice.
    stack: list[tuple[Any, _Place, str, int]] = [
        (value, root, k if isinstance(k, str) else "", 0) for k, value in reversed(config.items())
    ]
    while stack:
        node, place, key, part = stack.pop()
        if isinstance(node, list):
            if part != _LAMBDA_FIELD and _is_marshalled_code(node):
                yield Finding(place.where, place.owner, _bytecode_in(key))
                continue
            stack.extend((item, place, key, part) for item in reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        is_lambda = False
        if "class_name" in node or is_reference(node):
            place = _enter(node, place)
            yield from _check_object(node, place, key)
            if node.get("class_name") == _BYTECODE:
                continue
            is_lambda = node.get("class_name") == "Lambda" and isinstance(node.get("config"), dict)
            if is_lambda:
                yield from _check_keras2_lambda(node["config"], place)
        if part != _LAMBDA_CONFIG:
            yield from _check_stored_callables(node, place)
        for k, value in reversed(node.items()):
            inner = _LAMBDA_CONFIG if is_lambda and k == "config" else 0
            if part == _LAMBDA_CONFIG:
                inner = _LAMBDA_FIELD
            stack.append((value, place, k if isinstance(k, str) else key, inner))


@dataclass(frozen=True)
class _Place:
    """Where a config value sits: the path of layer names, and the innermost layer's class."""

    path: tuple[str, ...]
    owner: str

    @property
    def where(self) -> str:
        return "/".join(self.path)


def _enter(node: dict[str, Any], place: _Place) -> _Place:
    """A serialized layer opens a new path level; other objects (initializers...) do not."""
    name = _layer_name(node)
    if name is None:
        return place
    return _Place((*place.path, name), _text(node.get("class_name")))


def _layer_name(node: dict[str, Any]) -> str | None:
    config = node.get("config")
    if (
        isinstance(config, dict)
        and isinstance(config.get("name"), str)
        and ("trainable" in config or "layers" in config)  # Keras 2 Sequential: no trainable
    ):
        return config["name"]
    if "inbound_nodes" in node and isinstance(node.get("name"), str):
        return node["name"]
    return None


def _check_object(node: dict[str, Any], place: _Place, key: str) -> Iterator[Finding]:
    where, owner = place.where, place.owner
    class_name = _text(node.get("class_name", "function" if is_reference(node) else None))
    if class_name == _BYTECODE:
        if owner == "Lambda" and key == "function":
            reason = "is a Lambda layer with Python bytecode, which would run when loaded"
        else:
            reason = _bytecode_in(key)
        yield Finding(where, owner, reason)
        return
    if class_name in _UNSAFE_CLASSES and not keras2_ops.converts(node):
        yield Finding(where, class_name, _unsafe_class_reason(node, class_name))
    config = node.get("config")
    if isinstance(config, dict) and isinstance(config.get("vocabulary"), str):
        yield Finding(
            where,
            class_name,
            f"reads its vocabulary from the file {config['vocabulary']!r}, outside the model "
            "file (any file the loading user can read would become part of the model)",
        )
    registered = node.get("registered_name")
    custom = next((n for n in (registered, class_name) if isinstance(n, str) and ">" in n), None)
    module = node.get("module")
    if custom is not None:
        yield Finding(
            where,
            class_name,
            f"uses {custom!r}, a custom object registered outside "
            "Keras, whose code would be imported and run",
        )
    elif "module" in node and not _keras_module(module, class_name, registered):
        what = node.get("config") if class_name == "function" else class_name
        where_from = (
            "which is not modeling code"
            if isinstance(module, str) and module.split(".")[0] in _KERAS_PACKAGES
            else "outside Keras"
        )
        yield Finding(
            where,
            class_name,
            f"uses {_text(what)!r} from module {module!r}, {where_from}, whose code would be "
            "imported and run",
        )
    elif module == "builtins" and _python_builtin(node.get("config")):
        yield Finding(
            where,
            class_name,
            f"names Python's built-in function {node['config']!r}, not a Keras function; a "
            "Keras that falls back to Python's builtins would call it",
        )
    elif is_reference(node) and not is_pure_reference(node):
        yield Finding(
            where,
            class_name,
            f"calls the function {_text(referenced_name(node))!r} from module {module!r} by "
            "reference, which Keras would look up and run (only Keras' built-in activations, "
            "losses and metrics are known to run no other code)",
        )


def _keras_module(module: Any, class_name: str, registered: Any) -> bool:
    if not isinstance(module, str):
        return module is None
    if class_name == "function" or _names_a_function(class_name):
        # Keras writes its built-in functions (activations, losses...) as module "builtins" and
        # looks them up among its own functions; other functions must come from modeling code.
        # Keras resolves any name in the module, so `{"class_name": "get_file"}` is a function.
        return (module == "builtins" and registered in (None, "function")) or bool(
            _MODELING_FUNCTIONS.match(module)
        )
    return module.split(".")[0] in _KERAS_PACKAGES and not _NON_MODELING.match(module)


def _names_a_function(class_name: str) -> bool:
    """Classes are CamelCase; a lower-case name (not a `__marker__`) is a function's."""
    return class_name[:1].islower() and not class_name.startswith("__")


def _python_builtin(name: Any) -> bool:
    """A "builtins" function name that is Python's own (exec, eval, open...), not Keras'."""
    return isinstance(name, str) and hasattr(builtins, name) and name not in _HARMLESS_BUILTINS


def _check_keras2_lambda(config: dict[str, Any], place: _Place) -> Iterator[Finding]:
    """tf.keras 2.x stored a Lambda's callables as [base64 bytecode, defaults, closure] with a
    `function_type` of "lambda"; "function" names a Python function; "raw" is plain data.

    Keras 3's legacy `.h5` loader ignores `function_type` and runs any list-valued `function` as
    bytecode, so a list there is bytecode whatever its label says.
    """
    for field, kind_key in _KERAS2_CALLABLES.items():
        value, kind = config.get(field), config.get(kind_key)
        if value is None or isinstance(value, dict):
            continue  # nothing, or a serialized object (checked on its own)
        code = (field == "function" and isinstance(value, list)) or _is_marshalled_code(value)
        if not code and (kind == "raw" or (kind is None and field != "function")):
            continue  # plain data; Keras 3 writes output shapes as plain lists
        if code or kind in ("lambda", None):
            reason = "with Python bytecode, which would run when loaded"
        else:
            module = config.get("module") if field == "function" else config.get(f"{field}_module")
            reason = (
                f"calling the Python function {value!r} from module {module!r}, which "
                "Keras would look up and run"
            )
        if field == "function":
            yield Finding(place.where, "Lambda", f"is a Lambda layer {reason}")
        else:
            yield Finding(place.where, "Lambda", f"holds a callable in {field!r} {reason}")


def _check_stored_callables(node: dict[str, Any], place: _Place) -> Iterator[Finding]:
    """tf-keras stores the functions of other objects as a Lambda does: `<field>` beside
    `<field>_type` ("lambda": bytecode; "function": a Python function looked up by name), e.g.
    ResidualWrapper's `residual_fn` and DropoutWrapper's `dropout_fn`."""
    for kind_key, kind in node.items():
        if not (isinstance(kind_key, str) and kind_key.endswith("_type")):
            continue
        field = kind_key[: -len("_type")]
        value = node.get(field)
        if value is None or isinstance(value, dict) or kind not in ("lambda", "function"):
            continue
        if kind == "lambda" or _is_marshalled_code(value):
            yield Finding(place.where, place.owner, _bytecode_in(field))
        else:
            module = node.get(f"{field}_module")
            yield Finding(
                place.where,
                place.owner,
                f"holds a callable in {field!r} calling the Python function {_text(value)!r} "
                f"from module {module!r}, which Keras would look up and run",
            )


def _is_marshalled_code(value: Any) -> bool:
    """A list (or string) that starts with base64 text of a marshalled code object: what
    tf-keras' and Keras' `func_load` turn into a function, whatever label it carries.

    Their base64 decoding skips characters outside the alphabet (tf-keras first escapes
    non-Latin-1 characters), so the test does too. A marshalled code object starts with the
    byte `c` (0x63, or 0xE3 with marshal's reference flag), then three small 32-bit counts
    (arguments...), and is far longer than a name.
    """
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or len(value) < _MIN_CODE_TEXT:
        return False
    text = _NOT_BASE64.sub(b"", value.encode("raw_unicode_escape"))
    if len(text) < 20:
        return False
    head = binascii.a2b_base64(text[:20])
    small_counts = all(head[i : i + 2] == b"\0\0" for i in (3, 7, 11))
    return head[:1] in (b"c", b"\xe3") and small_counts


def _bytecode_in(key: str) -> str:
    return f"holds Python bytecode in {key or 'its config'!r}, which would run when loaded"


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


# -- the archive and the HDF5 weights --------------------------------------------------------


def _scan_members(members: list[str]) -> Iterator[Finding]:
    """Names no Keras writes, which Keras skips and extraction tools may follow out of the
    folder; merge would copy them into its output, so they are refused like code."""
    for name in members:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
            reason = "points outside the archive, where extracting it would write"
        elif "\\" in name:
            reason = (
                "has a backslash in its name, which extracting on Windows reads as a folder "
                "separator"
            )
        else:
            continue
        yield Finding(name, "zip member", reason, what="archive member")


def _scan_hdf5(model_file: ModelFile) -> tuple[list[Finding], int]:
    """Links to other files, and the number of values the datasets declare (each checked
    against what it stores)."""
    prefix = f"{WEIGHTS_MEMBER}:" if model_file.format == "keras" else ""
    found: list[tuple[str, Finding]] = []
    values = 0
    with open_hdf5(model_file.path) as h5:
        for entry in walk_hdf5(h5, model_file.path):
            where = f"{prefix}/{entry.name}"
            if entry.kind == "external":
                filename, target = entry.target or ("?", "?")
                reason = f"is a link to {target!r} in another file {filename!r}"
                found.append((entry.name, Finding(where, "ExternalLink", reason, _HDF5_WHAT)))
            elif entry.kind in ("soft", "other"):
                # Keras' loaders do not follow them, and fusecli's readers would not either:
                # what the check reads and what Keras loads would differ.
                raise ModelFileError(
                    model_file.path,
                    f"HDF5 object {where!r} is a {entry.kind} link, which no Keras writes and "
                    "Keras' loader does not follow; refusing",
                )
            elif entry.kind == "dataset":
                _check_filters(model_file.path, entry.node, where)
                dataset_findings = list(_check_dataset(entry.node, where))
                if dataset_findings:  # its data is elsewhere: nothing here to measure
                    found.extend((entry.name, f) for f in dataset_findings)
                else:
                    values += check_dataset_size(model_file.path, entry.node, where)
    return [finding for _name, finding in sorted(found, key=lambda item: item[0])], values


def _check_filters(path: Path, dataset: h5py.Dataset, where: str) -> None:
    """A dataset stored through an HDF5 filter this HDF5 library does not have cannot be read,
    nor copied: refused here, naming its file, rather than later, when a write that copies it
    fails under another file's name."""
    plist = dataset.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, flags, _values, name = plist.get_filter(i)
        if not flags & h5py.h5z.FLAG_OPTIONAL and not h5py.h5z.filter_avail(code):
            label = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            raise ModelFileError(
                path,
                f"HDF5 dataset {where!r} is stored through filter {code} ({label!r}), which "
                "this HDF5 library does not have; it cannot be read",
            )


def _check_dataset(dataset: h5py.Dataset, where: str) -> Iterator[Finding]:
    if dataset.is_virtual:
        sources = sorted({m.file_name for m in dataset.virtual_sources()})
        yield Finding(
            where,
            "virtual dataset",
            f"is a virtual dataset reading from {sources}",
            what=_HDF5_WHAT,
        )
    external = dataset.external
    if external:
        files = sorted({_text(e[0]) for e in external})
        yield Finding(
            where, "external dataset", f"keeps its data in other files {files}", what=_HDF5_WHAT
        )


def _scan_npz(model_file: ModelFile) -> tuple[list[Finding], int]:
    """Keras writes each layer's variables to `model.weights.npz` as a pickled dict, and
    loading a pickle runs whatever it names; fusecli reads the pickle's opcodes, never runs it.

    Also returns a bound on the values the arrays hold (a pickle stores each in a byte or more).
    """
    findings = []
    values = 0
    for member in read_npz_members(model_file.path):
        if member.pickle is None:
            values += math.prod(member.shape)
            continue
        values += len(member.pickle)
        imports = _pickle_imports(member.pickle)
        names = ", ".join(repr(n) for n in imports[:3]) + (
            f" and {len(imports) - 3} more" if len(imports) > 3 else ""
        )
        findings.append(
            Finding(
                f"{NPZ_WEIGHTS_MEMBER}:{member.key}",
                "pickle",
                "is a NumPy object array, stored as a pickle, which runs code when loaded"
                + (f" (it imports {names})" if imports else ""),
                what="archive member",
            )
        )
    return findings, values


def _pickle_imports(data: bytes) -> list[str]:
    """The `module.name`s a pickle imports, read from its opcodes (nothing is unpickled),
    leaving out numpy's own, which every object array names."""
    imports: list[str] = []
    pushed: list[Any] = []  # what each opcode pushed, as far as names go (else None)
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST") and isinstance(arg, str):
                imports.append(arg.replace(" ", "."))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = pushed[-2:] if len(pushed) >= 2 else [None, None]
                imports.append(f"{module}.{attr}" if module and attr else "?")
                pushed[-2:] = [None]
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            elif opcode.stack_after and opcode.stack_before == []:
                pushed.append(arg if isinstance(arg, str) else None)
    except (ValueError, EOFError, UnicodeDecodeError, struct.error):
        pass  # a broken pickle is still a pickle: what was read so far is reported
    return [n for n in dict.fromkeys(imports) if n not in _NUMPY_PICKLING]


_NUMPY_PICKLING = {
    f"{module}.{name}"
    for module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "ndarray", "dtype", "scalar")
}


# Config keys whose value is a number of units, filters, heads...: a layer holding such a key
# owns variables with at least that many values (a Dense kernel has `units` columns...).
_SIZE_KEYS = {
    "units",
    "filters",
    "output_dim",
    "input_dim",
    "num_heads",
    "key_dim",
    "value_dim",
    "depth_multiplier",
    "kernel_size",  # its product
}
# Keys whose values one variable holds the product of (an Embedding's table, a kernel...).
_SIZE_PRODUCTS = (
    ("input_dim", "output_dim"),
    ("filters", "kernel_size"),
    ("depth_multiplier", "kernel_size"),
    ("depth_multiplier", "filters"),  # a separable convolution's pointwise kernel, per channel
    ("num_heads", "key_dim"),
    ("num_heads", "value_dim"),
)
_SIZE_FLOOR = 1 << 16  # below this, a declared size is never questioned
# Values one row may hold in a layer's input or output: 256 MiB of float32, beyond any model's
# activations on one example (a 4096 x 4096 RGB image is 50 million).
MAX_ROW_VALUES = 1 << 26


def _check_declared_sizes(model_file: ModelFile, values: int) -> None:
    """Refuse a config whose layers declare more units (filters, heads...) than the file's
    weights hold values: building it would allocate memory out of all proportion to the file
    (a `Dense(units=2**31)` asks for gigabytes, and so do an `Embedding(60000, 60000)` and a
    `Dense(60000)` on inputs of 60000 features), and its weights could not match anyway.

    Input channels come from the shapes the config gives (`fusecli.config.shapes`), for the
    layers whose shapes it can follow."""
    limit = max(values, _SIZE_FLOOR)
    shapes = OutputShapes(model_file.config)
    first_inputs = shapes.first_inputs
    widest = _widest_declared(model_file.config)
    for name, spec in shapes.outputs:
        _check_row_values(model_file.path, name, [spec.shape], None)
    stack: list[Any] = [model_file.config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        config = node.get("config")
        if "class_name" in node and isinstance(config, dict):
            inputs = first_inputs.get(id(config), [])
            _check_row_values(model_file.path, config.get("name"), inputs, config)
            declared = _declared_values(config, inputs, widest)
            too_many = next((said for size, said in declared if size > limit), None)
            if too_many is not None:
                raise ModelFileError(
                    model_file.path,
                    f"layer {_text(config.get('name'))!r} declares {too_many}, more than the "
                    f"{values} values the file's weights hold; building it would allocate "
                    "memory out of proportion to the file",
                )
        stack.extend(reversed(node.values()))  # layers in the file's order: causes first


def _check_row_values(
    path: Path, name: Any, shapes: list[Shape | None], config: dict[str, Any] | None
) -> None:
    """Refuse a layer whose inputs or outputs (as far as the config gives them) hold more than
    MAX_ROW_VALUES values for one row: running the model would allocate that much per row (a
    `Resizing(40000, 40000)` in a 19 KB file asks for 6.4 GB on one image)."""
    candidates = []
    for shape in shapes:
        known = [d for d in (shape or ())[1:] if isinstance(d, int) and d > 0]
        if known:
            candidates.append((math.prod(known), f"inputs of shape {_shape_text(shape)}"))
    if config is not None:
        candidates.extend(_declared_outputs(config))
    for count, said in candidates:
        if count > MAX_ROW_VALUES:
            raise ModelFileError(
                path,
                f"layer {_text(name)!r} works on {said}, {count} values for each row (more "
                f"than {MAX_ROW_VALUES}); running it would allocate memory out of proportion "
                "to any model",
            )


def _declared_outputs(config: dict[str, Any]) -> list[tuple[int, str]]:
    """Values per row a layer's config says its output holds, shapes known or not: an image of
    `height` x `width` (Resizing, CenterCrop, RandomCrop), one slot per token (CategoryEncoding,
    and lookups whose `output_mode` is not "int")."""
    found = []
    height, width = _declared_size(config.get("height")), _declared_size(config.get("width"))
    if height is not None and width is not None:
        found.append((height * width, f"outputs of height={height} and width={width} (at least)"))
    widening = _widening(config)
    if widening is not None:
        found.append(widening)
    return found


_WIDENING_KEYS = ("num_tokens", "max_tokens", "num_bins")


def _widening(config: dict[str, Any]) -> tuple[int, str] | None:
    """The channels a layer makes one per token (CategoryEncoding's `num_tokens`, a lookup's
    `max_tokens` in a one-hot, multi-hot, count or tf-idf output), if its config says so."""
    mode = config.get("output_mode")
    for key in ("num_tokens",) if mode in (None, "int") else _WIDENING_KEYS:
        size = _declared_size(config.get(key))
        if size is not None and size > 1:
            return size, f"outputs of {key}={size} channels"
    return None


def _widest_declared(model: dict[str, Any]) -> tuple[int, str] | None:
    """The most channels any layer of the config declares it makes (see `_widening`): a bound
    on the channels of layers whose inputs' shapes the config does not give."""
    widest = None
    stack: list[Any] = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            config = node.get("config")
            if "class_name" in node and isinstance(config, dict):
                found = _widening(config)
                if found is not None and (widest is None or found[0] > widest[0]):
                    name = _text(config.get("name"))
                    widest = (found[0], f"{found[1].removeprefix('outputs of ')} of {name!r}")
            stack.extend(node.values())
    return widest


def _shape_text(shape: Shape | None) -> str:
    dims = ", ".join("None" if not isinstance(d, int) else str(d) for d in shape or ())
    return f"({dims})"


def _declared_values(
    config: dict[str, Any],
    input_shapes: list[Shape | None],
    widest: tuple[int, str] | None = None,
) -> list[tuple[int, str]]:
    """Values the layer's variables must hold, by its config and the inputs it is called on,
    each with how the config says so: single keys, their products, then per input channel."""
    sizes = {key: _declared_size(config[key]) for key in config if key in _SIZE_KEYS}
    sizes = {key: size for key, size in sizes.items() if size is not None}
    candidates = [(size, f"{key}={_text(config[key])}") for key, size in sizes.items()]
    for keys in _SIZE_PRODUCTS:
        if keys == ("filters", "kernel_size") and "depth_multiplier" in sizes:
            continue  # a separable convolution has no kernel of that size
        if all(key in sizes for key in keys):
            product = math.prod(sizes[key] for key in keys)
            said = " and ".join(f"{key}={_text(config[key])}" for key in keys)
            candidates.append((product, f"{said} ({product} values)"))
    channels = max((_channels(config, shape) for shape in input_shapes), default=1)
    kernel = _per_channel_kernel(sizes)
    if channels > 1 and kernel is not None:
        key, size = kernel
        candidates.append(
            (
                size * channels,
                f"{key}={_text(config[key])} on inputs of {channels} channels "
                f"({size * channels} values)",
            )
        )
    elif kernel is not None and widest is not None and not _channels_known(config, input_shapes):
        # The config does not give this layer's inputs; they may be as wide as the widest
        # layer of the model says it makes (a Dense after CategoryEncoding(num_tokens=2e7)).
        key, size = kernel
        bound, said = widest
        candidates.append(
            (
                size * bound,
                f"{key}={_text(config[key])} on inputs whose channels the config does not "
                f"give, up to {said} ({size * bound} values)",
            )
        )
    return candidates


def _channels_known(config: dict[str, Any], input_shapes: list[Shape | None]) -> bool:
    if not input_shapes:
        return False
    for shape in input_shapes:
        if not shape:
            return False
        axis = 1 if config.get("data_format") == "channels_first" and len(shape) > 2 else -1
        channels = shape[axis]
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            return False
    return True


def _per_channel_kernel(sizes: dict[str, int]) -> tuple[str, int] | None:
    """The key naming the layer's first kernel, and that kernel's values per input channel
    (Dense: units; a convolution: filters x kernel size; attention: heads x key size)."""
    if "input_dim" in sizes:
        return None  # an Embedding: its inputs are indices, not channels
    kernel = sizes.get("kernel_size", 1)
    if "num_heads" in sizes:
        return "num_heads", sizes["num_heads"] * sizes.get("key_dim", 1)
    if "depth_multiplier" in sizes:
        return "depth_multiplier", sizes["depth_multiplier"] * kernel
    if "filters" in sizes:
        return "filters", sizes["filters"] * kernel
    if "units" in sizes:
        return "units", sizes["units"]
    return None


def _channels(config: dict[str, Any], shape: Shape | None) -> int:
    """The input channels a layer's kernel spans (the last axis, the first for channels_first),
    divided among its groups; 1 where the shape does not say."""
    if not shape:
        return 1
    axis = 1 if config.get("data_format") == "channels_first" and len(shape) > 2 else -1
    channels, groups = shape[axis], config.get("groups", 1)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        return 1
    if isinstance(groups, int) and not isinstance(groups, bool) and groups > 1:
        return max(channels // groups, 1)
    return channels


def _declared_size(value: Any) -> int | None:
    """An int, or the product of a list of ints (a kernel size)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return math.prod(value)
    return None
