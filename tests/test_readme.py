"""The README runs as printed: every line of its ```sh blocks (but `pip install`) and its Python
block, on the example files the project ships, in a fresh copy of examples/."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    """The command lines of each sh block (comments and `pip install` lines left out)."""
    out = []
    for block in blocks("sh"):
        lines = [line.strip() for line in block.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        lines = [line for line in lines if not line.startswith("pip ")]
        if lines:
            out.append(lines)
    return out


@pytest.fixture
def workdir(tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of examples/ and a `fusecli` on PATH that runs this checkout."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "fusecli"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fusecli "$@"\n')
    wrapper.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return tmp_path, env


def test_the_readme_has_examples_for_every_command():
    lines = [line for block in commands() for line in block]
    for command in ("fuse", "merge", "predict", "combine", "tune", "inspect", "export"):
        assert any(line.startswith(f"fusecli {command} ") for line in lines), command
    for line in lines:
        for word in shlex.split(line):
            if word.startswith("examples/") and "*" not in word:
                assert (REPO / word).exists(), f"{word} is not shipped"


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(commands())))
def test_every_sh_example_runs_as_printed(workdir, block):
    folder, env = workdir
    for line in commands()[block]:
        done = subprocess.run(
            ["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        words = shlex.split(line)
        written = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-o", "--save-recipe")]
        if not written and words[:2] == ["fusecli", "fuse"]:
            written = [done.stdout.strip()]
        for name in written:
            assert (folder / name).exists(), f"{line}: {name} was not written"


@pytest.mark.slow
def test_the_python_example_runs_as_printed(workdir):
    folder, env = workdir
    [code] = blocks("python")
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "fused.keras").exists() and (folder / "soup.keras").exists()
