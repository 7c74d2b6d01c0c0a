"""The fusion API on tiny real Keras models: numbers, names, formats, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense_model, predict

import fusecli
from fusecli.errors import FusecliError, InvalidRequest, ModelFileError, VerificationError
from fusecli.formats.modelfile import read_model_file
from fusecli.fusion.fuse import build_fusion, fuse_to_file, verify_file


@pytest.fixture(scope="module")
def x4():
    return np.random.default_rng(42).standard_normal((5, 4)).astype("float32")


def _load(keras, path, **kw):
    return keras.models.load_model(path, **kw)


def test_shared_inputs_reproduce_weighted_sum(tmp_path, keras, model_files, x4):
    report = fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "f.keras", [0.8, 0.2])
    assert report.inputs_mode == "shared"
    assert report.branches == ["a", "b"]
    fused = _load(keras, tmp_path / "f.keras")  # default settings: safe_mode on
    a, b = _load(keras, model_files["a"]), _load(keras, model_files["b"])
    expected = 0.8 * predict(a, x4)[0] + 0.2 * predict(b, x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-7)
    # The default check is the file-level proof; the numeric one is opt-in (verify=True).
    assert report.check["tensors"] == 8 and report.check["scan"] == "passed"
    assert report.max_abs_diff is None
    assert report.params == a.count_params() + b.count_params()
    assert [i["name"] for i in report.inputs] == ["input"]
    assert report.outputs == [{"name": "fused", "shape": [None, 3], "dtype": "float32"}]


def test_default_weights_are_equal(tmp_path, keras, model_files, x4):
    paths = [model_files["a"], model_files["b"], model_files["c"]]
    fuse_to_file(paths, tmp_path / "f.keras")
    fused = _load(keras, tmp_path / "f.keras")
    expected = sum(predict(_load(keras, p), x4)[0] for p in paths) / 3
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-7)


def test_models_sharing_a_name_fuse_in_h5_both_ways(tmp_path, keras, model_files, x4):
    # Both files hold a model called "functional"; .h5 in, .h5 out.
    names = {read_model_file(model_files[k]).config["config"]["name"] for k in ("a_h5", "b_h5")}
    assert names == {"functional"}
    out = tmp_path / "f.h5"
    report = fuse_to_file([model_files["a_h5"], model_files["b_h5"]], out, [0.3, 0.7])
    assert report.format == "h5"
    fused = _load(keras, out)
    expected = (
        0.3 * predict(_load(keras, model_files["a_h5"]), x4)[0]
        + 0.7 * predict(_load(keras, model_files["b_h5"]), x4)[0]
    )
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-7)
    names = {layer.name for layer in fused.layers}  # one flat graph, each branch's prefixed
    assert {"fused"} <= names
    assert {n.split("_h5_")[0] for n in names if "_h5_" in n} == {"a", "b"}


def test_a_model_fused_with_itself(tmp_path, keras, model_files, x4):
    out = tmp_path / "self.keras"
    report = fuse_to_file([model_files["a"], model_files["a"]], out, [0.25, 0.5], normalize=False)
    assert report.branches == ["a", "a_2"]
    expected = 0.75 * predict(_load(keras, model_files["a"]), x4)[0]
    np.testing.assert_allclose(predict(_load(keras, out), x4)[0], expected, rtol=1e-6, atol=1e-7)


def test_mixed_formats_keras_and_h5(tmp_path, keras, model_files, x4):
    out = tmp_path / "mixed.keras"
    fuse_to_file([model_files["a_h5"], model_files["b"]], out, [0.5, 0.5])
    a, b = _load(keras, model_files["a_h5"]), _load(keras, model_files["b"])
    expected = 0.5 * predict(a, x4)[0] + 0.5 * predict(b, x4)[0]
    np.testing.assert_allclose(predict(_load(keras, out), x4)[0], expected, rtol=1e-6, atol=1e-7)


def test_separate_inputs_two_stream(tmp_path, keras):
    keras.utils.set_random_seed(7)
    frames = keras.Input((6, 6, 3), name="frames")
    rgb = keras.Model(
        frames,
        keras.layers.Dense(4, activation="softmax")(
            keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(5, 3)(frames))
        ),
    )
    keypoints = keras.Input((10, 2), name="keypoints")
    pose = keras.Model(
        keypoints,
        keras.layers.Dense(4, activation="softmax")(keras.layers.GRU(6)(keypoints)),
    )
    rgb.save(tmp_path / "rgb.keras")
    pose.save(tmp_path / "pose.h5")
    out = tmp_path / "two_stream.keras"
    report = fuse_to_file([tmp_path / "rgb.keras", tmp_path / "pose.h5"], out, [0.8, 0.2])
    assert report.inputs_mode == "separate"
    assert "frames" in report.inputs_reason or "(None, 6, 6, 3)" in report.inputs_reason
    assert [i["name"] for i in report.inputs] == ["rgb_frames", "pose_keypoints"]
    rng = np.random.default_rng(0)
    xf = rng.standard_normal((3, 6, 6, 3)).astype("float32")
    xk = rng.standard_normal((3, 10, 2)).astype("float32")
    expected = 0.8 * predict(rgb, xf)[0] + 0.2 * predict(pose, xk)[0]
    np.testing.assert_allclose(
        predict(_load(keras, out), [xf, xk])[0], expected, rtol=1e-5, atol=1e-6
    )


def test_separate_forced_on_matching_inputs(tmp_path, keras, model_files, x4):
    out = tmp_path / "sep.keras"
    report = fuse_to_file([model_files["a"], model_files["b"]], out, inputs="separate")
    assert len(report.inputs) == 2
    fused = _load(keras, out)
    y = predict(fused, [x4, 2 * x4])[0]
    a, b = _load(keras, model_files["a"]), _load(keras, model_files["b"])
    np.testing.assert_allclose(
        y, 0.5 * predict(a, x4)[0] + 0.5 * predict(b, 2 * x4)[0], rtol=1e-6, atol=1e-7
    )


def test_shared_refused_when_inputs_differ(tmp_path, model_files):
    with pytest.raises(FusecliError, match=r"Cannot share inputs: input 0 of 'a' is \(None, 4\)"):
        fuse_to_file(
            [model_files["a"], model_files["other_in"]], tmp_path / "f.keras", inputs="shared"
        )
    assert not (tmp_path / "f.keras").exists()


def test_output_shapes_must_match(tmp_path, model_files):
    with pytest.raises(FusecliError) as e:
        fuse_to_file([model_files["a"], model_files["wide_out"]], tmp_path / "f.keras")
    assert str(e.value) == (
        "Output 0 of 'a' has shape (None, 3) but output 0 of 'wide_out' has shape (None, 5); "
        "outputs are fused position by position and must match"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def two_head_two_input(tmp_path_factory, keras):
    """Two models with two inputs (image, vector) and two heads (class scores, a box)."""
    d = tmp_path_factory.mktemp("multi")
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        image = keras.Input((4, 4, 1), name="image")
        meta = keras.Input((3,), name="meta")
        h = keras.layers.Concatenate()([keras.layers.Flatten()(image), meta])
        h = keras.layers.Dense(8, activation="relu")(h)
        cls = keras.layers.Dense(5, activation="softmax", name="cls")(h)
        box = keras.layers.Dense(4, name="box")(h)
        model = keras.Model([image, meta], [cls, box])
        paths.append(d / f"multi{seed}.keras")
        model.save(paths[-1])
    return paths


def test_several_inputs_and_outputs(tmp_path, keras, two_head_two_input):
    out = tmp_path / "multi.keras"
    report = fuse_to_file(two_head_two_input, out, [0.6, 0.4])
    assert report.inputs_mode == "shared"
    assert [i["name"] for i in report.inputs] == ["image", "meta"]
    assert [o["name"] for o in report.outputs] == ["fused_cls", "fused_box"]
    rng = np.random.default_rng(3)
    x = [
        rng.standard_normal((4, 4, 4, 1)).astype("float32"),
        rng.standard_normal((4, 3)).astype("float32"),
    ]
    m1, m2 = (_load(keras, p) for p in two_head_two_input)
    got = predict(_load(keras, out), x)
    for j in range(2):
        expected = 0.6 * predict(m1, x)[j] + 0.4 * predict(m2, x)[j]
        np.testing.assert_allclose(got[j], expected, rtol=1e-5, atol=1e-6)


def test_sequential_models(tmp_path, keras, x4):
    paths = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(2)]
        )
        paths.append(tmp_path / f"seq{seed}.keras")
        model.save(paths[-1])
    out = tmp_path / "seq_fused.h5"
    fuse_to_file(paths, out, [0.5, 0.3, 0.2])
    expected = sum(
        w * predict(_load(keras, p), x4)[0] for w, p in zip([0.5, 0.3, 0.2], paths, strict=True)
    )
    np.testing.assert_allclose(predict(_load(keras, out), x4)[0], expected, rtol=1e-6, atol=1e-6)


def test_lambda_scale_is_the_literal_recipe(tmp_path, keras, model_files, x4):
    out = tmp_path / "lambda.keras"
    fuse_to_file([model_files["a"], model_files["b"]], out, [0.8, 0.2], scale="lambda")
    with pytest.raises(ValueError, match="Lambda"):
        _load(keras, out)  # safe_mode refuses the bytecode
    fused = _load(keras, out, safe_mode=False)
    assert sum(type(layer).__name__ == "Lambda" for layer in fused.layers) == 2
    a, b = _load(keras, model_files["a"]), _load(keras, model_files["b"])
    expected = 0.8 * predict(a, x4)[0] + 0.2 * predict(b, x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-7)


def test_rescaling_file_has_no_lambda(tmp_path, keras, model_files):
    out = tmp_path / "r.keras"
    fuse_to_file([model_files["a"], model_files["b"]], out, [0.8, 0.2])
    kinds = [type(layer).__name__ for layer in _load(keras, out).layers]
    assert kinds.count("Rescaling") == 2 and kinds.count("Add") == 1 and "Lambda" not in kinds


def test_api_takes_loaded_models_and_returns_a_model(keras, x4):
    a = dense_model(keras, seed=11, name="functional")
    b = dense_model(keras, seed=12, name="functional")
    fused = fusecli.fuse([a, b], [2.0, -1.0])
    expected = 2.0 * predict(a, x4)[0] - 1.0 * predict(b, x4)[0]
    np.testing.assert_allclose(predict(fused, x4)[0], expected, rtol=1e-6, atol=1e-6)


def test_api_same_object_twice(keras, x4):
    a = dense_model(keras, seed=13)
    fused = fusecli.fuse([a, a], [0.5, 0.25], normalize=False)
    np.testing.assert_allclose(predict(fused, x4)[0], 0.75 * predict(a, x4)[0], rtol=1e-6)
    averaged = fusecli.fuse([a, a], [1, 3])  # rescaled to 0.25, 0.75 by default
    np.testing.assert_allclose(predict(averaged, x4)[0], predict(a, x4)[0], rtol=1e-6)


def test_verification_catches_a_wrong_model(tmp_path, model_files):
    fusion = build_fusion([model_files["a"], model_files["b"]], [0.8, 0.2])
    path = tmp_path / "f.keras"
    fusion.model.save(path)
    assert verify_file(fusion, path) < 1e-6
    fusion.weights = (0.7, 0.3)  # the file no longer computes what we claim
    with pytest.raises(VerificationError, match="differs from sum"):
        verify_file(fusion, path)


def test_nan_weights_in_a_model_are_refused(tmp_path, keras, model_files):
    model = dense_model(keras, seed=3)
    kernel = model.layers[1].kernel
    values = np.asarray(kernel)
    values[0, 0] = np.nan
    kernel.assign(values)
    model.save(tmp_path / "nan.keras")
    # .keras files do not store variable names: the layer and its variable's position are named.
    with pytest.raises(ModelFileError, match=r"nan.keras: weight 0 of layer 'dense'.* holds NaN"):
        fuse_to_file([model_files["a"], tmp_path / "nan.keras"], tmp_path / "f.keras")
    assert not (tmp_path / "f.keras").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, r"Expected one weight per model \(2 models\)"),
        ({"weights": [1.0, float("nan")]}, "finite"),
        ({"weights": [1.0, -1.0], "normalize": True}, "sum to 0"),
        ({"scale": "multiply"}, "Expected scale to be one of"),
        ({"inputs": "both"}, "Expected inputs to be one of"),
    ],
)
def test_bad_requests_fail_before_anything_is_written(tmp_path, model_files, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "f.keras", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_one_model_is_not_a_fusion(tmp_path, model_files):
    with pytest.raises(InvalidRequest, match="two or more models"):
        fuse_to_file([model_files["a"]], tmp_path / "f.keras")


def test_output_extension_picks_format(tmp_path, model_files):
    with pytest.raises(InvalidRequest, match=r"must end in \.keras, \.h5 or \.hdf5"):
        fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "f.onnx")


def test_weights_beyond_float32_are_a_bad_request(tmp_path, model_files):
    with pytest.raises(InvalidRequest, match="Weights must fit in float32"):
        fuse_to_file(
            [model_files["a"], model_files["b"]], tmp_path / "f.keras", [1e39, 1.0], normalize=False
        )
    assert list(tmp_path.iterdir()) == []


def test_upper_case_output_extension_is_refused(tmp_path, model_files):
    # Keras loads no OUT.KERAS ("File format not supported"): refused before any work.
    with pytest.raises(InvalidRequest, match="The output's extension must be lower case"):
        fuse_to_file([model_files["a"], model_files["b"]], tmp_path / "OUT.KERAS", [0.8, 0.2])
    assert list(tmp_path.iterdir()) == []


def test_upper_case_input_is_a_clean_error(tmp_path, model_files):
    upper = tmp_path / "A.KERAS"
    upper.write_bytes(model_files["a"].read_bytes())
    with pytest.raises(ModelFileError) as e:
        fuse_to_file([upper, model_files["b"]], tmp_path / "f.keras")
    assert str(e.value) == (
        f"{upper}: Keras loads only files whose name ends in lower case; rename it to A.keras"
    )


@pytest.mark.parametrize(("source", "name"), [("a_h5", "h5_inside.keras"), ("a", "zip.h5")])
def test_a_file_whose_name_lies_about_its_format_is_refused(tmp_path, model_files, source, name):
    # Keras picks the format by the name, the scan by the content: they must agree, or the scan
    # would look at one model and Keras load another (an HDF5 file with a zip appended, say).
    liar = tmp_path / name
    liar.write_bytes(model_files[source].read_bytes())
    with pytest.raises(ModelFileError, match="rename it to match what it holds"):
        fuse_to_file([liar, model_files["b"]], tmp_path / "f.keras")


def test_mixed_precision_models_fuse_at_the_logits(tmp_path, keras):
    paths = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        x = keras.Input((4,))
        h = keras.layers.Dense(16, activation="relu", dtype="mixed_float16")(x)
        y = keras.layers.Dense(5, activation="softmax", dtype="mixed_float16")(h)
        paths.append(tmp_path / f"mp{seed}.keras")
        keras.Model(x, y).save(paths[-1])
    out = tmp_path / "f.keras"
    report = fuse_to_file(paths, out, [0.5, 0.5], at="logits", verify=True)
    assert report.max_abs_diff < 4e-3  # float16 round-off, which the check allows for
    assert keras.models.load_model(out).output.dtype == "float32"
