"""Attention in tiles with an online softmax, for every instruction set this machine runs
(QWEN3PACK_ISA), against a plain numpy softmax; the same bits for a token whatever its batch; and
the bf16 KV cache: what it costs in accuracy, and that it halves the cache; the cache's blocks."""
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qwen3pack import _core, runtime
from qwen3pack.convert import convert
from qwen3pack.testing import huge_pages_enabled, make_checkpoint

ISAS = _core.supported_isas()
TILE = _core.ATTENTION_TILE


def reference_attention(q, k, v, scale):
    """softmax(scale q k^T) v in float64, over all the keys at once."""
    scores = scale * (q.astype(np.float64) @ k.astype(np.float64).T)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v.astype(np.float64)


def as_bf16(x):
    """(bit patterns, the float64 values they hold)."""
    half = x.astype(ml_dtypes.bfloat16)
    return half.view(np.uint16), half.astype(np.float64)


# (query heads G, head dim D, keys n, position of the first key): D and n are not multiples of the
# vector width (8, 16) or of the tile; a first position off the tile grid is a sliding window whose
# first tile is cut, and a key count past it ends on a partial tile.
ODD_SHAPES = [(1, 1, 1, 0), (2, 128, 1, 5), (2, 128, 200, 0), (3, 24, TILE + 1, TILE - 1), (5, 129, 130, 37),
              (1, 17, 3 * TILE, 0), (9, 40, 65, 100), (4, 7, 2, 63), (2, 256, 150, 1)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv_dtype", ["f32", "bf16"])
@pytest.mark.parametrize("G,D,n,first", ODD_SHAPES)
def test_attention_matches_a_plain_softmax_on_odd_sizes(isa, kv_dtype, G, D, n, first):
    rng = np.random.default_rng(G * 1000 + D + n)
    q = rng.standard_normal((G, D), dtype=np.float32) * np.float32(3)  # peaked: the running max moves
    ld = D + 3  # rows of the cache hold other KV heads too
    k = rng.standard_normal((n, ld), dtype=np.float32)
    v = rng.standard_normal((n, ld), dtype=np.float32)
    scale = D ** -0.5
    if kv_dtype == "bf16":
        (k, exact_k), (v, exact_v) = as_bf16(k), as_bf16(v)
    else:
        exact_k, exact_v = k, v
    want = reference_attention(q, exact_k[:, :D], exact_v[:, :D], scale)
    got = _core.attention(q, k, v, kv_dtype, first, scale, isa)
    assert got.shape == (G, D) and got.dtype == np.float32
    # Softmax weights within a few f32 ulps each, outputs averages of values of order 1.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("G,D,n,first", ODD_SHAPES)
def test_with_bf16_activations_a_bf16_cache_attends_within_a_rounding_of_each_weight(isa, G, D, n, first):
    # load(..., activations="bf16") with a bf16 cache: the queries are rounded to bf16, and so is
    # each weight exp(score - max) before it is summed and weights the values, for the CPU's bf16
    # dot product. Weights each moved by at most 2^-9 of themselves move the weighted average by
    # at most 2^-8 / (1 - 2^-9) of the largest value (their sum moves with them).
    rng = np.random.default_rng(G * 1000 + D + n)
    q = rng.standard_normal((G, D), dtype=np.float32) * np.float32(3)
    (k, exact_k), (v, exact_v) = (as_bf16(rng.standard_normal((n, D + 3), dtype=np.float32)) for _ in range(2))
    scale = D ** -0.5
    want = reference_attention(as_bf16(q)[1], exact_k[:, :D], exact_v[:, :D], scale)
    got = _core.attention(q, k, v, "bf16", first, scale, isa, "bf16")
    bound = 2.0**-8 / (1 - 2.0**-9) * np.abs(exact_v[:, :D]).max() + 2e-6
    assert np.abs(got - want).max() <= bound


@pytest.mark.parametrize("isa", ISAS)
def test_with_bf16_activations_the_query_and_each_weight_are_rounded_to_bf16(isa):
    # A query of 1.005859375 (1 + 3 * 2^-9) is rounded to 1.0078125; against keys 0 and -300,
    # scale 1/256, the scores are 0 and -1.0078125 * 300 / 256 = -1.18103..., whose weight
    # exp(-1.18103...) = 0.30696... is rounded to bf16 0.306640625. The output is that weight
    # over the sum of both (unrounded, 0.2358 instead of 0.2347). An f32 cache keeps f32 attention.
    D = 32
    q = np.zeros((1, D), dtype=np.float32)
    q[0, 0] = 1.005859375
    k, v = np.zeros((2, D), dtype=np.float32), np.zeros((2, D), dtype=np.float32)
    k[1, 0], v[1] = -300.0, 1.0
    (k_bits, _), (v_bits, _) = as_bf16(k), as_bf16(v)
    got = _core.attention(q, k_bits, v_bits, "bf16", 0, 1 / 256, isa, "bf16")
    np.testing.assert_allclose(got[0], np.full(D, 0.306640625 / 1.306640625), rtol=1e-6)
    weight = np.exp(-1.005859375 * 300 / 256)
    np.testing.assert_allclose(_core.attention(q, k, v, "f32", 0, 1 / 256, isa, "bf16")[0], weight / (1 + weight), rtol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_one_dominant_key_in_a_late_tile_rescales_the_earlier_tiles(isa):
    # The first tiles' outputs were summed against a smaller running max; the late key's score
    # is 80 above the others: their weight falls to exp(-80), and the output is its value.
    D, n = 32, 3 * TILE + 5
    q = np.zeros((1, D), dtype=np.float32)
    q[0, 0] = 1.0
    k = np.zeros((n, D), dtype=np.float32)
    k[-2, 0] = 80.0
    v = np.arange(n * D, dtype=np.float32).reshape(n, D) / np.float32(n * D)
    got = _core.attention(q, k, v, "f32", 0, 1.0, isa)
    np.testing.assert_allclose(got[0], v[-2], rtol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv_dtype,activations", [("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16")])
def test_a_querys_result_depends_only_on_its_own_keys_and_tiles(isa, kv_dtype, activations):
    # The engine cuts tiles at multiples of the tile size in absolute positions: the same keys at
    # the same positions give the same bits, however they are read; and a head's bits do not
    # depend on the heads beside it in a tile (query blocks put several tokens' heads in one
    # tile): 11 heads take passes of 4, 2 and 1 heads, in two groups of at most 8.
    rng = np.random.default_rng(3)
    q = rng.standard_normal((11, 64), dtype=np.float32)
    k = rng.standard_normal((150, 64), dtype=np.float32)
    v = rng.standard_normal((150, 64), dtype=np.float32)
    if kv_dtype == "bf16":
        (k, _), (v, _) = as_bf16(k), as_bf16(v)

    def attend(heads, keys, values):
        return _core.attention(heads, keys, values, kv_dtype, 30, 0.125, isa, activations)

    a = attend(q, k, v)
    assert np.array_equal(a, attend(q, k.copy(), v.copy()))
    for g in range(11):
        assert np.array_equal(attend(q[g:g + 1], k, v)[0], a[g])
        assert np.array_equal(attend(q[g:g + 3], k, v)[0], a[g])


def test_bf16_rounding_is_to_nearest_even_as_ml_dtypes():
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(10000, dtype=np.float32) * np.float32(100),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, 1.00390625, 1.01171875],
                                 dtype=np.float32)])  # the last two: ties, to even down and up
    np.testing.assert_array_equal(_core.to_bf16(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    assert np.isnan(_core.to_bf16(np.array([np.nan], dtype=np.float32)).view(ml_dtypes.bfloat16)[0])


def test_attention_checks_its_arguments():
    q = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="must be"):
        _core.attention(q, np.ones((3, 7), dtype=np.float32), np.ones((3, 7), dtype=np.float32), "f32", 0, 1.0, "")
    with pytest.raises(ValueError, match="kv_dtype"):
        _core.attention(q, np.ones((3, 8), dtype=np.uint16), np.ones((3, 8), dtype=np.uint16), "f16", 0, 1.0, "")


# ---------------------------------------------------------------------------------------------
# The engine: several tiles, sliding layers whose ring wraps inside a tile


LONG = 3 * TILE + 11  # positions of the sequences below


@pytest.fixture(scope="module")
def sliding_checkpoint(tmp_path_factory):
    """Full and sliding layers (window 37: the ring wraps inside a tile), 4 query heads on 2 KV heads."""
    return make_checkpoint(tmp_path_factory.mktemp("hf"), num_hidden_layers=3, use_sliding_window=True,
                           sliding_window=37, layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory, sliding_checkpoint):
    out = tmp_path_factory.mktemp("q3p") / "model"
    convert(sliding_checkpoint, out, tp=1)
    return out


@pytest.fixture(scope="module")
def sliding_model_bf16(tmp_path_factory, sliding_checkpoint):
    out = tmp_path_factory.mktemp("q3p") / "model-bf16"
    convert(sliding_checkpoint, out, tp=1, dtype="bf16")
    return out


def ids_of(n, seed):
    return np.random.default_rng(seed).integers(0, 384, n).tolist()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weights,kv_dtype,activations", [("f32", "f32", "f32"), ("f32", "bf16", "f32"),
                                                          ("bf16", "bf16", "bf16")])
