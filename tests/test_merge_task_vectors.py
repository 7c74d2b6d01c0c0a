"""The methods of merging fine-tunes of one base (ties, dare-*, breadcrumbs, model-stock) on
real tiny Keras models: a base, three fine-tunes trained from it on three different tasks, each
method checked tensor by tensor against a numpy implementation of its formula written here,
from mergekit's definitions; per-layer parameters, --seed, --dtype, the relatedness evidence and
the refusals that come before any tensor is read."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import run_cli

from fusecli.errors import FusecliError, InvalidRequest
from fusecli.merging.merge import merge

# Slow tier: trained fine-tunes merged by every method, whole CLI runs (docs/development.md).
pytestmark = pytest.mark.slow


def tiny_base(keras, seed: int = 7):
    keras.utils.set_random_seed(seed)
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(6, 3, name="conv_a")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Conv2D(6, 1, name="conv_b", activation="relu")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(8, activation="relu", name="dense")(h)
    y = keras.layers.Dense(5, name="head")(h)
    return keras.Model(x, y)


@pytest.fixture(scope="session")
def family(tmp_path_factory, keras):
    """base.keras, ft1..ft3.keras (the base trained on three different targets), and
    stranger.keras (the same architecture, initialised on its own)."""
    d = tmp_path_factory.mktemp("family")
    base = tiny_base(keras)
    base.save(d / "base.keras")
    start = base.get_weights()
    x = np.random.default_rng(0).standard_normal((64, 6, 6, 2)).astype("float32")
    for i in (1, 2, 3):
        keras.utils.set_random_seed(100 + i)
        base.set_weights(start)
        y = np.random.default_rng(i).standard_normal((64, 5)).astype("float32")
        base.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        base.fit(x, y, epochs=3, batch_size=16, verbose=0)
        base.save(d / f"ft{i}.keras")
    tiny_base(keras, seed=99).save(d / "stranger.keras")
    return d


def weights_of(keras, path):
    return [np.asarray(w, dtype=np.float64) for w in keras.models.load_model(path).get_weights()]


# -- the formulas, written from mergekit's definitions ------------------------------------------


def trim(delta, density):
    """mergekit sparsify.magnitude: keep the int(density * n) largest |entries|."""
    if density >= 1:
        return delta
    k = int(density * delta.size)
    order = np.argsort(-np.abs(delta).ravel(), kind="stable")
    keep = np.zeros(delta.size)
    keep[order[:k]] = 1
    return delta * keep.reshape(delta.shape)


def outliers(delta, density, gamma):
    """mergekit sparsify.magnitude_outliers (keeping sorted[n_bot : n - n_top])."""
    if density >= 1:
        return delta
    n = delta.size
    n_top = int(gamma * n)
    n_bot = n - int(density * n) - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(delta).ravel(), kind="stable")
    keep = np.zeros(n)
    keep[order[n_bot : n - n_top]] = 1
    return delta * keep.reshape(delta.shape)


def elect(weighted):
    """TIES' sum consensus: the sign of the sum; 0 counts as positive."""
    sign = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0)
    return np.sign(weighted) == sign


def task_vector_merge(base, fts, weights, deltas, *, consensus, normalize, lam):
    w = np.array(weights).reshape((-1,) + (1,) * base.ndim)
    weighted = np.stack(deltas) * w
    if consensus:
        agree = elect(weighted)
        merged = (weighted * agree).sum(axis=0)
        divisor = (w * agree).sum(axis=0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(axis=0)
        divisor = w.sum()
        divisor = 1 if abs(divisor) < 1e-8 else divisor
    if normalize:
        merged = merged / divisor
    return base + lam * merged


def ties_ref(base, fts, weights, density, lam=1.0, normalize=True):
    deltas = [trim(ft - base, density) for ft in fts]
    return task_vector_merge(
        base, fts, weights, deltas, consensus=True, normalize=normalize, lam=lam
    )


def dare_ref(base, fts, weights, density, seed, k, *, consensus, rescale="l1"):
    """Each entry kept with probability density; the generator seeded with (seed, k), one draw
    of the tensor's shape per model in order (the protocol docs/merge.md states)."""
    rng = np.random.default_rng([seed, k])
    deltas = []
    for ft in fts:
        delta = ft - base
        kept = delta * (rng.random(delta.shape) < density)
        if rescale == "l1":
            before, after = np.abs(delta).sum(), np.abs(kept).sum()
            if before >= 1e-7 and after >= 1e-7:
                kept = kept * before / after
        elif rescale == "density":
            kept = kept / density
        deltas.append(kept)
    return task_vector_merge(
        base, fts, weights, deltas, consensus=consensus, normalize=False, lam=1
    )


def breadcrumbs_ref(base, fts, weights, density, gamma):
    deltas = [outliers(ft - base, density, gamma) for ft in fts]
    return task_vector_merge(base, fts, weights, deltas, consensus=False, normalize=False, lam=1)


def model_stock_ref(base, fts):
    """mergekit model_stock.py, not filter-wise: the mean pairwise cosine of the offsets."""
    offsets = [(ft - base).ravel() for ft in fts]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norm = max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6)
            cosines.append(np.clip(a @ b / norm, -1, 1))
    cos = np.mean(cosines)
    n = len(fts)
    t = n * cos / (1 + (n - 1) * cos)
    return t * (sum(fts) / n) + (1 - t) * base


