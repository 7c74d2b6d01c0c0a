"""What a file can make the readers do is bounded: only the variables the config owns are read,
declared sizes are checked against stored ones (datasets, zip members, configs), walks are
iterative and bounded, and files that are two things at once are refused on purpose."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli
from filesupport import rewrite_h5_config, rewrite_keras_config

from fusecli.cli import cli
from fusecli.errors import ModelFileError, UnsafeModelError
from fusecli.formats.modelfile import read_model_file
from fusecli.formats.weights_layout import read_layout
from fusecli.merging.merge import merge
from fusecli.safety.loading import load_model
from fusecli.safety.scan import scan

BOMB = "; refusing a possible decompression bomb"


def _edit_keras_weights(source: Path, target: Path, edit) -> Path:
    """Copy a .keras archive, passing its model.weights.h5 through `edit(h5py.File)`."""
    with zipfile.ZipFile(source) as src:
        members = {n: src.read(n) for n in src.namelist()}
    buffer = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buffer, "r+") as h5:
        edit(h5)
    members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(target, "w") as dst:
        for name, data in members.items():
            dst.writestr(name, data)
    return target


def _lazy_zeros(h5: h5py.Group, name: str, count: int) -> None:
    """A gzip dataset declaring `count` float32 zeros, none of them written: a few KB on disk."""
    h5.create_dataset(name, shape=(count,), dtype="f4", chunks=(1 << 16,), compression="gzip")


def _one_error_line(result, message: str) -> None:
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: {message}\n"


# -- read only what Keras reads, with guards on declared sizes -------------------------------


def test_a_shape_bomb_the_config_never_reaches_is_refused(model_files, tmp_path):
    """512 MiB of declared zeros in 4 KB: merge used to merge it as a variable (2.7 GB of
    memory, a 537 MB output); now the scan refuses the file before anything is read."""
    path = _edit_keras_weights(
        model_files["a"], tmp_path / "bomb.keras", lambda h5: _lazy_zeros(h5, "junk", 1 << 27)
    )
    assert path.stat().st_size < 20_000
    message = (
        f"{path}: HDF5 dataset 'model.weights.h5:/junk' declares 536870912 bytes but stores 0 "
        f"(more than 1000 times less){BOMB}"
    )
    with pytest.raises(ModelFileError) as caught:
        scan(path)
    assert str(caught.value) == message
    out = tmp_path / "out.keras"
    _one_error_line(CliRunner().invoke(cli, ["merge", str(path), str(model_files["b"]), "-o",
                                             str(out), "--trust"]), message)  # fmt: skip
    assert not out.exists()


def test_merge_reads_only_the_variables_the_config_owns(model_files, tmp_path, keras):
    """A small dataset outside the layers is not a variable (it used to be merged as one); one
    among the layers that no layer owns is refused rather than guessed at."""
    outside = _edit_keras_weights(
        model_files["a"],
        tmp_path / "outside.keras",
        lambda h5: h5.create_dataset("extra", data=[1.0]),
    )
    assert [v.dataset for v in read_layout(outside).variables] == [
        v.dataset for v in read_layout(model_files["a"]).variables
    ]
    out = tmp_path / "soup.keras"
    merge([outside, model_files["b"]], out)
    merged = keras.saving.load_model(out).get_weights()
    a, b = (keras.saving.load_model(model_files[k]).get_weights() for k in "ab")
    for got, x, y in zip(merged, a, b, strict=True):
        np.testing.assert_allclose(got, (x + y) / 2, rtol=1e-6, atol=1e-7)

    among = _edit_keras_weights(
        model_files["a"],
        tmp_path / "among.keras",
        lambda h5: h5.create_dataset("layers/stray/vars/0", data=np.ones((4, 8), "f4")),
    )
    with pytest.raises(ModelFileError) as caught:
        merge([among, model_files["b"]], tmp_path / "no.keras")
    assert str(caught.value) == (
        f"{among}: its weights do not match its config (dataset 'layers/stray/vars/0' belongs to "
        "no layer of the config, and Keras would not load it)"
    )
    assert not (tmp_path / "no.keras").exists()


def test_a_deflated_config_that_inflates_too_far_is_refused(model_files, tmp_path):
    def pad(config):
        config["padding"] = " " * (4 << 20)
        return config

    path = tmp_path / "inflating.keras"
    with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                data = json.dumps(pad(json.loads(data))).encode()
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
        stored = next(i for i in dst.infolist() if i.filename == "config.json")
    with pytest.raises(ModelFileError) as caught:
        read_model_file(path)
    assert str(caught.value) == (
        f"{path}: member 'config.json' inflates to {stored.file_size} bytes from "
        f"{stored.compress_size} (more than 100 times){BOMB}"
    )


@pytest.mark.parametrize("key", ["units", "kernel_size"])
def test_a_config_declaring_absurd_sizes_is_refused(model_files, tmp_path, key):
    def edit(config):
        dense = config["config"]["layers"][1]["config"]
        dense[key] = 2**31 if key == "units" else [2**16, 2**16]
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "huge.keras", edit)
    value = "2147483648" if key == "units" else "[65536, 65536]"
    message = (
        f"{path}: layer 'dense' declares {key}={value}, more than the 67 values the file's "
        "weights hold; building it would allocate memory out of proportion to the file"
    )
    for reader in (scan, load_model):
        with pytest.raises(ModelFileError) as caught:
            reader(path)
        assert str(caught.value) == message
    _one_error_line(CliRunner().invoke(cli, ["inspect", str(path)]), message)


@pytest.mark.parametrize("attack", ["embedding", "wide inputs"])
def test_sizes_that_multiply_past_the_weights_are_refused(model_files, tmp_path, attack):
    """Each size under the floor, their product 81 million values (324 MB when Keras builds
    the layer, for a 13 KB file): an Embedding's table, or a Dense kernel on wide inputs."""

    def edit(config):
        inputs, dense = config["config"]["layers"][:2]
        if attack == "embedding":
            kept = {k: dense["config"][k] for k in ("name", "trainable", "dtype")}
            dense.update(class_name="Embedding", registered_name=None)
            dense["config"] = {**kept, "input_dim": 9000, "output_dim": 9000}
        else:
            inputs["config"]["batch_shape"] = [None, 9000]
            dense["config"]["units"] = 9000
            del dense["build_config"]  # Keras builds it on the Input's shape
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "wide.keras", edit)
    declared = (
        "input_dim=9000 and output_dim=9000 (81000000 values)"
        if attack == "embedding"
        else "units=9000 on inputs of 9000 channels (81000000 values)"
    )
    message = (
        f"{path}: layer 'dense' declares {declared}, more than the 67 values the file's "
        "weights hold; building it would allocate memory out of proportion to the file"
    )
    for reader in (scan, load_model):
        with pytest.raises(ModelFileError) as caught:
            reader(path)
        assert str(caught.value) == message
    _one_error_line(CliRunner().invoke(cli, ["inspect", str(path)]), message)


