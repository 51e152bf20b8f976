"""Reading a converted model directory: every number from a file is checked before it is used.

Checks are generators of problem sentences, so that `open` can stop at the first one and
`validate` can list them all.
"""
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import _core, schema
from .dtypes import QUANTIZED, dequantize, tensor_bytes, values_dtype
from .files import MAX_JSON_BYTES, open_regular, parse_json, read_into, read_json
from .layout import LayoutError, global_tensors, make_layout, rank_tensors
from .rankfile import (DATA_ALIGNMENT, MAGIC, PREFIX, TENSOR_ALIGNMENT, VERSION, FormatError,
                       Prefix, crc_hex, rank_file_name)

MANIFEST = "manifest.json"
CHECKSUM_CHUNK = 16 << 20


@dataclass
class RankFile:
    path: Path
    prefix: Prefix
    header: dict
    tensors: dict = field(default_factory=dict)  # name -> record
    _mmap: object = None

    rank = property(lambda self: self.prefix.rank)
    world_size = property(lambda self: self.prefix.world_size)
    conversion_id = property(lambda self: self.prefix.conversion_id)
    data_offset = property(lambda self: self.prefix.data_offset)
    file_size = property(lambda self: self.prefix.file_size)

    def array(self, name):
        """A read-only memory-mapped view of one tensor's values (bf16 as ml_dtypes.bfloat16);
        a q8, q4 or q6 tensor's values dequantized, in a new float32 array."""
        record = self.tensors[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[record["offset"]:record["offset"] + record["nbytes"]]
        if record["dtype"] in QUANTIZED:
            rows = record["shape"][0] if len(record["shape"]) == 2 else 1
            return dequantize(raw.reshape(rows, -1), record["dtype"], record["shape"][-1]).reshape(record["shape"])
        return raw.view(values_dtype(record["dtype"])).reshape(record["shape"])


@dataclass
class ConvertedModel:
    path: Path
    manifest: dict
    ranks: list

    model = property(lambda self: self.manifest["model"])
    layout = property(lambda self: self.manifest["layout"])
    generation = property(lambda self: self.manifest["generation"])


def _first(problems):
    for problem in problems:
        raise FormatError(problem)


def _validate_schema(document, schema_name, what):
    try:
        schema.validate(document, schema_name, what)
    except schema.SchemaError as error:
        raise FormatError(str(error)) from None


def read_manifest(directory):
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a directory")
    what = str(directory / MANIFEST)
    manifest = read_json(directory / MANIFEST, what, FormatError)
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, list) and len(version) == 2 and all(isinstance(v, int) for v in version):
        _first(_version_problems(what, *version))  # before the schema, which knows only this major
    _validate_schema(manifest, "manifest", what)
    _first(_manifest_problems(what, manifest))
    return manifest


def _version_problems(what, major, minor):
    if major > VERSION[0]:
        yield (f"{what}: format version {major}.{minor} is newer than this reader "
               f"({VERSION[0]}.{VERSION[1]}); upgrade qwen3pack to read it")
    elif major < 1:
        yield f"{what}: format version {major}.{minor} is not a released version"


def _manifest_problems(what, manifest):
    model, layout = manifest["model"], manifest["layout"]
    try:
        expected_layout = make_layout(model, layout["world_size"], layout["dtype"], layout.get("dtype_overrides"))
    except LayoutError as error:
        yield f"{what}: layout: {error}"
        return
    if layout != expected_layout:
        yield f"{what}: layout {layout} does not follow from the model and world size ({expected_layout})"
    if len(model["layer_types"]) != model["num_hidden_layers"]:
        yield f"{what}: model.layer_types has {len(model['layer_types'])} entries for {model['num_hidden_layers']} layers"
    world = layout["world_size"]
    names = [entry["file"] for entry in manifest["rank_files"]]
    expected_names = [rank_file_name(rank, world) for rank in range(world)]
    if names != expected_names or [e["rank"] for e in manifest["rank_files"]] != list(range(world)):
        yield f"{what}: rank_files must list {expected_names} in rank order, found {names}"
    if manifest["tensors"] != global_tensors(model, layout):
        yield f"{what}: tensors does not list the global tensors that the model and layout imply"


