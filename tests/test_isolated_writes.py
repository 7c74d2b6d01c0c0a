"""Reading the inputs' tensors, isolated: an input that crashes HDF5 when its tensors are read costs
`fuse` and `merge` one `Error:` line, and leaves no file beside the output.

The crafted file's chunk index loops: HDF5 crashes on it whenever it walks the index, which the
scan does too (it asks for the dataset's stored size); so the file is swapped in right after the
scans, as an attacker holding the path could, and the crash happens where the tensors are read.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, run_cli

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

_WEIGHTS = "model.weights.h5"


def _chunked_kernel(h5: h5py.File) -> None:
    """The first kernel rewritten as a chunked dataset (one row per chunk), its attributes
    kept: a valid file, whose values a chunk B-tree indexes."""
    names: list[str] = []
    h5.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    name = next(n for n in names if n.endswith(("kernel", "vars/0")))
    old = h5[name]
    values, attrs = old[()], dict(old.attrs)
    del h5[name]
    new = h5.create_dataset(name, data=values, chunks=(1, *values.shape[1:]))
    for key, value in attrs.items():
        new.attrs[key] = value


def _loop_the_chunk_index(data: bytes) -> bytes:
    """The chunk B-tree's leaf made an inner node whose children are itself: HDF5 (1.14)
    descends it until its stack overflows, when the data is read, and only then."""
    out = bytearray(data)
    nodes = [i for i in range(len(out) - 8) if out[i : i + 4] == b"TREE" and out[i + 4] == 1]
    assert len(nodes) == 1  # the one chunked dataset's index (node type 1: raw data chunks)
    node = nodes[0]
    entries = struct.unpack_from("<H", out, node + 6)[0]
    key = 4 + 4 + 8 * 3  # chunk size, filter mask, (2 dims + 1) offsets
    out[node + 5] = 1  # level 1: its children are nodes
    for k in range(entries):
        struct.pack_into("<Q", out, node + 24 + key + k * (key + 8), node)
    return bytes(out)


def _bad_h5(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as h5:
        _chunked_kernel(h5)
    target.write_bytes(_loop_the_chunk_index(target.read_bytes()))
    return target


def _bad_keras(source: Path, target: Path) -> Path:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == _WEIGHTS:
                buffer = io.BytesIO(data)
                with h5py.File(buffer, "a") as h5:
                    _chunked_kernel(h5)
                data = _loop_the_chunk_index(buffer.getvalue())
            zout.writestr(info, data)
    return target


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, model_files) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_data")
    return {
        "keras": _bad_keras(model_files["a"], d / "bad.keras"),
        "h5": _bad_h5(model_files["a_h5"], d / "bad.h5"),
    }


def _read_all(path: Path) -> int:
    """Read every dataset of an HDF5 file in a subprocess: its exit code."""
    script = (
        "import h5py, sys\n"
        "f = h5py.File(sys.argv[1], 'r')\n"
        "names = []\n"
        "f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)\n"
        "for name in names:\n"
        "    f[name][()]\n"
    )
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True).returncode


def test_the_crafted_files_crash_hdf5_when_read(bad_files, tmp_path):
    """What the tests below rely on: reading the files' data kills the reader; the scan, which
    is isolated, says so in one line."""
    with zipfile.ZipFile(bad_files["keras"]) as z:
        (tmp_path / _WEIGHTS).write_bytes(z.read(_WEIGHTS))
    assert _read_all(tmp_path / _WEIGHTS) < 0  # killed by a signal (SIGSEGV)
    assert _read_all(bad_files["h5"]) < 0
    result = run_cli("inspect", bad_files["keras"])
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: {bad_files['keras']}: crashed the HDF5 library while being read (exit code "
        "-11); the file is corrupt or hostile\n"
    )


# The command line, with merge's last check of its inputs (the variable list) made to re-point a
# symlink at the crafted file right after it has passed. (fuse has no such window: it reads each
# input through one open of it, or a private copy made from one, tests/test_same_bytes.py.)
_SWAP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    {before}
    from fusecli.cli import cli
    from fusecli.merging import merge

    link, bad = sys.argv[1:3]

    def swap():
        if os.path.realpath(link) != os.path.realpath(bad):
            os.symlink(os.path.abspath(bad), link + ".new")
            os.replace(link + ".new", link)

    def then_swap(check):
        def checked(*args, **kwargs):
            result = check(*args, **kwargs)
            swap()
            return result
        return checked

    merge._check_architectures = then_swap(merge._check_architectures)
    cli.main(args=sys.argv[3:], prog_name="fusecli")
    """
)


def _swapped(command: list, link: Path, good: Path, bad: Path, *, keras_first: bool = False):
    """Run the CLI `command` with `link` pointing at `good`, re-pointed at `bad` after the
    inputs' checks."""
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(good)
    before = "import keras  # TensorFlow's threads run: the helper's child reads" * keras_first
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", _SWAP_SCRIPT.format(before=before), link, bad, *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=300,
    )


def _one_error_line(result: subprocess.CompletedProcess, out_dir: Path, *, logs: bool) -> str:
    """The error line; with `logs`, after TensorFlow's start-up lines (the script imported it)."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines(keepends=True)
    if logs:
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert list(out_dir.iterdir()) == []  # no output, no temporary file beside it
    return lines[0]


@pytest.mark.parametrize(
    ("command", "bad", "good", "other", "keras_first"),
    [
        ("merge", "keras", "a", "b", False),
        ("merge", "h5", "a_h5", "b_h5", False),
        ("merge", "keras", "a", "b", True),
    ],
)
def test_a_crash_while_reading_tensors_is_one_error_line(
    bad_files, model_files, tmp_path, command, bad, good, other, keras_first
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    link = inputs / f"model{bad_files[bad].suffix}"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"out{bad_files[bad].suffix}"
    result = _swapped(
        [command, link, model_files[other], "-o", out],  # the link first: swapped after its scan
        link,
        model_files[good],
        bad_files[bad],
        keras_first=keras_first,
    )
    message = _one_error_line(result, out_dir, logs=keras_first)
    # The crash is survived, and the input it came from named: it changed after its scan.
    assert message == f"Error: {link}: changed while it was being read; the result was not kept\n"
    assert os.path.realpath(link) == str(bad_files[bad])  # the swap did happen


def test_without_the_swap_the_same_commands_write_right_files(model_files, tmp_path, keras):
    """The same scripts, the link left alone: written, and right."""
    x = np.linspace(-2, 2, 6 * 4, dtype="float32").reshape(6, 4)
    a = keras.saving.load_model(model_files["a"])
    b = keras.saving.load_model(model_files["b"])
    link = tmp_path / "model.keras"
    fused = tmp_path / "fused.keras"
    same = model_files["a"]
    result = _swapped(["fuse", link, model_files["b"], "-o", fused], link, same, same)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(
        keras.saving.load_model(fused)(x), 0.5 * a(x) + 0.5 * b(x), rtol=1e-5, atol=1e-6
    )
    merged = tmp_path / "merged.keras"
    result = _swapped(["merge", link, model_files["b"], "-o", merged], link, same, same)
    assert result.returncode == 0, result.stderr[-3000:]
    soup = keras.saving.load_model(merged)
    for got, wa, wb in zip(soup.weights, a.weights, b.weights, strict=True):
        np.testing.assert_allclose(got, (np.asarray(wa) + np.asarray(wb)) / 2, rtol=1e-6)
