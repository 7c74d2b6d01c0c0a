"""Benchmark: the safety scan (bounded iterative walk, size guards) against the floor of listing
every HDF5 object with h5py's own visitor, on ResNet50 .keras and .h5 files.

Each variant runs in its own fresh process, see measure.py. The floor opens the file and visits
every object's metadata (what any scan must at least do), with no checks at all.

    python bench/bench_scan.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from measure import best_of, make_resnet50s, table

FLOOR = """
import io, sys, zipfile, h5py
path = sys.argv[1]
if path.endswith(".keras"):
    with zipfile.ZipFile(path) as z:
        source = io.BytesIO(z.read("model.weights.h5"))
else:
    source = path
with h5py.File(source, "r") as h5:
    h5.visititems(lambda name, obj: (obj.shape, obj.dtype) if isinstance(obj, h5py.Dataset) else 0)
"""
START = "import h5py, zipfile, json"
SCAN = "import sys; from fusecli.safety.scan import scan; assert scan(sys.argv[1]) == []"
LAYOUT = (
    "import sys; from fusecli.formats.weights_layout import read_layout; read_layout(sys.argv[1])"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "resnet50.keras", Path(tmp) / "resnet50.h5"]
        make_resnet50s(*paths)
        for path in paths:
            results = best_of(
                {
                    "python: import h5py, zipfile, json": [sys.executable, "-c", START],
                    "floor: h5py visititems": [sys.executable, "-c", FLOOR, path],
                    "fusecli scan": [sys.executable, "-c", SCAN, path],
                    "fusecli read_layout": [sys.executable, "-c", LAYOUT, path],
                },
                repeat=repeat,
            )
            size_mb = path.stat().st_size / 1e6
            print(f"ResNet50 {path.suffix}, {size_mb:.0f} MB; best wall time of {repeat}")
            print(table(results, "floor: h5py visititems"))


if __name__ == "__main__":
    main()
