"""The door into Keras: the bytes scanned are the bytes loaded, reads are isolated whatever the
caller imported and end within a time limit, and interrupted commands leave no files behind.

The attacks run in real subprocesses (a crash, a hang or a payload must never touch pytest's own
process), on real files made here.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, run_cli
from filesupport import keras2_files

from fusecli.cli import cli
from fusecli.errors import FusecliError
from fusecli.safety.isolation import TIMEOUT_VARIABLE, read_timeout

# Slow tier: tf-keras references, isolated children or whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

# A subprocess that loads through the door, with the attacker's move made at the worst moment:
# right after the scan, before Keras reads anything. A custom layer registered by the calling
# program stands for the payload (Keras runs registered code even in safe mode; the scan refuses
# any custom object): constructing it leaves a marker file.
_SWAP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import keras
    import fusecli
    from fusecli.safety import loading

    work, benign, other, keras2, keras2_other = map(os.path.abspath, sys.argv[1:6])
    marker = os.path.join(work, "payload-ran")
    hostile = os.path.join(work, "hostile.keras")

    @keras.saving.register_keras_serializable("Gadget")
    class Marker(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if os.environ.get("ARMED"):
                open(marker, "w").close()

        def call(self, x):
            return x

    x = keras.Input((4,))
    keras.Model(x, Marker()(keras.layers.Dense(3)(x))).save(hostile)
    os.environ["ARMED"] = "1"

    swaps = {}  # link -> what it is re-pointed to right after its scan
    scan = loading.refuse_unsafe_each

    def scan_then_repoint(paths, *, trust=False):
        checked = scan(paths, trust=trust)
        for link, target in swaps.items():
            os.symlink(target, link + ".new")
            os.replace(link + ".new", link)
        swaps.clear()
        return checked

    loading.refuse_unsafe_each = scan_then_repoint

    def link_to(name, target, then):
        link = os.path.join(work, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(target, link)
        swaps[link] = then
        return link

    batch = np.linspace(-2, 2, 8 * 4, dtype="float32").reshape(8, 4)
    result = {}
    model = fusecli.load_model(link_to("model.keras", benign, hostile))
    result["load_model"] = np.asarray(model(batch)).tolist()
    fused = fusecli.fuse([link_to("first.keras", benign, hostile), other])
    result["fuse"] = np.asarray(fused(batch)).tolist()
    rows = np.linspace(-1, 1, 10, dtype="float32").reshape(2, 5)
    k2 = fusecli.load_model(link_to("k2.h5", keras2, keras2_other))
    result["keras2"] = np.asarray(k2(rows)).tolist()
    result["k2_direct"] = np.asarray(fusecli.load_model(keras2)(rows)).tolist()
    result["payload_ran"] = os.path.exists(marker)
    # The payload is real: loaded by Keras itself, it runs.
    keras.saving.load_model(hostile)
    result["keras_runs_payload"] = os.path.exists(marker)
    print(json.dumps(result))
    """
)


def _python(script: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})},
        timeout=300,
    )


