"""One rank file: the 64-byte prefix, the JSON header and the data section (SPEC.md, "Rank file")."""
import collections
import errno
import json
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import _core

MAGIC = b"Q3PACK\r\n"
VERSION = (1, 3)
PREFIX = struct.Struct("<8sHHIIIQQQ16s")  # magic, major, minor, rank, world_size, header_crc32c,
#                                           header_length, data_offset, file_size, conversion_id
assert PREFIX.size == 64
TENSOR_ALIGNMENT = 64
DATA_ALIGNMENT = 4096
# The writer hands the kernel the data in aligned blocks of this size (a huge page on x86-64 and
# aarch64), with O_DIRECT where it can; where it cannot, Linux keeps a file just written in
# page-cache folios of the size of the writes that made them, and maps a 2 MB folio with one TLB
# entry (see RankFileWriter).
WRITE_BLOCK = 2 << 20
BLOCKS_PER_WRITER = 2  # one being gathered while the other is written


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
    checksums are fixed-width hex, filled in by `finish` once the data is known.

    The data comes in pieces of a tensor's rows (often 1 MB), in file order. They are gathered
    into blocks of WRITE_BLOCK bytes at multiples of WRITE_BLOCK, and a thread writes each block
    whole while the next is gathered. Where the filesystem takes it, the blocks go to disk with
    O_DIRECT, past the page cache: a conversion then neither copies its output into memory nor
    leaves gigabytes of it dirty there to be written back, and a tp 2 conversion of the 0.6B
    shapes took 0.93-1.12 s where the page cache's writes took 1.17-3.51 (README, "Performance").
    A model loaded later reads the file back in 2 MB folios (the runtime asks for huge pages on its
    mapping). Elsewhere the blocks go through the page cache, which holds them in 2 MB folios too."""

    def __init__(self, path, rank, world_size, header, data_offset, file_size):
        """`header` with its offsets set by plan_offsets, which also gave data_offset and file_size."""
        self.path = Path(path)
        self.rank, self.world_size, self.header = rank, world_size, header
        self.data_offset, self.file_size = data_offset, file_size
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.file_size)  # gaps and padding read as zeros
        self._direct_fd = _open_direct(self.path)
        self._free_blocks = [mmap.mmap(-1, WRITE_BLOCK) for _ in range(BLOCKS_PER_WRITER)]  # page-aligned, as O_DIRECT needs
        self._writing = collections.deque()  # (future, block) in the order submitted
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{self.path.name}")
        self._block = None        # the block being gathered, if any
        self._block_index = None  # its index in the file
        self._block_filled = 0    # self._block[:_block_filled] holds data or zeros
        self._written_blocks = set()

    def write(self, offset, data):
        view = memoryview(data).cast("B")
        while len(view):
            index, start = divmod(offset, WRITE_BLOCK)
            count = min(len(view), WRITE_BLOCK - start)
            if index in self._written_blocks:  # on its way to disk already: the piece alone, after it
                self._wait_for_writes()
                self._pwrite(self._fd, offset, view[:count])
            else:
                if index != self._block_index:
                    self._submit_block()
                    self._block, self._block_index = self._free_block(), index
                if start > self._block_filled:  # a gap reads as zeros
                    self._block[self._block_filled:start] = bytes(start - self._block_filled)
                self._block[start:start + count] = view[:count]
                self._block_filled = max(self._block_filled, start + count)
            view, offset = view[count:], offset + count

    def _free_block(self):
        if not self._free_blocks:
            self._finish_oldest_write()
        return self._free_blocks.pop()

    def _finish_oldest_write(self):
        future, block = self._writing.popleft()
        self._free_blocks.append(block)
        future.result()

    def _submit_block(self):
        if self._block_index is None:
            return
        begin = self._block_index * WRITE_BLOCK
        size = min(WRITE_BLOCK, self.file_size - begin)  # a multiple of DATA_ALIGNMENT, as O_DIRECT needs
        self._block[self._block_filled:size] = bytes(max(0, size - self._block_filled))
        future = self._thread.submit(self._write_block, begin, memoryview(self._block)[:size])
        self._writing.append((future, self._block))
        self._written_blocks.add(self._block_index)
        self._block, self._block_index, self._block_filled = None, None, 0

    def _write_block(self, offset, view):
        if self._direct_fd is not None:
            try:
                return self._pwrite(self._direct_fd, offset, view)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                os.close(self._direct_fd)  # the filesystem opened it but refuses the writes
                self._direct_fd = None
        self._pwrite(self._fd, offset, view)

    def _wait_for_writes(self):
        while self._writing:
            self._finish_oldest_write()

    @staticmethod
    def _pwrite(fd, offset, view):
        while len(view):
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def sync_data(self):
        """Writes the last block and waits until the data is on disk: called before `finish`, while
        the checksums that go into the header are still being computed, so that finish's own
        fsync has only the header's block left to write."""
        self._submit_block()
        self._wait_for_writes()
        os.fdatasync(self._fd)

    def finish(self, conversion_id):
        """Writes the header (with the checksums now set in it) and the prefix; returns the
        header's CRC32C."""
        encoded = encode_header(self.header)
        assert PREFIX.size + len(encoded) <= self.data_offset, "header grew after planning"
        header_crc = _core.crc32c(encoded)
        prefix = Prefix(*VERSION, self.rank, self.world_size, header_crc, len(encoded),
                        self.data_offset, self.file_size, conversion_id)
        self._submit_block()
        self._wait_for_writes()
        self._pwrite(self._fd, 0, prefix.pack() + encoded)  # into the first block, on disk already
        os.fsync(self._fd)
        self.close()
        return header_crc

    def close(self):
        """Waits for the writes in flight (an error in one was raised already, or is of no more
        interest), then closes the file."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        for fd in (self._direct_fd, self._fd):
            if fd is not None:
                os.close(fd)
        self._direct_fd = self._fd = None


def _open_direct(path):
    """A second descriptor of `path` for O_DIRECT writes, or None where the system or the
    filesystem has no O_DIRECT (macOS, some FUSE and network filesystems)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        return None
