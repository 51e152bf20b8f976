"""qwen3-convert: atomic, deterministic, bounded in memory, and clear about bad input."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qwen3pack
from qwen3pack import formats, validate
from qwen3pack.convert import ConversionError, SourceError, convert, write
from qwen3pack.testing import make_checkpoint

BIN = Path(sys.executable).parent


def run_cli(*args, env=None):
    return subprocess.run([str(BIN / "qwen3pack"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_two_conversions_are_byte_identical(tmp_path, checkpoints):
    source = checkpoints(dtype="bf16", shards=2)
    convert(source, tmp_path / "a", tp=2)
    convert(source, tmp_path / "b", tp=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_an_error_mid_conversion_leaves_nothing_at_output(tmp_path, checkpoints, monkeypatch):
    calls = []

    def failing_write_rows(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full (injected)")
        return original(*args)

    original = write._write_rows
    monkeypatch.setattr(write, "_write_rows", failing_write_rows)
    with pytest.raises(OSError, match="injected"):
        convert(checkpoints(), tmp_path / "out", tp=2)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_conversion_leaves_an_existing_output_untouched(tmp_path, checkpoints, monkeypatch):
    source = checkpoints()
    convert(source, tmp_path / "out", tp=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_write_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out", tp=1, force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path, checkpoints):
    source = checkpoints()
    convert(source, tmp_path / "out", tp=2)
    with pytest.raises(ConversionError, match="already exists.*--force"):
        convert(source, tmp_path / "out", tp=1)
    convert(source, tmp_path / "out", tp=1, force=True)
    assert formats.open(tmp_path / "out").layout["world_size"] == 1


def test_the_directory_alone_carries_tokenizer_generation_config_and_chat_template(tmp_path, checkpoints):
    convert(checkpoints(), tmp_path / "out", tp=2)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"manifest.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    generation = formats.open(tmp_path / "out").generation
    assert generation["eos_token_ids"] == [258, 256] and generation["bos_token_id"] == 256


def test_provenance_records_each_source_file_with_its_sha256(tmp_path, checkpoints):
    source = checkpoints(shards=2)
    convert(source, tmp_path / "out", tp=1, dtype="bf16")
    provenance = formats.open(tmp_path / "out").manifest["provenance"]
    assert provenance["options"] == {"tp": 1, "dtype": "bf16"}
    assert provenance["converter"].startswith("qwen3pack ")
    files = {entry["file"]: entry["sha256"] for entry in provenance["sources"]}
    assert set(files) == {"config.json", "model.safetensors.index.json",
                          "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    for name, digest in files.items():
        assert hashlib.sha256((source / name).read_bytes()).hexdigest() == digest


def test_bf16_to_f16_overflow_names_the_tensor(tmp_path):
    from safetensors import TensorSpec, serialize_file
    from safetensors.torch import load_file
    source = make_checkpoint(tmp_path / "src", dtype="bf16")
    tensors = {k: v.view(__import__("torch").int16).numpy() for k, v in load_file(source / "model.safetensors").items()}
    big = tensors["model.layers.1.mlp.down_proj.weight"].copy()
    big[3, 5] = 0x4780  # bf16 65536.0: finite in bf16, beyond f16's 65504
    tensors["model.layers.1.mlp.down_proj.weight"] = big
    specs = {k: TensorSpec(dtype="bfloat16", shape=list(v.shape), data_ptr=v.ctypes.data, data_len=v.nbytes)
             for k, v in tensors.items()}
    serialize_file(specs, str(source / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"tensor model.layers.1.mlp.down_proj.weight: value 65536 exceeds the f16 range"):
        convert(source, tmp_path / "out", dtype="f16")
    assert not (tmp_path / "out").exists()
    convert(source, tmp_path / "out", dtype="bf16")  # bf16 holds it


def test_a_sharded_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    source = make_checkpoint(tmp_path / "src", shards=2)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    wrong = {"model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
             "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors"}[index["weight_map"][name]]
    index["weight_map"][name] = wrong
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=f"tensor {name} is not listed for this shard"):
        convert(source, tmp_path / "out")


def test_a_missing_tensor_is_named(tmp_path):
    source = make_checkpoint(tmp_path / "src", shards=2)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.1.mlp.up_proj.weight.extra"] = "model-00001-of-00002.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match="up_proj.weight.extra is listed in model-00001-of-00002.safetensors"):
        convert(source, tmp_path / "out")


def test_a_shape_that_disagrees_with_config_is_named(tmp_path):
    source = make_checkpoint(tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(SourceError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[128, 64\], config.json implies \[96, 64\]"):
        convert(source, tmp_path / "out")


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, checkpoints):
    result = run_cli("convert", checkpoints(dtype="bf16"), tmp_path / "out", "--tp", "2", "--dry-run",
                     "--context", "1000")
    assert result.returncode == 0, result.stderr
    assert "tp=2, weights bf16" in result.stdout and "rank 1" in result.stdout
    assert re.search(r"KV cache at 1000 tokens +[0-9.]+ GiB in bf16, [0-9.]+ in f32", result.stdout)
    assert not (tmp_path / "out").exists()


def test_cli_errors_exit_non_zero_with_one_line_naming_the_field(tmp_path, checkpoints):
    source = make_checkpoint(tmp_path / "src")
    result = run_cli("convert", source, tmp_path / "out", "--tp", "3")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: num_attention_heads: 4 does not split over 3 tensor-parallel ranks"
    assert not (tmp_path / "out").exists()
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_moe", "num_experts": 8}))
    result = run_cli("convert", source, tmp_path / "out")
    assert result.returncode == 1 and "mixture-of-experts" in result.stderr and "Traceback" not in result.stderr


def test_qwen3_convert_is_the_same_command(tmp_path, checkpoints):
    result = subprocess.run([str(BIN / "qwen3-convert"), str(checkpoints()), str(tmp_path / "out"), "--tp", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert validate(tmp_path / "out").ok


def test_a_hub_id_is_read_from_the_cache_when_offline(tmp_path, checkpoints):
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--qwen3" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in checkpoints().iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (cache / "models--tiny--qwen3" / "refs").mkdir()
    (cache / "models--tiny--qwen3" / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = run_cli("convert", "tiny/qwen3", tmp_path / "out", "--tp", "2", env=env)
    assert result.returncode == 0, result.stderr
    assert validate(tmp_path / "out").ok
    result = run_cli("convert", "tiny/absent", tmp_path / "out2", env=env)
    assert result.returncode == 1 and result.stderr.startswith("error: tiny/absent:")


def test_peak_memory_stays_far_below_the_largest_tensor(tmp_path):
    # A 256 MB embedding: the converter streams it in chunks, so it never sits whole in memory.
    source = make_checkpoint(tmp_path / "src", vocab_size=250_000, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, intermediate_size=256, num_hidden_layers=1)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forked parent across exec.
    script = ("import re, sys; from qwen3pack.convert import convert; "
              "convert(sys.argv[1], sys.argv[2], tp=2, dtype='bf16'); "
              "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    result = subprocess.run([sys.executable, "-c", script, str(source), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout) / 1024
    assert peak_mb < 200, f"peak RSS {peak_mb:.0f} MB while converting a 256 MB tensor"


def test_a_config_that_is_not_json_is_named(tmp_path):
    source = make_checkpoint(tmp_path / "src")
    (source / "config.json").write_text("{ not json")
    result = run_cli("convert", source, tmp_path / "out")
    assert result.returncode == 1 and "config.json: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_kv_cache_estimate_of_qwen3_8b_at_tp2_counts_its_kv_heads_per_rank():
    from qwen3pack.convert.hf_config import normalize_config
    from qwen3pack.convert.plan import kv_cache_bytes_per_rank
    from qwen3pack.formats import make_layout
    model = normalize_config(json.loads((Path(__file__).parent / "fixtures/configs/Qwen3-8B.json").read_text()))
    layout = make_layout(model, 2, "bf16")
    # 36 layers, keys and values, 4 of the 8 KV heads per rank, head_dim 128, 4096 tokens, f32
    assert kv_cache_bytes_per_rank(model, layout, 4096, "f32") == 36 * 2 * 4 * 128 * 4096 * 4
    assert kv_cache_bytes_per_rank(model, layout, 4096, "bf16") == 36 * 2 * 4 * 128 * 4096 * 2


def test_kv_cache_estimate_keeps_only_the_window_of_sliding_layers(tmp_path):
    from qwen3pack.convert.hf_config import normalize_config
    from qwen3pack.convert.plan import kv_cache_bytes_per_rank
    from qwen3pack.formats import make_layout
    from qwen3pack.testing import DEFAULT_CONFIG
    model = normalize_config({**DEFAULT_CONFIG, "num_hidden_layers": 4, "use_sliding_window": True,
                              "sliding_window": 100, "max_window_layers": 1})
    layout = make_layout(model, 1, "f32")
    per_token = 2 * 2 * 32 * 4
    assert kv_cache_bytes_per_rank(model, layout, 1000, "f32") == (1000 + 3 * 100) * per_token
    assert kv_cache_bytes_per_rank(model, layout, 1000, "bf16") == (1000 + 3 * 100) * per_token // 2


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
def test_the_dry_run_kv_cache_estimate_is_what_the_runtime_allocates(tmp_path, kv_dtype):
    from qwen3pack.convert.plan import kv_cache_bytes_per_rank
    source = make_checkpoint(tmp_path / "src", num_hidden_layers=4, use_sliding_window=True, sliding_window=10,
                             max_window_layers=1, layer_types=["full_attention"] + 3 * ["sliding_attention"])
    convert(source, tmp_path / "out", tp=2, dtype="bf16")
    converted = formats.open(tmp_path / "out")
    with qwen3pack.load(tmp_path / "out", max_context=100, kv_dtype=kv_dtype) as model:
        session = model.session()
        session.append(list(range(100)))  # the cache grows as the sequence does: full at max_context
        assert session.kv_cache_bytes == 2 * kv_cache_bytes_per_rank(converted.model, converted.layout, 100, kv_dtype)