def test_the_bytes_scanned_are_the_bytes_keras_loads(model_files, tmp_path_factory, keras):
    """A symlink re-pointed at a hostile file right after the scan: load_model and fuse load
    what was scanned, and the payload never runs; a Keras 2 file too."""
    work = tmp_path_factory.mktemp("swap")
    k2 = keras2_files(tmp_path_factory)
    result = _python(
        _SWAP_SCRIPT, work, model_files["a"], model_files["b"], k2["k2_seq"], k2["k2_rnn"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.splitlines()[-1])

    assert got["payload_ran"] is False
    assert got["keras_runs_payload"] is True  # so the check above means something
    batch = np.linspace(-2, 2, 8 * 4, dtype="float32").reshape(8, 4)
    a = np.asarray(keras.saving.load_model(model_files["a"])(batch))
    b = np.asarray(keras.saving.load_model(model_files["b"])(batch))
    np.testing.assert_allclose(got["load_model"], a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["fuse"], 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["keras2"], got["k2_direct"], rtol=1e-6, atol=1e-7)


# -- isolation -------------------------------------------------------------------------------


def _hanging_copy(source: Path, target: Path) -> Path:
    """`source` with its global heap's free-space object made 0 bytes long: HDF5 then loops
    forever on the heap that holds `model_config` (a byte or two changed)."""
    data = bytearray(source.read_bytes())
    start = data.find(b"GCOL")
    assert start >= 0
    end = start + struct.unpack_from("<Q", data, start + 8)[0]
    p = start + 16
    while p + 16 <= end:
        index, size = struct.unpack_from("<H", data, p)[0], struct.unpack_from("<Q", data, p + 8)[0]
        if index == 0:
            struct.pack_into("<Q", data, p + 8, 0)
            target.write_bytes(bytes(data))
            return target
        p += 16 + (size + 7) // 8 * 8
    raise AssertionError("no free space in the global heap")


@pytest.fixture(scope="module")
def hostile_h5(tmp_path_factory, model_files) -> dict[str, Path]:
    """`hang.h5` loops HDF5 forever; `nested.h5` is a valid model file with 40,000 nested empty
    groups, on which HDF5's recursive visitors overflow the stack."""
    d = tmp_path_factory.mktemp("hostile_h5")
    nested = d / "nested.h5"
    nested.write_bytes(model_files["a_h5"].read_bytes())
    with h5py.File(nested, "a") as f:
        group = f.create_group("junk")
        for _ in range(40_000):
            group = group.create_group("g")
    return {"hang": _hanging_copy(model_files["a_h5"], d / "hang.h5"), "nested": nested}


_AFTER_KERAS_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras  # TensorFlow's threads are running: a fork of this process would be unsafe
    import fusecli

    for path in sys.argv[1:]:
        try:
            model = fusecli.load_model(path)
            print("loaded", model.count_params())
        except fusecli.FusecliError as e:
            print("refused", e)
    """
)


def test_reads_stay_isolated_after_import_keras(hostile_h5, model_files, tmp_path):
    """A caller that imported Keras first (reads used to run in its own process then): a file
    that crashes HDF5 and the deep file do not crash it, the hanging file ends with an error,
    and a good file still loads."""
    crash = tmp_path / "crash.h5"  # h5py 3.14 / HDF5 1.14.6 segfault on it (test_broken_files)
    crash.write_bytes((Path(__file__).parent / "data" / "hdf5_crash.h5").read_bytes())
    result = _python(
        _AFTER_KERAS_SCRIPT,
        crash,
        hostile_h5["nested"],
        hostile_h5["hang"],
        model_files["a"],
        env={TIMEOUT_VARIABLE: "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]  # never a segfault (-11)
    crashed, nested, hang, good = result.stdout.splitlines()
    assert crashed.startswith(f"refused {crash}: ")  # "crashed the HDF5 library" with HDF5 1.14
    assert nested.startswith((f"refused {hostile_h5['nested']}: ", "loaded 67"))
    assert hang == (
        f"refused {hostile_h5['hang']}: was still being read after 3 s, the limit set by "
        f"{TIMEOUT_VARIABLE} plus 1 s per 4 MiB of the file; the file is corrupt or hostile (or "
        "the disk slower than that limit allows)"
    )
    assert good == "loaded 67"


def test_a_hanging_file_is_one_error_line(hostile_h5, model_files):
    result = run_cli("inspect", hostile_h5["hang"], model_files["a"], env={TIMEOUT_VARIABLE: "2"})
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: {hostile_h5['hang']}: was still being read after 2 s, the limit set by "
        f"{TIMEOUT_VARIABLE} plus 1 s per 4 MiB of the file; the file is corrupt or hostile (or "
        "the disk slower than that limit allows)\n"
    )
    assert str(model_files["a"]) in result.stdout  # the other file is still listed


@pytest.mark.slow
def test_a_hanging_file_is_cut_at_ten_seconds_by_default(hostile_h5, model_files, tmp_path):
    """No FUSECLI_READ_TIMEOUT: 10 s, plus the file's size at 4 MiB a second (a few ms here)."""
    env = {k: v for k, v in os.environ.items() if k != TIMEOUT_VARIABLE}
    for args in (
        ("inspect", hostile_h5["hang"]),
        ("fuse", hostile_h5["hang"], model_files["a"], "-o", tmp_path / "out.keras"),
    ):
        result = run_cli(*args, env=env)
        assert result.returncode == 1
        assert "was still being read after 10 s" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_time_limit_is_refused(value, monkeypatch, model_files):
    monkeypatch.setenv(TIMEOUT_VARIABLE, value)
    with pytest.raises(FusecliError, match=f"Received: {TIMEOUT_VARIABLE}='{value}'"):
        read_timeout()
    result = CliRunner().invoke(cli, ["inspect", str(model_files["a"])])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {TIMEOUT_VARIABLE} must be a positive number of seconds. "
        f"Received: {TIMEOUT_VARIABLE}={value!r}\n"
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, what: str, limit: float = 60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found.extend(children)
        todo.extend(children)
    return found


_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import keras  # reads now go through the helper process
    import fusecli

    fusecli.load_model(sys.argv[1])
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("caller", ["cli", "after_import_keras"])
def test_killing_the_caller_kills_the_reading_child(caller, hostile_h5, tmp_path):
    """SIGTERM to a process stuck on a hanging file (the CLI, whose child is a fork of it; a
    program that imported Keras, whose child comes from the helper): every process reading for
    it ends too, and the private copy of the input is removed."""
    private = tmp_path / "tmp"
    private.mkdir()
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    argv = (
        ["-m", "fusecli", "fuse", hostile_h5["hang"], hostile_h5["hang"], "-o", tmp_path / "o.h5"]
        if caller == "cli"
        else ["-c", _LOAD_SCRIPT, hostile_h5["hang"]]
    )
    process = subprocess.Popen(
        [sys.executable, *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": pythonpath,
            "TMPDIR": str(private),
            "TF_CPP_MIN_LOG_LEVEL": "3",
        },
    )
    try:
        expected = 1 if caller == "cli" else 2  # the helper, and its child reading

        def reading() -> list[int]:
            readers = [p for p in _descendants(process.pid) if _running(p)]
            copied = list(private.glob("fusecli-*/0/hang.h5"))
            return readers if copied and len(readers) >= expected else []

        readers = _wait_for(reading, "a child reads the private copy")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGTERM
    _wait_for(lambda: not any(map(_running, readers)), "the children ended")
    assert list(private.iterdir()) == []
    assert not (tmp_path / "o.h5").exists()


# -- interrupted commands leave nothing behind -----------------------------------------------


def _npy_header(shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_combine_removes_its_temporary_output(tmp_path, signum):
    """combine reading scores from a pipe that stays open: the CLI waits inside its output
    block, its temporary file beside the target; the signal must take that file with it."""
    other = tmp_path / "other.npy"
    np.save(other, np.ones((1000, 10), dtype="float32"))
    out = tmp_path / "out.npy"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "fusecli", "combine", "-", other, "-o", out],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        process.stdin.write(_npy_header((1000, 10)))
        process.stdin.flush()
        _wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".fusecli-")], "tmp")
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.npy"]
    if signum == signal.SIGTERM:
        assert process.returncode == -signal.SIGTERM
    else:
        assert process.returncode == 1  # click's "Aborted!"


