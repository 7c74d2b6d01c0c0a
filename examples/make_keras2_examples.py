"""Make the Keras 2 era example pair in examples/ with tf-keras (with tf-keras installed: pip
install tf-keras):

    python examples/make_keras2_examples.py [OUT_DIR]    # OUT_DIR defaults to examples/

The same two streams as make_examples.py (a toy action recogniser with 5 classes), written as a
tf.keras 2 user has them: `model.save("rgb_stream.h5")` under Keras 2, the legacy `.h5` format
with Keras 2 layer configs (`batch_input_shape`, keras_version 2.x):
- rgb_stream.h5 takes a 16x16 RGB frame,
- pose_stream.h5 takes 17 body keypoints (x, y).
Weights are random (seeded): they show the mechanics, not accuracy. tf-keras and Keras 3 must not
share a process: run this script on its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tf_keras as keras  # noqa: E402

HERE = Path(__file__).resolve().parent
CLASSES = 5


def rgb_stream() -> keras.Model:
    frames = keras.Input((16, 16, 3), name="frames")
    x = keras.layers.Conv2D(8, 3, activation="relu")(frames)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(frames, outputs, name="rgb_stream")


def pose_stream() -> keras.Model:
    keypoints = keras.Input((17, 2), name="keypoints")
    x = keras.layers.Flatten()(keypoints)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(keypoints, outputs, name="pose_stream")


def main(out: Path) -> None:
    keras.utils.set_random_seed(0)
    for name, build in (("rgb_stream", rgb_stream), ("pose_stream", pose_stream)):
        path = out / f"{name}.h5"
        build().save(path, save_format="h5")
        print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
