"""Broken model files: one `Error: <file>: <what is wrong>` line, exit 1, nothing written."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from conftest import run_cli

from fusecli.cli import cli
from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model
from fusecli.safety.scan import scan

BROKEN = {
    "missing.keras": "no such file",
    "empty.keras": "is empty",
    "truncated.keras": "is not a valid .keras archive (File is not a zip file)",
    "truncated.h5": "is not a readable HDF5 file (Unable to synchronously open file (truncated "
    "file: eof = {half}, sblock->base_addr = 0, stored_eof = {size}))",
    "random.keras": "is neither a .keras archive nor an HDF5 file",
    "text.keras": "is neither a .keras archive nor an HDF5 file",
    "no_model.h5": "is an HDF5 file without a model (no model_config attribute)",
    "folder.keras": "is a directory, not a model file",
    "no_config.keras": "is a zip archive without config.json, not a .keras model",
    "bad_json.keras": "config.json is not valid JSON (Expecting property name enclosed in double "
    "quotes: line 1 column 2 (char 1))",
    "config_not_a_model.keras": "config.json does not describe a Keras object",
    "no_weights.keras": "is a zip archive without model.weights.h5, not a .keras model",
    "model.txt": "is not a Keras model file (expected .keras, .h5, .hdf5)",
}


@pytest.fixture(scope="session")
def broken(tmp_path_factory, model_files) -> dict[str, tuple[Path, str]]:
    """Each broken file, with the message it must produce."""
    d = tmp_path_factory.mktemp("broken")
    good = model_files["a"].read_bytes()
    good_h5 = model_files["a_h5"].read_bytes()
    (d / "empty.keras").touch()
    (d / "truncated.keras").write_bytes(good[: len(good) // 2])
    (d / "truncated.h5").write_bytes(good_h5[: len(good_h5) // 2])
    (d / "random.keras").write_bytes(os.urandom(4096))
    (d / "text.keras").write_text("hello, I am not a model\n")
    (d / "model.txt").write_bytes(good)
    with h5py.File(d / "no_model.h5", "w") as f:
        f["x"] = [1.0, 2.0]
    (d / "folder.keras").mkdir()
    with zipfile.ZipFile(d / "no_config.keras", "w") as z:
        z.writestr("metadata.json", "{}")
    for name, replace in [
        ("bad_json.keras", {"config.json": b"{not json"}),
        ("config_not_a_model.keras", {"config.json": b"[1, 2]"}),
        ("no_weights.keras", {"model.weights.h5": None}),
    ]:
        with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(d / name, "w") as dst:
            for member in src.namelist():
                data = replace.get(member, src.read(member))
                if data is not None:
                    dst.writestr(member, data)
    sizes = {"half": len(good_h5) // 2, "size": len(good_h5)}
    return {name: (d / name, message.format(**sizes)) for name, message in BROKEN.items()}


@pytest.mark.parametrize("name", BROKEN)
def test_readers_raise_model_file_error(broken, name):
    path, message = broken[name]
    for reader in (read_model_file, load_model, scan):
        with pytest.raises(ModelFileError) as caught:
            reader(path)
        assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize("name", BROKEN)
@pytest.mark.parametrize("command", ["inspect", "fuse"])
def test_commands_answer_one_error_line(broken, model_files, tmp_path, name, command):
    path, message = broken[name]
    before = path.read_bytes() if path.is_file() else None
    out = tmp_path / "out.keras"
    args = ["inspect", str(path)] if command == "inspect" else [
        "fuse", str(model_files["a"]), str(path), "-o", str(out)
    ]  # fmt: skip
    if command == "inspect" and name == "folder.keras":
        message = "holds no model files (.keras, .h5, .hdf5)"  # inspect reads folders
    result = CliRunner().invoke(cli, args)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {path}: {message}\n"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(model_files, tmp_path):
    path = tmp_path / "locked.keras"
    path.write_bytes(model_files["a"].read_bytes())
    path.chmod(0)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert (result.exit_code, result.stderr) == (1, f"Error: {path}: cannot be read "
                                                    "(permission denied)\n")  # fmt: skip


def test_real_process_prints_no_traceback(broken):
    """Without TensorFlow in the way (inspect), so a real process is cheap."""
    paths = [str(broken[n][0]) for n in ("truncated.h5", "random.keras", "bad_json.keras")]
    result = run_cli("inspect", *paths)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == "".join(f"Error: {p}: {broken[Path(p).name][1]}\n" for p in paths)


def test_a_file_that_crashes_hdf5_costs_one_error_line(model_files, tmp_path):
    """tests/data/hdf5_crash.h5: a tf-keras .h5 with 4 bytes changed (found by fuzzing), on which
    h5py 3.14 / HDF5 1.14.6 segfault while reading the `keras_version` attribute. inspect reads
    each file in a child process, so the crash costs one error line, not the listing."""
    crash = tmp_path / "crash.h5"
    crash.write_bytes((Path(__file__).parent / "data" / "hdf5_crash.h5").read_bytes())
    result = run_cli("inspect", crash, model_files["a"])
    assert result.stdout.splitlines()[1].startswith(str(model_files["a"]))
    if result.returncode != 0:  # a future HDF5 may read it, or reject it without crashing
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"Error: {crash}: ")


def test_a_file_that_crashes_hdf5_does_not_crash_fuse(model_files, tmp_path):
    """The same file given to fuse: it is read and scanned in a child process before TensorFlow
    is imported, so the crash is reported, not suffered (it used to end in a segfault, 139)."""
    crash = tmp_path / "crash.h5"
    crash.write_bytes((Path(__file__).parent / "data" / "hdf5_crash.h5").read_bytes())
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", crash, model_files["a"], "-o", out)
    assert result.returncode in (0, 1), result.stderr  # never killed by a signal
    if result.returncode == 1:
        assert result.stderr == (
            f"Error: {crash}: crashed the HDF5 library while being read (exit code -11); the "
            "file is corrupt or hostile\n"
        )
        assert not out.exists()