def test_a_token_gets_the_same_bits_in_prefill_decode_and_any_batch(monkeypatch, sliding_model, sliding_model_bf16, isa,
                                                                     weights, kv_dtype, activations):
    monkeypatch.setenv("QWEN3PACK_ISA", isa)
    ids = ids_of(LONG, 5)
    model = sliding_model_bf16 if weights == "bf16" else sliding_model
    with runtime.load(model, threads=2, kv_dtype=kv_dtype, activations=activations) as m:
        prefill = m.logits(ids)
        decode = m.session()
        for i, token in enumerate(ids):
            assert np.array_equal(decode.append([token]), prefill[i]), i
        chunked = m.session()
        for start in range(0, LONG, 50):
            got = chunked._core.append(np.array(ids[start:start + 50], dtype=np.int32), True)
            assert np.array_equal(got, prefill[start:start + 50])
        # In one batch with a longer prefill and a decode at another position.
        other = m.session()
        other.append(ids_of(100, 6))
        a, b = m.session(), m.session()
        a.append(ids[:-1])
        got = m.append_batch([a, other, b], [ids[-1:], [7], ids_of(90, 7)])
        assert np.array_equal(got[0], prefill[-1])


@pytest.fixture(scope="module")
def measured(sliding_model):
    """Next-token distributions of the f32 and bf16 caches over the same 250 tokens: the f32
    cache's greedy continuation of a 20-token prompt, fed to both."""
    prompt = ids_of(20, 8)
    with runtime.load(sliding_model, threads=2) as m:
        ids = prompt + list(m.generate(prompt, max_new_tokens=230))
        f32 = m.logits(ids)
        f32_bytes = m.session()
        f32_bytes.append(ids)
        f32_bytes = f32_bytes.kv_cache_bytes
    with runtime.load(sliding_model, threads=2, kv_dtype="bf16") as m:
        assert m.kv_dtype == "bf16"
        bf16 = m.logits(ids)
        s = m.session()
        s.append(ids)
        bf16_bytes = s.kv_cache_bytes
    return f32.astype(np.float64), bf16.astype(np.float64), f32_bytes, bf16_bytes


def log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_the_bf16_kv_cache_stays_close_to_f32(measured):
    # Measured on this model (see the README): mean KL 2.0e-6, top-1 agreement 100%, largest
    # logit error 0.047 (0.18% of the largest logit, 25.4). The bounds leave 2.5-5x of room.
    f32, bf16, _, _ = measured
    assert np.abs(f32).max() > 10.0
    lp, lq = log_softmax(f32), log_softmax(bf16)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    assert kl.mean() < 1e-5
    assert np.abs(f32 - bf16).max() < 0.005 * np.abs(f32).max()
    assert (f32.argmax(axis=1) == bf16.argmax(axis=1)).mean() >= 0.99
    assert np.abs(f32 - bf16).max() > 0  # the keys and values really are rounded


SLOT_BYTES = 2 * 2 * 32 * 4  # a position of a layer in the f32 cache: keys and values, 2 KV heads of 32 values


def test_the_bf16_kv_cache_holds_half_the_bytes(measured):
    _, _, f32_bytes, bf16_bytes = measured
    # 250 positions: the full layer in 4 blocks of TILE, the two sliding layers' rings of 37.
    assert f32_bytes == (4 * TILE + 2 * 37) * SLOT_BYTES
    assert bf16_bytes * 2 == f32_bytes


def test_bf16_sessions_fork_truncate_and_reset(sliding_model):
    ids = ids_of(120, 9)
    with runtime.load(sliding_model, threads=1, kv_dtype="bf16") as m:
        want = m.logits(ids)
        s = m.session()
        s.append(ids[:100])
        f = s.fork()
        np.testing.assert_array_equal(f.append(ids[100:]), want[-1])
        np.testing.assert_array_equal(s.append(ids[100:101]), want[100])
        s.truncate(s.position - 1)  # within the window: allowed
        np.testing.assert_array_equal(s.append(ids[100:101]), want[100])
        s.reset()
        np.testing.assert_array_equal(s.append(ids[:10]), want[9])


