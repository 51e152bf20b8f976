"""`qwen3pack reshard`: a converted model rewritten for another tensor-parallel size from its rank
files alone, through the converter's writer.

Each global (Hugging Face) tensor is gathered from the source ranks a chunk of rows at a time, as
the converter reads it from a safetensors file, so the new rank files hold exactly what converting
the checkpoint at the new size writes. Every source tensor record is read front to back, once
(replicated copies included), and its CRC32C checked as its last byte goes by: a damaged source is
refused, naming its file and tensor, before the output is put in place. q8, q4 and q6 rows travel as
their stored blocks, which move between ranks whole, never quantized again (_check_whole_blocks).
"""
import hashlib
import json
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import _core
from ..formats import dtypes, reader
from ..formats.dtypes import BLOCK_TYPES, QUANTIZED, tensor_bytes
from ..formats.files import open_regular, read_into
from ..formats.layout import group_dtype, make_layout
from ..formats.rankfile import VERSION, FormatError, crc_hex
from ..formats.reader import MANIFEST
from .output import commit_atomically
from .plan import Plan, plan_ranks
from .source import copied_files
from .write import CHUNK_BYTES, CONVERTER, ConversionError, write_model


def reshard(directory, output, tp, force=False):
    """Rewrites the converted model in `directory` for `tp` ranks into `output`; returns the Plan.
    The weights keep their dtype; the generation settings and tokenizer files carry over."""
    directory = Path(directory)
    converted = reader.open(directory)
    model = converted.model
    layout = make_layout(model, tp, converted.layout["dtype"], converted.layout.get("dtype_overrides"))
    _check_whole_blocks(directory, model, converted.layout, layout)
    rank_paths = [rank_file.path for rank_file in converted.ranks]
    plan = Plan(directory, model, layout, converted.generation, converted.manifest["tensors"], sources={},
                ignored=[], ranks=plan_ranks(model, layout), files=[directory / MANIFEST, *rank_paths],
                copied_files=copied_files(directory))

    def fill(staging):
        with RankFiles(converted) as rank_files:
            gathered = {name: GatheredTensor(name, spec["dtype"], tuple(spec["shape"]), str(directory),
                                             rank_files.pieces_of(name), rank_files.scratch)
                        for name, spec in plan.global_tensors.items()}
            write_model(replace(plan, sources=gathered), staging, lambda: _identity(converted.manifest, tp))

    commit_atomically(output, force, [directory, *plan.files, *plan.copied_files], fill)
    return plan


def _check_whole_blocks(directory, model, old, new):
    """q8, q4 and q6 blocks lie along each row's input dimension, quantized per rank slice: o_proj and
    down_proj, split along that dimension, move between ranks in whole blocks (the same bytes as
    quantizing the new slices) only where every rank's slice, before and after, is a whole number
    of blocks. Elsewhere their values would be quantized twice: refused."""
    split_columns = {("o_proj", "o_proj"): lambda layout: layout["heads_per_rank"] * model["head_dim"],
                     ("down", "down_proj"): lambda layout: layout["intermediate_per_rank"]}
    for (group, matrix), columns_per_rank in split_columns.items():
        dtype = group_dtype(old, group)
        if dtype not in QUANTIZED:
            continue
        block = BLOCK_TYPES[dtype][0]
        for layout in (old, new):
            columns = columns_per_rank(layout)
            if columns % block:
                raise ConversionError(
                    f"{directory}: its {dtype} {matrix} weights cannot be resharded to tp {new['world_size']}: at "
                    f"tp {layout['world_size']} a rank holds {columns} of their columns, not a whole number of "
                    f"{block}-value blocks, so their values would be quantized twice; convert the checkpoint "
                    f"again with --tp {new['world_size']}")


def _identity(source_manifest, tp):
    """The conversion id and provenance of a reshard: the same source and tp give the same id; the
    provenance keeps the checkpoint's files and says which conversion was resharded."""
    source_id = source_manifest["conversion_id"]
    identity = json.dumps({"format": VERSION, "reshard": {"conversion_id": source_id, "tp": tp}},
                          sort_keys=True).encode()
    provenance = {"converter": CONVERTER, "options": {"tp": tp},
                  "sources": source_manifest["provenance"]["sources"],
                  "resharded_from": {"conversion_id": source_id,
                                     "tp": source_manifest["layout"]["world_size"]}}
    return hashlib.sha256(identity).digest()[:16], provenance


