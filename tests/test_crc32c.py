import zlib

import numpy as np

from qwen3pack import _core


def crc32c_reference(data, crc=0):
    """Bit-by-bit CRC32C, straight from the definition (reflected polynomial 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_the_published_check_values():
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720, B.4
    assert _core.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert _core.crc32c(bytes(range(32))) == 0x46DD794E
    assert _core.crc32c(b"") == 0


def test_crc32c_matches_the_definition_at_every_length_and_alignment():
    data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    for start in range(9):
        for length in (0, 1, 7, 8, 9, 63, 64, 65, 200):
            chunk = data[start:start + length]
            assert _core.crc32c(chunk) == crc32c_reference(chunk)


def test_crc32c_continues_across_chunks():
    data = np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)
    whole = _core.crc32c(data)
    assert _core.crc32c(data[5000:], _core.crc32c(data[:5000])) == whole
    assert whole != zlib.crc32(data.tobytes())  # Castagnoli, not the zlib polynomial


def test_crc32c_of_long_inputs_taken_in_three_lanes_matches_the_definition():
    """Inputs of 24 KiB and more run three 8 KiB lanes at once, joined by moving each lane's CRC
    over the bytes after it (runtime/src/crc32c.cpp): checked on either side of those sizes, from
    a start other than 0, and at an odd alignment."""
    data = np.random.default_rng(2).integers(0, 256, 3 * 24576 + 40, dtype=np.uint8).tobytes()
    for start, length in ((0, 24575), (0, 24576), (3, 24577), (1, 2 * 24576 + 8), (5, 3 * 24576 + 35)):
        chunk = data[start:start + length]
        assert _core.crc32c(chunk) == crc32c_reference(chunk)
    assert _core.crc32c(data[24576:], _core.crc32c(data[:24576], 7)) == crc32c_reference(data, 7)
