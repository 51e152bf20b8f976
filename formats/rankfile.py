"""One rank file: the 64-byte prefix, the JSON header and the data section (SPEC.md, "Rank file")."""
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .. import _core

MAGIC = b"Q3PACK\r\n"
VERSION = (1, 2)
PREFIX = struct.Struct("<8sHHIIIQQQ16s")  # magic, major, minor, rank, world_size, header_crc32c,
#                                           header_length, data_offset, file_size, conversion_id
assert PREFIX.size == 64
TENSOR_ALIGNMENT = 64
DATA_ALIGNMENT = 4096


# A converted model that does not follow the format; the message names the file and tensor. One
# class (a ValueError) for the readers here and the C++ loader, which also raises it while computing
# when a rank file is truncated under a loaded model.
FormatError = _core.FormatError


def align_up(value, alignment):
    return (value + alignment - 1) // alignment * alignment


def rank_file_name(rank, world_size):
    return f"rank-{rank:05d}-of-{world_size:05d}.q3p"


def crc_hex(value):
    return f"{value:08x}"


def encode_header(header):
    return json.dumps(header, separators=(",", ":"), sort_keys=False).encode()


@dataclass
class Prefix:
    major: int
    minor: int
    rank: int
    world_size: int
    header_crc32c: int
    header_length: int
    data_offset: int
    file_size: int
    conversion_id: bytes

    def pack(self):
        return PREFIX.pack(MAGIC, self.major, self.minor, self.rank, self.world_size,
                           self.header_crc32c, self.header_length, self.data_offset,
                           self.file_size, self.conversion_id)


def plan_offsets(header):
    """Sets every tensor record's offset (records need name, dtype, shape, nbytes, crc32c) and
    returns (data_offset, file_size). The header's own length depends on the offsets written
    into it, so the data section moves down a page until the header fits before it."""
    data_offset = DATA_ALIGNMENT
    while True:
        position = data_offset
        for record in header["tensors"]:
            position = align_up(position, TENSOR_ALIGNMENT)
            record["offset"] = position
            position += record["nbytes"]
        if PREFIX.size + len(encode_header(header)) <= data_offset:
            return data_offset, align_up(position, DATA_ALIGNMENT)
        data_offset += DATA_ALIGNMENT


class RankFileWriter:
    """Writes one rank file whose header is fixed in size before any data is written: the
    checksums are fixed-width hex, filled in by `finish` once the data is known."""

    def __init__(self, path, rank, world_size, header, data_offset, file_size):
        """`header` with its offsets set by plan_offsets, which also gave data_offset and file_size."""
        self.path = Path(path)
        self.rank, self.world_size, self.header = rank, world_size, header
        self.data_offset, self.file_size = data_offset, file_size
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.file_size)  # gaps and padding read as zeros

    def write(self, offset, data):
        view = memoryview(data).cast("B")
        while len(view):
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def finish(self, conversion_id):
        """Writes the header (with the checksums now set in it) and the prefix; returns the
        header's CRC32C."""
        encoded = encode_header(self.header)
        assert PREFIX.size + len(encoded) <= self.data_offset, "header grew after planning"
        header_crc = _core.crc32c(encoded)
        prefix = Prefix(*VERSION, self.rank, self.world_size, header_crc, len(encoded),
                        self.data_offset, self.file_size, conversion_id)
        self.write(0, prefix.pack() + encoded)
        os.fsync(self._fd)
        self.close()
        return header_crc

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