def assert_tensors(got, expected):
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(
            g, e.astype(np.float32), rtol=2e-6, atol=1e-7, err_msg=f"tensor {k}"
        )


# -- each method, tensor by tensor -------------------------------------------------------------


def _inputs(keras, family, n=3):
    fts = [weights_of(keras, family / f"ft{i}.keras") for i in range(1, n + 1)]
    return weights_of(keras, family / "base.keras"), fts


def test_ties_equals_the_formula(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2, 3)]
    report = merge(files, out, method="ties", base=family / "base.keras", density=0.5)
    assert report.warnings == []
    base, fts = _inputs(keras, family)
    expected = [ties_ref(b, [f[k] for f in fts], (1, 1, 1), 0.5) for k, b in enumerate(base)]
    assert_tensors(weights_of(keras, out), expected)
    # the trim matters: without it the result differs
    plain = [ties_ref(b, [f[k] for f in fts], (1, 1, 1), 1.0) for k, b in enumerate(base)]
    assert not np.allclose(weights_of(keras, out)[0], plain[0])


def test_ties_weights_lambda_and_no_normalize(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2, 3)]
    merge(
        files,
        out,
        (0.5, 1.0, -0.3),
        method="ties",
        base=family / "base.keras",
        density=0.7,
        lambda_=0.8,
        normalize=False,
    )
    base, fts = _inputs(keras, family)
    expected = [
        ties_ref(b, [f[k] for f in fts], (0.5, 1.0, -0.3), 0.7, lam=0.8, normalize=False)
        for k, b in enumerate(base)
    ]
    assert_tensors(weights_of(keras, out), expected)


@pytest.mark.parametrize(("method", "consensus"), [("dare-linear", False), ("dare-ties", True)])
@pytest.mark.parametrize("rescale", ["l1", "density"])
def test_dare_equals_the_formula(tmp_path, keras, family, method, consensus, rescale):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2, 3)]
    report = merge(
        files,
        out,
        (0.6, 0.3, 0.4),
        method=method,
        base=family / "base.keras",
        density=0.4,
        seed=11,
        rescale=rescale,
    )
    assert report.seed == 11
    base, fts = _inputs(keras, family)
    expected = [
        dare_ref(
            b,
            [f[k] for f in fts],
            (0.6, 0.3, 0.4),
            0.4,
            11,
            k,
            consensus=consensus,
            rescale=rescale,
        )
        for k, b in enumerate(base)
    ]
    assert_tensors(weights_of(keras, out), expected)


def test_breadcrumbs_equals_the_formula(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2)]
    merge(files, out, method="breadcrumbs", base=family / "base.keras", density=0.6, gamma=0.1)
    base, fts = _inputs(keras, family, n=2)
    expected = [
        breadcrumbs_ref(b, [f[k] for f in fts], (1, 1), 0.6, 0.1) for k, b in enumerate(base)
    ]
    assert_tensors(weights_of(keras, out), expected)


def test_model_stock_equals_the_formula(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2, 3)]
    merge(files, out, method="model-stock", base=family / "base.keras")
    base, fts = _inputs(keras, family)
    expected = [model_stock_ref(b, [f[k] for f in fts]) for k, b in enumerate(base)]
    assert_tensors(weights_of(keras, out), expected)


# -- per-layer parameters ------------------------------------------------------------------------


def test_density_gradient_and_set_patterns(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2)]
    report = merge(
        files,
        out,
        method="ties",
        base=family / "base.keras",
        density="0.2,0.8",
        overrides=["*:density=0.9", "conv_b:density=0.5"],
    )
    # five layers hold merged tensors: conv_a, bn, conv_b, dense, head at depth 0 .. 1
    got = {(t["layer"], t["density"]) for t in report.per_tensor}
    # '*' beats the gradient; 'conv_b' is more specific than '*'
    assert got == {("conv_a", 0.9), ("bn", 0.9), ("conv_b", 0.5), ("dense", 0.9), ("head", 0.9)}
    assert report.settings["density"] == {"setting": [0.2, 0.8], "min": 0.5, "max": 0.9}
    assert report.settings["set"] == ["*:density=0.9", "conv_b:density=0.5"]
    base, fts = _inputs(keras, family, n=2)
    density = {t["tensor"]: t["density"] for t in report.per_tensor}
    expected = [ties_ref(b, [f[k] for f in fts], (1, 1), density[k]) for k, b in enumerate(base)]
    assert_tensors(weights_of(keras, out), expected)


