"""Fuzzing: mutated real .keras and .h5 files make the readers raise only `ModelFileError`."""

from __future__ import annotations

import contextlib
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import read_model_file
from fusecli.inspection import inspect_file
from fusecli.safety.scan import scan

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow


class Originals:
    """The real files' bytes, behind a short repr (hypothesis prints its arguments)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def __getitem__(self, kind: str) -> bytes:
        return self.files[kind]

    def __repr__(self) -> str:
        return "originals"


@pytest.fixture(scope="module")
def originals(model_files) -> Originals:
    """A real .keras and .h5; the .keras archive also with its members stored uncompressed, so
    that mutations reach the JSON and the HDF5 inside rather than only the zip's checksums."""
    keras_bytes = model_files["a"].read_bytes()
    stored = model_files["a"].with_name("a_stored.keras")
    with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(stored, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name), compress_type=zipfile.ZIP_STORED)
    return Originals({
        ".keras": keras_bytes,
        "stored.keras": stored.read_bytes(),
        ".h5": model_files["a_h5"].read_bytes(),
    })  # fmt: skip


def _mutations():
    return st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    )


def _check(path: Path) -> None:
    for reader in (read_model_file, scan, inspect_file):
        with contextlib.suppress(ModelFileError):
            reader(path)


@pytest.mark.parametrize("kind", [".keras", "stored.keras", ".h5"])
@SETTINGS
@given(mutations=_mutations(), cut=st.one_of(st.none(), st.floats(0.01, 1)))
def test_mutated_files_raise_only_model_file_error(originals, tmp_path, kind, mutations, cut):
    data = bytearray(originals[kind])
    for where, value in mutations:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: max(1, int(cut * len(data)))]
    path = tmp_path / f"fuzzed{Path(kind).suffix or kind}"
    path.write_bytes(bytes(data))
    _check(path)


@SETTINGS
@given(config=st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["class_name", "config", "name", "layers", "module",
                                       "registered_name", "inbound_nodes", "input_layers",
                                       "output_layers", "function", "function_type",
                                       "batch_shape", "trainable", "units", "kernel_size",
                                       "residual_fn", "residual_fn_type"]), inner, max_size=5),
    max_leaves=30,
))  # fmt: skip
def test_any_json_config_raises_only_model_file_error(originals, tmp_path, config):
    path = tmp_path / "odd.keras"
    src = tmp_path / "src.keras"
    src.write_bytes(originals[".keras"])
    with zipfile.ZipFile(src) as s, zipfile.ZipFile(path, "w") as d:
        for name in s.namelist():
            body = {"class_name": "Functional", "config": config} if name == "config.json" else None
            d.writestr(name, json.dumps(body) if body else s.read(name))
    _check(path)