def test_a_full_layer_grows_by_blocks_of_a_tile_of_positions_up_to_max_context(sliding_model):
    # Nothing is copied as a sequence grows; a sliding layer's ring is allocated whole.
    max_context = 2 * TILE + 5
    rings = 2 * 37 * SLOT_BYTES
    with runtime.load(sliding_model, threads=1, max_context=max_context) as m:
        s = m.session()
        assert s.kv_cache_bytes == 0
        for appended, full_layer_slots in ((1, TILE), (TILE - 1, TILE), (1, 2 * TILE), (TILE - 1, 2 * TILE),
                                           (1, max_context), (4, max_context)):
            s.append(ids_of(appended, appended))
            assert s.kv_cache_bytes == rings + full_layer_slots * SLOT_BYTES, s.position
        assert s.fork().kv_cache_bytes == s.kv_cache_bytes


def test_sessions_on_the_blocks_of_dropped_sessions_compute_what_a_fresh_model_does(sliding_model):
    # A model keeps the blocks of the caches it drops for its next ones, with the keys and values
    # they held: a cache reads only what it wrote.
    max_context = 2 * TILE + 5
    ids = ids_of(max_context, 12)
    with runtime.load(sliding_model, threads=1, max_context=max_context) as fresh:
        want = fresh.logits(ids)
    with runtime.load(sliding_model, threads=1, max_context=max_context) as m:
        for seed in range(3):
            s = m.session()
            s.append(ids_of(max_context - 1 - seed, 20 + seed))
            s.fork().append([seed])
            del s
        np.testing.assert_array_equal(m.logits(ids), want)
        s = m.session()
        for i, token in enumerate(ids):
            np.testing.assert_array_equal(s.append([token]), want[i])


def anon_huge_bytes():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no AnonHugePages in /proc/self/smaps_rollup")


@pytest.fixture(scope="module")
def model_of_2mb_blocks(tmp_path_factory):
    """8 layers x 4 KV heads x (K + V) x TILE positions x 128 values x 4 bytes: 2 MB a block."""
    source = make_checkpoint(tmp_path_factory.mktemp("hf"), num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=128)
    out = tmp_path_factory.mktemp("q3p") / "model"
    convert(source, out, tp=1)
    return out


@pytest.mark.skipif(not huge_pages_enabled(), reason="no transparent huge pages")
def test_a_block_of_2mb_or_more_is_mapped_in_2mb_pages(model_of_2mb_blocks):
    with runtime.load(model_of_2mb_blocks, threads=1) as m:
        s = m.session()
        before = anon_huge_bytes()
        s.append(ids_of(TILE + 1, 13))  # two blocks
        assert s.kv_cache_bytes == 2 * (2 << 20)
        assert anon_huge_bytes() - before >= 2 * (2 << 20)


def test_a_block_is_one_mapping_of_the_process(model_of_2mb_blocks):
    # Its 2 MB alignment's slack is unmapped: a process has at most vm.max_map_count mappings
    # (65530), and a long sequence is hundreds of blocks.
    def mappings():
        return len(Path("/proc/self/maps").read_text().splitlines())

    with runtime.load(model_of_2mb_blocks, threads=1) as m:
        s = m.session()
        s.append(ids_of(TILE, 14))  # the first block, and the engine's buffers for TILE tokens
        before = mappings()
        for seed in range(6):
            s.append(ids_of(TILE, 15 + seed))
        assert s.kv_cache_bytes == 7 * (2 << 20)
        assert mappings() - before <= 6


def test_kv_dtype_is_checked_at_load(sliding_model):
    for bad in ("f16", "fp32", "BF16", None):
        with pytest.raises(ValueError, match=r"kv_dtype must be one of \('auto', 'f32', 'bf16'\)"):
            runtime.load(sliding_model, kv_dtype=bad)
    with runtime.load(sliding_model, threads=1) as m:
        assert m.kv_dtype == "f32" and "kv_dtype=f32" in repr(m)
