"""The matrix kernels of every instruction set this machine runs (QWEN3PACK_ISA) against the
generic one: the same products on odd sizes, the same logits, and the transformers parity suite."""
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen3pack import _core, runtime
from qwen3pack.convert import convert
from qwen3pack.testing import BF16_ACTIVATIONS_ATOL, make_checkpoint

ISAS = _core.supported_isas()
SIMD_ISAS = [isa for isa in ISAS if isa != "generic"]
# Sizes that are not multiples of the vector width (8 or 16), the row tile (4) or the token tile:
# (tokens, in, out). (9, 100, 25): rows enough for the 6-row tiles' first tile to ask for the next
# tile's rows as it reads (matmul_avx512's comment), over several steps and a masked last one.
ODD_SIZES = [(1, 1, 1), (1, 67, 13), (3, 15, 5), (5, 17, 7), (7, 33, 9), (37, 129, 11), (33, 1023, 6), (2, 8, 16),
             (9, 100, 25)]


def weights_as(w, dtype):
    """(stored values for _core.matmul, the exact f64 values they hold)."""
    if dtype == "f32":
        return w, w.astype(np.float64)
    half = w.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float16)
    return half.view(np.uint16), half.astype(np.float64)


def test_the_generic_kernel_is_always_there_and_the_default_is_the_widest():
    assert ISAS[0] == "generic"
    assert set(ISAS) <= {"generic", "avx2", "avx512"}
    if "avx512" in ISAS:
        assert "avx2" in ISAS  # the AVX-512 kernel asks for AVX2 too


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("n,inputs,outputs", ODD_SIZES)
def test_matmul_matches_the_exact_product_on_odd_sizes(isa, dtype, n, inputs, outputs):
    rng = np.random.default_rng(n * 1000 + inputs)
    x = rng.standard_normal((n, inputs), dtype=np.float32)
    stored, exact_w = weights_as(rng.standard_normal((outputs, inputs), dtype=np.float32), dtype)
    got = _core.matmul(x, stored, dtype, isa)
    want = x.astype(np.float64) @ exact_w.T
    assert got.shape == (n, outputs) and got.dtype == np.float32
    # f32 sums of `inputs` products: the error grows with the sum of the products' magnitudes.
    bound = 1e-6 * (np.abs(x).astype(np.float64) @ np.abs(exact_w).T) + 1e-30
    assert np.all(np.abs(got - want) <= bound)
    assert np.all(np.abs(got - _core.matmul(x, stored, dtype, "generic")) <= 2 * bound)


@pytest.mark.parametrize("isa", ISAS)
def test_a_token_gives_the_same_bits_alone_or_in_any_batch(isa):
    # Each y value is summed in an order fixed by `in` alone: decode (one token) and prefill (a
    # block of tokens) give the same logits for the same token.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((23, 301), dtype=np.float32)
    stored, _ = weights_as(rng.standard_normal((19, 301), dtype=np.float32), "bf16")
    full = _core.matmul(x, stored, "bf16", isa)
    for t in (0, 5, 22):
        assert np.array_equal(_core.matmul(x[t:t + 1], stored, "bf16", isa)[0], full[t])
    assert np.array_equal(_core.matmul(x[3:10], stored, "bf16", isa), full[3:10])


