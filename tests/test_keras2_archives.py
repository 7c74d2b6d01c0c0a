"""`.keras` archives written by tf.keras 2.13+ (and tf-keras today): Keras 3's layout, holding a
Keras 2 config, which Keras 3 cannot load at all ("Could not locate class 'Functional'").

fusecli loads them by converting the config (`fusecli.formats.keras2`), and fuses them into
files Keras 3 loads; merge, which copies an input's config, refuses them in one line. The files
and tf-keras' own outputs on them (what tf-keras computes once it has loaded the archive back)
come from tests/legacy_fixtures/make_keras2_h5.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import predict, run_cli
from keras2support import MARKER, expected, keras2_reference_dir

from fusecli.errors import ModelFileError
from fusecli.formats.modelfile import read_model_file
from fusecli.safety.loading import load_model

# Slow tier: tf-keras references and whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow

LOADED = [
    "gru",
    "lstm",
    "conv",
    "multi_io",  # several inputs and outputs
    "transfer",  # a nested functional model
    "siamese",  # a nested model called twice
    "hard_sigmoid",  # Keras 2's hard_sigmoid, matched by scaling weights
    "seq2seq",
    "assorted",
    "tf_op",  # a TFOpLambda, converted to a Keras operation
    "s2s_bidirectional",
    "causal_attention",  # the causal mask is a call argument in the archive
    "text_gru",
]


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory):
    return keras2_reference_dir(tmp_path_factory)


def test_the_archives_are_keras2_configs_keras3_cannot_load(keras2_dir, keras):
    model_file = read_model_file(keras2_dir / "transfer.keras")
    assert model_file.keras2_archive and model_file.keras_version.startswith("2.")
    assert "batch_input_shape" in str(model_file.config)
    with pytest.raises(Exception, match="Could not locate class"):
        keras.saving.load_model(keras2_dir / "transfer.keras", compile=False)


@pytest.mark.parametrize("name", LOADED)
def test_loaded_archive_computes_what_tf_keras_computes(keras2_dir, name):
    xs, ys = expected(keras2_dir, f"{name}_archive")
    got = predict(load_model(keras2_dir / f"{name}.keras"), xs if len(xs) > 1 else xs[0])
    assert len(got) == len(ys)
    for i, (g, y) in enumerate(zip(got, ys, strict=True)):
        np.testing.assert_allclose(g, y, rtol=1e-5, atol=1e-6, err_msg=f"output {i}")
    assert max(float(np.ptp(y)) for y in ys) > 0.05  # outputs that vary with the input


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_fused_archives_load_in_keras3_and_compute_the_weighted_sum(
    keras2_dir, tmp_path, keras, suffix
):
    out = tmp_path / f"fused{suffix}"
    a, b = keras2_dir / "gru.keras", keras2_dir / "lstm.keras"
    result = run_cli("fuse", a, b, "--w", "0.8", "0.2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    xa, ya = expected(keras2_dir, "gru_archive")
    xb, yb = expected(keras2_dir, "lstm_archive")
    np.testing.assert_array_equal(xa[0], xb[0])  # the two streams see the same frames
    fused = keras.saving.load_model(out, compile=False)
    (got,) = predict(fused, xa[0])
    np.testing.assert_allclose(got, 0.8 * ya[0] + 0.2 * yb[0], rtol=1e-5, atol=1e-6)
    assert float(np.ptp(ya[0] - yb[0])) > 0.05  # the weights matter


def test_an_archive_with_bytecode_is_refused_and_its_code_never_runs(
    keras2_dir, tmp_path, monkeypatch
):
    marker = tmp_path / "ran"
    monkeypatch.setenv(MARKER, str(marker))
    out = tmp_path / "fused.keras"
    path = keras2_dir / "lambda_code.keras"
    result = run_cli("fuse", path, path, "-o", out)
    assert result.returncode == 1 and not out.exists() and not marker.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: {path}: layer ") and "bytecode" in last
    assert "Traceback" not in result.stderr


def test_an_archive_keras3_cannot_match_is_refused_naming_the_layer(keras2_dir):
    with pytest.raises(ModelFileError, match=r"cannot convert Keras 2 layer 'lstm_\d+' \(LSTM\)"):
        load_model(keras2_dir / "masking_states.keras")


def test_merge_refuses_archives_in_one_line(keras2_dir, tmp_path):
    out = tmp_path / "merged.keras"
    path = keras2_dir / "gru.keras"
    result = run_cli("merge", path, path, "-o", out)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.strip() == (
        f"Error: {path}: is a .keras archive written by tf.keras "
        f"{read_model_file(path).keras_version}, whose Keras 2 config Keras 3 cannot load; "
        "merge copies an input's config into its output, so it cannot merge it (save the model "
        "as .h5 in tf.keras, which merge converts, or use fuse, which converts it through Keras)"
    )


def _restamped(src, dst, metadata: dict | None) -> None:
    """`src` with its metadata.json replaced by `metadata` (or left out when None)."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name != "metadata.json":
                zout.writestr(name, zin.read(name))
            elif metadata is not None:
                zout.writestr(name, json.dumps(metadata))


@pytest.mark.parametrize("metadata", [{"keras_version": "3.5.0"}, None], ids=["says3", "none"])
@pytest.mark.parametrize("name", ["gru", "transfer"])
def test_an_archive_is_known_by_its_config_not_its_metadata(
    keras2_dir, tmp_path, keras, metadata, name
):
    # metadata.json is a claim: a tf-keras archive stamped 3.x (or without one) is still a Keras 2
    # config, which fuse converts and merge refuses, instead of writing files Keras 3 cannot load.
    path = tmp_path / f"{name}.keras"
    _restamped(keras2_dir / f"{name}.keras", path, metadata)
    assert read_model_file(path).keras2_archive
    out = tmp_path / "fused.keras"
    result = run_cli("fuse", path, path, "--w", "0.8", "0.2", "-o", out)
    assert result.returncode == 0, result.stderr
    xs, ys = expected(keras2_dir, f"{name}_archive")
    got = predict(keras.saving.load_model(out, compile=False), xs if len(xs) > 1 else xs[0])
    for g, y in zip(got, ys, strict=True):
        np.testing.assert_allclose(g, y, rtol=1e-5, atol=1e-6)
    merged = tmp_path / "merged.keras"
    result = run_cli("merge", path, path, "-o", merged)
    assert result.returncode == 1 and not merged.exists()
    assert result.stderr.startswith(f"Error: {path}: is a .keras archive written by tf.keras")
    assert len(result.stderr.strip().splitlines()) == 1
