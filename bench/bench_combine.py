"""`fusecli combine` against numpy doing the same sum in memory, on two 1 GiB score arrays.

    python bench/bench_combine.py [--gib 1.0]

Writes two float32 score arrays of --gib GiB each (rows of 1,000 classes) in a temporary folder,
then runs each variant in its own process and prints wall time, peak memory (RSS) and the ratios:
- numpy by hand: np.save(out, 0.6 * np.load(a) + 0.4 * np.load(b)), all in memory;
- fusecli combine a.npy b.npy --w 0.6 0.4 -o out.npy (chunked reads, bounded memory);
- fusecli combine through pipes: cat a.npy | fusecli combine - b.npy ... -o - | cat > out.npy.
Every output is checked against the others before the folder is deleted.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from measure import measure, table

CLASSES = 1000

BY_HAND = textwrap.dedent(
    """
    import sys
    import numpy as np
    a, b, out = sys.argv[1:]
    np.save(out, 0.6 * np.load(a) + 0.4 * np.load(b))
    """
)


MAKE = textwrap.dedent(
    """
    import sys
    import numpy as np
    path, rows, classes, seed = sys.argv[1], *map(int, sys.argv[2:])
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, classes))
    for start in range(0, rows, 16384):
        stop = min(rows, start + 16384)
        out[start:stop] = rng.random((stop - start, classes), dtype=np.float32)
    out.flush()
    """
)


def make_scores(path: Path, rows: int, seed: int) -> None:
    """A float32 .npy of (rows, CLASSES), made in a child process.

    A child's peak RSS starts from its parent's at fork time, so this process must stay small:
    it neither makes nor maps the big arrays itself until every variant has been measured.
    """
    argv = [sys.executable, "-c", MAKE, str(path), str(rows), str(CLASSES), str(seed)]
    subprocess.run(argv, check=True)


def same(paths: list[Path]) -> float:
    """Largest absolute difference between the outputs, slice by slice."""
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    worst = 0.0
    for start in range(0, len(arrays[0]), 16384):
        first = np.asarray(arrays[0][start : start + 16384], dtype=np.float64)
        for other in arrays[1:]:
            diff = np.abs(first - np.asarray(other[start : start + 16384], dtype=np.float64))
            worst = max(worst, float(diff.max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0, help="size of each input array")
    gib = parser.parse_args().gib
    rows = int(gib * 2**30) // (4 * CLASSES)
    fusecli = [sys.executable, "-m", "fusecli"]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        a, b = d / "a.npy", d / "b.npy"
        make_scores(a, rows, 0)
        make_scores(b, rows, 1)
        size_mb = a.stat().st_size / 2**20
        print(f"inputs: 2 x float32 ({rows:,}, {CLASSES}) = 2 x {size_mb:,.0f} MB", flush=True)

        # Read both once so that every variant starts from a warm page cache.
        subprocess.run(["cat", str(a), str(b)], stdout=subprocess.DEVNULL, check=True)
        numpy_run = measure(
            "numpy in memory", [sys.executable, "-c", BY_HAND, str(a), str(b), str(d / "np.npy")]
        )
        ours = measure(
            "fusecli combine (files)",
            [*fusecli, "combine", str(a), str(b), "--w", "0.6", "0.4", "-o", str(d / "fc.npy")],
        )
        q = shlex.quote
        pipeline = (
            f"cat {q(str(a))} | {' '.join(map(q, fusecli))} combine - {q(str(b))} "
            f"--w 0.6 0.4 -o - | cat > {q(str(d / 'pipe.npy'))}"
        )
        piped = measure(
            "fusecli combine (stdin -> stdout)", ["bash", "-o", "pipefail", "-c", pipeline]
        )
        worst = same([d / "np.npy", d / "fc.npy", d / "pipe.npy"])
        print(table({m.label: m for m in (numpy_run, ours, piped)}, numpy_run.label))
        print(f"peak memory of combine / size of one input: {ours.peak_mb / size_mb:.3f}")
        print(f"largest difference between the outputs: {worst:.3g}")


if __name__ == "__main__":
    main()