_MERGE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import fusecli

    def progress(done, total):
        print("writing", flush=True)
        time.sleep(600)  # stopped here, in the middle of writing, until the signal comes

    fusecli.merge(sys.argv[1:3], sys.argv[3], progress=progress)
    """
)


def test_sigterm_during_merge_removes_the_soup_and_its_weights(model_files, tmp_path):
    """merge stopped mid-write: `.soup.<random>.keras` exists, then SIGTERM removes it (it used
    to leave it, and a `.weights.h5`, beside the target)."""
    out = tmp_path / "soup.keras"
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-c", _MERGE_SCRIPT, model_files["a"], model_files["b"], out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        assert process.stdout.readline() == "writing\n", process.stderr.read()
        during = sorted(p.name for p in tmp_path.iterdir())
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    # files/archive.py writes the weights in place inside the archive: one temporary file.
    assert len(during) == 1 and during[0].startswith(f".fusecli-{process.pid}-soup.")
    assert process.returncode == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


_DIR_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from fusecli.output import atomic_output_dir

    with atomic_output_dir(sys.argv[1], force=False) as tmp:
        (tmp / "saved_model.pb").write_bytes(b"half written")
        print("writing", flush=True)
        time.sleep(600)  # stopped here, in the middle of writing, until the signal comes
    """
)


