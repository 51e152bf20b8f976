"""q6 weights (llama.cpp's block_q6_K layout): the quantizer and its bound, the byte layout, the q6
products of every instruction set, q6 conversions (a whole model, an output head beside q4) and
the measured accuracy of a q6 model. (The C++ quantizer against the numpy rule, odd sizes,
batches and the damage tests: tests/test_quant.py, beside q8 and q4.)"""
import numpy as np
import pytest

from qwen3pack import _core, formats, runtime
from qwen3pack.convert import convert
from qwen3pack.formats.dtypes import Q6_BLOCK_DTYPE, DtypeOverflow, dequantize_q6, quantize_q6
from qwen3pack.testing import logit_agreement, make_checkpoint, runtime_logits, transformers_logits

ISAS = _core.supported_isas()
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


def sub_blocks(values):
    """values [rows, cols] padded with zeros to whole blocks, as [rows, blocks, 16, 16]."""
    return np.pad(values, [(0, 0), (0, -values.shape[1] % 256)]).reshape(len(values), -1, 16, 16)


def error_bound(values, blocks):
    """The largest round-trip error of each sub-block of 16: a step of a plain fit (max |x| / 31,
    twice the rounding's half step, as the search may clip the extreme value), plus what storing
    the scale in 8 bits of the block's d moves the levels: half a unit of d on each of 32 steps."""
    largest = np.abs(sub_blocks(values)).max(-1)
    d = np.abs(blocks["d"].astype(np.float64))[..., None]
    return (largest / 31 + 16 * d) * (1 + 1e-5) + 1e-30


# ---- The block quantizer ----

