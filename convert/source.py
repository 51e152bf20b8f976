"""The Hugging Face checkpoint to convert: where it is, and where each tensor's bytes lie.

Only safetensors headers are read here; the converter streams the bytes later, with pread.
"""
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..formats import files
from ..formats.dtypes import SAFETENSORS_DTYPES, element_size

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The files a converted directory carries through (and the only ones fetched from the hub).
COPIED_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "merges.txt", "chat_template.jinja", "generation_config.json"]
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_INDEX_BYTES = MAX_HEADER_BYTES  # an index lists no more than the headers do


class SourceError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: str          # bf16 | f16 | f32
    shape: tuple
    offset: int         # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def origin(self):
        return self.file.name

    @contextmanager
    def row_reader(self):
        """read_rows(first_row, buffer): fills `buffer` with the rows from `first_row` on."""
        row_bytes = self.nbytes // (self.shape[0] if len(self.shape) == 2 else 1)
        with open_regular(self.file) as f:
            yield lambda first_row, buffer: read_bytes_into(f, buffer, self.offset + first_row * row_bytes,
                                                            self.file)


def resolve(source):
    """A local directory as it is, or a hub id downloaded (or found in the cache) through
    huggingface_hub, which honours HF_HUB_OFFLINE and HF_HOME."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{source}: not a directory")
        return path
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise SourceError(f"{source}: no such directory (and not a hub id like Qwen/Qwen3-0.6B)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return Path(snapshot_download(
            repo_id=source,
            allow_patterns=["config.json", "*.safetensors", INDEX, *COPIED_FILES]))
    except HFValidationError as error:
        raise SourceError(f"{source}: {error}") from None
    except Exception as error:  # network, authentication, offline cache miss: all end here
        raise SourceError(f"{source}: could not download from the hub: {error}") from None


def open_regular(path):
    """A binary file object on the regular file at `path` (formats.files.open_regular)."""
    return files.open_regular(path, str(path), SourceError)


def read_json(path, max_bytes):
    """The JSON value in the regular file at `path`, refused when larger than `max_bytes`."""
    return files.read_json(path, str(path), SourceError, max_bytes)


def read_safetensors_header(path):
    """{name: SourceTensor} of one safetensors file, checked as the safetensors library checks it:
    the tensors' bytes are contiguous from the start of the data to its end, each of exactly the
    size its shape and dtype give."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise SourceError(f"{path.name}: safetensors header length {header_length} does not fit the file")
        header_bytes = f.read(header_length)
    header = files.parse_json(header_bytes, f"{path.name}: safetensors header", SourceError)
    if not isinstance(header, dict):
        raise SourceError(f"{path.name}: safetensors header is not a JSON object")
    _check_metadata(path, header.pop("__metadata__", {}))
    data_start = 8 + header_length
    tensors = {name: _source_tensor(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_contiguous(path, tensors.values(), data_start, size)
    return tensors


def _check_metadata(path, metadata):
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SourceError(f"{path.name}: __metadata__ is not an object of strings")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _source_tensor(path, name, entry, data_start, size):
    where = f"{path.name}: tensor {name}"
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: its entry is not a JSON object")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise SourceError(f"{where}: dtype {entry.get('dtype')!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
        raise SourceError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) and n >= 0 for n in offsets)):
        raise SourceError(f"{where}: data_offsets {offsets!r} is not two non-negative integers")
    begin, end = offsets
    count = _element_count(shape, bound=size - data_start)
    nbytes = None if count is None else count * element_size(dtype)
    if nbytes is None or end - begin != nbytes:
        takes = f"more than the file's {size - data_start} bytes of data" if nbytes is None else nbytes
        raise SourceError(f"{where}: data_offsets {offsets} hold {end - begin} bytes, but shape {shape} "
                          f"of {dtype} takes {takes}")
    return SourceTensor(name, path, dtype, tuple(shape), data_start + begin, nbytes)


def _element_count(shape, bound):
    """The product of `shape`, None once it exceeds `bound` (a hostile shape's product can have
    millions of digits)."""
    count = 0 if 0 in shape else 1
    for n in shape:
        count *= n
        if count > bound:
            return None
    return count


def _check_contiguous(path, tensors, data_start, size):
    """Sorted by offset, each tensor starts where the one before ends, the first at the start of
    the data and the last ending at the end of the file: no gaps, no shared bytes."""
    position = data_start
    for tensor in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if tensor.offset != position:
            relative = [tensor.offset - data_start, tensor.offset - data_start + tensor.nbytes]
            raise SourceError(f"{path.name}: tensor {tensor.name}: data_offsets {relative} do not start where "
                              f"the tensor before it ends ({position - data_start}): tensors' bytes must be "
                              "contiguous, without gaps or overlaps")
        position += tensor.nbytes
    if position != size:
        raise SourceError(f"{path.name}: the tensors end at byte {position - data_start} of the data, "
                          f"which has {size - data_start} bytes")


def read_tensors(directory):
    """{name: SourceTensor} over every safetensors file of the checkpoint; a sharded checkpoint's
    index is checked against the shards' own headers."""
    index_path = directory / INDEX
    if not index_path.exists():
        single = directory / SINGLE
        if not single.exists():
            raise SourceError(f"{directory}: no {SINGLE} and no {INDEX}")
        return read_safetensors_header(single)
    weight_map = read_json(index_path, MAX_INDEX_BYTES)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(file, str) for file in weight_map.values())):
        raise SourceError(f"{INDEX}: weight_map is not an object of tensor names to file names")
    tensors = {}
    for file in sorted(set(weight_map.values())):
        shard = directory / file
        if Path(file).name != file or not shard.exists():
            raise SourceError(f"{INDEX}: shard {file} is missing from {directory}")
        for name, tensor in read_safetensors_header(shard).items():
            if weight_map.get(name) != file:
                raise SourceError(f"{file}: tensor {name} is not listed for this shard in {INDEX}")
            tensors[name] = tensor
    for name, file in weight_map.items():
        if name not in tensors:
            raise SourceError(f"{INDEX}: tensor {name} is listed in {file} but that shard does not hold it")
    return tensors


def source_files(directory, tensors):
    """The files whose content defines the conversion, for provenance: config.json, the index if
    there is one, and the safetensors files that hold `tensors`."""
    index = [directory / INDEX] if (directory / INDEX).exists() else []
    return [directory / "config.json", *index, *sorted({tensor.file for tensor in tensors.values()})]


def copied_files(directory):
    """The files of COPIED_FILES that the checkpoint has, each checked to be a readable regular file."""
    present = [directory / name for name in COPIED_FILES if (directory / name).exists()]
    for path in present:
        open_regular(path).close()
    return present


def read_bytes_into(file, buffer, offset, path):
    """Fills `buffer` from `file` (opened from `path`) at `offset`, failing on a short read."""
    got = files.read_into(file.fileno(), buffer, offset)
    if got < memoryview(buffer).nbytes:
        raise SourceError(f"{path.name}: ends at byte {offset + got}, before its tensors do (it was truncated)")