def test_gradient_over_depth_is_reported(tmp_path, family):
    proc = run_cli(
        "merge",
        family / "ft1.keras",
        family / "ft2.keras",
        "--method",
        "ties",
        "--base",
        family / "base.keras",
        "--density",
        "0.2,0.8",
        "-o",
        tmp_path / "m.keras",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    by_layer = {t["layer"]: (t["depth"], t["density"]) for t in report["per_tensor"]}
    assert by_layer == {
        "conv_a": (0.0, 0.2),
        "bn": (0.25, pytest.approx(0.35)),
        "conv_b": (0.5, pytest.approx(0.5)),
        "dense": (0.75, pytest.approx(0.65)),
        "head": (1.0, 0.8),
    }
    assert report["settings"]["density"] == {"setting": [0.2, 0.8], "min": 0.2, "max": 0.8}
    assert "density 0.2 to 0.8 over the layers" in proc.stderr


def test_weight_gradients_per_model(tmp_path, keras, family):
    out = tmp_path / "m.keras"
    files = [family / f"ft{i}.keras" for i in (1, 2)]
    report = merge(
        files, out, ((0.0, 1.0), 0.5), method="task-arithmetic", base=family / "base.keras"
    )
    depth = {t["tensor"]: t["depth"] for t in report.per_tensor}
    base, fts = _inputs(keras, family, n=2)
    expected = [b + depth[k] * (fts[0][k] - b) + 0.5 * (fts[1][k] - b) for k, b in enumerate(base)]
    assert_tensors(weights_of(keras, out), expected)


# -- seed, dtype ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_file(tmp_path, family):
    args = [family / "ft1.keras", family / "ft2.keras", "--method", "dare-ties", "--base"]
    args += [family / "base.keras", "--density", "0.5", "-q"]
    paths = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        paths.append(tmp_path / f"{name}.keras")
        proc = run_cli("merge", *args, "--seed", seed, "-o", paths[-1])
        assert proc.returncode == 0, proc.stderr
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_default_seed_is_fixed_and_reported(tmp_path, family):
    files = [family / "ft1.keras", family / "ft2.keras"]
    a = merge(
        files, tmp_path / "a.keras", method="dare-linear", base=family / "base.keras", density=0.5
    )
    b = merge(
        files, tmp_path / "b.keras", method="dare-linear", base=family / "base.keras", density=0.5
    )
    assert a.seed == b.seed == 0
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtype_of_the_written_tensors(tmp_path, keras, family, dtype):
    out = tmp_path / "m.keras"
    files = [family / "ft1.keras", family / "ft2.keras"]
    merge(files, out, dtype=dtype)
    with h5py.File(__import__("zipfile").ZipFile(out).open("model.weights.h5")) as h5:
        kernel = h5["layers/conv2d/vars/0"] if "layers/conv2d" in h5 else None
        names = []
        h5.visititems(lambda n, o: names.append(o) if isinstance(o, h5py.Dataset) else None)
        kinds = {o.dtype.itemsize for o in names}
        assert kinds == {4 if dtype == "float32" else 2}
        if dtype == "bfloat16":
            assert all(o.attrs.get("dtype") == "bfloat16" for o in names)
    del kernel
    a, b = (weights_of(keras, f) for f in files)
    got = weights_of(keras, out)  # Keras loads it into the model's float32 variables
    import ml_dtypes

    cast = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    for g, x, y in zip(got, a, b, strict=True):
        np.testing.assert_array_equal(g, ((x + y) / 2).astype(cast).astype(np.float32))


def test_bfloat16_in_h5_is_refused_before_work(tmp_path, family):
    with pytest.raises(InvalidRequest, match="--dtype bfloat16 needs a .keras output"):
        merge([family / "ft1.keras", family / "ft2.keras"], tmp_path / "m.h5", dtype="bfloat16")
    assert not (tmp_path / "m.h5").exists()


# -- relatives -------------------------------------------------------------------------------------


def test_a_stranger_is_named_with_the_evidence(tmp_path, family):
    proc = run_cli(
        "merge",
        family / "ft1.keras",
        family / "stranger.keras",
        "-o",
        tmp_path / "m.keras",
        "--json",
        "-q",
    )
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    (model,) = report["relatedness"]["models"]
    assert model["model"] == "stranger.keras"
    assert abs(model["median_cosine"]) < 0.5
    assert proc.stderr.startswith(
        "Warning: stranger.keras does not look like a relative of ft1.keras: the median cosine "
        "similarity of its kernels to ft1.keras's is "
    )
    assert proc.stderr.count("\n") == 1


def test_fine_tunes_look_related(tmp_path, family):
    files = [family / f"ft{i}.keras" for i in (1, 2, 3)]
    report = merge(files, tmp_path / "m.keras", method="ties", base=family / "base.keras")
    assert report.warnings == []
    cosines = [m["median_cosine"] for m in report.relatedness["models"]]
    assert len(cosines) == 3 and min(cosines) > 0.9
    assert report.relatedness["reference"] == "base.keras"


# -- errors before work ----------------------------------------------------------------------------


def _poisoned(tmp_path, family):
    """A copy of ft2 whose tensors hold NaN: reading any of them is an error."""
    import shutil
    import zipfile

    bad = tmp_path / "poisoned.keras"
    with zipfile.ZipFile(family / "ft2.keras") as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model.weights.h5":
                weights = tmp_path / "w.h5"
                weights.write_bytes(data)
                with h5py.File(weights, "a") as h5:
                    h5.visititems(
                        lambda n, o: (
                            o.__setitem__((), np.full(o.shape, np.nan, o.dtype))
                            if isinstance(o, h5py.Dataset) and o.dtype.kind == "f"
                            else None
                        )
                    )
                data = weights.read_bytes()
            dst.writestr(info, data)
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
    return bad


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--set", "nothing*:density=0.5"],
            "--set 'nothing*:density=0.5': the pattern matches no layer",
        ),
        (
            ["--density", "0.01"],
            "10 tensors cannot take their values: weight 1 (layer 'conv_a'): --density 0.01 keeps "
            "none of its 6 entries (needs 0.167 or more)",
        ),
        (["--density", "1.2"], "--density must be in (0, 1]. Received: density=1.2"),
        (["--lambda", "0.5,1"], None),  # fine: a gradient, then the poisoned file is read
    ],
)
def test_errors_come_before_any_tensor_is_read(tmp_path, family, extra, message):
    bad = _poisoned(tmp_path, family)
    out = tmp_path / "m.keras"
    proc = run_cli(
        "merge",
        family / "ft1.keras",
        bad,
        "--method",
        "ties",
        "--base",
        family / "base.keras",
        *extra,
        "-o",
        out,
    )
    last = proc.stderr.strip().splitlines()[-1]
    if message is None:
        assert proc.returncode == 1
        assert "holds NaN or infinite values" in last
    else:
        assert proc.returncode == 2
        assert last.startswith("Error: ") and message in last
    assert not out.exists()


