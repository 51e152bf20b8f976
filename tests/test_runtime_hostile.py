"""Hostile or damaged rank files raise exceptions that name the file and tensor; never a crash.

Two levels: `qwen3pack.runtime.load` on doctored directories (the Python reader usually objects
first), and the C++ engine (`qwen3pack._core.Engine`) handed doctored tensor tables and
expectations directly, so that the C++ checks are exercised even where the reader would catch
the same file before them.
"""
import copy
import json
import shutil

import numpy as np
import pytest

from qwen3pack import _core, formats, runtime
from qwen3pack.convert import convert
from qwen3pack.formats.rankfile import PREFIX, Prefix, crc_hex, encode_header
from qwen3pack.testing import make_checkpoint

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
QKV = "model.layers.0.self_attn.qkv_proj.weight"
U64 = 2**64


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tied tp=2 model (2 KV heads, so each rank has one) converted once for the module."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("hf"))
    out = tmp_path_factory.mktemp("q3p") / "model"
    convert(checkpoint, out, tp=2, dtype="f32")
    return out


@pytest.fixture
def copy_of(good, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def engine_args(directory):
    converted = formats.open(directory)
    return (copy.deepcopy(converted.model), copy.deepcopy(converted.layout),
            copy.deepcopy(runtime.model.rank_sources(converted)))


def make_engine(model, layout, ranks, verify_crc=False):
    return _core.Engine(model, layout, ranks, 1, 64, verify_crc)


def record(ranks, name, rank=0):
    return next(r for r in ranks[rank]["tensors"] if r["name"] == name)


def test_the_untouched_tables_load(good):
    engine = make_engine(*engine_args(good), verify_crc=True)
    assert engine.world_size == 2
    engine.close()


# ---------------------------------------------------------------------------------------------
# The C++ checks of the tensor table


def _offset_past_end(ranks):
    record(ranks, EMBED)["offset"] = ranks[0]["file_size"]


def _offset_plus_nbytes_overflows(ranks):
    record(ranks, EMBED)["offset"] = U64 - 64  # offset + nbytes wraps around 2^64


def _nbytes_disagrees_with_shape(ranks):
    record(ranks, EMBED)["nbytes"] += 4


def _shape_product_overflows(ranks):
    r = record(ranks, EMBED)
    r["shape"], r["nbytes"] = [2**62, 2**62], 0


def _wrong_geometry(ranks):  # one qkv row fewer: consistent in itself, wrong for the model
    r = record(ranks, QKV)
    r["shape"] = [r["shape"][0] - 1, r["shape"][1]]
    r["nbytes"] = r["shape"][0] * r["shape"][1] * 4


def _transposed(ranks):
    r = record(ranks, QKV)
    r["shape"] = r["shape"][::-1]


def _three_axes(ranks):
    r = record(ranks, QKV)
    r["shape"] = [1, *r["shape"]]


def _negative_axis(ranks):
    r = record(ranks, NORM)
    r["shape"] = [-64]


def _unaligned(ranks):
    record(ranks, EMBED)["offset"] += 4


def _before_data(ranks):
    record(ranks, EMBED)["offset"] = 64


def _overlap(ranks):
    tensors = ranks[0]["tensors"]
    tensors[1]["offset"] = tensors[0]["offset"]


def _missing(ranks):
    ranks[1]["tensors"] = [r for r in ranks[1]["tensors"] if r["name"] != QKV]


def _duplicate(ranks):
    ranks[0]["tensors"].append(dict(record(ranks, NORM)))


def _unknown(ranks):
    record(ranks, NORM)["name"] = "model.layers.9.mlp.extra.weight"


def _lm_head_in_tied_model(ranks):
    record(ranks, NORM)["name"] = "lm_head.weight"


def _wrong_dtype(ranks):
    r = record(ranks, NORM)
    r["dtype"], r["nbytes"] = "bf16", r["nbytes"] // 2


def _unknown_dtype(ranks):
    record(ranks, NORM)["dtype"] = "f8"


def _offset_beyond_64_bits(ranks):
    record(ranks, EMBED)["offset"] = 2**70


def _negative_offset(ranks):
    record(ranks, EMBED)["offset"] = -4096


def _bad_crc_text(ranks):
    record(ranks, EMBED)["crc32c"] = "xyz"


TABLE_CASES = {
    "offset_past_the_end": (_offset_past_end, "run past the end of the file"),
    "offset_plus_nbytes_overflowing_64_bits": (_offset_plus_nbytes_overflows, "run past the end of the file"),
    "nbytes_not_shape_times_element_size": (_nbytes_disagrees_with_shape, "nbytes .* differs from shape"),
    "shape_product_overflowing": (_shape_product_overflows, "overflows"),
    "one_row_missing_from_the_geometry": (_wrong_geometry, r"shape \[127, 64\] but the model and layout imply \[128, 64\]"),
    "transposed_matrix": (_transposed, "model and layout imply"),
    "three_axes": (_three_axes, "1 or 2 axes"),
    "negative_axis": (_negative_axis, "axis <= 0"),
    "offset_not_aligned_to_64": (_unaligned, "not a multiple of 64"),
    "offset_before_the_data_section": (_before_data, "before the data section"),
    "overlapping_tensors": (_overlap, "overlaps"),
    "missing_tensor": (_missing, f"'{QKV}': missing"),
    "duplicate_tensor": (_duplicate, "twice"),
    "unknown_tensor": (_unknown, "not a tensor of this model"),
    "lm_head_in_a_tied_model": (_lm_head_in_tied_model, "ties its embeddings"),
    "norm_stored_as_bf16": (_wrong_dtype, "dtype bf16 but expected f32"),
    "unknown_dtype": (_unknown_dtype, "unknown dtype 'f8'"),
    "offset_beyond_64_bits": (_offset_beyond_64_bits, "out of range"),
    "negative_offset": (_negative_offset, "out of range"),
    "crc_not_hex": (_bad_crc_text, "hex digits"),
}


@pytest.mark.parametrize("case", TABLE_CASES)
def test_the_engine_refuses_a_doctored_tensor_table_naming_file_and_tensor(good, case):
    mutate, message = TABLE_CASES[case]
    model, layout, ranks = engine_args(good)
    mutate(ranks)
    with pytest.raises(_core.FormatError, match=message) as caught:
        make_engine(model, layout, ranks)
    assert "rank-0000" in str(caught.value) and "tensor '" in str(caught.value)  # names file and tensor
    assert isinstance(caught.value, ValueError)


# ---------------------------------------------------------------------------------------------
# The C++ checks of the prefix against the caller's expectations


@pytest.mark.parametrize("key,value,message", [
    ("conversion_id", bytes(16), "conversion id .* differs from the manifest's"),
    ("file_size", 4096, "file size .* differs from the expected"),
    ("data_offset", 8192 * 4, "data offset .* differs from the expected"),
    ("path", "/nonexistent/rank-00000-of-00002.q3p", "cannot open"),
])
def test_the_engine_checks_the_prefix_against_the_manifest(good, key, value, message):
    model, layout, ranks = engine_args(good)
    ranks[0][key] = value
    with pytest.raises(_core.FormatError, match=message):
        make_engine(model, layout, ranks)


def test_the_engine_refuses_rank_files_out_of_order(good):
    model, layout, ranks = engine_args(good)
    ranks[0]["path"], ranks[1]["path"] = ranks[1]["path"], ranks[0]["path"]
    with pytest.raises(_core.FormatError, match="holds rank 1 of 2, expected rank 0 of 2"):
        make_engine(model, layout, ranks)


def _doctor_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("case,doctor,message", [
    ("bad_magic", lambda p: _doctor_bytes(p, 0, b"NOTQ3PAK"), "bad magic"),
    ("newer_major_version", lambda p: _doctor_bytes(p, 8, (2).to_bytes(2, "little")),
     "major version 2, this runtime reads major version 1"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-4096]), "truncated or extended"),
    ("shorter_than_the_prefix", lambda p: p.write_bytes(b"Q3PACK\r\n"), "shorter than the 64-byte prefix"),
    ("damaged_header", lambda p: _doctor_bytes(p, 70, b"#"), "header checksum mismatch"),
    ("header_length_past_data", lambda p: _doctor_bytes(p, 24, (U64 - 1).to_bytes(8, "little")),
     "runs past the data offset"),
])
def test_the_engine_refuses_a_damaged_prefix_that_the_table_does_not_reveal(good, copy_of, case, doctor, message):
    # The table and expectations come from the intact directory; the file under them is damaged.
    model, layout, ranks = engine_args(good)
    damaged = copy_of / "rank-00001-of-00002.q3p"
    doctor(damaged)
    ranks[1]["path"] = str(damaged)
    with pytest.raises(_core.FormatError, match=message) as caught:
        make_engine(model, layout, ranks)
    assert "rank-00001-of-00002.q3p" in str(caught.value)