def test_bf16_activations_are_rounded_to_nearest_even():
    # Through an identity matrix, each output is one rounded activation times 1, plus zeros.
    ties = [1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 2.0 ** -126 * (1 + 2.0 ** -8)]
    x = np.array([ties + [0.1, -0.3, 3.0e38, 1e-3, 0.0, -0.0, 65504.0, 1 / 3]], dtype=np.float32)
    identity = np.eye(x.shape[1], dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert want[0, 0] == 1.0 and want[0, 1] == 1 + 2.0 ** -6  # ties go to the even neighbour
    for isa in ISAS:
        got = _core.matmul(x, identity, "bf16", isa, "bf16")
        assert np.array_equal(got[:, 4:], want[:, 4:]) and np.array_equal(got[:, :3], want[:, :3]), isa
        # vdpbf16ps flushes subnormal inputs to zero; the f32 FMA paths keep them.
        assert got[0, 3] in (0.0, want[0, 3]), isa


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,inputs,outputs", ODD_SIZES + [(9, 64, 9), (130, 45, 9)])
def test_bf16_activations_give_the_exact_product_of_the_rounded_activations(isa, n, inputs, outputs):
    rng = np.random.default_rng(n * 1000 + inputs + 7)
    x = rng.standard_normal((n, inputs), dtype=np.float32)
    stored, exact_w = weights_as(rng.standard_normal((outputs, inputs), dtype=np.float32), "bf16")
    rounded = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    got = _core.matmul(x, stored, "bf16", isa, "bf16")
    want = rounded @ exact_w.T
    # bf16 x bf16 products are exact in f32: only the f32 sums round (the bound of the f32 test).
    bound = 1e-6 * (np.abs(rounded) @ np.abs(exact_w).T) + 1e-30
    assert np.all(np.abs(got - want) <= bound)
    assert np.all(np.abs(got - _core.matmul(x, stored, "bf16", "generic", "bf16")) <= 2 * bound)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("inputs", [301, 333, 320, 31])  # steps of 32 values: 9 and a part, 10 and a part, 10, a part
def test_with_bf16_activations_a_token_gives_the_same_bits_alone_or_in_any_batch(isa, inputs):
    # (AVX-512 sums a row's even and odd steps apart: at once in decode's tiles, in two passes in
    # prefill's, kernels_avx512bf16.cpp)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((133, inputs), dtype=np.float32)  # more than one panel of 128 tokens
    stored, _ = weights_as(rng.standard_normal((19, inputs), dtype=np.float32), "bf16")
    full = _core.matmul(x, stored, "bf16", isa, "bf16")
    for t in (0, 5, 130):
        assert np.array_equal(_core.matmul(x[t:t + 1], stored, "bf16", isa, "bf16")[0], full[t])
    for a, b in ((3, 10), (2, 4), (120, 133)):
        assert np.array_equal(_core.matmul(x[a:b], stored, "bf16", isa, "bf16"), full[a:b])


def test_silu_is_within_a_few_ulp_of_float64_over_the_whole_range():
    # Below -87.3, where exp(-g) leaves f32, silu is -0 (its value is smaller than 1e-35 there).
    gate = np.concatenate([np.linspace(-100, 100, 20001, dtype=np.float32),
                           np.float32([0.0, -0.0, 1e-30, -1e-30, 87.3, -87.3, 88.8, -88.8, 1e38, -1e38])])
    up = np.random.default_rng(0).uniform(0.5, 2.0, gate.size).astype(np.float32)
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        want = g / (1.0 + np.exp(-g)) * up.astype(np.float64)
    got = _core.silu_mul(gate, up).astype(np.float64)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 4 * ulp + 1e-35), np.max((np.abs(got - want) - 1e-35) / ulp)


def test_silu_keeps_the_infinities_and_nan_of_its_formula():
    # silu(inf) = inf, silu(-inf) = -inf / inf = nan, as g / (1 + exp(-g)) gives; NaN stays NaN, so
    # that the engine's finiteness check names the step.
    got = _core.silu_mul(np.float32([np.inf, -np.inf, np.nan]), np.float32([2.0, 2.0, 2.0]))
    assert got[0] == np.inf and np.isnan(got[1]) and np.isnan(got[2])


def test_matmul_checks_its_arguments():
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(x, np.ones((3, 5), dtype=np.float32), "f32", "generic")
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(x, np.ones((3, 4), dtype=np.uint16), "f32", "generic")
    with pytest.raises(ValueError, match="QWEN3PACK_ISA=sse9"):
        _core.matmul(x, np.ones((3, 4), dtype=np.float32), "f32", "sse9")
    with pytest.raises(ValueError, match="activations must be 'f32', or 'bf16' for bf16 weights, got 'bf16'"):
        _core.matmul(x, np.ones((3, 4), dtype=np.float32), "f32", "generic", "bf16")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activations", ["f32", "bf16"])
