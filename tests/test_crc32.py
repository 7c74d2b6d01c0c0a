"""The zip checksum of a written `.keras` member, computed in two halves and joined."""

from __future__ import annotations

import os
import random
import zipfile
import zlib

import h5py
import numpy as np

from fusecli.formats import archive
from fusecli.formats.crc32 import crc32_combine, range_crc32


def test_joined_checksums_equal_the_whole_ones():
    rng = random.Random(0)
    for _ in range(300):
        first = rng.randbytes(rng.randint(0, 5000))
        second = rng.randbytes(rng.randint(0, 5000))
        joined = crc32_combine(zlib.crc32(first), zlib.crc32(second), len(second))
        assert joined == zlib.crc32(first + second)


def test_a_range_of_a_file(tmp_path):
    data = np.random.default_rng(0).bytes(40 << 20)  # above the size split in two
    path = tmp_path / "data.bin"
    path.write_bytes(b"head" + data + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert range_crc32(fd, 4, len(data)) == zlib.crc32(data)
        assert range_crc32(fd, 4, 1000) == zlib.crc32(data[:1000])
        assert range_crc32(fd, 4, 0) == 0
    finally:
        os.close(fd)


def test_a_written_archive_passes_zipfiles_own_check(tmp_path):
    # zipfile compares the recorded CRC with the member's bytes as it reads the member whole.
    path = tmp_path / "out.keras"
    values = np.random.default_rng(1).standard_normal((3000, 2000)).astype("float32")
    members = archive.keras_members({"class_name": "Functional"}, {"keras_version": "3"})
    with archive.keras_archive(path, members) as h5:
        h5.create_dataset("w", data=values)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        with z.open("model.weights.h5") as member, h5py.File(member, "r") as h5:
            np.testing.assert_array_equal(h5["w"][()], values)
