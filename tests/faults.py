"""Writer faults for `fusecli.files.archive.fault`, defined at module level: the tensors are
written in a child process (of the helper, once Keras is imported), which gets them by name."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FlipOneBit:
    """One bit of one byte of the first tensor whose path ends in `suffix`."""

    suffix: str
    hits: int = 0

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.hits or not name.endswith(self.suffix):
            return values
        self.hits += 1
        damaged = values.copy()
        damaged.reshape(-1).view(np.uint8)[3] ^= 0x01
        return damaged


@dataclass
class AddOne:
    """+1 on the first tensor whose path ends in `suffix`."""

    suffix: str
    hits: int = 0

    def __call__(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.hits or not name.endswith(self.suffix):
            return values
        self.hits += 1
        return values + 1
