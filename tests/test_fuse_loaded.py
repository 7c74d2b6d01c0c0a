"""`fusecli.fuse()` on loaded models goes through the same fused graph as model files: every
variable path unique, and the same outputs as the file `fuse_to_file` writes from the same models.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import predict

import fusecli
from fusecli.fusion.fuse import fuse_to_file


def _mlp(keras, seed: int, *, name: str, in_dim: int = 4, softmax: bool = False):
    keras.utils.set_random_seed(seed)
    x = keras.Input((in_dim,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(x)
    y = keras.layers.Dense(3, activation="softmax" if softmax else None, name="out")(h)
    return keras.Model(x, y, name=name)


def _sequential(keras, seed: int, *, name: str):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="out"),
            keras.layers.Softmax(name="probs"),
        ],
        name=name,
    )


def _nested(keras, seed: int, *, name: str):
    """A functional model holding a Sequential tower, named alike in both models."""
    keras.utils.set_random_seed(seed)
    tower = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="relu", name="d")], name="tower"
    )
    x = keras.Input((4,), name="x")
    y = keras.layers.Dense(3, name="head")(tower(x))
    return keras.Model(x, y, name=name)


def _cases(keras):
    return {
        "functional, same names": ([_mlp(keras, 1, name="m"), _mlp(keras, 2, name="m")], {}),
        "sequential, at logits": (
            [_sequential(keras, 3, name="s"), _sequential(keras, 4, name="s")],
            {"at": "logits"},
        ),
        "nested": ([_nested(keras, 5, name="n"), _nested(keras, 6, name="n")], {}),
        "separate inputs": (
            [_mlp(keras, 7, name="a", in_dim=4), _mlp(keras, 8, name="b", in_dim=6)],
            {},
        ),
        "shared inputs forced apart": (
            [_mlp(keras, 9, name="m"), _mlp(keras, 10, name="m")],
            {"inputs": "separate"},
        ),
        "functional, at logits": (
            [_mlp(keras, 11, name="m", softmax=True), _mlp(keras, 12, name="m", softmax=True)],
            {"at": "logits"},
        ),
    }


CASES = [
    "functional, same names",
    "sequential, at logits",
    "nested",
    "separate inputs",
    "shared inputs forced apart",
    "functional, at logits",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_loaded_models_fuse_as_their_files_do(tmp_path, keras, case):
    models, options = _cases(keras)[case]
    fused = fusecli.fuse(models, [0.7, 0.3], **options)
    paths = [v.path for v in fused.variables]
    assert len(paths) == len(set(paths)), paths
    assert len(paths) == sum(len(m.variables) for m in models)

    files = []
    for i, model in enumerate(models):
        files.append(tmp_path / f"{model.name}_{i}.keras")
        model.save(files[-1])
    fuse_to_file(files, tmp_path / "fused.keras", [0.7, 0.3], **options)
    from_file = keras.models.load_model(tmp_path / "fused.keras")

    rng = np.random.default_rng(0)
    batch = [rng.standard_normal((5, *t.shape[1:])).astype("float32") * 3 for t in fused.inputs]
    got = predict(fused, batch if len(batch) > 1 else batch[0])
    expected = predict(from_file, batch if len(batch) > 1 else batch[0])
    assert np.ptp(expected[0], axis=0).max() > 1e-3  # outputs that vary with the input
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_the_sum_is_of_the_models_themselves(keras):
    """An independent reference: the loaded models called one by one."""
    a, b = _nested(keras, 13, name="n"), _nested(keras, 14, name="n")
    fused = fusecli.fuse([a, b], [2.0, -1.0])
    x = np.random.default_rng(1).standard_normal((6, 4)).astype("float32") * 3
    expected = 2.0 * predict(a, x)[0] - 1.0 * predict(b, x)[0]
    np.testing.assert_allclose(predict(fused, x)[0], expected, rtol=1e-5, atol=1e-5)
    # The models given are left as they were: nothing renamed in place.
    assert a.name == "n" and a.layers[1].name == "tower"
