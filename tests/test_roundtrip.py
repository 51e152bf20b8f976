"""Converting and gathering back gives every source tensor exactly (after the dtype asked for)."""
import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen3pack import formats
from qwen3pack.convert import convert

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# 8 q heads and 2 KV heads: tp 4 and 8 replicate KV heads; vocab 383 is padded for every tp > 1.
SMALL = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, vocab_size=383)


def source_tensors(directory):
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def as_stored(tensor, dtype):
    """The values qwen3pack should store for a source tensor converted to `dtype` (bf16 as
    ml_dtypes.bfloat16, which is what gather returns)."""
    converted = tensor.to(TORCH_DTYPES[dtype])
    if dtype == "bf16":
        return converted.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return converted.numpy()


CASES = [
    # tp, source dtype, --dtype, tied, shards
    (1, "f32", "auto", True, 1),
    (2, "bf16", "auto", False, 3),
    (4, "f32", "bf16", True, 2),
    (8, "bf16", "f16", False, 1),
    (2, "f16", "f32", True, 1),
]


@pytest.mark.parametrize("tp,source_dtype,dtype,tie,shards", CASES)
def test_gather_gives_back_every_source_tensor(tmp_path, checkpoints, tp, source_dtype, dtype, tie, shards):
    source = checkpoints(dtype=source_dtype, tie=tie, shards=shards, **SMALL)
    convert(source, tmp_path / "out", tp=tp, dtype=dtype)
    converted = formats.open(tmp_path / "out")
    weights_dtype = source_dtype if dtype == "auto" else dtype
    expected = source_tensors(source)
    assert set(converted.manifest["tensors"]) == set(expected)
    for name, tensor in expected.items():
        stored_dtype = "f32" if tensor.ndim == 1 else weights_dtype
        got = formats.gather(converted, name)
        want = as_stored(tensor, stored_dtype)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_kv_heads_are_replicated_when_tp_exceeds_them(tmp_path, checkpoints):
    source = checkpoints(**SMALL)
    convert(source, tmp_path / "out", tp=8)
    converted = formats.open(tmp_path / "out")
    assert converted.layout["kv_head_replicas"] == 4 and converted.layout["kv_heads_per_rank"] == 1
    k_proj = load_file(source / "model.safetensors")["model.layers.0.self_attn.k_proj.weight"].numpy()
    d = 16
    for rank in range(8):
        qkv = converted.ranks[rank].array("model.layers.0.self_attn.qkv_proj.weight")
        assert qkv.shape == (d + 2 * d, 64)  # one q head, one k head, one v head
        kv_head = rank // 4
        np.testing.assert_array_equal(qkv[d:2 * d], k_proj[kv_head * d:(kv_head + 1) * d])
        part = converted.ranks[rank].tensors["model.layers.0.self_attn.qkv_proj.weight"]["parts"][1]
        assert part["replicas"] == 4 and part["start"] == kv_head * d


def test_vocab_is_padded_to_a_multiple_of_tp_with_zero_rows(tmp_path, checkpoints):
    convert(checkpoints(**SMALL), tmp_path / "out", tp=4)
    converted = formats.open(tmp_path / "out")
    assert converted.layout["padded_vocab_size"] == 384 and converted.model["vocab_size"] == 383
    last = converted.ranks[3].array("model.embed_tokens.weight")
    assert last.shape == (96, 64)
    assert not last[-1].any() and last[-2].any()
    assert converted.ranks[3].tensors["model.embed_tokens.weight"]["parts"][-1]["source"] is None


def test_a_tied_model_stores_its_matrix_once_even_with_a_redundant_lm_head(tmp_path, checkpoints):
    source = checkpoints(tie=False, **SMALL)
    config = json.loads((source / "config.json").read_text())
    tied_copy = tmp_path / "tied"
    tied_copy.mkdir()
    for path in source.iterdir():
        (tied_copy / path.name).write_bytes(path.read_bytes())
    (tied_copy / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    convert(tied_copy, tmp_path / "out", tp=2)
    converted = formats.open(tmp_path / "out")
    assert "lm_head.weight" not in converted.ranks[0].tensors
    assert "lm_head.weight" not in converted.manifest["tensors"]


def test_norms_are_stored_in_f32_whatever_the_weights_dtype(tmp_path, checkpoints):
    convert(checkpoints(dtype="bf16"), tmp_path / "out", tp=2)
    rank = formats.open(tmp_path / "out").ranks[1]
    for name, record in rank.tensors.items():
        assert record["dtype"] == ("f32" if name.endswith("norm.weight") else "bf16"), name


def test_tensor_data_is_aligned_for_direct_io(tmp_path, checkpoints):
    convert(checkpoints(), tmp_path / "out", tp=2)
    for rank in formats.open(tmp_path / "out").ranks:
        assert rank.data_offset % 4096 == 0 and rank.file_size % 4096 == 0
        assert all(record["offset"] % 64 == 0 for record in rank.tensors.values())


def test_qkv_rows_are_the_ranks_q_heads_then_k_heads_then_v_heads(tmp_path, checkpoints):
    source = checkpoints(**SMALL)
    convert(source, tmp_path / "out", tp=2)
    weights = load_file(source / "model.safetensors")
    q, k, v = (weights[f"model.layers.1.self_attn.{n}_proj.weight"].numpy() for n in "qkv")
    qkv = formats.open(tmp_path / "out").ranks[1].array("model.layers.1.self_attn.qkv_proj.weight")
    d = 16
    np.testing.assert_array_equal(qkv, np.concatenate([q[4 * d:8 * d], k[d:2 * d], v[d:2 * d]]))


def test_gather_returns_bf16_values_that_compare_with_the_float32_source(tmp_path, checkpoints):
    """The most common dtype must compare by value: np.allclose against the source just works."""
    source = checkpoints(**SMALL)  # float32 weights
    convert(source, tmp_path / "out", tp=2, dtype="bf16")
    gathered = formats.gather(tmp_path / "out", "model.layers.1.mlp.down_proj.weight")
    original = load_file(source / "model.safetensors")["model.layers.1.mlp.down_proj.weight"].numpy()
    assert gathered.dtype == ml_dtypes.bfloat16 and gathered.shape == original.shape
    assert np.allclose(gathered.astype(np.float32), original, rtol=2 ** -8, atol=0)
    assert not np.allclose(gathered.astype(np.float32), -original, rtol=2 ** -8, atol=0)