def test_the_fma_peak_is_measured(isa, activations):
    assert _core.fma_peak_flops(isa, 0.01, activations) > 1e8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One small model per weight dtype, with odd sizes (hidden 72, intermediate 100, vocab 389)."""
    out = {}
    for dtype in ("f32", "bf16", "f16"):
        source = make_checkpoint(tmp_path_factory.mktemp("hf"), dtype=dtype, hidden_size=72, intermediate_size=100,
                                 head_dim=24, vocab_size=389)
        out[dtype] = tmp_path_factory.mktemp("q3p") / "model"
        convert(source, out[dtype], tp=2, dtype=dtype)
    return out


def logits_with(monkeypatch, isa, model, ids, activations="f32"):
    monkeypatch.setenv("QWEN3PACK_ISA", isa)
    with runtime.load(model, threads=2, activations=activations) as m:
        assert m._engine.isa == isa and m._engine.activations == activations
        return m.logits(ids)


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_every_kernel_gives_the_logits_of_the_generic_kernel(monkeypatch, models, isa, dtype):
    ids = list(np.random.default_rng(2).integers(0, 389, 29))
    want = logits_with(monkeypatch, "generic", models[dtype], ids)
    got = logits_with(monkeypatch, isa, models[dtype], ids)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("isa", SIMD_ISAS)
def test_with_bf16_activations_every_kernel_gives_the_logits_of_the_generic_kernel(monkeypatch, models, isa):
    ids = list(np.random.default_rng(2).integers(0, 389, 29))
    want = logits_with(monkeypatch, "generic", models["bf16"], ids, "bf16")
    got = logits_with(monkeypatch, isa, models["bf16"], ids, "bf16")
    # Sums in another order move an activation across a bf16 rounding boundary now and then, and
    # that moves the logits by a rounding's worth: up to 0.047 was measured (logits of order 20),
    # within BF16_ACTIVATIONS_ATOL of transformers either way.
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_ACTIVATIONS_ATOL)
    assert np.abs(got - logits_with(monkeypatch, isa, models["bf16"], ids)).max() > 1e-3  # they are rounded


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("activations", ["f32", "bf16"])
def test_a_token_has_the_same_logits_in_prefill_decoded_alone_or_in_a_batch(monkeypatch, models, isa, activations):
    monkeypatch.setenv("QWEN3PACK_ISA", isa)
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 389, 12)]
    with runtime.load(models["bf16"], threads=2, activations=activations) as m:
        prefill = m.logits(ids)
        alone, other = m.session(), m.session()
        m.append_batch([other], [ids[:5]])
        for t, token in enumerate(ids):
            assert np.array_equal(alone.append([token]), prefill[t])
        batched = m.session()
        m.append_batch([batched], [ids[:6]])
        for t in range(6, 12):  # beside another sequence at another position
            got, _ = m.append_batch([batched, other], [[ids[t]], [ids[t % 5]]])
            assert np.array_equal(got, prefill[t])


def test_bf16_activations_need_bf16_weights_and_a_known_name(models):
    for dtype in ("f32", "f16"):
        with pytest.raises(ValueError, match=f"activations='bf16' needs bf16 weights; this model's are {dtype}"):
            runtime.load(models[dtype], threads=1, activations="bf16")
    with pytest.raises(ValueError, match="activations must be one of"):
        runtime.load(models["bf16"], threads=1, activations="f16")


def test_an_unknown_or_unsupported_isa_is_refused_at_load(monkeypatch, models):
    monkeypatch.setenv("QWEN3PACK_ISA", "avx1024")
    with pytest.raises(ValueError, match="QWEN3PACK_ISA=avx1024 is not an instruction set this machine runs"):
        runtime.load(models["f32"], threads=1)
    monkeypatch.setenv("QWEN3PACK_ISA", "")  # empty: the default
    with runtime.load(models["f32"], threads=1) as m:
        assert m._engine.isa == ISAS[-1]


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa != os.environ.get("QWEN3PACK_ISA", ISAS[-1])])
def test_the_transformers_parity_suite_passes_with_every_kernel(isa):
    # The whole suite already runs with the default kernel (or QWEN3PACK_ISA's); here again with
    # each other one, in a child process that reads the variable at each load.
    suite = Path(__file__).with_name("test_runtime.py")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(suite)],
                          env={**os.environ, "QWEN3PACK_ISA": isa}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