# -- bounded, iterative walks ----------------------------------------------------------------


def _deep(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_config_nested_900_deep_is_one_clean_error(model_files, tmp_path, suffix):
    def edit(config):
        config["unused"] = _deep(900)
        return config

    if suffix == ".keras":
        path = rewrite_keras_config(model_files["a"], tmp_path / "deep.keras", edit)
        what = "config.json"
    else:
        path = rewrite_h5_config(model_files["a_h5"], tmp_path / "deep.h5", edit)
        what = "its model_config"
    message = (
        f"{path}: {what} is nested more than 256 levels deep; no Keras model is, and such a "
        "file is refused"
    )
    with pytest.raises(ModelFileError) as caught:
        load_model(path)  # TensorFlow is imported in this process: no child, no pickling
    assert str(caught.value) == message
    out = tmp_path / "out.keras"
    result = run_cli("fuse", path, model_files["a"], "-o", out)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    assert not out.exists()


@pytest.mark.slow
def test_28_nested_sequential_models_are_read_in_one_pass(keras, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")], name="s0")
    for i in range(1, 28):
        model = keras.Sequential([keras.Input((3,)), model], name=f"s{i}")
    path = tmp_path / "nested.keras"
    model.save(path)
    assert scan(path) == []
    layout = read_layout(path)
    assert [v.layer for v in layout.variables] == ["/".join(f"s{i}" for i in range(26, -1, -1))
                                                   + "/dense"] * 2  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(model.weights[0]), _read(path, layout.variables[0].dataset)
    )


def _read(path: Path, dataset: str) -> np.ndarray:
    with zipfile.ZipFile(path) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as h5:
        return h5[dataset][()]


@pytest.fixture(scope="session")
def deep_groups(tmp_path_factory, model_files) -> Path:
    """A real .h5 model with 40,000 nested empty groups beside its weights (Keras loads it;
    HDF5's recursive visitors crash on it)."""
    path = tmp_path_factory.mktemp("deep") / "deep.h5"
    path.write_bytes(model_files["a_h5"].read_bytes())
    with h5py.File(path, "r+") as h5:
        group = h5.create_group("nest")
        for _ in range(40_000):
            group = group.create_group("g")
    return path


@pytest.mark.slow
def test_40000_nested_groups_are_refused_without_recursion(deep_groups, model_files, tmp_path):
    message = f"{deep_groups}: its HDF5 groups are nested more than 128 levels deep"
    with pytest.raises(ModelFileError) as caught:
        scan(deep_groups)  # in this process, which has imported TensorFlow
    assert str(caught.value) == message
    for args in (["inspect", deep_groups], ["merge", deep_groups, model_files["a_h5"], "-o",
                                            tmp_path / "m.h5", "--trust"]):  # fmt: skip
        result = run_cli(*args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_hard_link_loops_are_walked_once(model_files, tmp_path):
    path = tmp_path / "loop.h5"
    path.write_bytes(model_files["a_h5"].read_bytes())
    with h5py.File(path, "r+") as h5:
        h5["model_weights/loop"] = h5["model_weights"]
        h5["model_weights/loop2"] = h5["/"]
    assert scan(path) == []
    assert len(read_layout(path).variables) == 4


# -- files that are two things at once, and odd archives -------------------------------------


def test_a_zip_behind_junk_bytes_is_refused(model_files, tmp_path, keras):
    for prefix in (b"#" * 400, b"PK" + b"#" * 398):
        path = tmp_path / "prefixed.keras"
        path.write_bytes(prefix + model_files["a"].read_bytes())
        with pytest.raises(ModelFileError) as caught:
            read_model_file(path)
        assert str(caught.value) == (
            f"{path}: is a zip archive behind 400 bytes of other data; Keras writes archives "
            "from their first byte, and a file that is two things at once is refused"
        )
    assert keras.saving.load_model(path).count_params() == 67  # Keras itself reads it


def test_an_h5_whose_user_block_starts_with_pk_is_refused(model_files, tmp_path, keras):
    path = tmp_path / "userblock.h5"
    with h5py.File(model_files["a_h5"], "r") as src, h5py.File(path, "w", userblock_size=512) as d:
        for key, value in src.attrs.items():
            d.attrs[key] = value
        for key in src:
            src.copy(src[key], d, name=key)
    with open(path, "r+b") as f:
        f.write(b"PK\x03\x04")
    with pytest.raises(ModelFileError) as caught:
        read_model_file(path)
    assert str(caught.value) == (
        f"{path}: is an HDF5 file whose user block starts with a zip signature; zip tools and "
        "Keras would read different things, and a file that is two things at once is refused"
    )
    assert keras.saving.load_model(path).count_params() == 67  # Keras itself reads it


def test_a_stored_member_whose_sizes_differ_is_refused(model_files, tmp_path, keras):
    """model.weights.h5 stored with 100 extra bytes that its declared size leaves out (and a
    CRC of the declared part): zipfile, and so Keras, read the declared part; a reader that
    trusts the stored size reads more."""
    with zipfile.ZipFile(model_files["a"]) as src:
        members = {n: src.read(n) for n in src.namelist()}
    weights = members["model.weights.h5"]
    path = tmp_path / "sizes.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
        for name, data in members.items():
            dst.writestr(name, data + b"\0" * 100 if name == "model.weights.h5" else data)
    data = bytearray(path.read_bytes())
    name = b"model.weights.h5"
    for signature, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        header = _find_header(data, signature, name)  # crc, compressed size, size follow
        struct.pack_into("<I", data, header + crc_at, zlib.crc32(weights))
        struct.pack_into("<I", data, header + crc_at + 8, len(weights))
    path.write_bytes(bytes(data))
    assert keras.saving.load_model(path).count_params() == 67  # Keras itself reads it
    with pytest.raises(ModelFileError) as caught:
        read_model_file(path)
    assert str(caught.value) == (
        f"{path}: member 'model.weights.h5' is stored uncompressed but declares {len(weights)} "
        f"bytes and stores {len(weights) + 100}; readers would disagree on its content"
    )


def test_two_members_of_one_name_are_refused(model_files, tmp_path, keras):
    """A hostile config.json, then a plain one of the same name: zipfile (Keras, the scan) reads
    the last, other readers (unzip) the first; the file is two models at once."""
    with zipfile.ZipFile(model_files["a"]) as src:
        members = {n: src.read(n) for n in src.namelist()}
    config = json.loads(members["config.json"])
    config["config"]["layers"][1]["config"]["activation"] = {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": None,
    }
    path = tmp_path / "twice.keras"
    with zipfile.ZipFile(path, "w") as dst, pytest.warns(UserWarning, match="Duplicate name"):
        dst.writestr("config.json", json.dumps(config))
        for name, data in members.items():
            dst.writestr(name, data)
    assert keras.saving.load_model(path).count_params() == 67  # Keras reads the plain one
    message = (
        f"{path}: has 2 members named 'config.json'; readers would disagree on which one is "
        "the file's"
    )
    with pytest.raises(ModelFileError) as caught:
        load_model(path)
    assert str(caught.value) == message
    _one_error_line(CliRunner().invoke(cli, ["inspect", str(path)]), message)


def _find_header(data: bytearray, signature: bytes, name: bytes) -> int:
    """The offset of the local (or central) header of member `name`."""
    name_at = 26 if signature == b"PK\x03\x04" else 28
    at = data.find(signature)
    while at >= 0:
        length = struct.unpack_from("<H", data, at + name_at)[0]
        start = at + (30 if signature == b"PK\x03\x04" else 46)
        if data[start : start + length] == name:
            return at
        at = data.find(signature, at + 1)
    raise AssertionError(f"no header for {name!r}")


@pytest.mark.parametrize("name", ["..\\outside.txt", "assets\\x.txt", "assets/../../x.txt"])
def test_members_with_dot_dot_or_backslash_are_refused(model_files, tmp_path, name):
    path = tmp_path / "member.keras"
    with zipfile.ZipFile(model_files["a"]) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, src.read(item))
        dst.writestr(name, b"x")
    (finding,) = scan(path)
    assert (finding.what, finding.path) == ("archive member", name)
    with pytest.raises(UnsafeModelError):
        merge([path, model_files["b"]], tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()


def test_a_config_just_under_the_depth_limit_merges(model_files, tmp_path):
    """The readers that still recurse over a config (architecture comparison) stay far from
    Python's recursion limit within MAX_CONFIG_DEPTH."""

    def edit(config):
        config["config"]["layers"][1]["config"]["note"] = _deep(240)
        return config

    a = rewrite_keras_config(model_files["a"], tmp_path / "a.keras", edit)
    b = rewrite_keras_config(model_files["b"], tmp_path / "b.keras", edit)
    report = merge([a, b], tmp_path / "soup.keras")
    assert (report.tensors, report.parameters) == (4, 67)
