"""Streaming the planned tensors into the rank files, with bounded memory, into a temporary
directory that replaces OUTPUT only when everything is written."""
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import __version__, _core
from ..formats.dtypes import F16_MAX, QUANTIZED, DtypeOverflow, convert, row_bytes, storage_dtype, to_float32
from ..formats.rankfile import VERSION, RankFileWriter, crc_hex, rank_file_name
from ..formats.reader import MANIFEST
from .. import schema
from .source import open_regular

CHUNK_BYTES = 8 << 20  # source bytes read at a time: with the dtype conversion's temporaries, the memory bound
HASH_CHUNK = 8 << 20
# The exponent bits of each dtype, as an unsigned integer of its size: all ones is Inf or NaN.
EXPONENT_MASKS = {"bf16": (np.uint16, 0x7F80), "f16": (np.uint16, 0x7C00), "f32": (np.uint32, 0x7F800000)}
CONVERTER = f"qwen3pack {__version__}"  # the provenance's "converter"


class ConversionError(ValueError):
    pass


@dataclass
class Destination:
    """One part of one rank file's tensor that a source tensor fills, and that tensor's running CRC."""
    writer: RankFileWriter
    record: dict
    part: dict


def sha256_of(path):
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    with open_regular(path) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    return digest.hexdigest()


