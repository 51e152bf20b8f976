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
from qwen3pack.testing import make_checkpoint

ISAS = _core.supported_isas()
SIMD_ISAS = [isa for isa in ISAS if isa != "generic"]
# Sizes that are not multiples of the vector width (8 or 16), the row tile (4) or the token tile:
# (tokens, in, out).
ODD_SIZES = [(1, 1, 1), (1, 67, 13), (3, 15, 5), (5, 17, 7), (7, 33, 9), (37, 129, 11), (33, 1023, 6), (2, 8, 16)]


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


def test_matmul_checks_its_arguments():
    x = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(x, np.ones((3, 5), dtype=np.float32), "f32", "generic")
    with pytest.raises(ValueError, match="w must be"):
        _core.matmul(x, np.ones((3, 4), dtype=np.uint16), "f32", "generic")
    with pytest.raises(ValueError, match="QWEN3PACK_ISA=sse9"):
        _core.matmul(x, np.ones((3, 4), dtype=np.float32), "f32", "sse9")


@pytest.mark.parametrize("isa", ISAS)
def test_the_fma_peak_is_measured(isa):
    assert _core.fma_peak_flops(isa, 0.01) > 1e8


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


def logits_with(monkeypatch, isa, model, ids):
    monkeypatch.setenv("QWEN3PACK_ISA", isa)
    with runtime.load(model, threads=2) as m:
        assert m._engine.isa == isa
        return m.logits(ids)


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_every_kernel_gives_the_logits_of_the_generic_kernel(monkeypatch, models, isa, dtype):
    ids = list(np.random.default_rng(2).integers(0, 389, 29))
    want = logits_with(monkeypatch, "generic", models[dtype], ids)
    got = logits_with(monkeypatch, isa, models[dtype], ids)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


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
