"""Names in a fused model: branches, inputs, outputs and layers.

Both ways of fusing (the files in `files.py`, loaded models in `build.py`) name things here, so
that they give a fused model the same names.
"""

from __future__ import annotations

import re


def identifier(text: str) -> str:
    """`text` as a Python-style identifier (a file name `1 rgb-v2` gives `m_1_rgb_v2`)."""
    name = re.sub(r"\W+", "_", text).strip("_") or "model"
    return f"m_{name}" if name[0].isdigit() else name


def unique(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`... whichever is not in `taken`; it is added to `taken`."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate
