"""qwen3pack reshard: a converted model rewritten for another tp from its rank files alone holds,
tensor for tensor, what converting the checkpoint at that tp writes."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qwen3pack
from qwen3pack import formats, validate
from qwen3pack.convert import ConversionError, convert, reshard
from qwen3pack.formats import FormatError
from qwen3pack.testing import make_checkpoint

BIN = Path(sys.executable).parent
# 8 q heads and 2 KV heads: tp 4 and 8 replicate each KV head on 2 and 4 ranks; vocabulary 383
# is padded for every tp > 1 (to 384 at tp 2, 4 and 8).
SMALL = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=383)
IDS = [1, 5, 9, 200, 382, 17, 3]


def run_cli(*args):
    return subprocess.run([str(BIN / "qwen3pack"), *map(str, args)], capture_output=True, text=True)


def tensor_records(directory):
    """Every tensor record of every rank file, with its bytes: what must not depend on whether the
    directory was converted or resharded."""
    converted = formats.open(directory)
    return [(rank_file.path.name, record, rank_file.array(record["name"]).tobytes())
            for rank_file in converted.ranks for record in rank_file.header["tensors"]]


def logits(directory):
    with qwen3pack.load(directory, threads=1) as model:
        return model.logits(IDS)


@pytest.mark.parametrize("source_dtype,dtype,tie", [("bf16", "auto", False), ("f32", "auto", True),
                                                     ("f32", "f16", False)])
def test_resharding_2_4_1_8_2_equals_converting_at_each_size(tmp_path, checkpoints, source_dtype, dtype, tie):
    checkpoint = checkpoints(dtype=source_dtype, tie=tie, **SMALL)
    convert(checkpoint, tmp_path / "direct-2", tp=2, dtype=dtype)
    previous = tmp_path / "direct-2"
    for tp in (4, 1, 8, 2):
        direct, resharded = tmp_path / f"direct-{tp}", tmp_path / f"resharded-{tp}"
        if not direct.exists():
            convert(checkpoint, direct, tp=tp, dtype=dtype)
        reshard(previous, resharded, tp)
        assert tensor_records(resharded) == tensor_records(direct), f"tp {tp}"
        want, got = json.loads((direct / "manifest.json").read_text()), json.loads((resharded / "manifest.json").read_text())
        for key in ("model", "layout", "tensors", "generation"):
            assert got[key] == want[key], key
        assert validate(resharded).ok, validate(resharded).problems
        np.testing.assert_array_equal(logits(resharded), logits(direct))
        previous = resharded


# q8 blocks (32 values) and q4 and q6 blocks (256) lie along each row's input dimension, quantized per rank
# slice: o_proj has 512 columns (8 heads of 64) and down_proj 512, so every rank's slice is whole
# q8 blocks up to tp 8 and whole q4 and q6 blocks up to tp 2.
BLOCKS = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=512,
              vocab_size=383)


@pytest.mark.parametrize("dtype, sizes", [("q8", (4, 1, 8, 2)), ("q4", (1, 2)), ("q6", (1, 2))])
def test_quantized_models_reshard_in_whole_blocks_to_what_converting_at_each_size_writes(
        tmp_path, checkpoints, dtype, sizes):
    checkpoint = checkpoints(trained_like=True, **BLOCKS)
    convert(checkpoint, tmp_path / "direct-2", tp=2, dtype=dtype)
    previous = tmp_path / "direct-2"
    for tp in sizes:
        direct, resharded = tmp_path / f"direct-{tp}", tmp_path / f"resharded-{tp}"
        if not direct.exists():
            convert(checkpoint, direct, tp=tp, dtype=dtype)
        reshard(previous, resharded, tp)
        assert tensor_records(resharded) == tensor_records(direct), f"tp {tp}"
        assert validate(resharded).ok, validate(resharded).problems
        previous = resharded


def test_a_quantized_model_whose_slices_would_cut_a_block_is_refused(tmp_path, checkpoints):
    convert(checkpoints(trained_like=True, **BLOCKS), tmp_path / "tp2", tp=2, dtype="q4")
    with pytest.raises(ConversionError, match=(
            r"tp2: its q4 o_proj weights cannot be resharded to tp 4: at tp 4 a rank holds 128 of their columns, "
            r"not a whole number of 256-value blocks, so their values would be quantized twice; convert the "
            r"checkpoint again with --tp 4$")):
        reshard(tmp_path / "tp2", tmp_path / "tp4", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp2"]


def test_the_manifest_records_the_reshard_and_keeps_the_checkpoint_files(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    reshard(tmp_path / "tp2", tmp_path / "tp4", 4)
    source, resharded = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("tp2", "tp4"))
    assert resharded["provenance"] == {
        "converter": f"qwen3pack {qwen3pack.__version__}",
        "options": {"tp": 4},
        "sources": source["provenance"]["sources"],
        "resharded_from": {"conversion_id": source["conversion_id"], "tp": 2},
    }
    identity = {"format": [1, 3], "reshard": {"conversion_id": source["conversion_id"], "tp": 4}}
    assert resharded["conversion_id"] == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    assert {r.conversion_id.hex() for r in formats.open(tmp_path / "tp4").ranks} == {resharded["conversion_id"]}


def test_resharding_twice_gives_the_same_bytes(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    reshard(tmp_path / "tp2", tmp_path / "a", 4)
    reshard(tmp_path / "tp2", tmp_path / "b", 4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_edited_generation_settings_and_tokenizer_files_carry_over(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    manifest = json.loads((tmp_path / "tp2" / "manifest.json").read_text())
    manifest["generation"]["defaults"] = {"temperature": 0.7, "top_p": 0.8}
    (tmp_path / "tp2" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "tp2" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    reshard(tmp_path / "tp2", tmp_path / "tp1", 1)
    assert formats.open(tmp_path / "tp1").generation["defaults"] == {"temperature": 0.7, "top_p": 0.8}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "tp1" / name).read_bytes() == (tmp_path / "tp2" / name).read_bytes(), name


def test_ranks_that_hold_only_vocabulary_padding_are_resharded(tmp_path, checkpoints):
    # vocabulary 5 at tp 8: ranks 5 to 7 hold one padding row each and nothing of the embedding
    checkpoint = checkpoints(**{**SMALL, "vocab_size": 5}, bos_token_id=1, eos_token_id=2)
    convert(checkpoint, tmp_path / "tp8", tp=8)
    convert(checkpoint, tmp_path / "tp2", tp=2)
    reshard(tmp_path / "tp8", tmp_path / "resharded", 2)
    assert tensor_records(tmp_path / "resharded") == tensor_records(tmp_path / "tp2")


def flip_byte(directory, rank, tensor, at=0):
    converted = formats.open(directory)
    rank_file = converted.ranks[rank]
    record = rank_file.tensors[tensor]
    position = record["offset"] + (at if at >= 0 else record["nbytes"] + at)
    with open(rank_file.path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("rank,tensor,at", [
    (1, "model.layers.1.self_attn.qkv_proj.weight", 0),   # q rows
    (0, "model.layers.0.self_attn.qkv_proj.weight", -1),  # the last byte of v
    (1, "model.layers.0.self_attn.o_proj.weight", 100),    # a column slice
    (1, "model.norm.weight", 0),                           # the second copy of a replicated norm
    (1, "model.embed_tokens.weight", -1),                  # the padding row, which is never copied
])
def test_a_damaged_source_tensor_is_refused_naming_its_file_and_tensor(tmp_path, checkpoints, rank, tensor, at):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    flip_byte(tmp_path / "tp2", rank, tensor, at)
    with pytest.raises(FormatError) as raised:
        reshard(tmp_path / "tp2", tmp_path / "out", 4)
    assert str(raised.value) == (f"rank-{rank:05d}-of-00002.q3p: tensor {tensor}: checksum mismatch "
                                 "(the data is damaged)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp2"]  # no output, no staging left behind


def rewrite_with_its_checksums(directory, rank, tensor, values):
    """Sets a tensor's values and every checksum that covers them (record, header, manifest): a
    file that is consistent in itself, as a buggy writer could leave it."""
    from qwen3pack import _core
    from qwen3pack.formats.rankfile import crc_hex, encode_header
    rank_file = formats.open(directory).ranks[rank]
    record = rank_file.tensors[tensor]
    data = np.asarray(values, dtype=rank_file.array(tensor).dtype).tobytes()
    record["crc32c"] = crc_hex(_core.crc32c(data))
    header = encode_header(rank_file.header)
    assert len(header) == rank_file.prefix.header_length
    with open(rank_file.path, "r+b") as f:
        f.seek(record["offset"])
        f.write(data)
        f.seek(20)
        f.write(_core.crc32c(header).to_bytes(4, "little"))
        f.seek(64)
        f.write(header)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["rank_files"][rank]["header_crc32c"] = crc_hex(_core.crc32c(header))
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_replicated_copies_that_differ_are_refused(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    rewrite_with_its_checksums(tmp_path / "tp2", 1, "model.norm.weight", np.full(64, 2.0))
    with pytest.raises(FormatError) as raised:
        reshard(tmp_path / "tp2", tmp_path / "out", 4)
    assert str(raised.value) == ("rank-00001-of-00002.q3p: tensor model.norm.weight: its copy of "
                                 "model.norm.weight[0:64] differs from rank-00000-of-00002.q3p's")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp2"]


def test_peak_memory_does_not_grow_with_the_model(tmp_path):
    # A 102 MB embedding (f32), resharded from tp 2 to tp 4: rows stream through 8 MB buffers.
    checkpoint = make_checkpoint(tmp_path / "src", vocab_size=100_000, hidden_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, intermediate_size=256, num_hidden_layers=1)
    convert(checkpoint, tmp_path / "tp2", tp=2)
    shutil.rmtree(checkpoint)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent across exec.
    script = ("import re, sys; from qwen3pack.convert import reshard; "
              "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
              "before = peak(); reshard(sys.argv[1], sys.argv[2], 4); print(before, peak())")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tp2"), str(tmp_path / "tp4")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before_kb, after_kb = map(int, result.stdout.split())
    assert (after_kb - before_kb) / 1024 < 40, f"peak RSS grew by {(after_kb - before_kb) / 1024:.0f} MB"


def test_the_command_line_reshards_and_reports_in_one_line(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    result = run_cli("reshard", tmp_path / "tp2", tmp_path / "tp4", "--tp", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / 'tp4'}: 4 rank files, 72 tensors, ")
    assert validate(tmp_path / "tp4").ok
    source_id = formats.open(tmp_path / "tp2").manifest["conversion_id"]
    assert f"resharded    from conversion {source_id} at tp 2\n" in run_cli("inspect", tmp_path / "tp4").stdout


def test_an_interrupt_mid_reshard_leaves_an_existing_output_untouched(tmp_path, checkpoints, monkeypatch):
    from qwen3pack.convert import write
    convert(checkpoints(**SMALL), tmp_path / "tp2", tp=2)
    convert(checkpoints(**SMALL), tmp_path / "out", tp=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_write_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reshard(tmp_path / "tp2", tmp_path / "out", 4, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tp2"]


@pytest.mark.parametrize("args,message", [
    (["tp2", "out", "--tp", "3"], "error: num_attention_heads: 8 does not split over 3 tensor-parallel ranks"),
    (["checkpoint", "out", "--tp", "2"], "error: {checkpoint}/manifest.json: missing"),
    (["tp2", "existing", "--tp", "2"], "error: {tmp}/existing: already exists (use --force to replace it)"),
    (["tp2", "tp2", "--tp", "4", "--force"],
     "error: {tmp}/tp2: is the source checkpoint or contains it; never replaced"),
])
def test_the_command_line_refuses_bad_input_in_one_line(tmp_path, checkpoints, args, message):
    checkpoint = checkpoints(**SMALL)
    convert(checkpoint, tmp_path / "tp2", tp=2)
    convert(checkpoint, tmp_path / "existing", tp=1)
    paths = {"tp2": tmp_path / "tp2", "out": tmp_path / "out", "existing": tmp_path / "existing",
             "checkpoint": checkpoint}
    result = run_cli("reshard", *(paths.get(arg, arg) for arg in args))
    assert result.returncode == 1
    assert result.stderr == message.format(checkpoint=checkpoint, tmp=os.path.realpath(tmp_path)) + "\n"
    assert not (tmp_path / "out").exists()
