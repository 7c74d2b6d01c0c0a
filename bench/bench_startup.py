"""Benchmark: how long `fusecli --help` takes to start, against a bare `python -c pass`.

Help must be instant: no TensorFlow, numpy or h5py is imported to print it (tested in
tests/test_cli_fuse.py); this measures what is left, as a ratio to the interpreter's own start-up.

    python bench/bench_startup.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import sys

from measure import best_of, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    repeat = parser.parse_args().repeat
    # What the installed `fusecli` script does, without depending on it being installed.
    script = [sys.executable, "-c", "import sys; from fusecli.cli import main; sys.exit(main())"]
    results = best_of(
        {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import click'": [sys.executable, "-c", "import click"],
            "fusecli --help": [*script, "--help"],
            "fusecli fuse --help": [*script, "fuse", "--help"],
            "python -m fusecli fuse --help": [sys.executable, "-m", "fusecli", "fuse", "--help"],
        },
        repeat=repeat,
    )
    print(f"best wall time of {repeat}, largest peak RSS")
    print(table(results, "python -c pass"))


if __name__ == "__main__":
    main()
