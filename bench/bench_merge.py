"""`fusecli merge` against the same merge written by hand in Keras 3, on two ResNet50 files.

    python bench/bench_merge.py [--repeat 3] [--previous CHECKOUT] [--save]

Makes two ResNet50 .keras files (keras.applications, weights=None, ~100 MB each; two random
initialisations, which measure the speed and make no useful model) in a temporary folder, then
runs each variant in its own process and prints wall time, peak memory and the ratios. fusecli
is measured as shipped (it reads the written file back and checks every tensor); beside it the
floors: starting Python with numpy and h5py, and a plain copy of both inputs. Both results are
then compared tensor by tensor. --save writes the tables to bench/results/merge.txt.

Python runs from compiled bytecode for every variant, as installed packages do (pip compiles
them; Keras and TensorFlow here are): besides the compiled copy `measure` runs, the bytecode of
every module, the previous code's too, is cached under the temporary folder
(PYTHONPYCACHEPREFIX) by one untimed run before the timed ones, so that an environment that
forbids writing bytecode beside the sources charges no variant for compiling on every start.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from measure import best_of, make_resnet50s, measure, save_results, table

# The merge by hand, as a user writes it today: load both, average, set_weights, save.
BY_HAND = textwrap.dedent(
    """
    import sys, keras
    a_path, b_path, out = sys.argv[1:]
    a = keras.models.load_model(a_path, compile=False)
    b = keras.models.load_model(b_path, compile=False)
    a.set_weights([(x + y) / 2 for x, y in zip(a.get_weights(), b.get_weights())])
    a.save(out)
    """
)

COMPARE = textwrap.dedent(
    """
    import sys, keras, numpy as np
    ours, theirs = (keras.models.load_model(p).get_weights() for p in sys.argv[1:])
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(ours, theirs, strict=True))
    print(f"largest difference between the two results: {worst:.3g} ({len(ours)} tensors)")
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--previous",
        type=Path,
        help="a checkout of earlier fusecli code, measured in the same run (e.g. `git archive`)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write bench/results/merge.txt")
    args = parser.parse_args()
    repeat, previous = args.repeat, args.previous
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a, b = d / "a.keras", d / "b.keras"
        make_resnet50s(a, b)
        compiled = ["env", f"PYTHONPYCACHEPREFIX={d / 'bytecode'}", "PYTHONDONTWRITEBYTECODE="]
        python = [*compiled, sys.executable, "-P"]  # -P: fusecli from PYTHONPATH, not the cwd
        fusecli = [*python, "-m", "fusecli", "merge", a, b, "--force"]
        variants = {
            "by hand in Keras": [sys.executable, "-c", BY_HAND, a, b, d / "h.keras"],
            "fusecli merge (reads back, checks)": [*fusecli, "-o", d / "m1.keras"],
            "floor: python -c 'import numpy, h5py'": [*python, "-c", "import numpy, h5py"],
            "floor: cat a b > out": ["sh", "-c", f"cat {a} {b} > {d / 'copy'}"],
        }
        if previous is not None:
            earlier = [*compiled, f"PYTHONPATH={previous}", *fusecli[len(compiled) :]]
            variants["previous code (reads back, checks)"] = [*earlier, "-o", d / "p1.keras"]
        for label, argv in variants.items():  # untimed: the bytecode is cached
            if label != "by hand in Keras":
                measure(label, argv)
        outputs = [d / "h.keras", d / "m1.keras", d / "copy", d / "p1.keras"]
        results = best_of(variants, repeat=repeat, fresh=outputs)
        compare = [sys.executable, "-c", COMPARE, d / "m1.keras", d / "h.keras"]
        same = subprocess.run(compare, check=True, capture_output=True, text=True).stdout
    lines = [f"two ResNet50 .keras files; best wall time of {repeat}, largest peak RSS"]
    lines.append(table(results, "by hand in Keras"))
    if previous is not None:
        lines.append("as ratios to the previous code (reads back, checks):")
        lines.append(table(results, "previous code (reads back, checks)"))
    lines.append(same.rstrip())
    text = "\n".join(lines)
    print(text)
    if args.save:
        print(f"saved in {save_results('merge', text)}")


if __name__ == "__main__":
    main()