_SIGTERM_IN_FORK_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from fusecli.safety import isolation
    from fusecli.termination import cleanup_on_termination

    # A SIGTERM that arrives while os.fork runs its hooks (as logging's are), made certain.
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))
    with cleanup_on_termination():
        isolation.call_isolated(os.path.getsize, Path(sys.argv[1]))
        print("went on after SIGTERM")
    """
)


def test_sigterm_while_forking_a_reader_ends_the_run(tmp_path):
    """Python drops what a signal handler raises in os.fork's after-fork hooks: a SIGTERM (or
    Ctrl-C) landing there was lost, and the run went on to keep its output. Signals now wait
    until the fork has returned."""
    result = _python(_SIGTERM_IN_FORK_SCRIPT, REPO / "README.md")
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-2000:])
    assert "went on" not in result.stdout


def test_sigterm_while_writing_a_directory_removes_it(tmp_path):
    """A directory output (export's SavedModel) written from Python, not the CLI: SIGTERM
    mid-write must take the temporary directory with it."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-c", _DIR_SCRIPT, tmp_path / "model"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        assert process.stdout.readline() == "writing\n", process.stderr.read()
        during = [p.name for p in tmp_path.iterdir()]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert len(during) == 1 and during[0].startswith(f".fusecli-{process.pid}-model.")
    assert process.returncode == -signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


# -- one error family --------------------------------------------------------------------------


def test_a_deep_config_is_one_clean_error_or_loads(model_files, tmp_path, keras):
    """A 900-deep object in a config key no layer reads: it used to end in `Error:
    RuntimeError: RecursionError ...`. Every entry point either handles it or says why not,
    without a Python exception's name."""
    from filesupport import rewrite_keras_config

    def deepen(config):
        node: dict = {}
        for _ in range(900):
            node = {"a": node}
        config["config"]["unused"] = node
        return config

    deep = rewrite_keras_config(model_files["a"], tmp_path / "deep.keras", deepen)
    merged = run_cli("merge", deep, model_files["b"], "-o", tmp_path / "m.keras")  # no TF: fast
    fused = CliRunner().invoke(  # TensorFlow is imported here already: in this process
        cli, ["fuse", str(deep), str(model_files["b"]), "-o", str(tmp_path / "f.keras")]
    )
    for code, stderr in ((merged.returncode, merged.stderr), (fused.exit_code, fused.stderr)):
        assert code in (0, 1), stderr
        assert "RecursionError" not in stderr
        if code == 1:
            assert stderr.startswith(f"Error: {deep}: ")
            assert stderr.count("\n") == 1


def test_fuse_of_models_with_string_inputs(tmp_path, keras):
    """StringLookup models: fuse used to fail with `TypeError: data type 'string' not
    understood` while checking the written file."""
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        x = keras.Input((1,), dtype="string")
        h = keras.layers.StringLookup(vocabulary=["0", "1", "a"], output_mode="one_hot")(x)
        paths.append(tmp_path / f"s{seed}.keras")
        keras.Model(x, keras.layers.Dense(3)(h)).save(paths[-1])
    out = tmp_path / "fused.keras"
    result = CliRunner().invoke(cli, ["fuse", *map(str, paths), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    words = np.array([["a"], ["1"], ["zebra"]], dtype=object)
    fused = keras.saving.load_model(out)
    a, b = (np.asarray(keras.saving.load_model(p)(words)) for p in paths)
    np.testing.assert_allclose(np.asarray(fused(words)), 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-7)


def test_an_unexpected_error_is_said_as_a_bug_without_its_class_name(monkeypatch, model_files):
    """The one error place: what a file does arrives as a `FusecliError`; anything else is a
    bug, and is said so, in one line, without a Python exception's class name."""
    import fusecli.inspection

    def broken(*_args, **_kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(fusecli.inspection, "inspect_paths", broken)
    result = CliRunner().invoke(cli, ["inspect", str(model_files["a"])])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: unsupported operand (a bug in fusecli; run with -v for the traceback, and "
        "please report it)\n"
    )


def test_no_room_for_private_copies_is_one_error(monkeypatch, model_files, tmp_path):
    import tempfile

    import fusecli

    missing = tmp_path / "missing"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    with pytest.raises(FusecliError) as caught:
        fusecli.load_model(model_files["a"])
    assert str(caught.value) == (
        f"Cannot make a private folder for the model files in {missing} (No such file or "
        "directory); set TMPDIR to a folder you can write to"
    )
