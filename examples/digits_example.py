"""Worked example: score fusion on scikit-learn's digits (8x8 images of 0-9), end to end.

    python examples/digits_example.py [WORKDIR]        (default: ./digits_demo)

1. Splits the 1,797 digits into train/validation/test (60/20/20, stratified, seed 0) and writes
   val.npz and test.npz (arrays x: (N, 8, 8) float32 in [0, 1], y: class ids).
2. Trains two different small Keras models for a few epochs (seeded): an MLP and a small CNN.
3. Runs the fusecli commands a user would, in a shell, printing each one:
   predict, combine through a pipe, tune on validation (which writes fused.keras), and the
   test-set accuracy of each model, of the tuned weights, and of the fused model.
Needs scikit-learn (only for the data set).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

SEED = 0
EPOCHS = 4
REPO = Path(__file__).resolve().parents[1]


def make_data(workdir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=SEED
    )
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SEED
    )
    np.savez(workdir / "val.npz", x=x_val, y=y_val)
    np.savez(workdir / "test.npz", x=x_test, y=y_test)
    np.save(workdir / "y_val.npy", y_val)
    np.save(workdir / "y_test.npy", y_test)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def train_models(workdir: Path, train: tuple[np.ndarray, np.ndarray]) -> None:
    import keras
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    x, y = train

    keras.utils.set_random_seed(SEED)
    pixels = keras.Input((8, 8), name="pixels")
    h = keras.layers.Flatten()(pixels)
    h = keras.layers.Dense(32, activation="relu")(h)
    mlp = keras.Model(pixels, keras.layers.Dense(10, activation="softmax")(h), name="mlp")

    keras.utils.set_random_seed(SEED + 1)
    pixels = keras.Input((8, 8), name="pixels")
    h = keras.layers.Reshape((8, 8, 1))(pixels)
    h = keras.layers.Conv2D(8, 3, activation="relu")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    cnn = keras.Model(pixels, keras.layers.Dense(10, activation="softmax")(h), name="cnn")

    for model in (mlp, cnn):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=EPOCHS, batch_size=32, shuffle=True, verbose=0)
        model.save(workdir / f"{model.name}.keras")


def sh(command: str, workdir: Path, *, optional: bool = False) -> str | None:
    """Run `command` in bash as a user would; echo it and its stderr; return its stdout.

    `optional`: a failure returns None instead of stopping the example.
    """
    print(f"\n$ {command}", flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    fusecli = f"{shlex.quote(sys.executable)} -m fusecli"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command.replace("fusecli ", f"{fusecli} ")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.stderr:
        print(done.stderr, end="", flush=True)
    if done.stdout and len(done.stdout) < 4000:
        print(done.stdout, end="", flush=True)
    if done.returncode != 0:
        if optional:
            print(f"(skipped: exit code {done.returncode})")
            return None
        raise SystemExit(f"failed with exit code {done.returncode}")
    return done.stdout


def accuracy(workdir: Path, scores: str, labels: str) -> float:
    s = np.load(workdir / scores)
    return float(np.mean(np.argmax(s, axis=1) == np.load(workdir / labels)))


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "digits_demo").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(workdir)
    print(
        f"digits: train {len(data['train'][1])}, val {len(data['val'][1])}, "
        f"test {len(data['test'][1])} rows; models trained {EPOCHS} epochs, seed {SEED}"
    )
    train_models(workdir, data["train"])

    # Validation: each model's scores, and their equal-weight sum through a shell pipe.
    sh("fusecli predict mlp.keras val.npz -o mlp_val.npy --force", workdir)
    sh(
        "fusecli predict cnn.keras val.npz -o - "
        "| fusecli combine mlp_val.npy - --labels y_val.npy -o fused_val.npy --force",
        workdir,
    )
    # Tuning, two ways that must agree: on saved score arrays, and on the models themselves
    # (which also writes the fused model with the best weights).
    sh("fusecli predict cnn.keras val.npz -o cnn_val.npy --force", workdir)
    sh("fusecli tune mlp_val.npy cnn_val.npy --labels y_val.npy --method grid --top 5", workdir)
    tuned = json.loads(
        sh(
            "fusecli tune mlp.keras cnn.keras --data val.npz --method grid --top 3 -o fused.keras "
            "--force --json",
            workdir,
        )
    )
    w = " ".join(f"{x:g}" for x in tuned["weights"])

    # Fusion at the logits, softmax(w1 z_mlp + w2 z_cnn): equal weights as I3D does, and weights
    # tuned for it. Both need a fusecli with `fuse --at logits`.
    names = ["mlp", "cnn", "fused"]
    logits_tuned = sh(
        "fusecli tune mlp.keras cnn.keras --data val.npz --method grid --at logits --top 3 "
        "-o logits_tuned.keras --force --json",
        workdir,
        optional=True,
    )
    if logits_tuned is not None:
        names.append("logits_tuned")
    made = sh(
        "fusecli fuse mlp.keras cnn.keras --at logits -o logits_equal.keras --force",
        workdir,
        optional=True,
    )
    if made is not None:
        names.append("logits_equal")
    for name in names:
        sh(f"fusecli predict {name}.keras test.npz -o {name}_test.npy --force", workdir)
    sh(
        f"fusecli combine mlp_test.npy cnn_test.npy --w {w} --labels y_test.npy "
        "-o tuned_test.npy --force",
        workdir,
    )
    results = {
        "weights": tuned["weights"],
        "val": {"tuned": tuned["score"], **{s["name"]: s["score"] for s in tuned["singles"]}},
        "test": {
            "mlp": accuracy(workdir, "mlp_test.npy", "y_test.npy"),
            "cnn": accuracy(workdir, "cnn_test.npy", "y_test.npy"),
            "equal weights": accuracy_of_mean(workdir),
            "tuned weights (combine)": accuracy(workdir, "tuned_test.npy", "y_test.npy"),
            "fused.keras (tune -o)": accuracy(workdir, "fused_test.npy", "y_test.npy"),
        },
    }
    if logits_tuned is not None:
        doc = json.loads(logits_tuned)
        results["logits_weights"] = doc["weights"]
        results["val"]["tuned at logits"] = doc["score"]
        results["test"]["tune --at logits -o"] = accuracy(
            workdir, "logits_tuned_test.npy", "y_test.npy"
        )
    if "logits_equal" in names:
        results["test"]["fuse --at logits (equal)"] = accuracy(
            workdir, "logits_equal_test.npy", "y_test.npy"
        )
    print("\nTest-set top-1 accuracy:")
    for name, value in results["test"].items():
        print(f"  {name:28} {value:.4f}")
    print(json.dumps(results, indent=2))


def accuracy_of_mean(workdir: Path) -> float:
    s = np.load(workdir / "mlp_test.npy") + np.load(workdir / "cnn_test.npy")
    return float(np.mean(np.argmax(s, axis=1) == np.load(workdir / "y_test.npy")))


if __name__ == "__main__":
    main()
