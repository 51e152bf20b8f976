"""Damaged or mismatched converted models get one clean error naming the file and tensor."""
import json
import shutil
import struct

import pytest

from qwen3pack import _core, formats, validate
from qwen3pack.convert import convert
from qwen3pack.formats import FormatError

RANK0, RANK1 = "rank-00000-of-00002.q3p", "rank-00001-of-00002.q3p"
QKV = "model.layers.1.self_attn.qkv_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from qwen3pack.testing import make_checkpoint
    root = tmp_path_factory.mktemp("damage")
    source = make_checkpoint(root / "source", dtype="bf16")
    convert(source, root / "out", tp=2)
    return root / "out"


@pytest.fixture
def model(pristine, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(pristine, copy)
    return copy


def rewrite_header(directory, file, mutate):
    """Applies `mutate` to a rank file's JSON header and re-seals it (valid checksums), as a
    hostile or buggy writer would."""
    path = directory / file
    data = bytearray(path.read_bytes())
    header_length, data_offset = struct.unpack_from("<QQ", data, 24)
    header = json.loads(data[64:64 + header_length])
    mutate(header)
    encoded = json.dumps(header).encode()
    assert 64 + len(encoded) <= data_offset
    data[64:data_offset] = encoded + bytes(data_offset - 64 - len(encoded))
    crc = _core.crc32c(encoded)
    struct.pack_into("<I", data, 20, crc)
    struct.pack_into("<Q", data, 24, len(encoded))
    path.write_bytes(data)
    manifest = json.loads((directory / "manifest.json").read_text())
    rank = int(file[5:10])
    manifest["rank_files"][rank]["header_crc32c"] = f"{crc:08x}"
    (directory / "manifest.json").write_text(json.dumps(manifest))


def record(header, name):
    return next(r for r in header["tensors"] if r["name"] == name)


def problems(directory, quick=False):
    report = validate(directory, quick=quick)
    assert not report.ok
    return report.problems


def test_a_pristine_conversion_is_valid(pristine):
    report = validate(pristine)
    assert report.ok, report.problems
    assert report.files == 2 and report.checksums


def test_a_flipped_byte_in_tensor_data_is_found_by_its_checksum(model):
    offset = formats.open(model).ranks[1].tensors[QKV]["offset"]
    path = model / RANK1
    data = bytearray(path.read_bytes())
    data[offset + 100] ^= 0x01
    path.write_bytes(data)
    assert problems(model) == [f"{RANK1}: tensor {QKV}: checksum mismatch (the data is damaged)"]
    assert validate(model, quick=True).ok  # --quick reads no tensor data
    with pytest.raises(FormatError, match=QKV):
        formats.verify_checksums(formats.open(model))


def test_a_truncated_rank_file_is_refused(model):
    path = model / RANK0
    path.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(FormatError, match=f"{RANK0}: truncated"):
        formats.open(model)
    assert any("truncated" in p for p in problems(model, quick=True))


def test_a_missing_rank_is_named(model):
    (model / RANK1).unlink()
    with pytest.raises(FormatError, match=f"{RANK1}: missing"):
        formats.open(model)
    assert problems(model) == [f"{RANK1}: missing"]


def test_ranks_from_two_conversions_are_not_mixed(model, tmp_path):
    from qwen3pack.testing import make_checkpoint
    other = make_checkpoint(tmp_path / "other", seed=1, dtype="bf16")
    convert(other, tmp_path / "other_out", tp=2)
    shutil.copyfile(tmp_path / "other_out" / RANK1, model / RANK1)
    found = problems(model, quick=True)
    assert any(p.startswith(f"{RANK1}: conversion id") and "different conversions are mixed" in p for p in found)


def test_a_newer_major_version_is_refused_with_a_clear_message(model):
    path = model / RANK0
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 2)
    path.write_bytes(data)
    with pytest.raises(FormatError, match=r"format version 2\.3 is newer than this reader \(1\.3\)"):
        formats.open(model)


def test_a_newer_major_version_in_the_manifest_is_refused(model):
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["format_version"] = [3, 1]
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"3\.1 is newer than this reader"):
        formats.open(model)


def test_a_header_offset_pointing_outside_the_file_is_refused(model):
    rewrite_header(model, RANK1, lambda h: record(h, QKV).update(offset=1 << 40))
    with pytest.raises(FormatError, match=f"{RANK1}: tensor {QKV}: bytes .* lie outside the file"):
        formats.open(model)