class Progress:
    """One line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self, total):
        self.total, self.done, self.started, self.shown = total, 0, time.perf_counter(), 0.0
        self.enabled = sys.stderr.isatty()

    def advance(self, nbytes):
        self.done += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self.shown > 0.2 or self.done == self.total):
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            sys.stderr.write(f"\rconverting {100 * self.done / max(self.total, 1):5.1f}%  "
                             f"{self.done / 1e9:7.2f} / {self.total / 1e9:.2f} GB  {rate / 1e6:7.0f} MB/s")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _destinations(writers):
    """{source name: [Destination]} over every rank, in the order the parts are laid out."""
    out = {}
    for writer in writers:
        for record in writer.header["tensors"]:
            record["_crc"] = 0
            for part in record["parts"]:
                out.setdefault(part["source"], []).append(Destination(writer, record, part))
    return out


def _write_rows(dest, rows, first_row, dtype, stored_blocks=False):
    """Writes source rows [first_row, first_row + len(rows)) where `dest` takes them; rows of a
    quantized dtype come as the quantizers take them (QUANTIZER_INPUT) and are quantized here,
    after the slice that the rank holds, so that no block straddles two ranks. With
    `stored_blocks` they come quantized already (a reshard), as bytes whose column slices lie on
    block boundaries (reshard._check_whole_blocks)."""
    record, part = dest.record, dest.part
    axis = part["axis"]
    if axis == 1:  # a column slice of every row: dest row i is source row i
        if stored_blocks:
            columns = slice(row_bytes(dtype, part["start"]), row_bytes(dtype, part["end"]))
        else:
            columns = slice(part["start"], part["end"])
        block = np.ascontiguousarray(rows[:, columns])
        dest_row = first_row
    else:          # a row slice (axis 0), or the whole tensor (replicated)
        lo = max(first_row, part["start"])
        hi = min(first_row + len(rows), part["end"])
        if lo >= hi:
            return
        block = rows[lo - first_row:hi - first_row]
        dest_row = part["at"] + lo - part["start"]
    if dtype in QUANTIZED and not stored_blocks:
        block = _quantized(block, dtype, dest)
    dest.writer.write(record["offset"] + dest_row * row_bytes(dtype, record["shape"][-1]), block)
    record["_crc"] = _core.crc32c(block, record["_crc"])


# The C++ quantizers give the bytes of formats.dtypes.quantize_q8, _q4 and _q6 (tests/test_quant.py,
# tests/test_quant_q4.py, test_quant_q6.py), 4 times faster for q8, and for q4 with 11 times less CPU (5.0 against 53.6 ns
# a weight on a 512 x 3072 matrix) spread over every core. They take float32 values, or a bf16
# checkpoint's rows as stored (bit patterns as uint16), which they widen row by row.
C_QUANTIZERS = {"q8": _core.quantize_q8_weights, "q4": _core.quantize_q4_weights, "q6": _core.quantize_q6_weights}
QUANTIZER_INPUT = {"bf16": "bf16"}  # source dtype -> what the quantizers take; f32 for the others


def _quantized(values, dtype, dest):
    try:
        return C_QUANTIZERS[dtype](np.ascontiguousarray(values))
    except OverflowError:
        largest = float(np.abs(to_float32(values, "bf16") if values.dtype == np.uint16 else values).max())
        raise ConversionError(f"tensor {dest.part['source']}: value {largest:g} exceeds the "
                              f"{dtype} range (a scale beyond f16's {F16_MAX:g}); convert it with --keep "
                              f"GROUP=bf16 or f32") from None


def _write_padding(dest):
    record, part = dest.record, dest.part
    # the file already reads as zeros here; zero rows quantize to zero bytes (scale 0, values 0)
    zeros = bytes(row_bytes(record["dtype"], record["shape"][1]) * (part["end"] - part["start"]))
    record["_crc"] = _core.crc32c(zeros, record["_crc"])


def _stream_tensor(source, dests, buffer, progress):
    """Reads one source tensor in chunks of rows, converts each chunk once per destination dtype,
    and writes it to every rank that holds a part of it. `source` is a safetensors tensor or a
    tensor gathered from rank files: anything with name, dtype, shape, nbytes, origin and
    row_reader()."""
    rows_total = source.shape[0] if len(source.shape) == 2 else 1
    row_bytes = source.nbytes // rows_total
    rows_per_chunk = max(1, len(buffer) // row_bytes)
    with source.row_reader() as read_rows:
        for first in range(0, rows_total, rows_per_chunk):
            count = min(rows_per_chunk, rows_total - first)
            chunk = memoryview(buffer)[:count * row_bytes]
            read_rows(first, chunk)
            if source.dtype in QUANTIZED:  # a reshard's quantized rows: their blocks move as they are
                blocks = np.frombuffer(chunk, dtype=np.uint8).reshape(count, -1)
                for dest in dests:
                    _write_rows(dest, blocks, first, source.dtype, stored_blocks=True)
                progress.advance(count * row_bytes)
                continue
            raw = np.frombuffer(chunk, dtype=storage_dtype(source.dtype)).reshape(count, -1)
            _check_finite(raw, source, first)
            converted = {}
            for dest in dests:
                dtype = dest.record["dtype"]
                if dtype not in converted:
                    try:
                        # quantized by _write_rows per rank slice, from what the quantizers take
                        taken = QUANTIZER_INPUT.get(source.dtype, "f32") if dtype in QUANTIZED else dtype
                        converted[dtype] = convert(raw, source.dtype, taken)
                    except DtypeOverflow as error:
                        raise ConversionError(f"tensor {source.name}: {error}; convert with --dtype bf16 "
                                              f"or f32") from None
                rows = converted[dtype] if len(source.shape) == 2 else converted[dtype].reshape(-1)[None]
                _write_rows(dest, rows, first, dtype)
            progress.advance(count * row_bytes)


def _check_finite(raw, source, first_row):
    """Refuses NaN and infinities: they convert, load and compute, into logits that are all NaN."""
    bits, mask = EXPONENT_MASKS[source.dtype]
    at = _core.first_nonfinite(raw.view(bits), mask)
    if at >= 0:
        row, column = divmod(at, raw.shape[1])
        position = [first_row + row, column] if len(source.shape) == 2 else [column]
        raise ConversionError(f"{source.origin}: tensor {source.name}: holds a NaN or infinite value "
                              f"(at {position}); only finite weights are converted")


def _stream_all(plan, writers):
    destinations = _destinations(writers)
    buffer = bytearray(CHUNK_BYTES)
    progress = Progress(sum(s.nbytes for s in plan.sources.values()))
    for name, source in plan.sources.items():
        _stream_tensor(source, destinations[name], buffer, progress)
    for dest in destinations.get(None, []):  # vocabulary padding: zeros, checksummed
        _write_padding(dest)
    for writer in writers:
        for record in writer.header["tensors"]:
            record["crc32c"] = crc_hex(record.pop("_crc"))


def _conversion_id(options, provenance_sources):
    identity = json.dumps({"format": VERSION, "options": options, "sources": provenance_sources},
                          sort_keys=True).encode()
    return hashlib.sha256(identity).digest()[:16]


def _manifest(plan, conversion_id, rank_entries, provenance):
    return {
        "format": "qwen3pack",
        "format_version": list(VERSION),
        "conversion_id": conversion_id.hex(),
        "model": plan.model,
        "layout": plan.layout,
        "rank_files": rank_entries,
        "tensors": plan.global_tensors,
        "generation": plan.generation,
        "provenance": provenance,
    }


def write_directory(plan, staging, options):
    """Writes the whole conversion of a Hugging Face checkpoint into `staging` (an empty directory);
    the source files are hashed for the provenance while the weights stream."""
    with ThreadPoolExecutor(max_workers=1) as hasher:  # hashing overlaps the conversion
        hashes = [hasher.submit(sha256_of, path) for path in plan.files]

        def identity():
            sources = [{"file": path.name, "sha256": h.result(), "size": path.stat().st_size}
                       for path, h in zip(plan.files, hashes)]
            provenance = {"converter": CONVERTER, "options": options, "sources": sources}
            return _conversion_id(options, sources), provenance

        try:
            write_model(plan, staging, identity)
        finally:
            for h in hashes:
                h.cancel()


def write_model(plan, staging, identity):
    """Writes the rank files of `plan` (its sources streamed into them), the manifest and the
    copied files into `staging`. identity() gives (conversion id, provenance) once the data is
    written."""
    tp = plan.layout["world_size"]
    writers = []
    try:
        for rank, rank_plan in enumerate(plan.ranks):
            writers.append(RankFileWriter(staging / rank_file_name(rank, tp), rank, tp, rank_plan.header,
                                          rank_plan.data_offset, rank_plan.file_size))
        _stream_all(plan, writers)
        for writer in writers:  # while the hashing thread may still be reading the sources
            writer.sync_data()
        conversion_id, provenance = identity()
        rank_entries = []
        for rank, writer in enumerate(writers):
            header_crc = writer.finish(conversion_id)
            rank_entries.append({"rank": rank, "file": writer.path.name, "size": writer.file_size,
                                 "header_crc32c": crc_hex(header_crc)})
    finally:
        for writer in writers:
            writer.close()
    manifest = _manifest(plan, conversion_id, rank_entries, provenance)
    schema.validate(manifest, "manifest", MANIFEST)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for path in plan.copied_files:
        with open_regular(path) as source, open(staging / path.name, "wb") as copy:
            shutil.copyfileobj(source, copy)