class SourceRecord:
    """One tensor record of a source rank file, read strictly front to back so that its CRC32C
    runs along; checked once the whole record has been read. Vocabulary padding at its end is
    never gathered: it is read (for the checksum) as soon as the rows before it are."""

    def __init__(self, file_name, fd, record):
        self.file_name, self.fd, self.record = file_name, fd, record
        self.position, self.crc = 0, 0
        self.data_end = _sourced_bytes(record)
        if self.data_end == 0:
            self._read_padding()

    @property
    def row_bytes(self):
        return self.record["nbytes"] // (self.record["shape"][0] if len(self.record["shape"]) == 2 else 1)

    def read(self, start, buffer):
        """Fills `buffer` with the record's bytes from `start`, where the previous read ended."""
        assert start == self.position, f"{self.file_name}: {self.record['name']} read out of order"
        view = memoryview(buffer).cast("B")
        _read_into(self.fd, view, self.record["offset"] + start, self.what)
        self._advance(view)
        if self.position == self.data_end:
            self._read_padding()

    def _read_padding(self):
        while self.position < self.record["nbytes"]:
            view = memoryview(bytearray(min(CHUNK_BYTES, self.record["nbytes"] - self.position)))
            _read_into(self.fd, view, self.record["offset"] + self.position, self.what)
            self._advance(view)

    def _advance(self, view):
        self.crc = _core.crc32c(view, self.crc)
        self.position += len(view)
        if self.position == self.record["nbytes"] and crc_hex(self.crc) != self.record["crc32c"]:
            raise FormatError(f"{self.what}: checksum mismatch (the data is damaged)")

    @property
    def what(self):
        return f"{self.file_name}: tensor {self.record['name']}"


def _sourced_bytes(record):
    """Where the record's bytes from a source tensor end: padding parts come last, and only there."""
    real = [part for part in record["parts"] if part["source"] is not None]
    if any(part["axis"] != 0 for part in real):
        return record["nbytes"]
    row_bytes = record["nbytes"] // record["shape"][0]
    return max((part["at"] + part["end"] - part["start"] for part in real), default=0) * row_bytes


def _read_into(fd, view, offset, what):
    if read_into(fd, view, offset) < len(view):
        raise FormatError(f"{what}: the file ends before the tensor does (it was truncated)")


class RankFiles:
    """The rank files of a converted model, open for reading, each tensor record a SourceRecord."""

    def __init__(self, converted):
        self.converted = converted
        self.scratch = bytearray(CHUNK_BYTES)  # a column slice or a replica's copy, before it is placed
        self._files = ExitStack()
        self._pieces = {}  # HF name -> [(SourceRecord, part)] over every rank, in rank and part order

    def __enter__(self):
        for rank_file in self.converted.ranks:
            name = rank_file.path.name
            fd = self._files.enter_context(open_regular(rank_file.path, name, FormatError)).fileno()
            for record in rank_file.header["tensors"]:
                source_record = SourceRecord(name, fd, record)
                for part in record["parts"]:
                    if part["source"] is not None:
                        self._pieces.setdefault(part["source"], []).append((source_record, part))
        return self

    def __exit__(self, *exc):
        self._files.close()

    def pieces_of(self, name):
        return self._pieces[name]


@dataclass
class GatheredTensor:
    """A global tensor as the writer streams it (the interface of a safetensors SourceTensor),
    its rows gathered from the slices that the source ranks hold."""
    name: str
    dtype: str
    shape: tuple
    origin: str
    pieces: list   # [(SourceRecord, part)]
    scratch: bytearray

    @property
    def nbytes(self):
        return tensor_bytes(self.dtype, self.shape)

    @contextmanager
    def row_reader(self):
        yield self._read_rows

    def _read_rows(self, first_row, buffer):
        row_bytes = self.nbytes // (self.shape[0] if len(self.shape) == 2 else 1)
        rows = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, row_bytes)
        placed = {}  # (axis, start, end) -> file that filled it: later copies must be the same bytes
        for source, part in self.pieces:
            piece = self._read_piece(source, part, first_row, rows, row_bytes)
            if piece is None:
                continue
            target, data = piece
            key = (part["axis"], part["start"], part["end"])
            if key in placed:
                if not np.array_equal(rows[target], data):
                    raise FormatError(f"{source.what}: its copy of {self.name}[{part['start']}:{part['end']}] "
                                      f"differs from {placed[key]}'s")
                continue
            rows[target] = data
            placed[key] = source.file_name

    def _read_piece(self, source, part, first_row, rows, row_bytes):
        """(where in `rows` the part's bytes of this chunk go, those bytes read into the scratch
        buffer), or None when the chunk has none of its rows."""
        count = len(rows)
        if part["axis"] == 1:  # every row's columns [start, end): the record's rows of the chunk
            width = source.row_bytes
            data = self._scratch(source, first_row * width, count * width).reshape(count, width)
            def at(column):  # the byte where a column starts (of a q8, q4 or q6 row: a block, _check_whole_blocks)
                return dtypes.row_bytes(self.dtype, column)
            columns = slice(at(part["at"]), at(part["at"] + part["end"] - part["start"]))
            return (slice(None), slice(at(part["start"]), at(part["end"]))), data[:, columns]
        lo, hi = max(first_row, part["start"]), min(first_row + count, part["end"])
        if part["axis"] is None:  # the whole (one-row) tensor, replicated
            lo, hi = 0, 1
        elif lo >= hi:
            return None
        first_byte = (part["at"] + lo - part["start"]) * row_bytes
        data = self._scratch(source, first_byte, (hi - lo) * row_bytes).reshape(hi - lo, row_bytes)
        return (slice(lo - first_row, hi - first_row), slice(None)), data

    def _scratch(self, source, start, length):
        view = np.frombuffer(self.scratch, dtype=np.uint8, count=length)
        source.read(start, view)
        return view