def read_prefix(f, what):
    """The checked 64-byte prefix of the opened rank file `f`."""
    actual_size = os.fstat(f.fileno()).st_size
    if actual_size < PREFIX.size:
        raise FormatError(f"{what}: truncated: {actual_size} bytes, shorter than the 64-byte prefix")
    magic, *fields = PREFIX.unpack(_read_at(f, 0, PREFIX.size, what))
    if magic != MAGIC:
        raise FormatError(f"{what}: not a qwen3pack rank file (magic {magic!r})")
    prefix = Prefix(*fields)
    _first(_version_problems(what, prefix.major, prefix.minor))
    if prefix.file_size != actual_size:
        raise FormatError(f"{what}: truncated or extended: the prefix says {prefix.file_size} bytes, "
                          f"the file has {actual_size}")
    if prefix.data_offset % DATA_ALIGNMENT or prefix.file_size % DATA_ALIGNMENT:
        raise FormatError(f"{what}: data_offset {prefix.data_offset} or file_size {prefix.file_size} "
                          f"is not a multiple of {DATA_ALIGNMENT}")
    if not PREFIX.size + prefix.header_length <= prefix.data_offset <= prefix.file_size:
        raise FormatError(f"{what}: header_length {prefix.header_length} and data_offset "
                          f"{prefix.data_offset} do not fit in {prefix.file_size} bytes")
    if prefix.header_length > MAX_JSON_BYTES:  # a sparse file can declare any size: bound the allocation
        raise FormatError(f"{what}: header_length {prefix.header_length} is more than the "
                          f"{MAX_JSON_BYTES} bytes a reader accepts")
    if prefix.world_size < 1 or prefix.rank >= prefix.world_size:
        raise FormatError(f"{what}: rank {prefix.rank} of world size {prefix.world_size}")
    return prefix


def _read_at(f, offset, length, what):
    try:
        data = os.pread(f.fileno(), length, offset)
    except OSError as e:
        raise FormatError(f"{what}: cannot be read: {e.strerror}") from None
    if len(data) != length:
        raise FormatError(f"{what}: truncated while reading")
    return data


