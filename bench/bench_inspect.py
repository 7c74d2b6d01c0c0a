"""Benchmark: `fusecli inspect` against loading the model in Keras, on a ResNet50 .keras file.

Each variant runs in its own fresh subprocess (as a user would run it), timed from outside, with
its peak RSS read from resource.getrusage(RUSAGE_CHILDREN) inside a small wrapper process.

    python bench/bench_inspect.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs one command in a child and reports its wall time and peak RSS (KiB on Linux).
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"code": code, "wall": wall, "rss_mb": rss / 1024}))
"""

MAKE_MODEL = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
keras.applications.ResNet50(weights=None).save(sys.argv[1])
"""

KERAS_LOAD = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
model = keras.models.load_model(sys.argv[1])
model.summary(print_fn=lambda *a, **k: None)
print(model.count_params())
"""


def measure(command: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    result = json.loads(out.stdout)
    if result["code"] != 0:
        raise SystemExit(f"{command} failed with exit status {result['code']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.keras"
        subprocess.run([sys.executable, "-c", MAKE_MODEL, str(path)], check=True)
        size_mb = path.stat().st_size / 1e6
        variants = {
            "fusecli inspect": [sys.executable, "-m", "fusecli", "inspect", str(path)],
            "fusecli inspect --json": [sys.executable, "-m", "fusecli", "inspect", str(path),
                                       "--json"],
            "keras load_model + summary": [sys.executable, "-c", KERAS_LOAD, str(path)],
        }  # fmt: skip
        results: dict[str, dict] = {}
        for _ in range(args.repeat):  # interleaved, so a busy machine hurts all variants alike
            for name, command in variants.items():
                r = measure(command)
                best = results.setdefault(name, r)
                best["wall"] = min(best["wall"], r["wall"])
                best["rss_mb"] = max(best["rss_mb"], r["rss_mb"])
    base = results["keras load_model + summary"]
    print(f"ResNet50 .keras, {size_mb:.0f} MB; best wall time of {args.repeat}, peak RSS")
    print(f"{'variant':30} {'wall s':>8} {'peak MB':>8} {'time ratio':>11} {'mem ratio':>10}")
    for name, r in results.items():
        print(
            f"{name:30} {r['wall']:8.2f} {r['rss_mb']:8.0f} {r['wall'] / base['wall']:11.3f} "
            f"{r['rss_mb'] / base['rss_mb']:10.3f}"
        )


if __name__ == "__main__":
    main()
