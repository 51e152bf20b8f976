"""q4 weights (llama.cpp's block_q4_K layout): the quantizer and its bound, the byte layout, the q4
products of every instruction set, q4 conversions (defaults, --keep, validation, damage,
reproducibility) and the measured accuracy of a q4 model."""
import shutil

import numpy as np
import pytest

from qwen3pack import _core, formats, runtime
from qwen3pack.convert import ConversionError, convert, reshard
from qwen3pack.formats.dtypes import Q4_BLOCK_DTYPE, DtypeOverflow, dequantize_q4, quantize_q4
from qwen3pack.testing import logit_agreement, make_checkpoint, runtime_logits, transformers_logits

ISAS = _core.supported_isas()
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def sub_blocks(values):
    """values [rows, cols] padded with zeros to whole blocks, as [rows, blocks, 8, 32]."""
    return np.pad(values, [(0, 0), (0, -values.shape[1] % 256)]).reshape(len(values), -1, 8, 32)


def error_bound(values, blocks):
    """The largest round-trip error of each sub-block of 32: a step of a plain min/max fit
    (span / 15, twice the rounding's half step, as the search may clip the extremes), plus what
    storing the scale and the minimum in 6 bits of the block's d and dmin moves the levels: at most
    half a unit of d on each of 15 steps, and half a unit of dmin."""
    sub = sub_blocks(values)
    span = sub.max(-1) - np.minimum(sub.min(-1), 0)
    d, dmin = blocks["d"].astype(np.float64)[..., None], blocks["dmin"].astype(np.float64)[..., None]
    return (span / 15 + 7.5 * d + dmin / 2) * (1 + 1e-5) + 1e-30


# ---- The block quantizer ----

