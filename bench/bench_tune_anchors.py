"""fusecli tune's default choice against the field's anchors, on scikit-learn's digits.

    python bench/bench_tune_anchors.py [--seeds 5]

For each seed, the 1,797 digits are split 60/20/20 (train/validation/test, stratified) and a
dozen varied scikit-learn classifiers are trained on the train split; their probabilities on the
validation and test rows are saved as .npy score arrays. Then, as a user would:

    fusecli tune val_*.npy --labels y_val.npy --save-recipe r.json      (defaults: --method auto)
    fusecli combine test_*.npy --recipe r.json --labels y_test.npy

and the test accuracy of that is set beside the anchors, all chosen on the same validation rows:
the best single model (by validation accuracy), the uniform average, Caruana's selection (plain
numpy, 50 rounds with replacement, best round kept), and scikit-learn's StackingClassifier (the
same dozen classifiers, logistic regression on 5-fold out-of-fold probabilities of the train
split, as it is meant to be used). Needs scikit-learn (`pip install 'fusecli[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from measure import REPO, save_results


def classifiers(seed: int) -> dict[str, object]:
    from sklearn.discriminant_analysis import (
        LinearDiscriminantAnalysis,
        QuadraticDiscriminantAnalysis,
    )
    from sklearn.ensemble import (
        AdaBoostClassifier,
        ExtraTreesClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC
    from sklearn.tree import DecisionTreeClassifier

    return {
        "logreg": LogisticRegression(C=0.1, max_iter=2000),
        "naive_bayes": GaussianNB(),
        "knn3": KNeighborsClassifier(3),
        "knn15": KNeighborsClassifier(15),
        "tree": DecisionTreeClassifier(max_depth=8, random_state=seed),
        "forest": RandomForestClassifier(100, random_state=seed),
        "extra_trees": ExtraTreesClassifier(100, random_state=seed),
        "boosting": HistGradientBoostingClassifier(max_iter=60, random_state=seed),
        "adaboost": AdaBoostClassifier(n_estimators=50, random_state=seed),
        "svc": SVC(gamma=0.02, probability=True, random_state=seed),
        "mlp": MLPClassifier((64,), max_iter=400, random_state=seed),
        "lda": LinearDiscriminantAnalysis(),
        "qda": QuadraticDiscriminantAnalysis(reg_param=0.5),
    }


def caruana(val: list[np.ndarray], y: np.ndarray, rounds: int = 50) -> np.ndarray:
    total = np.zeros_like(val[0], dtype=np.float64)
    chosen, values = [], []
    for _ in range(rounds):
        accuracy = [np.mean(np.argmax(total + s, axis=1) == y) for s in val]
        best = int(np.argmax(accuracy))
        total += val[best]
        chosen.append(best)
        values.append(accuracy[best])
    keep = int(np.argmax(values)) + 1
    return np.bincount(chosen[:keep], minlength=len(val)) / keep


def fusecli(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    argv = [sys.executable, "-m", "fusecli", *map(str, args)]
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env)


def one_seed(seed: int, folder: Path) -> dict[str, float]:
    from sklearn.datasets import load_digits
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    models = classifiers(seed)
    val, test = [], []
    for name, model in models.items():
        model.fit(x_train, y_train)
        val.append(model.predict_proba(x_val))
        test.append(model.predict_proba(x_test))
        np.save(folder / f"val_{name}.npy", val[-1].astype(np.float32))
        np.save(folder / f"test_{name}.npy", test[-1].astype(np.float32))
    np.save(folder / "y_val.npy", y_val)
    np.save(folder / "y_test.npy", y_test)

    def accuracy(p: np.ndarray) -> float:
        return float(np.mean(np.argmax(p, axis=1) == y_test))

    names = list(models)
    start = time.perf_counter()
    tuned = fusecli(
        "tune", *(folder / f"val_{n}.npy" for n in names), "--labels", folder / "y_val.npy",
        "--save-recipe", folder / "r.json", "--force", "--json",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    fusecli(
        "combine", *(folder / f"test_{n}.npy" for n in names), "--recipe", folder / "r.json",
        "-o", folder / "fused.npy", "--force",
    )  # fmt: skip
    chosen = json.loads(tuned.stdout)
    best = int(np.argmax([np.mean(np.argmax(v, axis=1) == y_val) for v in val]))
    weights = caruana(val, y_val)
    stacking = StackingClassifier(
        list(classifiers(seed).items()), LogisticRegression(max_iter=2000), cv=5
    ).fit(x_train, y_train)
    return {
        "fusecli default": accuracy(np.load(folder / "fused.npy")),
        "best single model": accuracy(test[best]),
        "uniform average": accuracy(sum(test) / len(test)),
        "Caruana (numpy, 50 rounds)": accuracy(
            sum(w * t for w, t in zip(weights, test, strict=True))
        ),
        "sklearn StackingClassifier": float(np.mean(stacking.predict(x_test) == y_test)),
        "_seconds": seconds,
        "_method": chosen["method"],
        "_best": names[best],
    }


def main() -> None:
    from threadpoolctl import threadpool_limits

    # One thread for BLAS and OpenMP (scikit-learn's boosting, MLP): on a shared machine their
    # spinning threads make the training many times slower than on one core.
    threadpool_limits(limits=1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            rows.append(one_seed(seed, Path(tmp)))
            print(f"seed {seed}: {rows[-1]}", file=sys.stderr)
    keys = [k for k in rows[0] if not k.startswith("_")]
    width = max(map(len, keys)) + 2
    lines = [
        f"scikit-learn digits, 13 classifiers, {args.seeds} splits 60/20/20 (360 test rows each);",
        "test accuracy in %, mean over the splits (and per split)",
        "",
        f"{'':<{width}} {'mean':>6}   per split",
    ]
    for k in keys:
        per = " ".join(f"{100 * r[k]:5.1f}" for r in rows)
        lines.append(f"{k:<{width}} {100 * np.mean([r[k] for r in rows]):6.2f}   {per}")
    lines.append("")
    lines.append("fusecli's choice per split: " + ", ".join(r["_method"] for r in rows))
    lines.append("best single model per split: " + ", ".join(r["_best"] for r in rows))
    seconds = [r["_seconds"] for r in rows]
    lines.append(f"fusecli tune wall time: {min(seconds):.1f} to {max(seconds):.1f} s")
    text = "\n".join(lines)
    print(text)
    save_results("tune_anchors", text)


if __name__ == "__main__":
    main()