def _advise(f, advice, length=0):
    """posix_fadvise(os.POSIX_FADV_<advice>) on [0, length) of `f` (0: all of it) where the system
    has it (not macOS). Advice only: where it is not taken, nothing else changes."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(f.fileno(), 0, length, getattr(os, f"POSIX_FADV_{advice}"))


def read_rank_file(path):
    """A rank file with its prefix and header checked on their own (not yet against a manifest)."""
    path = Path(path)
    what = path.name
    with open_regular(path, what, FormatError) as f:
        # The header's pages are read alone, without readahead, and not kept: pages cached in 4 KB
        # folios at the start of the file would keep a model from reading its first 2 MB block, and
        # (through the readahead they start) many after it, in one 2 MB folio, which it maps in one
        # TLB entry (README, "Weights in 2 MB pages"). Pages a running model maps stay.
        _advise(f, "RANDOM")
        prefix = read_prefix(f, what)
        encoded = _read_at(f, PREFIX.size, prefix.header_length, what)
        _advise(f, "DONTNEED", prefix.data_offset)
    if _core.crc32c(encoded) != prefix.header_crc32c:
        raise FormatError(f"{what}: header checksum mismatch (the header is damaged)")
    header = parse_json(encoded, f"{what}: header", FormatError)
    _validate_schema(header, "rank_header", what)
    tensors = {record["name"]: record for record in header["tensors"]}
    if len(tensors) != len(header["tensors"]):
        raise FormatError(f"{what}: a tensor name appears twice")
    return RankFile(path, prefix, header, tensors)


def rank_file_problems(rank_file, manifest, rank):
    """Every way in which one rank file disagrees with the manifest, the layout or its own bounds."""
    what = rank_file.path.name
    prefix = rank_file.prefix
    layout, model = manifest["layout"], manifest["model"]
    if prefix.rank != rank or prefix.world_size != layout["world_size"]:
        yield (f"{what}: holds rank {prefix.rank} of {prefix.world_size}, the manifest expects "
               f"rank {rank} of {layout['world_size']}")
    if prefix.conversion_id.hex() != manifest["conversion_id"]:
        yield (f"{what}: conversion id {prefix.conversion_id.hex()} differs from the manifest's "
               f"{manifest['conversion_id']}: files of different conversions are mixed")
    entry = manifest["rank_files"][rank]
    if entry["size"] != prefix.file_size or entry["header_crc32c"] != crc_hex(prefix.header_crc32c):
        yield f"{what}: size or header checksum differs from the manifest's entry"
    for key in ("model", "layout"):
        if rank_file.header[key] != manifest[key]:
            yield f"{what}: header's {key} differs from the manifest's"
    yield from _record_problems(rank_file, model, layout, rank)


def _record_problems(rank_file, model, layout, rank):
    what = rank_file.path.name
    records = rank_file.header["tensors"]
    expected = rank_tensors(model, layout, rank)
    expected_names = [t["name"] for t in expected]
    if [r["name"] for r in records] != expected_names:
        missing = sorted(set(expected_names) - set(rank_file.tensors))
        extra = sorted(set(rank_file.tensors) - set(expected_names))
        yield f"{what}: tensor list differs from the layout (missing {missing}, unexpected {extra}, or out of order)"
    expected_by_name = {t["name"]: t for t in expected}
    for record in records:
        name, offset, nbytes = record["name"], record["offset"], record["nbytes"]
        want = expected_by_name.get(name)
        if want is not None:
            for key in ("dtype", "shape", "parts"):
                if record[key] != want[key]:
                    yield f"{what}: tensor {name}: {key} {record[key]} differs from the layout's {want[key]}"
        if nbytes != tensor_bytes(record["dtype"], record["shape"]):
            yield f"{what}: tensor {name}: nbytes {nbytes} does not match shape {record['shape']} of {record['dtype']}"
        if offset % TENSOR_ALIGNMENT:
            yield f"{what}: tensor {name}: offset {offset} is not a multiple of {TENSOR_ALIGNMENT}"
        if offset < rank_file.data_offset:
            yield f"{what}: tensor {name}: offset {offset} lies in the header, before data_offset {rank_file.data_offset}"
        if not in_bounds(record, rank_file):
            yield (f"{what}: tensor {name}: bytes [{offset}, {offset + nbytes}) lie outside the file "
                   f"({rank_file.prefix.file_size} bytes)")
    # Each record against the next one only: a single bad offset gives one line, not a cascade.
    # Records in increasing offset order, each pair of neighbours apart, means no overlap at all.
    placed = [r for r in records if in_bounds(r, rank_file)]
    for before, after in zip(placed, placed[1:]):
        if after["offset"] < before["offset"] + before["nbytes"]:
            yield (f"{what}: tensor {after['name']}: offset {after['offset']} overlaps tensor {before['name']} "
                   f"(bytes [{before['offset']}, {before['offset'] + before['nbytes']})) or comes before it")


def in_bounds(record, rank_file):
    """Whether a record's bytes lie in the data section (the only records whose bytes are read)."""
    return rank_file.data_offset <= record["offset"] and record["offset"] + record["nbytes"] <= rank_file.file_size


def checksum_problems(rank_file):
    """Recomputes every tensor's CRC32C (reading, not mapping, so no pages stay resident). Records
    outside the file are skipped: the structure checks report them."""
    what = rank_file.path.name
    buffer = bytearray(CHECKSUM_CHUNK)
    try:
        f = open_regular(rank_file.path, what, FormatError)
    except FormatError as error:
        yield str(error)
        return
    with f:
        for record in rank_file.header["tensors"]:
            if not in_bounds(record, rank_file):
                continue
            try:
                crc = _crc_of_range(f.fileno(), record["offset"], record["nbytes"], buffer)
            except OSError as e:
                yield f"{what}: tensor {record['name']}: cannot be read: {e.strerror}"
                continue
            if crc != record["crc32c"]:
                yield f"{what}: tensor {record['name']}: checksum mismatch (the data is damaged)"