@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 257), (7, 300), (2, 700), (4, 1024)])
def test_the_round_trip_error_stays_within_the_bound_of_each_sub_block(shape):
    rng = np.random.default_rng(shape[1])
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    values[:, rng.integers(0, shape[1])] *= 50  # an outlier column
    blocks = quantize_q4(values)
    back = dequantize_q4(blocks, shape[1])
    assert blocks.shape == (shape[0], -(-shape[1] // 256)) and back.shape == shape and back.dtype == np.float32
    error = sub_blocks(np.abs(back.astype(np.float64) - values)).max(-1)
    assert np.all(error <= error_bound(values, blocks))


def test_a_block_of_zeros_is_stored_as_zero_bytes():
    assert quantize_q4(np.zeros((2, 300), np.float32)).tobytes() == bytes(2 * 2 * 144)


def test_a_negative_constant_block_is_its_minimum_to_f16_precision():
    blocks = quantize_q4(np.full((1, 256), -0.3, np.float32))
    back = dequantize_q4(blocks, 256)
    assert np.all(back == back[0, 0]) and abs(back[0, 0] + 0.3) <= 0.3 * 2**-11
    assert blocks["d"][0, 0] == 0 and np.all(blocks["qs"] == 0)  # no scale: every value is -dmin * m


def test_one_outlier_keeps_its_value_within_half_a_step_of_its_sub_block():
    values = np.full((1, 256), 0.01, np.float32)
    values[0, 7] = 12.7
    blocks = quantize_q4(values)
    back = dequantize_q4(blocks, 256)
    step = float(blocks["d"][0, 0]) * (blocks["scales"][0, 0, 0] & 63)  # sub-block 0's scale
    assert abs(back[0, 7] - 12.7) <= step / 2 * (1 + 1e-6)
    assert np.all(np.abs(back - values) <= error_bound(values, blocks).max())


def test_values_beyond_the_f16_scale_are_refused():
    with pytest.raises(DtypeOverflow, match="exceeds the q4 range"):
        quantize_q4(np.full((1, 4), 1e8, np.float32) * np.arange(1, 5, dtype=np.float32))


def hand_made_block():
    """A block whose fields are set by hand, packed as SPEC.md says, and its values by the SPEC's
    formula: d = 0.5, dmin = 0.25, sub-block j has scale j + 1 (j = 5: 50, 6 bits) and minimum
    2j + 3, value i of sub-block j has level (i + j) % 16."""
    sc = [1, 2, 3, 4, 5, 50, 7, 8]
    mn = [3, 5, 7, 9, 11, 13, 15, 17 + 32]
    levels = [[(i + j) % 16 for i in range(32)] for j in range(8)]
    raw = bytearray(np.array([0.5, 0.25], "<f2").tobytes())
    packed = [0] * 12
    for j in range(4):
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        packed[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6)
        packed[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4)
    raw += bytes(packed)
    for c in range(4):
        raw += bytes(levels[2 * c][l] | (levels[2 * c + 1][l] << 4) for l in range(32))
    want = np.array([[0.5 * sc[j] * levels[j][i] - 0.25 * mn[j] for j in range(8) for i in range(32)]], np.float32)
    return np.frombuffer(bytes(raw), np.uint8).reshape(1, 144).copy(), want


def test_the_block_layout_is_the_specs():
    raw, want = hand_made_block()
    assert np.array_equal(dequantize_q4(raw.view(Q4_BLOCK_DTYPE), 256), want)


@pytest.mark.parametrize("isa", ISAS)
def test_every_q4_product_reads_the_specs_layout(isa):
    # activations 127 at one position quantize exactly (scale 1, value 127): y = 127 * that weight
    raw, want = hand_made_block()
    x = np.eye(256, dtype=np.float32) * np.float32(127)
    assert np.array_equal(_core.matmul(x, raw, "q4", isa)[:, 0] / np.float32(127), want[0])


# ---- The q4 products ----

# (On odd sizes, and a token alone or in a batch: tests/test_quant.py, beside q8.)

@pytest.mark.parametrize("isa", ISAS)
def test_any_stored_bytes_give_the_same_bits_everywhere(isa):
    # a hostile file may hold any levels, 6-bit fields and f16 scales (here finite ones)
    rng = np.random.default_rng(5)
    blocks = np.frombuffer(rng.integers(0, 256, 6 * 2 * 144, dtype=np.uint8).tobytes(), Q4_BLOCK_DTYPE).copy()
    blocks["d"] = rng.choice([-2.0, 0.5, 6e-8, 65504.0], size=blocks.shape)
    blocks["dmin"] = rng.choice([-1.0, 0.25, 1e-7, 1000.0], size=blocks.shape)
    stored = blocks.view(np.uint8).reshape(6, -1)
    x = rng.standard_normal((3, 400), dtype=np.float32)
    for tokens in (x, x[:1]):  # a batch, and decode's single token
        assert np.array_equal(_core.matmul(tokens, stored, "q4", isa), _core.matmul(tokens, stored, "q4", "generic"))


def test_a_q4_product_checks_the_row_size():
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(np.ones((2, 257), np.float32), np.zeros((3, 144), np.uint8), "q4", "generic")


# ---- Conversion ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Untied, odd widths: hidden 72 (one padded block), o_proj and down_proj at tp 2 48 and 50
    columns per rank (each rank's slice padded to a whole block)."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), tie=False, hidden_size=72, intermediate_size=100,
                           head_dim=24, vocab_size=389, trained_like=True)


@pytest.fixture(scope="module")
def q4_model(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "model"
    convert(checkpoint, out, tp=2, dtype="q4")
    return out


def test_a_q4_conversion_validates_and_quantizes_each_ranks_slice(checkpoint, q4_model):
    assert formats.validate(q4_model).ok
    converted = formats.open(q4_model)
    assert converted.manifest["format_version"] == [1, 3] and converted.layout["dtype"] == "q4"
    # the embedding and the output head stay in q6 unless --keep says otherwise
    assert converted.layout["dtype_overrides"] == {"embed": "q6", "lm_head": "q6"}
    record = converted.ranks[1].tensors[O_PROJ]
    assert record["dtype"] == "q4" and record["shape"] == [72, 48] and record["nbytes"] == 72 * 144
    from safetensors.numpy import load_file
    source = load_file(checkpoint / "model.safetensors")
    for name in (O_PROJ, DOWN, "model.layers.1.self_attn.q_proj.weight"):
        values = source[name]
        # blocks start at each rank's first column: the rank's slices quantized on their own
        halves = np.array_split(values, 2, axis=1) if name in (O_PROJ, DOWN) else [values]
        want = np.concatenate([dequantize_q4(quantize_q4(h), h.shape[1]) for h in halves], axis=1)
        assert np.array_equal(formats.gather(q4_model, name), want), name


def test_keep_puts_the_embedding_and_the_output_head_in_q4_or_any_dtype(checkpoint, tmp_path):
    convert(checkpoint, tmp_path / "out", dtype="q4", keep="lm_head=q4,embed=bf16")
    converted = formats.open(tmp_path / "out")
    assert converted.layout["dtype_overrides"] == {"embed": "bf16"}
    assert converted.manifest["provenance"]["options"]["keep"] == {"lm_head": "q4", "embed": "bf16"}
    assert converted.ranks[0].tensors["lm_head.weight"]["dtype"] == "q4"
    with runtime.load(tmp_path / "out") as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()


def test_the_command_line_converts_to_q4_and_inspect_says_so(checkpoint, tmp_path):
    from click.testing import CliRunner
    from qwen3pack.cli import main
    result = CliRunner().invoke(main, ["convert", str(checkpoint), str(tmp_path / "out"), "--dtype", "q4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert "tp 1, q4 weights, embed q6, lm_head q6" in result.output and "format       1.3" in result.output


def test_a_q4_model_whose_rank_slices_are_padded_blocks_is_not_resharded(q4_model, tmp_path):
    with pytest.raises(ConversionError, match="its q4 o_proj weights cannot be resharded to tp 1: at tp 2 a rank "
                                              "holds 48 of their columns, not a whole number of 256-value blocks"):
        reshard(q4_model, tmp_path / "out", tp=1)


# ---- Accuracy ----

# Measured on these checkpoints (4 layers, hidden 256, vocab 1024, tied), 8 prompts of 64 tokens,
# against our f32 runtime (1e-5 from transformers' float32):
#   plain random weights (logits of std 8): q4 mean KL 0.101, top-1 93.9%, largest logit error 9.7
#   (its embedding in q6, as converted by default; in q8: 0.105);
#   trained-like weights (1% of input columns 8x, logits of std 2.4): KL 0.52, top-1 41% (q8: 0.51);
#   q4 against its own dequantized weights in f32 (the kernels and the activations' rounding
#   alone): KL 0.0011, top-1 100% (plain); KL 0.0056, top-1 92% (trained-like).
# llama.cpp's q4_K_M on the same checkpoints: KL 0.085, top-1 94.3% (plain); 0.52, 38% (trained-like).
# The bounds leave a margin of about 2x; a wrong scale, minimum or level order gives a KL of order 1
# on the plain checkpoint.
Q4_MAX_MEAN_KL, Q4_MIN_TOP1 = 0.2, 0.88


@pytest.fixture(scope="module")
def accuracy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    source = make_checkpoint(root / "hf", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024)
    for dtype in ("f32", "q4"):
        convert(source, root / dtype, dtype=dtype)
    return source, root


def test_q4_logits_keep_to_the_measured_distance_from_transformers(accuracy_models):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    source, root = accuracy_models
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(8)]
    reference = transformers_logits(source, prompts)
    q4 = logit_agreement(reference, runtime_logits(root / "q4", prompts))
    assert q4["mean_kl"] <= Q4_MAX_MEAN_KL and q4["top1"] >= Q4_MIN_TOP1, q4


@pytest.mark.parametrize("embed", ["f32", "q4"])
def test_q4_logits_are_those_of_its_dequantized_weights_but_for_the_activations_rounding(accuracy_models, tmp_path,
                                                                                        embed):
    # The same model with the stored q4 values as f32 weights: what remains is the activations'
    # quantization, so any error of the kernels, the scales or the minimums shows. The embedding
    # (the output head too: the model is tied) is f32 in both, or q4 in both, which also checks
    # its rows' dequantization on lookup. Measured: mean KL 0.0011, top-1 100%.
    from safetensors.numpy import load_file, save_file
    source, root = accuracy_models
    shutil.copytree(source, tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    quantized = {k for k, v in tensors.items() if v.ndim == 2 and ("embed" not in k or embed == "q4")}
    tensors = {k: dequantize_q4(quantize_q4(v), v.shape[1]) if k in quantized else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    convert(tmp_path / "hf", tmp_path / "dequantized", dtype="f32")
    convert(tmp_path / "hf", tmp_path / "q4", dtype="q4", keep=f"embed={embed}")
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(4)]
    got = logit_agreement(runtime_logits(tmp_path / "dequantized", prompts), runtime_logits(tmp_path / "q4", prompts))
    assert got["mean_kl"] <= 0.004 and got["top1"] >= 0.97, got
