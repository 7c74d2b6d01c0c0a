"""The CRC-32 a zip member's header records, of a file range, on two cores.

zlib (and `os.preadv`) let other threads run, so the range is read and summed in two halves side
by side; the halves' checksums are joined as zlib's `crc32_combine` joins them (Python's zlib
does not offer it): the first one's is multiplied by x^(8 * length of the second) modulo the
CRC-32 polynomial, in GF(2), and the second one's added.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

_POLYNOMIAL = 0xEDB88320  # reflected, as zlib's
_CHUNK = 8 << 20
# Below this, one thread: starting a second costs more than it saves.
_SPLIT_BYTES = 16 << 20


def range_crc32(fd: int, start: int, size: int) -> int:
    """The CRC-32 of the `size` bytes of `fd` from `start`."""
    if size < _SPLIT_BYTES:
        return _read_crc32(fd, start, size)
    half = size // 2
    with ThreadPoolExecutor(max_workers=1) as other:
        second = other.submit(_read_crc32, fd, start + half, size - half)
        first = _read_crc32(fd, start, half)
        return crc32_combine(first, second.result(), size - half)


def crc32_combine(first: int, second: int, second_size: int) -> int:
    """The CRC-32 of two byte strings one after the other, from theirs (zlib's algorithm)."""
    power, k = 1 << 31, 3  # x^0; x^(8 * 2^j) for each bit j of the size, from _POWERS[3 + j]
    while second_size:
        if second_size & 1:
            power = _multiply(_POWERS[k & 31], power)
        second_size >>= 1
        k += 1
    return _multiply(power, first) ^ second


def _read_crc32(fd: int, start: int, size: int) -> int:
    crc = 0
    buffer = bytearray(min(_CHUNK, size))
    done = 0
    while done < size:
        view = memoryview(buffer)[: min(len(buffer), size - done)]
        got = os.preadv(fd, [view], start + done)
        if not got:
            raise OSError("short read while computing a checksum")
        crc = zlib.crc32(view[:got], crc)
        done += got
    return crc


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (both reflected)."""
    mask, product = 1 << 31, 0
    while True:
        if a & mask:
            product ^= b
            if not a & (mask - 1):
                return product
        mask >>= 1
        b = (b >> 1) ^ _POLYNOMIAL if b & 1 else b >> 1


_POWERS = [1 << 30]  # x^(2^n) modulo the polynomial, n = 0..31
for _ in range(31):
    _POWERS.append(_multiply(_POWERS[-1], _POWERS[-1]))
