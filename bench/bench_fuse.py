"""`fusecli fuse` against the same fusion written by hand in Keras 3, on two ResNet50 files.

    python bench/bench_fuse.py [--repeat 3]

Makes two ResNet50 .keras files (keras.applications, weights=None, ~100 MB each) in a temporary
folder, then runs each variant in its own process and prints wall time, peak memory and the
ratios. fusecli is measured twice: as shipped (it loads the written file back and checks its
output) and with --no-verify, which does what the hand-written script does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

from measure import best_of, make_resnet50s, table

# The fusion by hand, as a careful user writes it today: load both, rename (both are "resnet50"),
# scale with Rescaling, join with Add, save.
BY_HAND = textwrap.dedent(
    """
    import sys, keras
    a_path, b_path, out = sys.argv[1:]
    a = keras.models.load_model(a_path, compile=False)
    b = keras.models.load_model(b_path, compile=False)
    a.name, b.name = "a", "b"
    x = keras.Input((224, 224, 3))
    ya = keras.layers.Rescaling(0.8)(a(x))
    yb = keras.layers.Rescaling(0.2)(b(x))
    keras.Model(x, keras.layers.Add()([ya, yb])).save(out)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a, b = d / "a.keras", d / "b.keras"
        make_resnet50s(a, b)
        fusecli = [sys.executable, "-m", "fusecli", "fuse", a, b, "--w", "0.8", "0.2", "--force"]
        results = best_of(
            {
                "by hand in Keras": [sys.executable, "-c", BY_HAND, a, b, d / "h.keras"],
                "fusecli fuse --no-verify": [*fusecli, "-o", d / "f2.keras", "--no-verify"],
                "fusecli fuse (verifies the file)": [*fusecli, "-o", d / "f1.keras"],
            },
            repeat=repeat,
        )
    print(f"two ResNet50 .keras files; best wall time of {repeat}, largest peak RSS")
    print(table(results, "by hand in Keras"))


if __name__ == "__main__":
    main()
