"""q8 weights: the block quantizer, the q8 products of every instruction set, quantized
conversions (validation, damage, reproducibility, --keep) and the accuracy of a q8 model."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from qwen3pack import _core, formats, runtime
from qwen3pack.cli import main
from qwen3pack.convert import ConversionError, SourceError, convert, reshard
from qwen3pack.formats import FormatError, LayoutError
from qwen3pack.formats.dtypes import (DtypeOverflow, Q8_BLOCK_DTYPE, dequantize_q4, dequantize_q6, dequantize_q8,
                                     float32_to_bf16_bits, quantize_q4, quantize_q6, quantize_q8, to_float32)
from qwen3pack.testing import logit_agreement, make_checkpoint, runtime_logits, transformers_logits

ISAS = _core.supported_isas()
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def error_bound(values):
    """The largest round-trip error q8 allows in each block of `values` [rows, cols]: half a step
    of the stored (f16) scale d, or, where rounding d to f16 made it smaller than max|x| / 127 so
    that the largest values clip at 127, 127 times that difference; plus f32 rounding."""
    blocks = quantize_q8(values)
    d = blocks["d"].astype(np.float64)
    exact = np.abs(np.pad(values, [(0, 0), (0, -values.shape[1] % 32)])).reshape(len(values), -1, 32).max(-1) / 127
    per_block = np.maximum(d / 2, 127 * np.abs(d - exact)) * (1 + 1e-6) + 1e-30
    return np.repeat(per_block, 32, axis=1)[:, :values.shape[1]]


# ---- The block quantizer ----

@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 33), (7, 65), (2, 100), (4, 1024)])
def test_the_round_trip_error_stays_within_the_bound_of_each_block(shape):
    rng = np.random.default_rng(shape[1])
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    values[:, rng.integers(0, shape[1])] *= 50  # an outlier column
    back = dequantize_q8(quantize_q8(values), shape[1])
    assert back.shape == shape and back.dtype == np.float32
    assert np.all(np.abs(back.astype(np.float64) - values) <= error_bound(values))


def test_a_block_of_zeros_is_stored_as_zero_bytes():
    blocks = quantize_q8(np.zeros((2, 40), np.float32))
    assert blocks.tobytes() == bytes(2 * 2 * 34)


def test_a_constant_block_is_its_value_to_f16_precision():
    blocks = quantize_q8(np.full((1, 32), -0.3, np.float32))
    assert np.all(blocks["q"] == -127)
    assert abs(dequantize_q8(blocks, 32)[0, 0] + 0.3) <= 0.3 * 2**-11


def test_one_outlier_sets_the_scale_and_the_others_round_to_its_steps():
    values = np.full((1, 32), 0.01, np.float32)
    values[0, 7] = 12.7
    blocks = quantize_q8(values)
    assert float(blocks["d"][0, 0]) == pytest.approx(0.1, rel=2**-11)
    assert blocks["q"][0, 0, 7] == 127 and np.all(np.delete(blocks["q"][0, 0], 7) == 0)


def test_the_last_block_is_padded_with_zeros():
    blocks = quantize_q8(np.ones((3, 33), np.float32))
    assert blocks.shape == (3, 2) and np.all(blocks["q"][:, 1, 1:] == 0) and np.all(blocks["q"][:, 1, 0] == 127)


def test_values_beyond_the_f16_scale_are_refused():
    with pytest.raises(DtypeOverflow, match="exceeds the q8 range"):
        quantize_q8(np.full((1, 4), 1e7, np.float32))


@pytest.mark.parametrize("scale", [1.0, 0.02, 3e-6, 1e-9, 1e-40, 1e3])
def test_the_converters_c_quantizer_gives_the_bytes_of_the_numpy_rule(scale):
    # scales from f16 normals down to f16 subnormals and zero, ties (multiples of half a step),
    # zero rows, and rows that end inside a block
    rng = np.random.default_rng(7)
    values = (rng.standard_normal((9, 75), dtype=np.float32) * np.float32(scale)).astype(np.float32)
    values[1] = 0
    values[2, :32] = np.arange(-16, 16, dtype=np.float32) * np.float32(0.5)
    values[2, 5] = 127 / 2  # d = 0.5: every other value is a tie
    values[3, :] = np.float32(scale) * rng.integers(-254, 255, 75).astype(np.float32) / 2
    stored = _core.quantize_q8_weights(values)
    assert stored.dtype == np.uint8 and stored.shape == (9, 3 * 34)
    assert stored.tobytes() == quantize_q8(values).tobytes()


def test_the_converters_c_quantizer_takes_bf16_rows_as_stored_and_gives_the_bytes_of_their_values():
    # a bf16 checkpoint's rows reach the quantizer as bit patterns (uint16), widened there
    values = np.random.default_rng(7).standard_normal((9, 75), dtype=np.float32)
    bits = float32_to_bf16_bits(values)
    stored = _core.quantize_q8_weights(bits)
    assert stored.tobytes() == quantize_q8(to_float32(bits, "bf16")).tobytes()


def test_the_converters_c_quantizer_refuses_scales_beyond_f16():
    with pytest.raises(OverflowError, match="exceeds the f16 range"):
        _core.quantize_q8_weights(np.full((1, 4), 1e7, np.float32))


def test_the_runtime_quantizes_activations_with_the_converters_rounding():
    # amax 127 gives d = 1: the halves are ties, rounded to even as numpy's rint does
    x = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -126.6, *np.linspace(-3, 3, 30)], np.float32)
    d, q = _core.quantize_q8(x)
    assert d[0] == 1.0
    inverse = np.float32(1) / d.astype(np.float32)
    want = np.rint(np.pad(x, (0, 64 - len(x))).reshape(2, 32) * inverse[:, None])
    assert np.array_equal(q, want.astype(np.int8))
    assert list(q[0, :8]) == [127, 0, 2, 2, 0, -2, 3, -127]


# ---- The searched quantizers of q4 and q6: C++ against the numpy rule ----

SEARCHED = {"q4": (quantize_q4, _core.quantize_q4_weights, 144), "q6": (quantize_q6, _core.quantize_q6_weights, 210)}


def _with_outlier_columns(values):
    values[:, [3, 77, 200]] *= np.float32(8)
    return values


C_QUANTIZER_CASES = {  # shapes that end inside a block, outliers, one sign, zeros, constants, tiny scales
    "normal": lambda rng: rng.standard_normal((7, 1024), dtype=np.float32),
    "short rows": lambda rng: rng.standard_normal((5, 300), dtype=np.float32) * np.float32(0.02),
    "outlier columns": lambda rng: _with_outlier_columns(rng.standard_normal((6, 768), dtype=np.float32)),
    "positive": lambda rng: np.abs(rng.standard_normal((3, 512), dtype=np.float32)),
    "zeros": lambda rng: np.zeros((2, 256), np.float32),
    "constant": lambda rng: np.full((2, 256), -0.3, np.float32),
    "ties of the largest value": lambda rng: np.tile(np.float32([0.5, -0.5, 0.25, -0.125]), (2, 64)),
    "f16 subnormal scales": lambda rng: rng.standard_normal((2, 256), dtype=np.float32) * np.float32(1e-6),
    "f32 subnormals": lambda rng: rng.standard_normal((2, 256), dtype=np.float32) * np.float32(1e-40),
}


@pytest.mark.parametrize("dtype", sorted(SEARCHED))
@pytest.mark.parametrize("case", sorted(C_QUANTIZER_CASES))
def test_the_converters_c_search_gives_the_bytes_of_the_numpy_rule(dtype, case):
    rule, quantizer, block_bytes = SEARCHED[dtype]
    values = C_QUANTIZER_CASES[case](np.random.default_rng(1))
    stored = quantizer(values)
    assert stored.dtype == np.uint8 and stored.shape == (len(values), -(-values.shape[1] // 256) * block_bytes)
    with np.errstate(all="ignore"):
        assert stored.tobytes() == rule(values).tobytes()


@pytest.mark.parametrize("dtype", sorted(SEARCHED))
@pytest.mark.parametrize("case", sorted(C_QUANTIZER_CASES))
def test_the_converters_c_search_takes_bf16_rows_as_stored_and_gives_the_bytes_of_their_values(dtype, case):
    # a bf16 checkpoint's rows reach the quantizer as bit patterns (uint16), widened there
    rule, quantizer, _ = SEARCHED[dtype]
    bits = float32_to_bf16_bits(C_QUANTIZER_CASES[case](np.random.default_rng(1)))
    with np.errstate(all="ignore"):
        assert quantizer(bits).tobytes() == rule(to_float32(bits, "bf16")).tobytes()


@pytest.mark.parametrize("dtype", sorted(SEARCHED))
def test_the_converters_c_search_refuses_scales_beyond_f16(dtype):
    with pytest.raises(OverflowError, match="exceeds the f16 range"):
        SEARCHED[dtype][1](np.full((1, 4), 1e10, np.float32) * np.arange(1, 5, dtype=np.float32))


# ---- The q8 products ----

# Odd sizes (n, inputs, outputs) of each dtype: rows ending inside a block (of 32 for q8, 256 for q4 and q6).
ODD_SIZES = {
    "q8": [(1, 1, 1), (1, 67, 13), (1, 600, 7), (3, 15, 5), (5, 17, 7), (7, 33, 9), (37, 129, 11), (33, 1023, 6), (2, 8, 16),
           (9, 96, 21)],
    "q4": [(1, 1, 1), (1, 67, 13), (3, 255, 5), (5, 257, 7), (7, 513, 9), (37, 300, 11), (2, 1024, 6), (9, 96, 21)],
    "q6": [(1, 1, 1), (1, 67, 13), (3, 255, 5), (5, 257, 7), (7, 513, 9), (37, 300, 11), (2, 1024, 6), (9, 96, 21)],
}
# dtype: (quantize, dequantize, values per block of the activations' scale)
QUANTIZERS = {"q8": (quantize_q8, dequantize_q8, 32), "q4": (quantize_q4, dequantize_q4, 256),
              "q6": (quantize_q6, dequantize_q6, 256)}


def quantized_weights(dtype, rng, out, inputs):
    quantize, dequantize, _ = QUANTIZERS[dtype]
    blocks = quantize(rng.standard_normal((out, inputs), dtype=np.float32))
    return blocks.view(np.uint8).reshape(out, -1), dequantize(blocks, inputs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,n,inputs,outputs", [(d, *size) for d, sizes in ODD_SIZES.items() for size in sizes])
def test_every_quantized_product_gives_the_bits_of_the_generic_one(isa, dtype, n, inputs, outputs):
    rng = np.random.default_rng(n * 1000 + inputs)
    x = rng.standard_normal((n, inputs), dtype=np.float32)
    stored, dequantized = quantized_weights(dtype, rng, outputs, inputs)
    got = _core.matmul(x, stored, dtype, isa)
    assert got.shape == (n, outputs)
    assert np.array_equal(got, _core.matmul(x, stored, dtype, "generic"))
    # against the exact product of the stored weights: only the activations' rounding (half a
    # step of their block scale per value) and the f32 sums differ
    block = QUANTIZERS[dtype][2]
    steps = np.abs(np.pad(x, [(0, 0), (0, -inputs % block)])).reshape(n, -1, block).max(-1) / 127
    bound = (np.repeat(steps, block, axis=1)[:, :inputs] / 2) @ np.abs(dequantized).T.astype(np.float64)
    exact = x.astype(np.float64) @ dequantized.T.astype(np.float64)
    assert np.all(np.abs(got - exact) <= bound * 1.001 + 1e-5 * (np.abs(x) @ np.abs(dequantized).T))


@pytest.mark.parametrize("isa", ISAS)
def test_extreme_stored_values_give_the_same_bits_everywhere(isa):
    # a hostile file may hold -128, which the converter never writes, and f16 scales of any sign
    rng = np.random.default_rng(5)
    for row_blocks in (5, 6):  # decode's single token takes blocks in pairs: an odd one left, or none
        blocks = np.zeros((6, row_blocks), Q8_BLOCK_DTYPE)
        blocks["q"] = rng.choice([-128, -127, 127, 0, 1], size=blocks["q"].shape)
        blocks["d"] = rng.choice([-2.0, 0.5, 6e-8, 65504.0], size=blocks["d"].shape)
        stored = blocks.view(np.uint8).reshape(6, -1)
        x = rng.standard_normal((11, 32 * row_blocks - 10), dtype=np.float32)
        for tokens in (x, x[:3], x[:1]):  # prefill's tiles, decode's batch, and its single token
            assert np.array_equal(_core.matmul(tokens, stored, "q8", isa), _core.matmul(tokens, stored, "q8", "generic"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", sorted(QUANTIZERS))
def test_every_batch_size_gives_the_bits_of_the_generic_product(isa, dtype):
    # Batches of more than 4 tokens take tiles of several rows and tokens (q8 with VNNI: 2 rows x 8
    # tokens, pairs of blocks): every partial tile of tokens and of rows, rows of an odd or even
    # number of blocks, and a batch past the 128-token panel.
    rng = np.random.default_rng(3)
    block = 32 if dtype == "q8" else 256
    for blocks in (9, 10):
        stored, _ = quantized_weights(dtype, rng, 7, block * blocks - 5)
        x = rng.standard_normal((131, block * blocks - 5), dtype=np.float32)
        for n in list(range(1, 18)) + [131]:
            assert np.array_equal(_core.matmul(x[:n], stored, dtype, isa), _core.matmul(x[:n], stored, dtype, "generic"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", sorted(QUANTIZERS))
def test_a_token_gives_the_same_bits_alone_or_in_any_batch(isa, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 301), dtype=np.float32)
    stored, _ = quantized_weights(dtype, rng, 19, 301)
    full = _core.matmul(x, stored, dtype, isa)
    for t in (0, 5, 22):
        assert np.array_equal(_core.matmul(x[t:t + 1], stored, dtype, isa)[0], full[t])


def test_a_q8_product_checks_the_row_size():
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(np.ones((2, 33), np.float32), np.zeros((3, 34), np.uint8), "q8", "generic")


# ---- Conversion ----

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Untied, odd widths: hidden 72 (2 blocks and a padded one), o_proj and down_proj at tp 2
    48 and 50 columns per rank (each rank's slice padded to whole blocks)."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), tie=False, hidden_size=72, intermediate_size=100,
                           head_dim=24, vocab_size=389, trained_like=True)


@pytest.fixture(scope="module")
def q8_model(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "model"
    convert(checkpoint, out, tp=2, dtype="q8")
    return out


@pytest.fixture(scope="module", params=["q8", "q4", "q6"])
def quantized_model(request, checkpoint, q8_model, tmp_path_factory):
    """(dtype, directory): the checkpoint at tp 2 in each quantized dtype (the tests below hold for
    all; tests/test_quant_q4.py and tests/test_quant_q6.py have q4's and q6's own)."""
    if request.param == "q8":
        return "q8", q8_model
    out = tmp_path_factory.mktemp(request.param) / "model"
    convert(checkpoint, out, tp=2, dtype=request.param)
    return request.param, out


def test_a_q8_conversion_validates_and_quantizes_each_ranks_slice(checkpoint, q8_model):
    assert formats.validate(q8_model).ok
    converted = formats.open(q8_model)
    assert converted.manifest["format_version"] == [1, 3] and converted.layout["dtype"] == "q8"
    record = converted.ranks[1].tensors[O_PROJ]
    assert record["dtype"] == "q8" and record["shape"] == [72, 48] and record["nbytes"] == 72 * 2 * 34
    assert converted.ranks[0].tensors["model.norm.weight"]["dtype"] == "f32"
    from safetensors.numpy import load_file
    source = load_file(checkpoint / "model.safetensors")
    for name in (O_PROJ, DOWN, "model.embed_tokens.weight", "lm_head.weight"):
        values = source[name]
        # blocks start at each rank's first column: the rank's slices quantized on their own
        halves = np.array_split(values, 2, axis=1) if name in (O_PROJ, DOWN) else [values]
        want = np.concatenate([dequantize_q8(quantize_q8(h), h.shape[1]) for h in halves], axis=1)
        assert np.array_equal(formats.gather(q8_model, name), want), name


@pytest.mark.parametrize("isa", ISAS)
def test_a_quantized_model_gives_the_logits_of_the_generic_kernels_with_every_instruction_set(quantized_model, monkeypatch, isa):
    # The quantized products are the same bits everywhere (above, tests/test_quant_q4.py, _q6.py); the
    # attention kernels of each instruction set round differently (measured: 1e-6 apart here), so
    # the logits are compared within 1e-5, far below what a wrong block or scale gives (1e-2 and more
    # at every position). Such a difference may also move an activation across a rounding boundary
    # of its quantization, which moves that position's logits by about a step of the activations
    # (seen with q6: one position of 21 by 0.0097, every other within 2e-6); one position may.
    _, model = quantized_model
    ids = list(np.random.default_rng(3).integers(0, 389, 21))
    monkeypatch.setenv("QWEN3PACK_ISA", "generic")
    with runtime.load(model, threads=2) as m:
        want = m.logits(ids)
    monkeypatch.setenv("QWEN3PACK_ISA", isa)
    with runtime.load(model, threads=2) as m:
        got = m.logits(ids)
        distance = np.abs(got - want).max(axis=1)
        assert np.sum(distance > 1e-5) <= 1 and distance.max() <= 0.03, distance
        assert np.array_equal(m.logits(ids[:7]), got[:7])  # a shorter prefill: the same bits


def test_a_quantized_conversion_is_the_same_bytes_twice(checkpoint, quantized_model, tmp_path):
    dtype, model = quantized_model
    convert(checkpoint, tmp_path / "again", tp=2, dtype=dtype)
    for file in ("manifest.json", "rank-00000-of-00002.q3p", "rank-00001-of-00002.q3p"):
        assert (tmp_path / "again" / file).read_bytes() == (model / file).read_bytes()


def test_a_damaged_quantized_file_is_refused_naming_the_tensor(quantized_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(quantized_model[1], copy)
    path = copy / "rank-00000-of-00002.q3p"
    data = bytearray(path.read_bytes())
    data[formats.open(copy).ranks[0].tensors[DOWN]["offset"] + 20] ^= 0x10  # a value of the first block
    path.write_bytes(data)
    assert formats.validate(copy).problems == [f"{path.name}: tensor {DOWN}: checksum mismatch (the data is damaged)"]
    with pytest.raises(FormatError, match=f"tensor '{DOWN}': CRC32C mismatch"):
        runtime.load(copy, verify="full")
    path.write_bytes(data[:-4096])
    with pytest.raises(FormatError, match=f"{path.name}: truncated"):
        runtime.load(copy)


# o_proj [72, 48] per rank with one byte a value (q8), half a byte (q4) or 6 bits (q6), as if the
# blocks had no scales
BLOCKLESS_NBYTES = {"q8": 72 * 48, "q4": 72 * 48 // 2, "q6": 72 * 48 * 6 // 8}


def test_the_loader_refuses_a_quantized_record_whose_size_is_not_whole_blocks(quantized_model):
    dtype, model = quantized_model
    converted = formats.open(model)
    ranks = runtime.model.rank_sources(converted)
    record = next(r for r in ranks[0]["tensors"] if r["name"] == O_PROJ)
    record["nbytes"] = BLOCKLESS_NBYTES[dtype]
    with pytest.raises(ValueError, match=f"tensor '{O_PROJ}': nbytes {record['nbytes']} differs from shape "
                                         f"\\[72, 48\\] of {dtype}"):
        _core.Engine(converted.model, converted.layout, ranks, 1, 64, False)


def test_keep_sets_the_dtype_of_groups_of_weights(checkpoint, tmp_path):
    convert(checkpoint, tmp_path / "out", dtype="q8", keep="lm_head=f32, embed=bf16")
    converted = formats.open(tmp_path / "out")
    assert converted.layout["dtype_overrides"] == {"embed": "bf16", "lm_head": "f32"}
    dtypes = {name: r["dtype"] for name, r in converted.ranks[0].tensors.items()}
    assert dtypes["model.embed_tokens.weight"] == "bf16" and dtypes["lm_head.weight"] == "f32"
    assert dtypes[O_PROJ] == "q8" and dtypes["model.norm.weight"] == "f32"
    assert converted.manifest["provenance"]["options"]["keep"] == {"embed": "bf16", "lm_head": "f32"}
    assert formats.validate(tmp_path / "out").ok
    with runtime.load(tmp_path / "out") as m:
        assert np.isfinite(m.logits([1, 2, 3])).all()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert "tp 1, q8 weights, embed bf16, lm_head f32" in result.output


def test_a_weight_beyond_q8s_range_is_refused_naming_its_tensor_and_nothing_is_left(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file
    source = tmp_path / "hf"
    shutil.copytree(checkpoint, source)
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = 1e7  # a scale of 78740, beyond f16's 65504
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight: value 1e\+07 "
                                              r"exceeds the q8 range .*--keep GROUP=bf16 or f32"):
        convert(source, tmp_path / "out", dtype="q8")
    assert not (tmp_path / "out").exists()


def test_a_bf16_weight_beyond_q8s_range_is_refused_naming_its_value(tmp_path):
    # the quantizer takes a bf16 checkpoint's rows as stored; the message gives the value they hold
    source = make_checkpoint(tmp_path / "hf", dtype="bf16")
    path = source / "model.safetensors"
    raw = bytearray(path.read_bytes())
    header_length = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8:8 + header_length])["model.layers.1.mlp.up_proj.weight"]
    at = 8 + header_length + entry["data_offsets"][0] + (3 * entry["shape"][1] + 5) * 2
    raw[at:at + 2] = float32_to_bf16_bits(np.array([1e7], np.float32)).tobytes()  # 10027008 in bf16
    path.write_bytes(raw)
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight: value 1\.0027e\+07 "
                                              r"exceeds the q8 range"):
        convert(source, tmp_path / "out", dtype="q8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep,message", [
    ("head=q8", "--keep: 'head=q8' is not GROUP=DTYPE with a group of embed, lm_head"),
    ("embed=q3", "--keep: 'embed=q3' is not GROUP=DTYPE"),
    ("embed", "--keep: 'embed' is not GROUP=DTYPE"),
    ("embed=q8,embed=f32", "--keep: embed is given twice"),
])
def test_a_bad_keep_is_refused_naming_it(checkpoint, tmp_path, keep, message):
    with pytest.raises(SourceError, match=message):
        convert(checkpoint, tmp_path / "out", dtype="q8", keep=keep)
    assert not (tmp_path / "out").exists()


def test_the_command_line_refuses_bad_dtypes_and_overrides(checkpoint, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(checkpoint), str(tmp_path / "a"), "--dtype", "q3"])
    assert result.exit_code != 0 and "'q3' is not one of" in result.output
    result = CliRunner().invoke(main, ["convert", str(checkpoint), str(tmp_path / "b"), "--keep", "mlp=q8"])
    assert result.exit_code == 1 and "error: --keep: 'mlp=q8' is not GROUP=DTYPE" in result.output


def test_the_output_head_of_a_tied_model_is_its_embedding(tmp_path):
    tied = make_checkpoint(tmp_path / "hf", tie=True)
    with pytest.raises(LayoutError, match="lm_head: the model ties its embeddings.*set embed instead"):
        convert(tied, tmp_path / "out", dtype="q8", keep="lm_head=bf16")


def test_a_q8_model_whose_rank_slices_are_padded_blocks_is_not_resharded(q8_model, tmp_path):
    # resharded in whole blocks only (tests/test_reshard.py): here o_proj's 48 columns a rank end in a padded block
    with pytest.raises(ConversionError, match="its q8 o_proj weights cannot be resharded to tp 1: at tp 2 a rank "
                                              "holds 48 of their columns, not a whole number of 32-value blocks"):
        reshard(q8_model, tmp_path / "out", tp=1)


def test_a_manifest_with_an_unknown_override_group_is_refused(q8_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(q8_model, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["layout"]["dtype_overrides"] = {"mlp": "bf16"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="dtype_overrides"):
        formats.open(copy)


# ---- Accuracy ----

# Measured on this checkpoint (4 layers, hidden 256, trained-like weights: 1% of the input columns
# 8 times larger, logits of standard deviation 2.4), 8 prompts of 64 tokens, against transformers
# in float32: q8 mean KL 0.0075, top-1 94.1%, largest logit error 0.96 (bf16 weights, from our
# f32 runtime on other prompts: mean KL 0.00028, top-1 98.6%). The outlier columns set the scale
# of a quarter of the blocks, whose other values get 8 times coarser steps. The bounds leave a
# margin of about 2.5x; a wrong scale, block or lane order gives a KL of order 1.
Q8_MAX_MEAN_KL, Q8_MIN_TOP1 = 0.02, 0.85


@pytest.fixture(scope="module")
def accuracy_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    source = make_checkpoint(root / "hf", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                             trained_like=True)
    for dtype in ("f32", "q8"):
        convert(source, root / dtype, dtype=dtype)
    return source, root


def test_q8_logits_keep_to_the_measured_distance_from_transformers(accuracy_models):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    source, root = accuracy_models
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(8)]
    reference = transformers_logits(source, prompts)
    assert logit_agreement(reference, runtime_logits(root / "f32", prompts))["max_logit_error"] < 1e-3
    q8 = logit_agreement(reference, runtime_logits(root / "q8", prompts))
    assert q8["mean_kl"] <= Q8_MAX_MEAN_KL and q8["top1"] >= Q8_MIN_TOP1, q8


def test_q8_logits_are_those_of_its_dequantized_weights_but_for_the_activations_rounding(accuracy_models, tmp_path):
    # The same model with the stored q8 values as f32 weights: what remains is the activations'
    # quantization (measured: mean KL 0.0021, top-1 96.5%), so any error of the kernels or scales shows.
    from safetensors.numpy import load_file, save_file
    source, root = accuracy_models
    shutil.copytree(source, tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    tensors = {k: dequantize_q8(quantize_q8(v), v.shape[1]) if v.ndim == 2 else v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    convert(tmp_path / "hf", tmp_path / "dequantized", dtype="f32")
    prompts = [np.random.default_rng(seed).integers(0, 1024, 64).tolist() for seed in range(4)]
    got = logit_agreement(runtime_logits(tmp_path / "dequantized", prompts), runtime_logits(root / "q8", prompts))
    assert got["mean_kl"] <= 0.005 and got["top1"] >= 0.9, got
