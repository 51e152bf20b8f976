"""A seeded random mutator over the manifest and the rank-file prefix and header: whatever the
damage, `formats.open`, `validate` and `load` end in a clean FormatError or a model that works.
Header mutations are resealed (length and checksum fixed up, in the file and the manifest) so
that they reach the checks behind the checksum, as a hostile writer's would."""
import json
import random
import struct

import numpy as np
import pytest

from qwen3pack import _core, formats, runtime, validate
from qwen3pack.convert import convert
from qwen3pack.formats import FormatError
from qwen3pack.testing import make_checkpoint

CASES_PER_TARGET = 700
HOSTILE_VALUES = [-1, 0, 1, 3, 63, 64, 4096, 2 ** 31, 2 ** 32 + 1, 2 ** 53 + 1, 2 ** 63 - 64, 2 ** 63, 2 ** 64,
                  -2 ** 63, 1.5, -0.0, 1e308, "", "x", "bf16", "f32", "sliding_attention", None, True, False,
                  [], {}, [[[]]], [2 ** 62, 2 ** 62], {"a": 1}]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A small tp=2 model with a sliding layer; its pristine bytes are kept to restore after each case."""
    root = tmp_path_factory.mktemp("fuzz")
    convert(make_checkpoint(root / "source", use_sliding_window=True, sliding_window=4, num_hidden_layers=2,
                            max_window_layers=1), root / "out", tp=2)
    directory = root / "out"
    rank_file = directory / "rank-00001-of-00002.q3p"
    data = rank_file.read_bytes()
    data_offset = struct.unpack_from("<Q", data, 32)[0]
    return directory, (directory / "manifest.json").read_bytes(), rank_file, data[:data_offset], len(data)


def nodes(value, path=()):
    """Every (path, value) in a JSON document, the root included."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from nodes(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from nodes(child, path + (index,))


def mutate_json(document, rng):
    """Replaces, deletes or duplicates one random node (a copy of `document` is changed)."""
    document = json.loads(json.dumps(document))
    path, _ = rng.choice(list(nodes(document))[1:])
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key, action = path[-1], rng.random()
    if action < 0.15:
        del parent[key]
    elif action < 0.25 and isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = rng.choice(HOSTILE_VALUES)
    return document


def reseal(rank_region, header_bytes):
    """The rank file's first bytes with a new header, its length and checksum fixed up; None when
    the header no longer fits before the data."""
    data_offset = len(rank_region)
    if 64 + len(header_bytes) > data_offset:
        return None
    region = bytearray(rank_region)
    region[64:] = header_bytes + bytes(data_offset - 64 - len(header_bytes))
    struct.pack_into("<IQ", region, 20, _core.crc32c(header_bytes), len(header_bytes))
    return bytes(region)


def write_case(target, manifest_bytes, rank_region):
    directory, _, rank_file, _, size = target
    (directory / "manifest.json").write_bytes(manifest_bytes)
    with open(rank_file, "r+b") as f:
        f.write(rank_region)
        f.truncate(size)


def check_outcome(directory):
    """The property: a clean FormatError, or a model that opens, validates and computes."""
    report = validate(directory, quick=True)
    assert all(isinstance(p, str) and "\n" not in p for p in report.problems)
    try:
        formats.open(directory)
    except FormatError:
        assert not report.ok
        return "refused"
    try:
        with runtime.load(directory, threads=1, max_context=16) as m:
            logits = m.logits([1, 2, 3])
    except FormatError:
        return "refused"
    assert logits.shape == (3, m.vocab_size) and np.isfinite(logits).all()
    return "loaded"


def header_case(target, rng):
    _, manifest_bytes, _, region, _ = target
    header_length = struct.unpack_from("<Q", region, 24)[0]
    header = json.loads(region[64:64 + header_length])
    mutated = reseal(region, json.dumps(mutate_json(header, rng)).encode())
    if mutated is None:
        return None
    manifest = json.loads(manifest_bytes)
    manifest["rank_files"][1]["header_crc32c"] = f"{struct.unpack_from('<I', mutated, 20)[0]:08x}"
    return json.dumps(manifest).encode(), mutated


def manifest_case(target, rng):
    _, manifest_bytes, _, region, _ = target
    return json.dumps(mutate_json(json.loads(manifest_bytes), rng)).encode(), region


def bytes_case(target, rng):
    """Random bytes of the prefix (its numbers: sizes, offsets, versions) or of the manifest text."""
    _, manifest_bytes, _, region, _ = target
    if rng.random() < 0.5:
        prefix = bytearray(region)
        for _ in range(rng.randint(1, 4)):
            prefix[rng.randrange(8, 64)] = rng.randrange(256)
        return manifest_bytes, bytes(prefix)
    text = bytearray(manifest_bytes)
    for _ in range(rng.randint(1, 4)):
        text[rng.randrange(len(text))] = rng.choice(b'{}[]",:0123456789-e.x \\')
    return bytes(text), region


@pytest.mark.parametrize("make_case", [header_case, manifest_case, bytes_case])
def test_every_mutation_ends_in_a_clean_error_or_a_working_model(target, make_case):
    rng = random.Random(f"qwen3pack-fuzz-{make_case.__name__}")
    outcomes = {"refused": 0, "loaded": 0}
    try:
        for case in range(CASES_PER_TARGET):
            files = make_case(target, rng)
            if files is None:
                continue
            write_case(target, *files)
            try:
                outcomes[check_outcome(target[0])] += 1
            except Exception as error:  # report which case, to replay it
                raise AssertionError(f"case {case} of {make_case.__name__}: {error!r}") from error
    finally:
        write_case(target, target[1], target[3])
    assert outcomes["refused"] > CASES_PER_TARGET // 2, outcomes  # the mutations do reach the checks
