"""Benchmark: `fusecli inspect` against loading the model in Keras, on a ResNet50 .keras file.

Each variant runs in its own fresh process (as a user would run it), see measure.py.

    python bench/bench_inspect.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from measure import best_of, make_resnet50s, table

KERAS_LOAD = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras
model = keras.models.load_model(sys.argv[1])
model.summary(print_fn=lambda *a, **k: None)
print(model.count_params())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.keras"
        make_resnet50s(path)
        size_mb = path.stat().st_size / 1e6
        inspect = [sys.executable, "-m", "fusecli", "inspect", path]
        results = best_of(
            {
                "keras load_model + summary": [sys.executable, "-c", KERAS_LOAD, path],
                "fusecli inspect": inspect,
                "fusecli inspect --json": [*inspect, "--json"],
            },
            repeat=repeat,
        )
    print(f"ResNet50 .keras, {size_mb:.0f} MB; best wall time of {repeat}, largest peak RSS")
    print(table(results, "keras load_model + summary"))


if __name__ == "__main__":
    main()
