"""Keras 2 era .h5 into Keras 3: fusecli.load_model vs tf-keras (Keras 2 itself) on the same file.

    python bench/bench_legacy_h5.py [--model ResNet50|MobileNetV2] [--dir DIR]

tf-keras writes a Keras 2 .h5 of a Keras application (random weights, seeded), with its own output
on a fixed image. Then, each in a fresh process: tf-keras loads the file and predicts; fusecli
loads it into Keras 3 and predicts; plain `keras.saving.load_model` is tried too. Prints wall time
and peak RSS of each process (os.wait4), the ratios, and the largest difference between the
Keras 3 output and Keras 2's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from measure import Measurement, measure, table

MAKE = """
import sys, numpy as np, tf_keras as k
k.utils.set_random_seed(0)
model = getattr(k.applications, sys.argv[1])(weights=None)
rng = np.random.default_rng(0)
for w in model.weights:  # BatchNormalization statistics away from 0/1, so they matter
    if "moving_variance" in w.name:
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    elif "moving_mean" in w.name or "beta" in w.name:
        w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
x = rng.uniform(-1, 1, (1, 224, 224, 3)).astype("float32")
model.save(sys.argv[2])
np.savez(sys.argv[3], x=x, y=model(x, training=False).numpy())
"""

TF_KERAS = """
import sys, numpy as np, tf_keras as k
model = k.models.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model(np.load(sys.argv[2])["x"], training=False).numpy())
"""

FUSECLI = """
import sys, numpy as np
from fusecli.safety.loading import load_model
model = load_model(sys.argv[1])
np.save(sys.argv[3], np.asarray(model(np.load(sys.argv[2])["x"], training=False)))
"""

PLAIN_KERAS3 = """
import sys, keras
keras.saving.load_model(sys.argv[1], compile=False)
"""


def run(label: str, code: str, *args: object, check: bool = True) -> Measurement:
    return measure(label, [sys.executable, "-c", code, *args], check=check)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ResNet50", help="a keras.applications name")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_legacy_"))
    work.mkdir(parents=True, exist_ok=True)
    h5, ref = work / f"{args.model}_keras2.h5", work / f"{args.model}_ref.npz"
    if not h5.exists():
        run("make", MAKE, args.model, str(h5), str(ref))
    print(f"{args.model}: {h5.stat().st_size / 1e6:.0f} MB Keras 2 .h5 written by tf-keras")

    k2 = run("tf-keras load_model + predict (Keras 2)", TF_KERAS, h5, ref, work / "k2.npy")
    ours = run("fusecli load_model + predict (Keras 3)", FUSECLI, h5, ref, work / "k3.npy")
    plain = run("plain", PLAIN_KERAS3, h5, check=False)
    expected = np.load(ref)["y"]
    diff = float(np.max(np.abs(np.load(work / "k3.npy") - expected)))
    same_k2 = float(np.max(np.abs(np.load(work / "k2.npy") - expected)))

    print(table({k2.label: k2, ours.label: ours}, k2.label))
    print(f"largest |Keras 3 - Keras 2| output difference: {diff:.3g}", end=" ")
    print(f"(tf-keras reloading its own file: {same_k2:.3g})")
    last = plain.stderr.strip().splitlines()[-1] if plain.returncode else "loaded"
    print(f"plain keras.saving.load_model: {last[:160]}")


if __name__ == "__main__":
    main()
