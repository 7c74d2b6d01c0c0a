"""`fusecli tune --method greedy` on many large score arrays, against a plain numpy Caruana.

    python bench/bench_tune_scale.py [--models 24] [--rows 50000] [--classes 100] [--rounds 100]

Writes --models float32 score arrays of (rows, classes) (softmax rows of noisy logits that each
know part of the answer; 24 x 50,000 x 100 is 480 MB) and their labels in a temporary folder, then
runs each variant in its own process:
- numpy by hand: np.load every array into memory, then Caruana's selection with replacement,
  --rounds rounds, each candidate scored by accuracy on the whole arrays (the textbook loop);
- fusecli tune ... --method greedy --rounds R --folds 0 (memory-mapped inputs, chunked rounds,
  log-loss tie-breaks, the best round kept; also scores each model alone, the average and the
  hard vote). --folds 0: the cross-validated estimate would repeat the selection on 5 folds.
Prints wall time and peak memory (RSS), as ratios, and the input bytes for the 1.25x memory goal;
and the validation accuracy of both choices (they may differ: fusecli breaks accuracy ties by
log loss, the loop by the lower index).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from measure import best_of, save_results, table

BY_HAND = textwrap.dedent(
    """
    import sys, json
    import numpy as np
    y_path, rounds, out, *paths = sys.argv[1:]
    y = np.load(y_path)
    scores = [np.load(p) for p in paths]
    total = np.zeros(scores[0].shape)
    chosen = []
    for r in range(1, int(rounds) + 1):
        accuracy = [np.mean(np.argmax(total + s, axis=1) == y) for s in scores]
        best = int(np.argmax(accuracy))
        total += scores[best]
        chosen.append((best, accuracy[best]))
    values = [a for _, a in chosen]
    keep = int(np.argmax(values)) + 1
    counts = np.bincount([i for i, _ in chosen[:keep]], minlength=len(scores))
    json.dump({"weights": (counts / keep).tolist()}, open(out, "w"))
    """
)

MAKE = textwrap.dedent(
    """
    import sys
    import numpy as np
    folder, models, rows, classes = sys.argv[1], *map(int, sys.argv[2:])
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, size=rows)
    np.save(f"{folder}/y.npy", y)
    for i in range(models):
        out = np.lib.format.open_memmap(
            f"{folder}/s{i:02d}.npy", mode="w+", dtype=np.float32, shape=(rows, classes)
        )
        for start in range(0, rows, 8192):
            stop = min(rows, start + 8192)
            z = rng.standard_normal((stop - start, classes)) * (1 + i % 4)
            z[np.arange(stop - start), y[start:stop]] += 2.0 + 0.1 * i
            z = np.exp(z - z.max(axis=1, keepdims=True))
            out[start:stop] = z / z.sum(axis=1, keepdims=True)
        out.flush()
    """
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=24)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make = [sys.executable, "-c", MAKE, tmp, str(args.models), str(args.rows)]
        subprocess.run([*make, str(args.classes)], check=True)
        paths = sorted(str(p) for p in folder.glob("s*.npy"))
        y = str(folder / "y.npy")
        rounds = str(args.rounds)
        variants = {
            "numpy Caruana by hand": [
                sys.executable, "-c", BY_HAND, y, rounds, folder / "hand.json", *paths
            ],
            "fusecli tune --method greedy": [
                sys.executable, "-m", "fusecli", "tune", *paths, "--labels", y, "--method",
                "greedy", "--rounds", rounds, "--folds", "0", "--json",
            ],
        }  # fmt: skip
        results = best_of(variants, repeat=args.repeat)
        ours = subprocess.run(
            variants["fusecli tune --method greedy"], check=True, capture_output=True, text=True
        )
        hand = np.array(json.loads((folder / "hand.json").read_text())["weights"])
        mine = json.loads(ours.stdout)
        labels = np.load(y)
        fused = sum(w * np.load(p, mmap_mode="r") for w, p in zip(hand, paths, strict=True) if w)
        hand_accuracy = float(np.mean(np.argmax(fused, axis=1) == labels))
    input_mb = args.models * args.rows * args.classes * 4 / 2**20
    peak = results["fusecli tune --method greedy"].peak_mb
    text = "\n".join(
        [
            f"{args.models} score arrays of {args.rows:,} x {args.classes} float32 "
            f"({input_mb:.0f} MiB), {args.rounds} rounds of greedy selection",
            table(results, "numpy Caruana by hand"),
            f"fusecli peak memory / input bytes: {peak / input_mb:.2f}",
            f"validation accuracy of the choice: by hand {hand_accuracy:.4f}, fusecli "
            f"{mine['score']:.4f} (round {mine['choice']['best_round']} of {args.rounds} kept)",
        ]
    )
    print(text)
    save_results("tune_scale", text)


if __name__ == "__main__":
    main()