@pytest.mark.parametrize("change,message", [
    (lambda m, l: l.update(heads_per_rank=1), "heads_per_rank = 1 but the model and world size imply 2"),
    (lambda m, l: l.update(world_size=4), "world_size = 4 but 2 rank files"),
    (lambda m, l: m.update(num_attention_heads=3), "num_attention_heads"),
    (lambda m, l: m.update(head_dim=33), "head_dim must be even"),
    (lambda m, l: m["rope"].update(type="longrope"), "'longrope' is not supported"),
    (lambda m, l: m.update(layer_types=["full_attention"]), "one entry per layer"),
    (lambda m, l: m.update(layer_types=["sliding_attention"] * 2, sliding_window=None), "sliding_window"),
    (lambda m, l: m.update(hidden_size="64"), "must be an integer"),
    (lambda m, l: m.pop("vocab_size"), "missing key 'vocab_size'"),
])
def test_the_engine_refuses_an_inconsistent_model_or_layout(good, change, message):
    model, layout, ranks = engine_args(good)
    change(model, layout)
    with pytest.raises(_core.FormatError, match=message):
        make_engine(model, layout, ranks)


# ---------------------------------------------------------------------------------------------
# Checksums


def test_full_verification_finds_a_flipped_weight_byte_that_quick_loading_does_not_read(copy_of):
    converted = formats.open(copy_of)
    rank_file = converted.ranks[1]
    target = rank_file.tensors[QKV]
    offset = target["offset"] + target["nbytes"] // 2
    with open(rank_file.path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    with runtime.load(copy_of, threads=1, verify="quick") as m:  # headers are intact
        assert m.logits([1, 2]).shape == (2, 384)
    with pytest.raises(formats.FormatError, match=f"rank-00001-of-00002.q3p: tensor '{QKV}': CRC32C mismatch"):
        runtime.load(copy_of, threads=1, verify="full")


# ---------------------------------------------------------------------------------------------
# Through load(): whichever layer objects first, a FormatError naming the file


def rewrite_header(directory, rank, mutate):
    """Edits a rank file's JSON header in place, keeping the prefix and the manifest consistent
    with it (header length and checksum), as a careful attacker would."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    path = directory / manifest["rank_files"][rank]["file"]
    raw = bytearray(path.read_bytes())
    fields = PREFIX.unpack(bytes(raw[:64]))
    prefix = Prefix(*fields[1:])
    header = json.loads(bytes(raw[64:64 + prefix.header_length]))
    mutate(header)
    encoded = encode_header(header)
    assert 64 + len(encoded) <= prefix.data_offset
    raw[64:prefix.data_offset] = encoded + bytes(prefix.data_offset - 64 - len(encoded))
    prefix.header_length = len(encoded)
    prefix.header_crc32c = _core.crc32c(encoded)
    raw[:64] = prefix.pack()
    path.write_bytes(bytes(raw))
    manifest["rank_files"][rank]["header_crc32c"] = crc_hex(prefix.header_crc32c)
    manifest_path.write_text(json.dumps(manifest))


def _header_record(header, name):
    return next(r for r in header["tensors"] if r["name"] == name)


@pytest.mark.parametrize("case,mutate", [
    ("offset_past_the_end", lambda h: _header_record(h, EMBED).update(offset=10**9 * 4096)),
    ("nbytes_overflowing", lambda h: _header_record(h, EMBED).update(nbytes=U64 - 1)),
    ("wrong_geometry", lambda h: _header_record(h, QKV).update(shape=[64, 64], nbytes=64 * 64 * 4)),
])
def test_load_refuses_a_rank_file_with_a_doctored_header(copy_of, case, mutate):
    rewrite_header(copy_of, 1, mutate)
    with pytest.raises(formats.FormatError, match="rank-00001-of-00002.q3p"):
        runtime.load(copy_of, threads=1)


def test_load_refuses_a_truncated_rank_file(copy_of):
    path = copy_of / "rank-00000-of-00002.q3p"
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(formats.FormatError, match="rank-00000-of-00002.q3p.*truncated"):
        runtime.load(copy_of, threads=1)


def test_load_refuses_a_rank_file_from_another_conversion(copy_of):
    _doctor_bytes(copy_of / "rank-00001-of-00002.q3p", 48, bytes(range(16)))
    with pytest.raises(formats.FormatError, match="rank-00001-of-00002.q3p: conversion id"):
        runtime.load(copy_of, threads=1)


def test_editing_the_stop_ids_in_the_manifest_changes_the_default_stops(copy_of):
    # SPEC: `generation` is editable without touching the weights; generate() follows it.
    with runtime.load(copy_of, threads=1) as m:
        free = list(m.generate([1, 2], 16, temperature=4.0, seed=2, stop_token_ids=[]))
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = [free[5]]
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with runtime.load(copy_of, threads=1) as m:
        assert list(m.generate([1, 2], 16, temperature=4.0, seed=2)) == free[:free.index(free[5]) + 1]
    assert np.unique(free).size > 3
