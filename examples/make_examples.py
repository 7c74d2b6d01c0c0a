"""Make the small example models that ship in examples/ (run from the repository's top folder).

Two streams of a toy action recogniser with 5 classes, as in two-stream late fusion:
- rgb_stream.keras takes a 16x16 RGB frame,
- pose_stream.keras takes 17 body keypoints (x, y).
Their weights are random (seeded): they show the mechanics, not accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = 5


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


def main() -> None:
    keras.utils.set_random_seed(0)
    rgb_stream().save(HERE / "rgb_stream.keras")
    pose_stream().save(HERE / "pose_stream.keras")
    print(HERE / "rgb_stream.keras")
    print(HERE / "pose_stream.keras")


if __name__ == "__main__":
    main()