def test_overlapping_tensors_are_refused(model):
    def overlap(header):
        record(header, QKV)["offset"] = record(header, "model.layers.1.input_layernorm.weight")["offset"]
    rewrite_header(model, RANK1, overlap)
    assert any("overlaps" in p and QKV in p for p in problems(model, quick=True))


def test_a_misaligned_tensor_is_refused(model):
    rewrite_header(model, RANK0, lambda h: record(h, QKV).update(offset=record(h, QKV)["offset"] + 2))
    assert any(f"tensor {QKV}: offset" in p and "multiple of 64" in p for p in problems(model, quick=True))


def test_a_shape_that_disagrees_with_the_config_is_refused(model):
    def reshape(header):
        r = record(header, QKV)
        r["shape"] = [r["shape"][0] // 2, r["shape"][1] * 2]
    rewrite_header(model, RANK0, reshape)
    assert any(f"tensor {QKV}: shape" in p for p in problems(model, quick=True))


def test_a_damaged_header_is_found_by_its_checksum(model):
    path = model / RANK0
    data = bytearray(path.read_bytes())
    data[100] ^= 0x20
    path.write_bytes(data)
    with pytest.raises(FormatError, match=f"{RANK0}: header checksum mismatch"):
        formats.open(model)


def test_not_a_rank_file_at_all(model):
    (model / RANK0).write_bytes(b"GGUF" + bytes(8000))
    with pytest.raises(FormatError, match=f"{RANK0}: not a qwen3pack rank file"):
        formats.open(model)


def test_a_manifest_that_fails_its_schema_names_the_field(model):
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["layout"]["world_size"] = "two"
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="world_size"):
        formats.open(model)


def test_a_stray_rank_file_of_another_world_size_is_reported(model):
    shutil.copyfile(model / RANK0, model / "rank-00000-of-00004.q3p")
    assert problems(model, quick=True) == [
        "rank-00000-of-00004.q3p: a rank file that the manifest does not list (another conversion's?)"]


def test_generation_settings_can_be_edited_without_touching_the_weights(model):
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = [1, 2, 3]
    manifest["generation"]["defaults"] = {"temperature": 0.7, "top_p": 0.9}
    (model / "manifest.json").write_text(json.dumps(manifest))
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert validate(model).ok


def test_a_schema_violation_in_a_tensor_record_names_the_tensor(model):
    rewrite_header(model, RANK0, lambda h: record(h, QKV).update(dtype="q3"))
    with pytest.raises(FormatError, match=rf"{RANK0}: tensors\[\d+\]\({QKV}\)\.dtype: 'q3' is not one of"):
        formats.open(model)


def test_random_damage_to_prefix_and_header_never_escapes_as_anything_but_a_clean_error(pristine, tmp_path):
    import numpy as np
    from qwen3pack import load
    rng = np.random.default_rng(7)
    original = (pristine / RANK0).read_bytes()
    header_end = 64 + struct.unpack_from("<Q", original, 24)[0]
    model = tmp_path / "fuzzed"
    shutil.copytree(pristine, model)
    for _ in range(150):
        data = bytearray(original)
        for position in rng.integers(0, header_end, rng.integers(1, 4)):
            data[position] = rng.integers(0, 256)
        (model / RANK0).write_bytes(data)
        report = validate(model, quick=True)
        assert report.ok == (bytes(data) == original)
        if not report.ok:
            with pytest.raises(FormatError):
                load(model)


def test_resealed_headers_with_hostile_numbers_are_refused_by_reader_and_loader(pristine, tmp_path):
    import numpy as np
    from qwen3pack import load
    rng = np.random.default_rng(11)
    hostile = [0, 1, 63, 4096, (1 << 63) - 1, 1 << 64, (1 << 64) + 4096, -64]
    for attempt in range(40):
        model = tmp_path / f"m{attempt}"
        shutil.copytree(pristine, model)
        def mutate(header):
            r = header["tensors"][rng.integers(len(header["tensors"]))]
            key = ["offset", "nbytes", "shape"][rng.integers(3)]
            value = int(hostile[rng.integers(len(hostile))])
            if key == "shape":
                r["shape"][0] = value
            else:
                r[key] = value
        rewrite_header(model, RANK1, mutate)
        if (model / RANK1).read_bytes() == (pristine / RANK1).read_bytes():
            continue  # the mutation happened to write the value that was there
        assert not validate(model, quick=True).ok
        with pytest.raises(FormatError):
            load(model)