def _crc_of_range(fd, offset, nbytes, buffer):
    """The CRC32C of [offset, offset + nbytes) of `fd` as 8 hex digits (None past a short read)."""
    crc, done = 0, 0
    while done < nbytes:
        chunk = memoryview(buffer)[:min(nbytes - done, len(buffer))]
        if read_into(fd, chunk, offset + done) < len(chunk):
            return None  # the file shrank since it was opened
        crc = _core.crc32c(chunk, crc)
        done += len(chunk)
    return crc_hex(crc)


def open(directory, ranks=None):
    """Opens a converted model: the manifest and every rank file, checked against each other,
    against the layout and against their own sizes. Checksums are not read (see validate).
    ranks: the rank numbers whose files are opened (None: all), as a host that computes only some
    ranks needs; ConvertedModel.ranks then holds those."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    entries = list(enumerate(manifest["rank_files"]))
    if ranks is not None:
        world = len(entries)
        for rank in ranks:
            if not 0 <= rank < world:
                raise FormatError(f"{directory / MANIFEST}: has no rank {rank} (tp {world})")
        entries = [entries[rank] for rank in ranks]
    opened = []
    for rank, entry in entries:
        rank_file = read_rank_file(directory / entry["file"])
        _first(rank_file_problems(rank_file, manifest, rank))
        opened.append(rank_file)
    return ConvertedModel(directory, manifest, opened)


def gather(directory, name):
    """The global Hugging Face tensor `name`, rebuilt from the slices that the ranks hold (in the
    stored dtype: bf16 as ml_dtypes.bfloat16, numpy's bf16; q8, q4, q6 dequantized to float32, each
    rank's blocks without their padding). Copies of replicated slices must agree."""
    converted = directory if isinstance(directory, ConvertedModel) else open(directory)
    if name not in converted.manifest["tensors"]:
        raise KeyError(f"{converted.path}: no tensor {name}")
    spec = converted.manifest["tensors"][name]
    out = np.zeros(spec["shape"], dtype=values_dtype(spec["dtype"]))
    filled = {}  # axis slice (start, end) or None -> source rank file, for replica checks
    for rank_file in converted.ranks:
        for record in rank_file.header["tensors"]:
            for part in record["parts"]:
                if part["source"] != name:
                    continue
                stored = rank_file.array(record["name"])
                axis, start, end = part["axis"], part["start"], part["end"]
                if axis is None:
                    piece, target = stored, (slice(None),)
                else:
                    index = [slice(None)] * stored.ndim
                    index[axis] = slice(part["at"], part["at"] + end - start)
                    piece = stored[tuple(index)]
                    target = [slice(None)] * stored.ndim
                    target[axis] = slice(start, end)
                    target = tuple(target)
                key = (axis, start, end)
                if key in filled:
                    if not _same_bits(out[target], piece):
                        raise FormatError(f"{rank_file.path.name}: tensor {record['name']}: its copy of "
                                          f"{name}[{start}:{end}] differs from {filled[key]}'s")
                    continue
                out[target] = piece
                filled[key] = rank_file.path.name
    _first(_coverage_problems(name, spec["shape"], filled))
    return out


def _same_bits(a, b):
    """Replica copies must be the same bytes (-0.0 is not 0.0, a NaN may have any payload)."""
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return np.array_equal(a.view(bits), b.view(bits))


def _coverage_problems(name, shape, filled):
    if (None, 0, shape[0]) in filled:
        return
    covered = sorted((start, end) for (axis, start, end) in filled)
    position = 0
    for start, end in covered:
        if start != position:
            break
        position = end
    axes = {axis for (axis, _, _) in filled}
    if len(axes) != 1 or position != shape[next(iter(axes))]:
        yield f"{name}: the rank files do not cover the whole tensor"