@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 257), (7, 300), (2, 700), (4, 1024)])
def test_the_round_trip_error_stays_within_the_bound_of_each_sub_block(shape):
    rng = np.random.default_rng(shape[1])
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    values[:, rng.integers(0, shape[1])] *= 50  # an outlier column
    blocks = quantize_q6(values)
    back = dequantize_q6(blocks, shape[1])
    assert blocks.shape == (shape[0], -(-shape[1] // 256)) and back.shape == shape and back.dtype == np.float32
    error = sub_blocks(np.abs(back.astype(np.float64) - values)).max(-1)
    assert np.all(error <= error_bound(values, blocks))


def test_a_block_of_zeros_is_stored_as_zero_bytes():
    assert quantize_q6(np.zeros((2, 300), np.float32)).tobytes() == bytes(2 * 2 * 210)


def test_a_constant_block_is_its_value_to_f16_precision():
    back = dequantize_q6(quantize_q6(np.full((1, 256), -0.3, np.float32)), 256)
    assert np.all(back == back[0, 0]) and abs(back[0, 0] + 0.3) <= 0.3 * 2**-10


def test_one_outlier_is_kept_and_the_other_sub_blocks_keep_steps_of_their_own():
    values = np.full((1, 256), 0.01, np.float32)
    values[0, 7] = 0.64
    blocks = quantize_q6(values)
    back = dequantize_q6(blocks, 256)
    assert abs(back[0, 7] - 0.64) <= 0.64 / 64
    assert np.all(np.abs(back - values) <= error_bound(values, blocks).max())


def test_a_sub_block_under_a_256th_of_the_blocks_largest_scale_is_stored_as_zeros():
    # the sub-block scales are 8 bits of the block's d = (largest scale) / 128: a scale below half
    # a unit rounds to 0 (llama.cpp's q6_K does the same)
    values = np.full((1, 256), 0.01, np.float32)
    values[0, 7] = 12.7
    back = dequantize_q6(quantize_q6(values), 256)
    assert abs(back[0, 7] - 12.7) <= 12.7 / 64 and np.all(back[0, 16:] == 0)


def test_values_beyond_the_f16_scale_are_refused():
    with pytest.raises(DtypeOverflow, match="exceeds the q6 range"):
        quantize_q6(np.full((1, 4), 1e10, np.float32) * np.arange(1, 5, dtype=np.float32))


def hand_made_block():
    """A block whose fields are set by hand, packed as SPEC.md says, and its values by the SPEC's
    formula: d = 0.5, sub-block j has the scale sc[j] (both ends of int8 among them), value v has
    the level (7v + 3) % 64."""
    sc = [1, -2, 3, -4, 127, -128, 7, 8, -9, 10, 11, -12, 13, 14, -15, 16]
    level = [(7 * v + 3) % 64 for v in range(256)]
    ql, qh = bytearray(128), bytearray(64)
    for h in range(2):
        for l in range(32):
            q = [level[128 * h + 32 * c + l] for c in range(4)]
            ql[64 * h + l] = (q[0] & 15) | (q[2] & 15) << 4
            ql[64 * h + 32 + l] = (q[1] & 15) | (q[3] & 15) << 4
            qh[32 * h + l] = q[0] >> 4 | (q[1] >> 4) << 2 | (q[2] >> 4) << 4 | (q[3] >> 4) << 6
    raw = bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + np.array([0.5], "<f2").tobytes()
    want = np.array([[0.5 * sc[v // 16] * (level[v] - 32) for v in range(256)]], np.float32)
    return np.frombuffer(raw, np.uint8).reshape(1, 210).copy(), want


def test_the_block_layout_is_the_specs():
    raw, want = hand_made_block()
    assert np.array_equal(dequantize_q6(raw.view(Q6_BLOCK_DTYPE), 256), want)


@pytest.mark.parametrize("isa", ISAS)
def test_every_q6_product_reads_the_specs_layout(isa):
    # activations 127 at one position quantize exactly (scale 1, value 127): y = 127 * that weight
    raw, want = hand_made_block()
    x = np.eye(256, dtype=np.float32) * np.float32(127)
    assert np.array_equal(_core.matmul(x, raw, "q6", isa)[:, 0] / np.float32(127), want[0])


# ---- The q6 products ----

@pytest.mark.parametrize("isa", ISAS)
def test_any_stored_bytes_give_the_same_bits_everywhere(isa):
    # a hostile file may hold any levels, 8-bit scales and f16 scales (here finite ones)
    rng = np.random.default_rng(5)
    blocks = np.frombuffer(rng.integers(0, 256, 6 * 2 * 210, dtype=np.uint8).tobytes(), Q6_BLOCK_DTYPE).copy()
    blocks["d"] = rng.choice([-2.0, 0.5, 6e-8, 65504.0], size=blocks.shape)
    stored = blocks.view(np.uint8).reshape(6, -1)
    x = rng.standard_normal((7, 400), dtype=np.float32)
    for tokens in (x, x[:3], x[:1]):  # a batch, decode's batch, and its single token
        assert np.array_equal(_core.matmul(tokens, stored, "q6", isa), _core.matmul(tokens, stored, "q6", "generic"))


def test_a_q6_product_checks_the_row_size():
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(np.ones((2, 257), np.float32), np.zeros((3, 210), np.uint8), "q6", "generic")


# ---- Conversion ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tied, odd widths: hidden 72 (one padded block), o_proj and down_proj at tp 2 48 and 50
    columns per rank (each rank's slice padded to a whole block)."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), hidden_size=72, intermediate_size=100, head_dim=24,
                           vocab_size=389, trained_like=True)


def test_a_q6_conversion_validates_and_quantizes_each_ranks_slice(checkpoint, tmp_path):
    convert(checkpoint, tmp_path / "q6", tp=2, dtype="q6")
    assert formats.validate(tmp_path / "q6").ok
    converted = formats.open(tmp_path / "q6")
    assert converted.layout["dtype"] == "q6" and "dtype_overrides" not in converted.layout
    record = converted.ranks[1].tensors[O_PROJ]
    assert record["dtype"] == "q6" and record["shape"] == [72, 48] and record["nbytes"] == 72 * 210
    from safetensors.numpy import load_file
    source = load_file(checkpoint / "model.safetensors")
    for name in (O_PROJ, "model.embed_tokens.weight"):
        values = source[name]
        halves = np.array_split(values, 2, axis=1) if name == O_PROJ else [values]
        want = np.concatenate([dequantize_q6(quantize_q6(h), h.shape[1]) for h in halves], axis=1)
        assert np.array_equal(formats.gather(tmp_path / "q6", name), want), name


def test_q4_keeps_the_embedding_and_output_head_in_q6_as_llama_cpps_q4_k_m_does(checkpoint, tmp_path):
    # (tests/test_quant_q4.py: an untied head, and --keep)
    from click.testing import CliRunner
    from qwen3pack.cli import main
    result = CliRunner().invoke(main, ["convert", str(checkpoint), str(tmp_path / "out"), "--dtype", "q4"])
    assert result.exit_code == 0, result.output
    converted = formats.open(tmp_path / "out")
    assert converted.layout["dtype_overrides"] == {"embed": "q6"}
    assert converted.ranks[0].tensors["model.embed_tokens.weight"]["dtype"] == "q6"
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert "tp 1, q4 weights, embed q6" in result.output and "format       1.3" in result.output
    with runtime.load(tmp_path / "out") as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()


# ---- Accuracy ----

# Measured on the checkpoints of tests/test_quant_q4.py (4 layers, hidden 256, vocab 1024, tied),
# 8 prompts of 64 tokens, against our f32 runtime (1e-5 from transformers' float32):
#   plain random weights (logits of std 8): q6 mean KL 0.0092, top-1 98.6%, largest logit error 3.0
#   (q8: 0.0012, 99.6%, 1.2);
#   q6 against its own dequantized weights in f32 (the kernels and the activations' rounding
#   alone): KL 0.0016, top-1 98.8%.
# The bounds leave a margin of about 2x; a wrong scale or level order gives a KL of order 1.
Q6_MAX_MEAN_KL, Q6_MIN_TOP1 = 0.02, 0.96


@pytest.fixture(scope="module")
def accuracy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    source = make_checkpoint(root / "hf", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
    convert(source, root / "q6", dtype="q6")
    return source, root


def test_q6_logits_keep_to_the_measured_distance_from_transformers(accuracy_models):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    source, root = accuracy_models
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(8)]
    q6 = logit_agreement(transformers_logits(source, prompts), runtime_logits(root / "q6", prompts))
    assert q6["mean_kl"] <= Q6_MAX_MEAN_KL and q6["top1"] >= Q6_MIN_TOP1, q6


def test_q6_logits_are_those_of_its_dequantized_weights_but_for_the_activations_rounding(accuracy_models, tmp_path):
    # The same model with the stored q6 values as f32 weights (the embedding, and so the tied output
    # head, among them: its rows are dequantized on lookup): what remains is the activations'
    # quantization, so any error of the kernels or the scales shows.
    from safetensors.numpy import load_file, save_file
    source, root = accuracy_models
    (tmp_path / "hf").mkdir()
    for file in source.iterdir():
        (tmp_path / "hf" / file.name).write_bytes(file.read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors = {k: dequantize_q6(quantize_q6(v), v.shape[1]) if v.ndim == 2 else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    convert(tmp_path / "hf", tmp_path / "dequantized", dtype="f32")
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(4)]
    got = logit_agreement(runtime_logits(tmp_path / "dequantized", prompts), runtime_logits(root / "q6", prompts))
    assert got["mean_kl"] <= 0.004 and got["top1"] >= 0.97, got
