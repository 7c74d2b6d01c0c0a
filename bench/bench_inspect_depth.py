"""Benchmark: `fusecli inspect` on models nested N levels deep, against reading their config.

Each file wraps a one-Dense model in N Sequential models (the shape the issue reported: 28
levels took over 120 s). The floor is a process that opens the archive and parses config.json;
inspect should stay a constant factor above it at every depth (linear in the file's size).
`--before DIR` also times the code of another checkout (e.g. main before this change), at the
depths it can finish.

    python bench/bench_inspect_depth.py [--repeat 3] [--before /path/to/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from measure import best_of, table

_MAKE_BASE = """
import sys, keras
keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(sys.argv[1])
"""

READ_CONFIG = """
import json, sys, zipfile
json.loads(zipfile.ZipFile(sys.argv[1]).read("config.json"))
"""

DEPTHS = (7, 14, 28, 56)  # the scan refuses configs nested over 256 JSON levels (~84 models)
BEFORE_DEPTHS = (7, 10, 13, 16)  # exponential code: each level costs about twice the last


def nested(base: Path, target: Path, depth: int) -> Path:
    """Copy `base`, its model wrapped in `depth` Sequential models."""
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(data)
                for level in range(depth):
                    source = {
                        "class_name": "InputLayer",
                        "config": {"batch_shape": [None, 4], "dtype": "float32"},
                    }
                    config = {
                        "module": "keras",
                        "class_name": "Sequential",
                        "config": {"name": f"level{level}", "layers": [source, config]},
                    }
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a checkout of older fusecli code to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.keras"
        subprocess.run(
            [sys.executable, "-c", _MAKE_BASE, base],
            check=True,
            capture_output=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        files = {d: nested(base, Path(tmp) / f"depth{d}.keras", d) for d in DEPTHS}
        deepest = files[max(DEPTHS)]
        variants: dict[str, list[object]] = {
            "floor: read config.json": [sys.executable, "-c", READ_CONFIG, deepest]
        }
        for depth, path in files.items():
            variants[f"inspect, depth {depth} ({path.stat().st_size // 1000} KB)"] = [
                sys.executable, "-m", "fusecli", "inspect", path,
            ]  # fmt: skip
        results = best_of(variants, repeat=args.repeat)
        print(f"best wall time of {args.repeat}; the floor parses the deepest file's config")
        print(table(results, "floor: read config.json"))
        if args.before is not None:
            older = {d: nested(base, Path(tmp) / f"before{d}.keras", d) for d in BEFORE_DEPTHS}
            before = best_of(
                {
                    f"{args.before.name}: inspect, depth {d}": [
                        sys.executable,
                        "-m",
                        "fusecli",
                        "inspect",
                        path,
                    ]  # fmt: skip
                    for d, path in older.items()
                },
                repeat=1,
                env={"PYTHONPATH": str(args.before)},
            )
            first = next(iter(before))
            print(table(before, first))


if __name__ == "__main__":
    main()
