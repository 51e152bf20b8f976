"""The Hugging Face checkpoint to convert: where it is, and where each tensor's bytes lie.

Only safetensors headers are read here; the converter streams the bytes later, with pread.
"""
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..formats.dtypes import SAFETENSORS_DTYPES, element_size

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# The files a converted directory carries through (and the only ones fetched from the hub).
COPIED_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                "merges.txt", "chat_template.jinja", "generation_config.json"]
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


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


def read_safetensors_header(path):
    """{name: SourceTensor} of one safetensors file, every offset checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(MAX_HEADER_BYTES, size - 8):
            raise SourceError(f"{path.name}: safetensors header length {header_length} does not fit the file")
        try:
            header = json.loads(f.read(header_length))
        except (ValueError, RecursionError) as error:  # RecursionError: hostile nesting
            raise SourceError(f"{path.name}: safetensors header is not JSON: {error}") from None
    data_start = 8 + header_length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _source_tensor(path, name, entry, data_start, size)
    return tensors


def _source_tensor(path, name, entry, data_start, size):
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise SourceError(f"{path.name}: tensor {name}: dtype {entry.get('dtype')} is not one of "
                          f"{sorted(SAFETENSORS_DTYPES)}")
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    nbytes = math.prod(shape) * element_size(dtype)
    if not (0 <= begin <= end and end - begin == nbytes and data_start + end <= size):
        raise SourceError(f"{path.name}: tensor {name}: data_offsets {entry['data_offsets']} do not "
                          f"match shape {list(shape)} or lie outside the file")
    return SourceTensor(name, path, dtype, shape, data_start + begin, nbytes)


def read_tensors(directory):
    """{name: SourceTensor} over every safetensors file of the checkpoint; a sharded checkpoint's
    index is checked against the shards' own headers."""
    index_path = directory / INDEX
    if not index_path.exists():
        single = directory / SINGLE
        if not single.exists():
            raise SourceError(f"{directory}: no {SINGLE} and no {INDEX}")
        return read_safetensors_header(single)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SourceError(f"{index_path.name}: unreadable index: {error}") from None
    tensors = {}
    for file in sorted(set(weight_map.values())):
        shard = directory / file
        if Path(file).name != file or not shard.is_file():
            raise SourceError(f"{INDEX}: shard {file} is missing from {directory}")
        for name, tensor in read_safetensors_header(shard).items():
            if weight_map.get(name) != file:
                raise SourceError(f"{file}: tensor {name} is not listed for this shard in {INDEX}")
            tensors[name] = tensor
    for name, file in weight_map.items():
        if name not in tensors:
            raise SourceError(f"{INDEX}: tensor {name} is listed in {file} but that shard does not hold it")
    return tensors


def source_files(directory):
    """The files whose content defines the conversion, for provenance."""
    names = ["config.json"]
    if (directory / INDEX).exists():
        names += [INDEX, *sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))]
    else:
        names.append(SINGLE)
    return [directory / name for name in names]


def read_bytes_into(fd, buffer, offset):
    """Fills `buffer` from `fd` at `offset`, failing on a short read."""
    view = memoryview(buffer).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise SourceError(f"short read at offset {offset}")
        view, offset = view[n:], offset + n
