"""Small random Hugging Face Qwen3 checkpoints, for tests and the demo (numpy only)."""
import json
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file

from .formats.dtypes import float32_to_bf16_bits

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAFETENSORS_DTYPE = {"f32": ("float32", np.float32), "f16": ("float16", np.float16), "bf16": ("bfloat16", None)}

DEFAULT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # deliberately not hidden_size / heads, as in Qwen3-0.6B
    "vocab_size": 384,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "bos_token_id": 256,
    "eos_token_id": 258,
}


def _weights(config, rng, tie):
    """Random weights scaled so that activations stay of order 1 and logits of order 1 to 10."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    d = config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def matrix(rows, cols):
        return rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], h), dtype=np.float32) * np.float32(0.5)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.input_layernorm.weight": norm(h),
            f"{p}.self_attn.q_proj.weight": matrix(q_rows, h),
            f"{p}.self_attn.k_proj.weight": matrix(kv_rows, h),
            f"{p}.self_attn.v_proj.weight": matrix(kv_rows, h),
            f"{p}.self_attn.q_norm.weight": norm(d),
            f"{p}.self_attn.k_norm.weight": norm(d),
            f"{p}.self_attn.o_proj.weight": matrix(h, q_rows),
            f"{p}.post_attention_layernorm.weight": norm(h),
            f"{p}.mlp.gate_proj.weight": matrix(inter, h),
            f"{p}.mlp.up_proj.weight": matrix(inter, h),
            f"{p}.mlp.down_proj.weight": matrix(h, inter),
        })
    tensors["model.norm.weight"] = norm(h)
    if not tie:
        tensors["lm_head.weight"] = rng.standard_normal((config["vocab_size"], h), dtype=np.float32) * np.float32(0.5)
    return tensors


def _save_safetensors(tensors, path, dtype):
    name, np_dtype = SAFETENSORS_DTYPE[dtype]
    buffers = {k: (float32_to_bf16_bits(v) if dtype == "bf16" else v.astype(np_dtype)) for k, v in tensors.items()}
    specs = {k: TensorSpec(dtype=name, shape=list(b.shape), data_ptr=b.ctypes.data, data_len=b.nbytes)
             for k, b in buffers.items()}
    serialize_file(specs, str(path), {"format": "pt"})  # buffers stay referenced until here


def _write_tokenizer(directory):
    """A byte-level BPE with no merges: every byte is a token, plus Qwen's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def make_checkpoint(directory, seed=0, shards=1, tie=True, dtype="f32", **config_overrides):
    """Writes a small random Qwen3 checkpoint (config.json, safetensors, tokenizer, generation
    config) to `directory`, deterministic by `seed`. `shards` > 1 splits the weights over that
    many files with a model.safetensors.index.json. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**DEFAULT_CONFIG, "tie_word_embeddings": tie, "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype], **config_overrides}
    tensors = _weights(config, np.random.default_rng(seed), tie)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"], 256],
         "do_sample": False}, indent=2))
    _write_tokenizer(directory)
    names = list(tensors)
    if shards == 1:
        _save_safetensors(tensors, directory / "model.safetensors", dtype)
        return directory
    weight_map = {}
    for shard, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        _save_safetensors({n: tensors[n] for n in chunk}, directory / file, dtype)
        weight_map.update({n: file for n in chunk})
    total = sum(v.size for v in tensors.values()) * {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2))
    return directory