def test_a_list_for_a_method_that_takes_none(tmp_path, family):
    proc = run_cli(
        "merge",
        family / "ft1.keras",
        family / "ft2.keras",
        "--method",
        "model-stock",
        "--base",
        family / "base.keras",
        "--density",
        "0.2,0.8",
        "-o",
        tmp_path / "m.keras",
    )
    assert proc.returncode == 2
    assert proc.stderr.endswith(
        "Error: --density is not a parameter of model-stock (it takes --filter-wise). "
        "Received: density=0.2,0.8\n"
    )


def test_api_errors_are_fusecli_errors(tmp_path, family):
    with pytest.raises(FusecliError):
        merge([family / "ft1.keras"], tmp_path / "m.keras", method="ties")


# -- the recipe ------------------------------------------------------------------------------------


def test_the_recipe_records_method_parameters_seed_and_dtype(tmp_path, keras, family):
    from fusecli.formats.recipe import read_recipe

    out = tmp_path / "m.keras"
    files = [family / "ft1.keras", family / "ft2.keras"]
    merge(
        files,
        out,
        (0.7, 0.5),
        method="dare-ties",
        base=family / "base.keras",
        density=(0.5, 0.9),
        overrides=["head:density=1"],
        seed=4,
        dtype="float16",
    )
    recipe = read_recipe(out, "keras")
    assert [s["file"] for s in recipe["sources"]] == ["ft1.keras", "ft2.keras", "base.keras"]
    assert recipe["options"] == {
        "method": "dare-ties",
        "parameters": {
            "weights": [0.7, 0.5],
            "density": {"setting": [0.5, 0.9], "min": 0.5, "max": 1.0},
            "rescale": "l1",
            "seed": 4,
            "normalize": False,
            "lambda": 1.0,
            "set": ["head:density=1"],
        },
        "base": "base.keras",
        "seed": 4,
        "dtype": "float16",
    }
    keras.models.load_model(out)  # Keras loads it as before
    shown = run_cli("inspect", out)
    assert shown.returncode == 0, shown.stderr
    assert f"recipe: {out}: fusecli " in shown.stdout
    assert "merge method=dare-ties" in shown.stdout and '"setting": [0.5, 0.9]' in shown.stdout
