"""Fusing two Keras 2 era `.h5` files: fusecli (to .h5 and to .keras) vs the recipe by hand.

    python bench/bench_keras2_fuse.py [--repeat N] [--dir DIR] [--save]

The two pairs of issue 16, written as Keras 2 `.h5` by tf-keras (random weights, seeded):
- two GRU(1024) streams over 20 frames, one of 2048-d RGB features, one of a 512-d stream, each
  ending in Dense(51, softmax);
- two ResNet50 on one 224x224x3 input.
By hand, in tf-keras: load both, scale each output with a Lambda, Add, save `.h5` (what a Keras 2
user writes). fusecli: `fusecli fuse a.h5 b.h5 --w 0.8 0.2 -o fused.h5` (a file operation, no
Keras) and `-o fused.keras` (Keras loads the Keras 2 inputs first). Each in its own process,
interleaved, best time and largest peak RSS (bench/measure.py); fusecli with `python -P`, so that
it runs the compiled copy of this checkout that `measure` puts on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from measure import best_of, save_results, table

MAKE = """
import sys, numpy as np, tf_keras as k
L = k.layers
def stream(features, seed):
    k.utils.set_random_seed(seed)
    return k.Sequential([L.GRU(1024, input_shape=(20, features)),
                         L.Dense(51, activation="softmax")])
out = sys.argv[1]
stream(2048, 0).save(f"{out}/rgb.h5")
stream(512, 1).save(f"{out}/flow.h5")
for seed, name in enumerate(("resnet_a", "resnet_b")):
    k.utils.set_random_seed(seed)
    k.applications.ResNet50(weights=None).save(f"{out}/{name}.h5")
"""

BY_HAND = """
import sys, tf_keras as k
a, b, out = sys.argv[1:]
models = [k.models.load_model(p, compile=False) for p in (a, b)]
for i, m in enumerate(models):
    m._name = f"model_{i}"  # two ResNet50 are both named resnet50: Keras refuses that
shared = models[0].input_shape == models[1].input_shape
inputs = [k.Input(m.input_shape[1:]) for m in (models[:1] if shared else models)]
outs = [m(inputs[0] if shared else x) for m, x in zip(models, inputs * (2 if shared else 1))]
scaled = [k.layers.Lambda(lambda t, w=w: t * w)(o) for o, w in zip(outs, (0.8, 0.2))]
k.Model(inputs, k.layers.Add()(scaled)).save(out)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--save", action="store_true", help="write bench/results/keras2_fuse.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        d = args.dir or Path(scratch)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "resnet_b.h5").exists():
            import subprocess

            subprocess.run([sys.executable, "-c", MAKE, str(d)], check=True, env=_env())
        text = []
        for title, (a, b) in {
            "two GRU(1024) streams (2048-d and 512-d, 20 frames, 51 classes)": ("rgb", "flow"),
            "two ResNet50 (shared 224x224x3 input)": ("resnet_a", "resnet_b"),
        }.items():
            pa, pb = d / f"{a}.h5", d / f"{b}.h5"
            fuse = [sys.executable, "-P", "-m", "fusecli", "fuse", pa, pb, "--w", "0.8", "0.2"]
            variants = {
                "by hand (tf-keras)": [sys.executable, "-c", BY_HAND, pa, pb, d / "hand.h5"],
                "fusecli -o x.h5": [*fuse, "-o", d / "fused.h5", "--force"],
                "fusecli -o x.keras": [*fuse, "-o", d / "fused.keras", "--force"],
                "copy the inputs (cp)": ["cp", pa, pb, d / "copies"],
            }
            (d / "copies").mkdir(exist_ok=True)
            outputs = [d / "hand.h5", d / "fused.h5", d / "fused.keras", d / "copies" / pa.name]
            results = best_of(
                variants, repeat=args.repeat, fresh=[*outputs, d / "copies" / pb.name]
            )
            text.append(f"{title}\n{table(results, 'by hand (tf-keras)')}\n")
            print(text[-1], flush=True)
    if args.save:
        print(save_results("keras2_fuse", "\n".join(text)))


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


if __name__ == "__main__":
    main()
