"""`combine`: chunked weighted sums of .npy score arrays, from files and pipes, and bad input."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fusecli.cli import cli
from fusecli.errors import FusecliError, InvalidRequest
from fusecli.scores.arrays import combine_scores, open_scores, read_scores


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class CountingStream(io.BytesIO):
    """A pipe stand-in that remembers the largest single read."""

    largest = 0

    def readinto(self, buffer) -> int:
        self.largest = max(self.largest, len(buffer))
        return super().readinto(buffer)


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.random((103, 7), dtype=np.float32)
    b = rng.random((103, 7), dtype=np.float32)
    y = rng.integers(0, 7, size=103)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "y.npy", y)
    return a, b, y


def test_weighted_sum_in_many_small_chunks(tmp_path, arrays):
    a, b, _ = arrays
    out = tmp_path / "out.npy"
    report = combine_scores(
        [tmp_path / "a.npy", tmp_path / "b.npy"],
        out,
        (1.0, 1.5),
        normalize=False,  # the sum itself; by default the weights are rescaled to 0.4, 0.6
        chunk_bytes=200,
    )
    got = np.load(out)
    assert got.dtype == np.float32 and report.dtype == "float32"
    np.testing.assert_allclose(got, a + np.float32(1.5) * b, rtol=1e-6)
    assert report.shape == [103, 7] and report.weights == [1.0, 1.5]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 40),
    tail=st.lists(st.integers(1, 4), max_size=2),
    dtypes=st.lists(
        st.sampled_from(["<f4", ">f4", "<f8", ">f8", "<i4", "|u1", "|b1"]), min_size=1, max_size=3
    ),
    chunk_bytes=st.integers(1, 400),
    stream_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_sum_equals_numpy(
    tmp_path_factory, rows, tail, dtypes, chunk_bytes, stream_first, seed
):
    d = tmp_path_factory.mktemp("prop")
    rng = np.random.default_rng(seed)
    shape = (rows, *tail)
    arrays = [(rng.random(shape) * 10).astype(dt) for dt in dtypes]
    weights = tuple(float(w) for w in rng.uniform(-2, 2, size=len(arrays)))
    paths = []
    for i, a in enumerate(arrays):
        np.save(d / f"{i}.npy", a)
        paths.append(d / f"{i}.npy")
    stdin = None
    if stream_first:
        stdin = io.BytesIO(npy_bytes(arrays[0]))
        paths[0] = "-"
    stdout = io.BytesIO()
    report = combine_scores(
        paths,
        "-",
        weights,
        normalize=False,
        chunk_bytes=chunk_bytes,
        stdin=stdin,
        stdout=stdout,
    )
    got = np.load(io.BytesIO(stdout.getvalue()))
    wide = any(np.dtype(t).kind == "f" and np.dtype(t).itemsize == 8 for t in dtypes)
    assert got.dtype == (np.float64 if wide else np.float32) and report.dtype == str(got.dtype)
    expected = sum(w * a.astype(np.float64) for w, a in zip(weights, arrays, strict=True))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    assert got.shape == shape


def test_any_shape_and_float64(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.random((9, 2, 3))
    b = rng.random((9, 2, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    combine_scores([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "o.npy", chunk_bytes=64)
    got = np.load(tmp_path / "o.npy")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 0.5 * a + 0.5 * b.astype(np.float64), rtol=1e-12)


def test_fortran_ordered_file(tmp_path):
    a = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(6, 4))
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(read_scores(tmp_path / "a.npy"), a)


@pytest.mark.parametrize("shape", [(37, 5), (23, 3, 4)])
def test_fortran_ordered_files_are_read_in_row_chunks_without_a_map(tmp_path, shape):
    rng = np.random.default_rng(2)
    a = np.asfortranarray(rng.random(shape))
    b = rng.random(shape)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    combine_scores([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "o.npy", chunk_bytes=100)
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), 0.5 * a + 0.5 * b)
    with open_scores(tmp_path / "a.npy") as reader:
        assert not any(isinstance(v, np.memmap) for v in vars(reader).values())
        parts = [reader.read_rows(4) for _ in range(0, shape[0], 4)]
    np.testing.assert_array_equal(np.concatenate(parts), a)
    assert {len(p) for p in parts[:-1]} == {4}


def test_stdin_and_stdout_streams_in_bounded_reads(tmp_path, arrays):
    a, b, _ = arrays
    stdin = CountingStream(npy_bytes(a))
    stdout = io.BytesIO()
    combine_scores(
        ["-", tmp_path / "b.npy"], "-", (0.25, 0.75), stdin=stdin, stdout=stdout, chunk_bytes=300
    )
    got = np.load(io.BytesIO(stdout.getvalue()))
    np.testing.assert_allclose(got, np.float32(0.25) * a + np.float32(0.75) * b, rtol=1e-6)
    # 300 bytes for a row of 2 inputs + output (3 * 28 bytes) -> 3 rows of 28 bytes per read.
    assert stdin.largest == 3 * 28


def test_accuracies_with_labels(tmp_path, arrays):
    a, b, y = arrays
    report = combine_scores(
        [tmp_path / "a.npy", tmp_path / "b.npy"],
        None,
        (0.4, 0.6),
        labels=tmp_path / "y.npy",
        chunk_bytes=500,
    )

    def top(s, k):
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return float(np.mean([c in row for c, row in zip(y, order, strict=True)]))

    fused = np.float32(0.4) * a + np.float32(0.6) * b
    for name, s in ((str(tmp_path / "a.npy"), a), (str(tmp_path / "b.npy"), b), ("fused", fused)):
        assert report.accuracy[name] == {"top1": top(s, 1), "top5": top(s, 5)}


def test_one_hot_labels_from_npz(tmp_path, arrays):
    a, b, y = arrays
    np.savez(tmp_path / "val.npz", y=np.eye(7, dtype=np.uint8)[y])
    report = combine_scores([tmp_path / "a.npy"], None, labels=tmp_path / "val.npz")
    assert report.accuracy[str(tmp_path / "a.npy")]["top1"] == np.mean(np.argmax(a, 1) == y)


def _bad_files(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "small.npy", rng.random((103, 5), dtype=np.float32))
    nan = rng.random((103, 7)).astype(np.float32)
    nan[57, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 103, dtype=object), allow_pickle=True)
    np.save(tmp_path / "str.npy", np.array(["x"] * 103))
    np.savez(tmp_path / "arch.npz", a=np.zeros(3), b=np.zeros(3))
    (tmp_path / "trunc.npy").write_bytes(npy_bytes(np.zeros((103, 7), np.float32))[:500])
    (tmp_path / "junk.npy").write_bytes(b"hello world, not numpy")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.save(tmp_path / "short_y.npy", np.zeros(50, dtype=int))
    np.save(tmp_path / "big_y.npy", np.full(103, 9))
    _write_header_only(tmp_path / "neg.npy", "<f4", (-1, 7), b"\0" * 64)
    _write_header_only(tmp_path / "neg_y.npy", "<i8", (-1,), b"\0" * 64)
    _write_header_only(tmp_path / "huge_y.npy", "<i8", (10**15,), b"\0" * 64)


def _write_header_only(path, descr, shape, data: bytes) -> None:
    """A .npy whose header says `shape` whatever `data` follows it."""
    import numpy.lib.format as npy_format

    with open(path, "wb") as f:
        header = {"descr": descr, "fortran_order": False, "shape": shape}
        npy_format.write_array_header_1_0(f, header)
        f.write(data)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        (
            ["a.npy", "small.npy"],
            {},
            "Score arrays must have the same shape to be combined. "
            "Received: {d}/a.npy has shape (103, 7), {d}/small.npy has shape (103, 5)",
        ),
        (["a.npy", "nan.npy"], {}, "{d}/nan.npy: holds NaN or infinite values (first in row 57)"),
        (["obj.npy"], {}, "{d}/obj.npy: holds Python objects, not numbers"),
        (["str.npy"], {}, "{d}/str.npy: holds values of dtype <U1, not numbers"),
        (
            ["arch.npz"],
            {},
            "{d}/arch.npz: holds 2 arrays (a, b); name the one to read as {d}/arch.npz:NAME",
        ),
        (
            ["trunc.npy"],
            {},
            "{d}/trunc.npy: is truncated (its header promises 2884 bytes of data for shape "
            "(103, 7), the file holds 372)",
        ),
        (["junk.npy"], {}, "{d}/junk.npy: is not a .npy array"),
        (["neg.npy"], {}, "{d}/neg.npy: has a broken .npy header (negative size in shape (-1, 7))"),
        (
            ["a.npy"],
            {"labels": "neg_y.npy"},
            "{d}/neg_y.npy: has a broken .npy header (negative size in shape (-1,))",
        ),
        (
            ["a.npy"],
            {"labels": "huge_y.npy"},
            "{d}/huge_y.npy: is truncated (its header promises 8000000000000000 bytes of data "
            "for shape (1000000000000000,), the file holds 64)",
        ),
        (["empty.npy"], {}, "{d}/empty.npy: is empty"),
        (["missing.npy"], {}, "{d}/missing.npy: no such file"),
        (
            ["a.npy"],
            {"labels": "short_y.npy"},
            "{d}/short_y.npy: expected one label per row of the scores (103 rows). "
            "Received: 50 labels",
        ),
        (
            ["a.npy"],
            {"labels": "big_y.npy"},
            "{d}/big_y.npy: holds class 9, but the scores have 7 classes (0 to 6)",
        ),
        (["a.npy"], {"output": "a.npy"}, "{d}/a.npy: is one of the input files; choose another"),
        (["a.npy"], {"output": "b.npy"}, "{d}/b.npy: already exists (use --force to replace it)"),
    ],
)
def test_bad_input_is_one_clean_error_and_writes_nothing(tmp_path, arrays, inputs, kwargs, message):
    _bad_files(tmp_path)
    output = tmp_path / kwargs.pop("output", "out.npy")
    if "labels" in kwargs:
        kwargs["labels"] = tmp_path / kwargs["labels"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FusecliError) as e:
        combine_scores([tmp_path / i for i in inputs], output, **kwargs)
    assert str(e.value).startswith(message.format(d=tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_requests_refused_before_reading(tmp_path, arrays):
    with pytest.raises(InvalidRequest, match=r"Only one input can be read from stdin"):
        combine_scores(["-", "-"], "-")
    with pytest.raises(InvalidRequest, match=r"Expected one weight per model \(2 models\)"):
        combine_scores([tmp_path / "a.npy", tmp_path / "b.npy"], "-", (1.0,))
    with pytest.raises(InvalidRequest, match=r"The output must be a .npy file"):
        combine_scores([tmp_path / "a.npy"], tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_stream_that_ends_early(arrays):
    a = arrays[0]
    with (
        open_scores("-", stdin=io.BytesIO(npy_bytes(a)[:-30])) as reader,
        pytest.raises(
            FusecliError, match=r"^-: the .npy data ends early \(expected 103 rows of 28 bytes"
        ),
    ):
        reader.read_all()
    with pytest.raises(FusecliError, match=r"^-: stdin is empty \(expected a .npy stream\)$"):
        combine_scores(["-"], None, labels=None, stdin=io.BytesIO(b""))


def test_cli_file_output_and_json(tmp_path, arrays):
    a, b, y = arrays
    runner = CliRunner()
    args = ["combine", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--w", "1", "1.5"]
    result = runner.invoke(cli, [*args, "-o", str(tmp_path / "o.npy")])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'o.npy'}\n"
    # --w 1 1.5 is rescaled to 0.4, 0.6 by default, and stderr says so
    assert result.stderr.startswith(
        "Weights 1, 1.5 rescaled to sum to 1: 0.4, 0.6 (--no-normalize keeps them as given).\n"
    )
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), 0.4 * a + 0.6 * b, rtol=1e-6)
    args = [*args, "--no-normalize"]
    result = runner.invoke(cli, [*args, "-o", str(tmp_path / "o.npy"), "--force"])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), a + np.float32(1.5) * b, rtol=1e-6)

    result = runner.invoke(cli, [*args, "--labels", str(tmp_path / "y.npy"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["output"] is None and doc["weights"] == [1.0, 1.5]
    fused_top1 = float(np.mean(np.argmax(a + np.float32(1.5) * b, axis=1) == y))
    assert doc["accuracy"]["fused"]["top1"] == fused_top1
    assert re.search(rf"^  fused +{fused_top1:.4f}  ", result.stderr, re.MULTILINE)


def test_cli_stdin_to_stdout(tmp_path, arrays):
    a, b, _ = arrays
    result = CliRunner().invoke(
        cli, ["combine", "-", str(tmp_path / "b.npy"), "-o", "-"], input=npy_bytes(a)
    )
    assert result.exit_code == 0, result.stderr
    got = np.load(io.BytesIO(result.stdout_bytes))
    np.testing.assert_allclose(got, np.float32(0.5) * a + np.float32(0.5) * b, rtol=1e-6)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["a.npy"], 2, "Nothing to do: give -o OUTPUT (- for stdout), --labels, or both"),
        (["a.npy", "-o", "-", "--json"], 2, "--json and -o - would both write to stdout"),
        (["-", "-", "-o", "-"], 2, "Only one input can be read from stdin ('-')"),
        (["a.npy", "b.npy", "--w", "1", "-o", "-"], 2, "Expected one weight per model"),
        (["a.npy", "small.npy", "-o", "x.npy"], 1, "Error: Score arrays must have the same shape"),
    ],
)
def test_cli_errors(tmp_path, arrays, monkeypatch, args, code, message):
    _bad_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["combine", *args])
    assert result.exit_code == code
    assert message in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "x.npy").exists()


def _fifo(tmp_path, name, content: bytes):
    """A named pipe that a thread fills with `content` once a reader opens it."""
    import os
    import threading

    path = tmp_path / name
    os.mkfifo(path)

    def feed() -> None:
        with open(path, "wb") as f:
            f.write(content)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return path


def test_named_pipes_as_inputs_and_labels(tmp_path, arrays):
    a, b, y = arrays
    pipe_a = _fifo(tmp_path, "a.pipe", npy_bytes(a))
    pipe_y = _fifo(tmp_path, "y.pipe", npy_bytes(y))
    out = tmp_path / "x.npy"
    report = combine_scores([pipe_a, tmp_path / "b.npy"], out, labels=pipe_y)
    np.testing.assert_allclose(np.load(out), np.float32(0.5) * a + np.float32(0.5) * b, rtol=1e-6)
    assert report.accuracy["fused"]["top1"] == pytest.approx(
        np.mean(np.argmax(0.5 * a + 0.5 * b, axis=1) == y)
    )


def test_fortran_order_from_a_named_pipe_is_refused(tmp_path, arrays):
    pipe = _fifo(tmp_path, "f.pipe", npy_bytes(np.asfortranarray(arrays[0])))
    with pytest.raises(FusecliError) as e:
        combine_scores([pipe, tmp_path / "b.npy"], tmp_path / "x.npy")
    assert str(e.value) == (
        f"{pipe}: a Fortran-ordered .npy cannot be read from a pipe in rows; "
        "save it as C-ordered (np.ascontiguousarray) or pass it as a regular file"
    )
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize(
    ("a", "b", "weights", "row"),
    [
        (np.ones((4, 3), np.float32), np.ones((4, 3), np.float32), [1e39, 1], 0),
        (
            np.array([[1, 2], [3e38, 3e38], [1, 1]], np.float32),
            np.array([[1, 2], [3e38, 1], [1, 1]], np.float32),
            [1, 1],
            1,
        ),
    ],
)
def test_overflow_to_infinity_is_refused_without_warnings(tmp_path, a, b, weights, row):
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    result = CliRunner().invoke(
        cli,
        [
            "combine",
            str(tmp_path / "a.npy"),
            str(tmp_path / "b.npy"),
            "--w",
            *map(str, weights),
            "--no-normalize",
            "-o",
            str(tmp_path / "x.npy"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: The fused scores overflow float32 in row {row} (the weighted sum is beyond "
        "3.403e+38); use smaller weights or float64 scores\n"
    )
    assert not (tmp_path / "x.npy").exists()


def test_zero_rows_with_labels_are_refused(tmp_path):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(0, dtype=int))
    inputs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    with pytest.raises(FusecliError) as e:
        combine_scores(inputs, tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert str(e.value) == (
        f"Accuracy needs at least one row of scores. Received: {inputs[0]} has shape (0, 3)"
    )
    assert not (tmp_path / "x.npy").exists()
    combine_scores(inputs, tmp_path / "x.npy")  # without labels, 0 rows are fine
    assert np.load(tmp_path / "x.npy").shape == (0, 3)


def test_labels_that_are_not_arrays(tmp_path, arrays):
    import zipfile

    import h5py

    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        z.writestr("y.npy", b"raw bytes, not a .npy")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("y", data=h5py.Empty("f4"))
    expected = {
        "raw.npz": "array 'y' is not a .npy array (got bytes)",
        "empty.h5": "array 'y' is an empty dataset with no shape",
    }
    for name, message in expected.items():
        with pytest.raises(FusecliError) as e:
            combine_scores([tmp_path / "a.npy"], tmp_path / "x.npy", labels=tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: {message}"
        assert not (tmp_path / "x.npy").exists()
