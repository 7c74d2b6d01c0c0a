"""Run one bench script, print its tables, and keep them in bench/results/NAME.txt.

    python bench/save.py NAME bench_x.py [ARGS...]

The file is headed by the date, the machine and the command (`measure.save_results`), so that
every figure the README and docs/ quote can be traced to a committed run. The bench's own stderr
(progress, warnings) is passed through and not kept.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from measure import save_results

HERE = Path(__file__).resolve().parent


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    name, script, *args = sys.argv[1:]
    done = subprocess.run(
        [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True
    )
    print(done.stdout, end="")
    if done.returncode != 0:
        raise SystemExit(f"{script} failed (exit {done.returncode}); nothing saved")
    print(f"saved in {save_results(name, done.stdout, [script, *args])}")


if __name__ == "__main__":
    main()
