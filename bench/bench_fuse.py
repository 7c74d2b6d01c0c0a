"""`fusecli fuse` against the same fusion written by hand in Keras 3, and against a plain copy of
the input files (the floor for any job that reads and writes them), in one run.

    python bench/bench_fuse.py [--repeat 1] [--previous CHECKOUT] [--save] [--note TEXT]

Two pairs of models, made in a temporary folder: two ResNet50 .keras files (keras.applications,
weights=None, ~100 MB each) and two ~1 GB models (4 x Dense(8192)). Each variant runs in its own
process (bench/measure.py); the tables give wall time and peak memory (RSS) as ratios to the
hand-written script and to `cat a b > out`. fusecli runs with `python -P`, so that PYTHONPATH
(this checkout's compiled copy, `bench/measure.py`, or `--previous`) picks the code, and not the
folder the bench is started from (before, both fusecli rows of a run from the checkout's root
ran the checkout's code).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from measure import best_of, make_resnet50s, save_results, table

# The fusion by hand, as a careful user writes it: load both, rename (both have one name), scale
# with Rescaling, join with Add, save.
BY_HAND = textwrap.dedent(
    """
    import sys, keras
    a_path, b_path, out = sys.argv[1:]
    a = keras.models.load_model(a_path, compile=False)
    b = keras.models.load_model(b_path, compile=False)
    a.name, b.name = "a", "b"
    x = keras.Input(a.inputs[0].shape[1:])
    ya = keras.layers.Rescaling(0.8)(a(x))
    yb = keras.layers.Rescaling(0.2)(b(x))
    keras.Model(x, keras.layers.Add()([ya, yb])).save(out)
    """
)

_MAKE_DENSE = """
import sys, keras
for seed, path in enumerate(sys.argv[1:]):
    keras.utils.set_random_seed(seed)
    x = keras.Input((8192,))
    h = x
    for _ in range(4):
        h = keras.layers.Dense(8192)(h)
    keras.Model(x, h).save(path)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--previous",
        type=Path,
        help="a checkout of earlier fusecli code, measured in the same run (e.g. `git archive`)",
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--save", action="store_true", help="write the tables to bench/results/fuse.txt"
    )
    parser.add_argument("--note", default="", help="a line to put above the tables")
    args = parser.parse_args()
    repeat, previous = args.repeat, args.previous
    previous_name = "fusecli fuse, previous code"
    lines = [args.note] if args.note else []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pairs = {
            "two ResNet50 .keras (2 x 103 MB)": (d / "r1.keras", d / "r2.keras"),
            "two 4 x Dense(8192) .keras (2 x 1.07 GB)": (d / "g1.keras", d / "g2.keras"),
        }
        make_resnet50s(*pairs["two ResNet50 .keras (2 x 103 MB)"])
        subprocess.run(
            [
                sys.executable,
                "-c",
                _MAKE_DENSE,
                *map(str, pairs["two 4 x Dense(8192) .keras (2 x 1.07 GB)"]),
            ],
            check=True,
            capture_output=True,
        )
        for title, (a, b) in pairs.items():
            out = d / "out.keras"
            fuse = [sys.executable, "-P", "-m", "fusecli", "fuse", a, b, "--w", "0.8", "0.2"]
            variants = {
                "by hand in Keras": [sys.executable, "-c", BY_HAND, a, b, d / "h.keras"],
                "fusecli fuse (checks the file)": [*fuse, "-o", out, "--force"],
                "cat a b > out": ["sh", "-c", f"cat '{a}' '{b}' > '{d / 'cat.bin'}'"],
            }
            if previous is not None:
                earlier = ["env", f"PYTHONPATH={previous}", *fuse, "-o", d / "p.keras", "--force"]
                variants[previous_name] = earlier
            outputs = [d / "h.keras", out, d / "cat.bin", d / "p.keras"]
            results = best_of(variants, repeat=repeat, fresh=outputs)
            block = [
                f"\n{title}; best wall time of {repeat}, largest peak RSS",
                table(results, "by hand in Keras"),
                "as ratios to the copy:",
                table(results, "cat a b > out"),
            ]
            if previous is not None:
                block += ["as ratios to the previous code:", table(results, previous_name)]
            print("\n".join(block))
            lines += block
    if args.save:
        print(save_results("fuse", "\n".join(lines)))


if __name__ == "__main__":
    main()
