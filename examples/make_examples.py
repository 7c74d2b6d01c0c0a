"""Make the small example files that ship in examples/ (run from the repository's top folder).

Everything is tiny and seeded; the weights are random: the files show the mechanics, not
accuracy. The README's examples run on them as printed.

- rgb_stream.keras, pose_stream.keras: two streams of a toy action recogniser with 5 classes,
  as in two-stream late fusion (a 16x16 RGB frame; 17 body keypoints (x, y)).
- val.npz: 32 validation rows for them: `frames`, `keypoints` (each stream reads the array named
  after its input) and `y`, the class ids.
- base.keras, ft1.keras, ft2.keras, ft3.keras: a small classifier and three fine-tunes of it
  (its weights plus small seeded changes), for `merge`.
- many/: four small classifiers m_1.keras ... m_4.keras of one input, their scores on 60
  validation rows (val_1.npy ...) and 40 test rows (test_1.npy ...), and y_val.npy, for `tune`
  choosing how to fuse many models and `combine`/`fuse --recipe` applying the choice.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = 5
VAL_ROWS = 32


def rgb_stream() -> keras.Model:
    frames = keras.Input((16, 16, 3), name="frames")
    x = keras.layers.Conv2D(8, 3, activation="relu")(frames)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(frames, keras.layers.Dense(CLASSES, activation="softmax")(x))


def pose_stream() -> keras.Model:
    keypoints = keras.Input((17, 2), name="keypoints")
    x = keras.layers.Flatten()(keypoints)
    x = keras.layers.Dense(16, activation="relu")(x)
    return keras.Model(keypoints, keras.layers.Dense(CLASSES, activation="softmax")(x))


def classifier(features: int, classes: int, name: str) -> keras.Model:
    x = keras.Input((features,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(
        x, keras.layers.Dense(classes, activation="softmax", name="probs")(h), name=name
    )


def fine_tunes(folder: Path) -> list[Path]:
    """base.keras and three relatives of it: the base's weights plus small seeded changes."""
    keras.utils.set_random_seed(1)
    base = classifier(8, CLASSES, "base")
    base.save(folder / "base.keras")
    paths = [folder / "base.keras"]
    for i in (1, 2, 3):
        rng = np.random.default_rng(100 + i)
        tuned = classifier(8, CLASSES, f"ft{i}")
        tuned.set_weights(
            [w + rng.normal(0.0, 0.05, w.shape).astype(w.dtype) for w in base.get_weights()]
        )
        tuned.save(folder / f"ft{i}.keras")
        paths.append(folder / f"ft{i}.keras")
    return paths


def validation_data(path: Path) -> Path:
    rng = np.random.default_rng(7)
    np.savez(
        path,
        frames=rng.random((VAL_ROWS, 16, 16, 3)).astype("float32"),
        keypoints=rng.normal(size=(VAL_ROWS, 17, 2)).astype("float32"),
        y=rng.integers(0, CLASSES, VAL_ROWS),
    )
    return path


def many_models(folder: Path) -> list[Path]:
    """Four classifiers of one input and their scores on validation and test rows; the labels
    follow the models' mean score, with some noise, so that the choice means something."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(11)
    x_val = rng.normal(size=(60, 8)).astype("float32")
    x_test = rng.normal(size=(40, 8)).astype("float32")
    paths, val_scores = [], []
    for i in range(1, 5):
        keras.utils.set_random_seed(20 + i)
        model = classifier(8, 3, f"m_{i}")
        model.save(folder / f"m_{i}.keras")
        val = np.asarray(model.predict(x_val, verbose=0))
        np.save(folder / f"val_{i}.npy", val)
        np.save(folder / f"test_{i}.npy", np.asarray(model.predict(x_test, verbose=0)))
        val_scores.append(val)
        paths += [folder / f"m_{i}.keras", folder / f"val_{i}.npy", folder / f"test_{i}.npy"]
    mean = np.mean(val_scores, axis=0) + rng.normal(0.0, 0.05, (60, 3))
    np.save(folder / "y_val.npy", np.argmax(mean, axis=1))
    return [*paths, folder / "y_val.npy"]


def main() -> None:
    keras.utils.set_random_seed(0)
    rgb_stream().save(HERE / "rgb_stream.keras")
    pose_stream().save(HERE / "pose_stream.keras")
    made = [HERE / "rgb_stream.keras", HERE / "pose_stream.keras"]
    made.append(validation_data(HERE / "val.npz"))
    made += fine_tunes(HERE)
    made += many_models(HERE / "many")
    for path in made:
        print(path)


if __name__ == "__main__":
    main()
