"""Benchmark: what the loading door costs (a private copy of each input, a read and scan in an
isolated child, always) against the same work done in-process, and against Keras by hand.

    python bench/bench_door.py [--repeat 3] [--baseline DIR]

On a ResNet50 .keras (about 100 MB) and a tiny .keras, in one process that has imported Keras
(TensorFlow's threads running, where reads used to run in-process):
- read+scan in-process (the work itself, no isolation: what happened after `import keras`),
  the first isolated read (it starts the helper process), and later isolated reads;
- the private copy alone, and `cat FILE > /dev/null` as the floor for reading the bytes once;
- `fusecli.load_model` against `keras.saving.load_model` on the same file.
Each figure is the best of `--repeat`. With `--baseline DIR` (a checkout of an earlier fusecli),
`fusecli inspect` on the tiny file is also timed as a whole process, this checkout against it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import REPO, best_of, make_resnet50s, table

_IN_PROCESS = """
import json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
import fusecli
from fusecli.safety import isolation
from fusecli.safety import loading
from fusecli.safety import scan

repeat = int(sys.argv[1])
out = {}

def best(fn):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)

for path in map(Path, sys.argv[2:]):
    r = out[path.name] = {"mb": path.stat().st_size / 1e6}
    r["cat"] = best(lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL))
    r["in_process"] = best(lambda: scan._read_and_scan(path))
    isolation.stop_helper()
    start = time.perf_counter()
    scan.refuse_unsafe(path)
    r["first_isolated"] = time.perf_counter() - start
    r["isolated"] = best(lambda: scan.refuse_unsafe(path))

    def copy():
        folder = Path(tempfile.mkdtemp())
        loading._private_copy(path, folder / "0")
        shutil.rmtree(folder)

    r["copy"] = best(copy)
    keras.saving.load_model(path)  # warm: Keras' first load builds its caches
    r["keras"] = best(lambda: keras.saving.load_model(path, compile=False))
    r["door"] = best(lambda: fusecli.load_model(path))
print(json.dumps(out))
"""

_TINY = """
import sys, keras
x = keras.Input((4,))
keras.Model(x, keras.layers.Dense(3)(x)).save(sys.argv[1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier fusecli")
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        big, tiny = Path(tmp) / "resnet50.keras", Path(tmp) / "tiny.keras"
        make_resnet50s(big)
        subprocess.run([sys.executable, "-c", _TINY, tiny], check=True, env=env)
        result = subprocess.run(
            [sys.executable, "-c", _IN_PROCESS, str(args.repeat), big, tiny],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp,
        )
        figures = json.loads(result.stdout.splitlines()[-1])
        print(f"In a process that imported Keras; best of {args.repeat}, milliseconds")
        columns = ("in_process", "first_isolated", "isolated", "copy", "cat", "keras", "door")
        print(f"{'file':<16} {'MB':>6} " + " ".join(f"{c:>14}" for c in columns))
        for name, r in figures.items():
            cells = " ".join(f"{r[c] * 1000:14.1f}" for c in columns)
            print(f"{name:<16} {r['mb']:6.1f} {cells}")
        for name, r in figures.items():
            print(
                f"{name}: door / keras by hand {r['door'] / r['keras']:.2f}x; isolated read / "
                f"in-process {r['isolated'] / r['in_process']:.2f}x; copy / cat "
                f"{r['copy'] / r['cat']:.2f}x"
            )
        if args.baseline:
            os.chdir(tmp)  # so that `python -m fusecli` imports from PYTHONPATH, not from here
            inspect = [sys.executable, "-m", "fusecli", "inspect", tiny]
            here = best_of({"inspect (this checkout)": inspect}, repeat=args.repeat)
            old = best_of(
                {"inspect (baseline)": inspect},
                repeat=args.repeat,
                env={"PYTHONPATH": str(args.baseline.resolve())},
            )
            print()
            print(table({**old, **here}, "inspect (baseline)"))


if __name__ == "__main__":
    main()
