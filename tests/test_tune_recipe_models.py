"""`fuse MODELS --recipe`: the fused model computes what `combine --recipe` computes on the
models' scores (tune on validation, apply anywhere, same numbers), loadable with safe_mode."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from fusecli.cli import cli
from fusecli.scores.prediction import predict_array
from fusecli.scores.recipe import apply_recipe, load_recipe
from fusecli.scores.tuning import tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def splits(tmp_path_factory, model_files):
    d = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(21)
    x = rng.standard_normal((160, 4)).astype(np.float32)
    np.savez(d / "all.npz", x=x)
    z = [predict_array(model_files[k], d / "all.npz", at="logits") for k in "abc"]
    y = np.argmax(0.5 * z[0] + 0.3 * z[1] + 0.2 * z[2] + rng.standard_normal(z[0].shape), 1)
    np.savez(d / "val.npz", x=x[:100], y=y[:100])
    np.savez(d / "test.npz", x=x[100:], y=y[100:])
    return d


@pytest.mark.parametrize(
    ("method", "calibrate"),
    [("stack", True), ("greedy", True), ("stack", False), ("optimize", False)],
)
def test_fused_model_computes_the_recipe(splits, model_files, keras, method, calibrate):
    d = splits
    models = [model_files[k] for k in "abc"]
    tag = f"{method}_{calibrate}"
    recipe, fused = d / f"{tag}.json", d / f"{tag}.keras"
    result = tune(
        models,
        data=d / "val.npz",
        method=method,
        calibrate=calibrate,
        folds=0,
        save_recipe=recipe,
        output=fused,
    )
    assert result.output == str(fused) and load_recipe(recipe).method == method
    at = "logits" if calibrate else "output"
    arrays = []
    for k in "abc":
        arrays.append(d / f"{tag}_{k}.npy")
        np.save(arrays[-1], predict_array(model_files[k], d / "test.npz", at=at))
    apply_recipe(arrays, recipe, d / f"{tag}_fused.npy")
    model = keras.saving.load_model(fused, safe_mode=True)
    x = np.load(d / "test.npz")["x"]
    np.testing.assert_allclose(
        np.asarray(model(x)), np.load(d / f"{tag}_fused.npy"), rtol=1e-5, atol=2e-6
    )
    layers = {type(layer).__name__ for layer in model.layers}
    if method == "stack":
        assert {"Concatenate", "Dense", "Softmax"} <= layers
    if calibrate:
        assert "Rescaling" in layers


def test_fuse_cli_with_a_recipe(splits, model_files, keras, tmp_path):
    d = splits
    models = [str(model_files[k]) for k in "abc"]
    recipe = tmp_path / "r.json"
    args = ["tune", *models, "--data", str(d / "val.npz"), "--method", "stack", "--calibrate"]
    assert (
        CliRunner().invoke(cli, [*args, "--folds", "0", "--save-recipe", str(recipe)]).exit_code
        == 0
    )
    out = tmp_path / "fused.keras"
    result = CliRunner().invoke(cli, ["fuse", *models, "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    wrong = CliRunner().invoke(cli, ["fuse", *models[:2], "--recipe", str(recipe), "-o", "x.keras"])
    assert wrong.exit_code == 2
    assert "Error: The recipe fuses 3 models" in wrong.stderr
