"""`fusecli fuse a.keras b.keras -o x.h5` (Keras 3 inputs, converted to Keras 2's `.h5` schema as
a file operation) against the same fusion written by hand in Keras 3, a plain copy of the inputs,
and (optionally) earlier fusecli code, in one run; then the fused `.h5` loaded by tf-keras and by
Keras 3 and compared with 0.8 A(x) + 0.2 B(x) as Keras 3 computes it.

    python bench/bench_keras3_h5.py [--repeat 1] [--previous CHECKOUT] [--save] [--note TEXT]

Two ResNet50 .keras files (keras.applications, weights=None, BatchNormalization statistics
randomised, no final softmax), made in a temporary folder. Each variant runs in its own process
(bench/measure.py). Run it from outside the checkout (`cd /tmp && python .../bench_keras3_h5.py`):
fusecli's isolated child processes import fusecli from the current folder first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench_fuse import BY_HAND  # saved to .h5, its file is in Keras 3's schema: Keras 3 only
from measure import best_of, save_results, table

_MAKE = textwrap.dedent(
    """
    import sys, keras, numpy as np
    for seed, path in enumerate(sys.argv[1:]):
        keras.utils.set_random_seed(seed)
        model = keras.applications.ResNet50(weights=None, classifier_activation=None)
        rng = np.random.default_rng(seed)
        for v in model.weights:
            if "moving_variance" in v.path:
                v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
            elif "moving_mean" in v.path:
                v.assign(rng.normal(0.0, 0.1, v.shape).astype("float32"))
        model.save(path)
    """
)
_REFERENCE = textwrap.dedent(
    """
    import sys, keras, numpy as np
    a, b = (keras.models.load_model(p, compile=False) for p in sys.argv[1:3])
    x = np.random.default_rng(9).normal(size=(2, 224, 224, 3)).astype("float32")
    np.savez(sys.argv[3], x=x, y=0.8 * np.asarray(a(x)) + 0.2 * np.asarray(b(x)))
    """
)
_LOAD = textwrap.dedent(
    """
    import os, sys
    if sys.argv[1] == "tf-keras":
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tf_keras as k
    else:
        import keras as k
    import numpy as np
    data = np.load(sys.argv[3])
    try:
        model = k.models.load_model(sys.argv[2], compile=False)
    except Exception as e:
        print("does not load:", " ".join(str(e).split())[-120:])
    else:
        y = np.asarray(model(data["x"], training=False))
        print(f"largest difference from 0.8 A(x) + 0.2 B(x): {np.abs(y - data['y']).max():.1e}")
    """
)


def _run(*argv: object) -> str:
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--previous", type=Path, help="a checkout of earlier fusecli code")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write bench/results/keras3_h5.txt")
    parser.add_argument("--note", default="", help="a line to put above the tables")
    args = parser.parse_args()
    previous_name = "fusecli fuse, previous code"
    lines = [args.note] if args.note else []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a, b = d / "a.keras", d / "b.keras"
        subprocess.run([sys.executable, "-c", _MAKE, a, b], check=True, capture_output=True)
        out = d / "out.h5"
        # -P: fusecli from PYTHONPATH (this checkout, or --previous), not the current folder
        fuse = [sys.executable, "-P", "-m", "fusecli", "fuse", a, b, "--w", "0.8", "0.2"]
        variants = {
            "by hand in Keras 3 (-> .h5)": [sys.executable, "-c", BY_HAND, a, b, d / "h.h5"],
            "fusecli fuse -o x.h5": [*fuse, "-o", out, "--force"],
            "cat a b > out": ["sh", "-c", f"cat '{a}' '{b}' > '{d / 'cat.bin'}'"],
        }
        if args.previous is not None:
            earlier = ["env", f"PYTHONPATH={args.previous}", *fuse, "-o", d / "p.h5", "--force"]
            variants[previous_name] = earlier
        outputs = [d / "h.h5", out, d / "cat.bin", d / "p.h5"]
        results = best_of(variants, repeat=args.repeat, fresh=outputs)
        block = [
            f"\ntwo ResNet50 .keras (2 x 103 MB) -> .h5; best wall time of {args.repeat}, "
            "largest peak RSS",
            table(results, "by hand in Keras 3 (-> .h5)"),
            "as ratios to the copy:",
            table(results, "cat a b > out"),
        ]
        if args.previous is not None:
            block += ["as ratios to the previous code:", table(results, previous_name)]
        _run("-c", _REFERENCE, a, b, d / "ref.npz")
        written = {"fusecli fuse -o x.h5": out, "by hand in Keras 3 (-> .h5)": d / "h.h5"}
        if args.previous is not None:
            written[previous_name] = d / "p.h5"
        block.append("\nthe written .h5 loaded:")
        for name, path in written.items():
            for loader in ("tf-keras", "keras"):
                block.append(f"{name}, {loader}: {_run('-c', _LOAD, loader, path, d / 'ref.npz')}")
        print("\n".join(block))
        lines += block
    if args.save:
        print(save_results("keras3_h5", "\n".join(lines)))


if __name__ == "__main__":
    main()
