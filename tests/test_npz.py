""".keras files whose weights are `model.weights.npz`: Keras (3.6+) can write them, pickling
each layer's variables. The scan finds the pickles without numpy's help, inspect describes the
files, and every command refuses them; no pickle ever runs."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli

from fusecli.cli import cli
from fusecli.errors import ModelFileError, UnsafeModelError
from fusecli.inspection import inspect_file
from fusecli.merging.merge import merge
from fusecli.safety.loading import load_model
from fusecli.safety.scan import scan

PICKLE = "is a NumPy object array, stored as a pickle, which runs code when loaded"
REFUSING = "; refusing (use --trust to load it anyway)"


class _Payload:
    """Unpickling this calls os.system: the pickle a hostile file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _with_npz(source: Path, target: Path, arrays: dict[str, bytes]) -> Path:
    """`source`'s config and metadata, its weights replaced by an npz of these .npy members."""
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as z:
        for key, data in arrays.items():
            z.writestr(f"{key}.npy", data)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in ("metadata.json", "config.json"):
            dst.writestr(name, src.read(name))
        dst.writestr("model.weights.npz", npz.getvalue())
    return target


@pytest.fixture(scope="session")
def npz_files(tmp_path_factory, keras, model_files) -> dict[str, Path]:
    from keras.src.saving import saving_lib  # the only way to choose Keras' npz format

    d = tmp_path_factory.mktemp("npz")
    files = {"marker": d / "pickle_ran"}
    model = keras.saving.load_model(model_files["a"])
    files["keras"] = d / "written_by_keras.keras"
    saving_lib.save_model(model, files["keras"], weights_format="npz")
    evil = np.empty((), dtype=object)
    evil[()] = _Payload(files["marker"])
    files["hostile"] = _with_npz(
        model_files["a"], d / "hostile.keras", {"layers/dense": _npy(evil)}
    )
    files["numeric"] = _with_npz(
        model_files["a"],
        d / "numeric.keras",
        {"a": _npy(np.ones((4, 8), "float32")), "b": _npy(np.ones(8, "float32"))},
    )
    header = _npy(np.zeros(0, "float32"))  # a header that will be made to declare 1 GiB
    bomb = header.replace(b"(0,)", b"(268435456,)".ljust(len(b"(0,)")))
    files["bomb_source"] = bomb
    return files


def test_keras_npz_pickles_are_found_without_unpickling(npz_files):
    findings = scan(npz_files["keras"])
    keys = [f.path for f in findings]
    assert keys == [
        "model.weights.npz:__root__",
        "model.weights.npz:layers/input_layer",
        "model.weights.npz:layers/dense",
        "model.weights.npz:layers/dense_1",
    ]
    assert all(f.what == "archive member" and f.class_name == "pickle" for f in findings)
    assert findings[0].reason == PICKLE  # an empty dict: only numpy's own names
    assert findings[2].reason.startswith(
        f"{PICKLE} (it imports 'keras.src.backend.Variable', 'functools.partial', "
        "'tensorflow.python.ops.resource_variable_ops.ResourceVariable' and 1 more)"
    )


@pytest.mark.slow
def test_a_hostile_pickle_is_named_and_never_runs(npz_files, model_files, tmp_path):
    path = npz_files["hostile"]
    (finding,) = scan(path)
    assert finding.describe() == (
        f"archive member 'model.weights.npz:layers/dense' {PICKLE} (it imports 'posix.system')"
    )
    message = f"{path}: {finding.describe()}{REFUSING}"
    with pytest.raises(UnsafeModelError) as caught:
        load_model(path)
    assert str(caught.value) == message
    with pytest.raises(UnsafeModelError) as caught:
        merge([path, path], tmp_path / "m.keras")
    assert str(caught.value) == message
    result = run_cli("fuse", path, model_files["a"], "-o", tmp_path / "f.keras")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    # With --trust the file reaches Keras, whose own loader refuses object arrays.
    with pytest.raises(ModelFileError) as caught:
        load_model(path, trust=True)
    assert "Object arrays cannot be loaded when allow_pickle=False" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert not npz_files["marker"].exists()


def test_inspect_describes_npz_files(npz_files, model_files):
    report = inspect_file(npz_files["keras"])
    original = inspect_file(model_files["a"])
    for key in ("format", "name", "class_name", "inputs", "outputs", "layers"):
        assert report[key] == original[key]
    assert report["params"] is None  # pickled: never read
    assert len(report["unsafe"]) == 4
    assert inspect_file(npz_files["numeric"])["params"] == 4 * 8 + 8

    result = run_cli("inspect", npz_files["hostile"])
    assert result.returncode == 0, result.stderr
    row = result.stdout.splitlines()[1]
    assert row.startswith(str(npz_files["hostile"])) and " float32  ?  " in row
    assert not npz_files["marker"].exists()


def test_merge_refuses_npz_weights_even_with_trust(npz_files, tmp_path):
    path = npz_files["numeric"]
    result = CliRunner().invoke(cli, ["merge", str(path), str(path), "-o",
                                      str(tmp_path / "m.keras"), "--trust"])  # fmt: skip
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: {path}: keeps its weights in model.weights.npz (NumPy pickles, which fusecli "
        "never unpickles) rather than model.weights.h5; re-save it with Keras' default weights "
        "format\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_npz_array_declaring_far_more_than_it_stores_is_refused(
    npz_files, model_files, tmp_path
):
    path = _with_npz(model_files["a"], tmp_path / "bomb.keras", {"big": npz_files["bomb_source"]})
    with pytest.raises(ModelFileError) as caught:
        scan(path)
    assert str(caught.value).startswith(
        f"{path}: model.weights.npz array 'big' declares 1073741824 bytes but stores "
    )
    assert str(caught.value).endswith("; refusing a possible decompression bomb")


def test_npz_pickles_are_not_read_through_numpy(npz_files):
    """The pickle bytes stay bytes: reading them back needs allow_pickle, which fusecli never
    passes (the control shows they are real pickles)."""
    with zipfile.ZipFile(npz_files["hostile"]) as z:
        inner = zipfile.ZipFile(io.BytesIO(z.read("model.weights.npz")))
        data = inner.read("layers/dense.npy")
    with pytest.raises(ValueError, match="allow_pickle=False"):
        np.load(io.BytesIO(data))
    assert b"system" in data and pickle.PROTO[0] in data
    assert json.loads(json.dumps(inspect_file(npz_files["hostile"])["unsafe"]))


def test_absurd_config_sizes_are_refused_with_npz_weights_and_trust(npz_files, tmp_path):
    """The pickles are not read, so their size in bytes bounds the values they hold."""
    with zipfile.ZipFile(npz_files["keras"]) as z:
        config = json.loads(z.read("config.json"))
        npz = z.read("model.weights.npz")
    config["config"]["layers"][1]["config"]["units"] = 2**31
    name = config["config"]["layers"][1]["config"]["name"]  # Keras numbers names per process
    path = tmp_path / "huge.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.npz", npz)
    with pytest.raises(ModelFileError) as caught:
        load_model(path, trust=True)
    assert str(caught.value).startswith(
        f"{path}: layer '{name}' declares units=2147483648, more than the "
    )
