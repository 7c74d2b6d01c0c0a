"""`fusecli export` to each format against the same export done by hand, on a fused MobileNetV2
pair.

    python bench/bench_export.py [--repeat 2] [--formats saved-model,tflite,onnx]

Makes two MobileNetV2 .keras files (keras.applications, weights=None, 224x224) whose batch
norms get random scales and shifts and the statistics of one batch of random images, so that the
fused model's outputs vary with the input (with untrained statistics the activations saturate,
every image gets ~1/1000 per class, and any check passes), and fuses them with
`fusecli fuse --w 0.8 0.2`. Then, in its own process each:

- the floor: importing Keras and loading the fused file, which every variant does first;
- by hand: Keras' own `model.export` (tf_saved_model, litert, onnx; a careful user calls the
  model once, which Keras' ONNX export needs, and then runs the artifact once in its runtime
  and compares it with Keras, as fusecli does);
- fusecli export, which also checks the artifact in its runtime.

Prints wall time, peak memory and the ratios, and the largest difference from the Keras model
that each variant found (fusecli's from its own report on stderr).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from measure import REPO, best_of, table

_MAKE = textwrap.dedent(
    """
    import sys, numpy as np, keras
    for seed, path in enumerate(sys.argv[1:]):
        keras.utils.set_random_seed(seed)
        model = keras.applications.MobileNetV2(weights=None)
        rng = np.random.default_rng(seed)
        norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        for layer in norms:
            gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.2, beta.shape).astype("float32"),
                mean,
                var,
            ])
            layer.momentum = 0.0
        # One pass in training mode sets every moving mean and variance to the statistics of
        # its input on random images: without it, activations saturate and every image gets
        # nearly the same output.
        model(rng.uniform(-1, 1, (32, 224, 224, 3)).astype("float32"), training=True)
        for layer in norms:
            layer.momentum = 0.999
        model.save(path)
    """
)

_FLOOR = "import sys, keras; keras.saving.load_model(sys.argv[1])"

# Keras' own export, then one run in the runtime and the largest difference, as fusecli does.
_BY_HAND = textwrap.dedent(
    """
    import sys, numpy as np, keras
    path, out, fmt = sys.argv[1:]
    model = keras.saving.load_model(path)
    x = np.random.default_rng(0).standard_normal((4, 224, 224, 3)).astype("float32")
    want = np.asarray(model(x))
    if fmt == "saved-model":
        import tensorflow as tf
        model.export(out, format="tf_saved_model", verbose=False)
        served = tf.saved_model.load(out).signatures["serving_default"]
        got = next(iter(served(tf.constant(x)).values())).numpy()
    elif fmt == "tflite":
        import tensorflow as tf
        model.export(out, format="litert", verbose=False)
        runner = tf.lite.Interpreter(model_path=out).get_signature_runner()
        got = next(iter(runner(**{runner.get_input_details().popitem()[0]: x}).values()))
    else:
        import onnxruntime
        model.export(out, format="onnx", verbose=False)
        session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
    print(f"largest difference from Keras {np.abs(got - want).max():.3g}", file=sys.stderr)
    """
)

_OUTPUT = {"saved-model": "served", "tflite": "fused.tflite", "onnx": "fused.onnx"}
_DIFF = re.compile(r"largest difference from Keras ([0-9.e+-]+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--formats", default="saved-model,tflite,onnx")
    args = parser.parse_args()
    formats = args.formats.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a, b, fused = d / "a.keras", d / "b.keras", d / "fused.keras"
        env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", _MAKE, a, b], check=True, env=_env(env))
        subprocess.run(
            [sys.executable, "-m", "fusecli", "fuse", a, b, "--w", "0.8", "0.2", "-o", fused],
            check=True,
            capture_output=True,
            env=_env(env),
        )
        variants: dict[str, list] = {
            "load the fused file (floor)": [sys.executable, "-c", _FLOOR, fused]
        }
        fusecli = [sys.executable, "-m", "fusecli", "export", fused, "--force", "-o"]
        for fmt in formats:
            out = d / _OUTPUT[fmt]
            hand = [sys.executable, "-c", _BY_HAND, fused, d / f"hand_{_OUTPUT[fmt]}", fmt]
            variants[f"{fmt}: Keras model.export + check"] = hand
            variants[f"{fmt}: fusecli export --no-verify"] = [*fusecli, out, "--no-verify"]
            variants[f"{fmt}: fusecli export"] = [*fusecli, out]
        results = best_of(variants, repeat=args.repeat)
    print(f"fused MobileNetV2 pair (224x224, 1000 classes); best wall time of {args.repeat}, "
          "largest peak RSS")  # fmt: skip
    print(table(results, "load the fused file (floor)"))
    print("\nlargest difference from the Keras model, 4 random images")
    for label, m in results.items():
        found = _DIFF.search(m.stderr)
        if found:
            print(f"  {label:<40} {float(found.group(1)):.3g}")
    print("\nfusecli's own report")
    for label, m in results.items():
        for line in m.stderr.splitlines():
            if line.startswith(("Wrote", "Note")):
                print(f"  {label}: {line}")


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **extra}


if __name__ == "__main__":
    main()
