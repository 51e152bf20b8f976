"""The runtime (qwen3pack.runtime over the C++ core) against transformers' Qwen3 in float32.

Tiny random checkpoints (qwen3pack.testing.make_checkpoint) are converted at tp 1, 2 and 4 and
compared position by position with transformers (torch CPU, float32, eager attention).
"""
import gc
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qwen3pack  # noqa: E402
from qwen3pack import _core, runtime  # noqa: E402
from qwen3pack.convert import convert  # noqa: E402
from qwen3pack.testing import BF16_ACTIVATIONS_ATOL, make_checkpoint  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

# f32 weights, f32 activations on both sides: only the order of the sums differs (about 1e-5 on
# logits of order 10); 1e-3 is the bound.
F32_ATOL = 1e-3

# The model configurations under test (config.json overrides of make_checkpoint). The default
# checkpoint has hidden 64, 4 q heads, 2 KV heads and head_dim 32 (not 64 / 4).
CONFIGS = {
    "head_dim_not_hidden_over_heads": dict(tie=True),
    "untied_one_kv_head": dict(tie=False, num_key_value_heads=1),
    "sliding_window_5_mixed_layers": dict(
        use_sliding_window=True, sliding_window=5, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Longer than the attention tile (64): the online softmax runs over several tiles, and the
    # ring of the sliding layers wraps inside a tile.
    "sliding_window_37_long": dict(
        use_sliding_window=True, sliding_window=37, num_hidden_layers=3,
        layer_types=["full_attention", "sliding_attention", "full_attention"]),
    "yarn_rope": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                      max_position_embeddings=64),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "vocab_383_not_divisible_by_tp": dict(vocab_size=383),
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(config_name, tp, dtype="f32", **checkpoint_kwargs) -> (checkpoint dir, output dir)."""
    made, sources = {}, {}

    def make(name, tp, dtype="f32", source_dtype="f32", **extra):
        kwargs = {**CONFIGS.get(name, {}), **extra}
        skey = (name, source_dtype, repr(sorted(kwargs.items())))
        if skey not in sources:
            sources[skey] = make_checkpoint(tmp_path_factory.mktemp("hf"), dtype=source_dtype, **kwargs)
        key = (skey, tp, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp("q3p") / "model"
            convert(sources[skey], out, tp=tp, dtype=dtype)
            made[key] = out
        return sources[skey], made[key]

    return make


_HF = {}


def hf_model(checkpoint):
    if checkpoint not in _HF:
        _HF[checkpoint] = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    return _HF[checkpoint]


def hf_logits(checkpoint, ids):
    with torch.no_grad():
        return hf_model(checkpoint)(torch.tensor([list(ids)])).logits[0].numpy()


def random_ids(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


# ---------------------------------------------------------------------------------------------
# Exact Qwen3 math, every configuration, tp 1 / 2 / 4


@pytest.mark.parametrize("name,tp", [
    ("head_dim_not_hidden_over_heads", 1),
    ("head_dim_not_hidden_over_heads", 2),
    ("head_dim_not_hidden_over_heads", 4),  # 2 KV heads over 4 ranks: each KV head replicated twice
    ("untied_one_kv_head", 1),
    ("untied_one_kv_head", 2),
    ("untied_one_kv_head", 4),  # 1 KV head on all 4 ranks
    ("sliding_window_5_mixed_layers", 1),
    ("sliding_window_5_mixed_layers", 2),
    ("yarn_rope", 1),
    ("yarn_rope", 2),
    ("sliding_window_37_long", 2),
    ("linear_rope", 2),
    ("vocab_383_not_divisible_by_tp", 2),
    ("vocab_383_not_divisible_by_tp", 4),
])
def test_logits_at_every_position_match_transformers(converted, name, tp):
    checkpoint, out = converted(name, tp)
    vocab = hf_model(checkpoint).config.vocab_size
    # 40 tokens: 8 sliding windows of 5, beyond yarn's 16 positions; 200 for the long windows.
    n = 200 if name.endswith("_long") else 40
    ids = random_ids(n, vocab, seed=tp)
    with runtime.load(out, threads=2) as m:
        assert m.world_size == tp
        got = m.logits(ids)
    want = hf_logits(checkpoint, ids)
    assert got.shape == (n, vocab) and got.dtype == np.float32  # padded vocabulary rows dropped
    assert np.abs(want).max() > 1.0  # a meaningful comparison: logits of order 1-10
    np.testing.assert_allclose(got, want, rtol=0, atol=F32_ATOL)


def test_sliding_window_changes_the_result_so_the_mask_is_really_tested(converted):
    checkpoint, out = converted("sliding_window_5_mixed_layers", 1)
    ids = random_ids(12, 384)
    full = make_checkpoint(Path(out).parent / "no_window", num_hidden_layers=3)  # same seed, same weights
    with runtime.load(out, threads=1) as m:
        got = m.logits(ids)
    assert np.abs(got[:5] - hf_logits(full, ids)[:5]).max() < F32_ATOL  # within the window: same
    assert np.abs(got[6:] - hf_logits(full, ids)[6:]).max() > 0.1  # beyond it: keys are masked


def test_results_do_not_depend_on_the_thread_count(converted):
    _, out = converted("head_dim_not_hidden_over_heads", 2)
    ids = random_ids(30, 384)
    with runtime.load(out, threads=1) as a, runtime.load(out, threads=4) as b:
        assert a.threads == 2 and b.threads == 4  # at least one thread per rank
        assert np.array_equal(a.logits(ids), b.logits(ids))  # fixed summation order: same bits


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_shards_match_transformers_on_the_same_rounded_weights(converted, dtype):
    # The checkpoint itself is bf16 (f16); transformers loads it into float32 exactly, and our
    # runtime widens each stored weight to f32 exactly too: the weights are identical and both
    # sides compute in f32, so only summation order differs, as in the f32 comparison (~1e-5 on
    # logits of order 20). 1e-4 leaves a 10x margin, while rounding the weights differently (bf16
    # vs f32 weights) moves these logits by ~1e-2.
    checkpoint, out = converted("head_dim_not_hidden_over_heads", 2, dtype=dtype, source_dtype=dtype)
    assert qwen3pack.formats.open(out).layout["dtype"] == dtype
    ids = random_ids(32, 384, seed=3)
    with runtime.load(out, threads=2, kv_dtype="f32", activations="f32") as m:  # transformers' precision
        got = m.logits(ids)
    np.testing.assert_allclose(got, hf_logits(checkpoint, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, kv_dtype, activations", [
    ("f32", "f32", "f32"), ("bf16", "bf16", "bf16"), ("f16", "bf16", "f32"), ("q8", "bf16", "f32")])
def test_a_model_runs_in_its_own_precision_unless_told_otherwise(converted, dtype, kv_dtype, activations):
    # "auto", the default: bf16 activations for bf16 weights (as llama.cpp, vLLM and transformers
    # run a bf16 model) and a bf16 KV cache for any model but an f32 one.
    _, out = converted("head_dim_not_hidden_over_heads", 1, dtype=dtype)
    ids = random_ids(20, 384, seed=4)
    with runtime.load(out, threads=1) as m:
        assert (m.kv_dtype, m.activations) == (kv_dtype, activations)
        assert f"kv_dtype={kv_dtype}, activations={activations}>" in repr(m)
        default = m.logits(ids)
    with runtime.load(out, threads=1, kv_dtype=kv_dtype, activations=activations) as m:
        assert np.array_equal(m.logits(ids), default)
    if dtype == "bf16":
        with runtime.load(out, threads=1, kv_dtype="f32", activations="f32") as m:
            assert (m.kv_dtype, m.activations) == ("f32", "f32")
            assert not np.array_equal(m.logits(ids), default)


@pytest.mark.parametrize("tp", [1, 2])
def test_bf16_activations_stay_within_their_bound_of_transformers(converted, tp):
    checkpoint, out = converted("head_dim_not_hidden_over_heads", tp, dtype="bf16", source_dtype="bf16")
    ids = random_ids(32, 384, seed=3)
    with runtime.load(out, threads=2, activations="bf16") as m:
        got = m.logits(ids)
    want = hf_logits(checkpoint, ids)
    assert np.abs(want).max() > 10.0
    np.testing.assert_allclose(got, want, rtol=0, atol=BF16_ACTIVATIONS_ATOL)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


# ---------------------------------------------------------------------------------------------
# Generation


@pytest.mark.parametrize("name,tp", [("head_dim_not_hidden_over_heads", 2), ("sliding_window_5_mixed_layers", 2)])
def test_greedy_generate_gives_the_32_tokens_of_transformers_generate(converted, name, tp):
    checkpoint, out = converted(name, tp)
    prompt = random_ids(9, 384, seed=7)
    with torch.no_grad():
        want = hf_model(checkpoint).generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    with runtime.load(out, threads=2) as m:
        got = list(m.generate(prompt, max_new_tokens=32, temperature=0.0, stop_token_ids=[]))
    assert got == want


def test_greedy_generate_with_repetition_penalty_matches_transformers(converted):
    checkpoint, out = converted("head_dim_not_hidden_over_heads", 1)
    prompt = random_ids(9, 384, seed=8)
    with torch.no_grad():
        want = hf_model(checkpoint).generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                             repetition_penalty=3.0, eos_token_id=None,
                                             pad_token_id=0)[0, len(prompt):].tolist()
    with runtime.load(out, threads=2) as m:
        got = list(m.generate(prompt, 32, repetition_penalty=3.0, stop_token_ids=[]))
    assert got == want
    assert len(set(got)) > 3  # the penalty really acted (greedy alone repeats one or two tokens)


@pytest.fixture(scope="module")
def base_model(converted):
    _, out = converted("head_dim_not_hidden_over_heads", 2)
    with runtime.load(out, threads=2, max_context=256) as m:
        yield m


def test_sampling_with_the_same_seed_gives_the_same_tokens(base_model):
    kwargs = dict(max_new_tokens=24, temperature=4.0, top_k=50, top_p=0.95, min_p=0.01, stop_token_ids=[])
    a = list(base_model.generate([1, 2, 3], seed=1234, **kwargs))
    b = list(base_model.generate([1, 2, 3], seed=1234, **kwargs))
    c = list(base_model.generate([1, 2, 3], seed=99, **kwargs))
    assert a == b and len(a) == 24
    assert a != c
    assert all(isinstance(t, int) for t in a)


def test_top_k_1_sampling_equals_greedy(base_model):
    greedy = list(base_model.generate([5, 6, 7], 20, stop_token_ids=[]))
    top1 = list(base_model.generate([5, 6, 7], 20, temperature=1.5, top_k=1, seed=3, stop_token_ids=[]))
    assert top1 == greedy


def test_stop_token_ids_end_generation_after_yielding_the_stop_token(base_model):
    free = list(base_model.generate([9, 8, 7], 32, temperature=4.0, seed=5, stop_token_ids=[]))
    stop = free[6]
    stopped = list(base_model.generate([9, 8, 7], 32, temperature=4.0, seed=5, stop_token_ids=[stop]))
    assert stopped == free[:free.index(stop) + 1]


def test_default_stop_tokens_are_the_manifest_eos_ids(base_model):
    eos = base_model.generation["eos_token_ids"]
    free = list(base_model.generate([1], 40, temperature=3.0, seed=11, stop_token_ids=[]))
    got = list(base_model.generate([1], 40, temperature=3.0, seed=11))
    cut = next((i for i, t in enumerate(free) if t in eos), None)
    assert got == (free if cut is None else free[:cut + 1])


def test_generate_checks_its_arguments_at_the_call(base_model):
    with pytest.raises(ValueError, match="temperature"):
        base_model.generate([1], temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        base_model.generate([1], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        base_model.generate([1], max_new_tokens=-1)
    with pytest.raises(runtime.ContextLengthError, match="max_context"):
        base_model.generate([1] * 200, max_new_tokens=100)
    assert list(base_model.generate([1], max_new_tokens=0)) == []


def test_sampler_presence_penalty_min_p_top_p_and_distribution():
    logits = np.array([2.0, 1.9, -5.0, 0.0], dtype=np.float32)
    s = _core.Sampler(4, temperature=0.0, presence_penalty=0.5)
    assert s.sample(logits) == 0
    s.accept(0)  # once generated, token 0 is penalised below token 1
    assert s.sample(logits) == 1
    p = _core.Sampler(4, temperature=0.0, repetition_penalty=2.0)
    p.add_prompt(np.array([0], dtype=np.int32))  # the prompt counts for the repetition penalty
    assert p.sample(logits) == 1
    # min_p 0.5: only tokens with p >= 0.5 * p(max) remain: 0 and 1 (exp(-0.1) ~ 0.9), never 2 or 3.
    mp = _core.Sampler(4, temperature=1.0, min_p=0.5, seed=1)
    assert {mp.sample(logits) for _ in range(300)} == {0, 1}
    # top_p 0.4: token 0 alone (p ~ 0.5) reaches it.
    tp = _core.Sampler(4, temperature=1.0, top_p=0.4, seed=2)
    assert {tp.sample(logits) for _ in range(100)} == {0}
    # Plain temperature sampling follows softmax(logits / T).
    t = _core.Sampler(4, temperature=2.0, seed=3)
    counts = np.bincount([t.sample(logits) for _ in range(4000)], minlength=4) / 4000
    want = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum()
    np.testing.assert_allclose(counts, want, atol=0.03)


def test_sampler_top_p_over_a_flat_distribution_keeps_exactly_the_needed_prefix():
    # 5000 equal logits: top_p 0.9 keeps the first 4500 ids (ties go by id), more than the
    # 1024 candidates the sampler sorts first, so it must fall back to sorting everything.
    s = _core.Sampler(5000, temperature=1.0, top_p=0.9, seed=4)
    draws = [s.sample(np.zeros(5000, dtype=np.float32)) for _ in range(3000)]
    assert max(draws) < 4500 and max(draws) > 4000 and len(set(draws)) > 1500


# ---------------------------------------------------------------------------------------------
# Sessions and batches


@pytest.fixture(scope="module")
def sliding_tp2(converted):
    _, out = converted("sliding_window_5_mixed_layers", 2)
    with runtime.load(out, threads=2, max_context=64) as m:
        yield m


def test_session_fed_token_by_token_gives_the_logits_of_one_full_pass(sliding_tp2):
    ids = random_ids(30, 384, seed=4)  # 6x the sliding window: the ring wraps many times
    full = sliding_tp2.logits(ids)
    s = sliding_tp2.session()
    steps = np.stack([s.append([t]) for t in ids])
    assert s.position == 30
    np.testing.assert_allclose(steps, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 5, 7, 13])
def test_session_fed_in_chunks_longer_than_the_window_gives_the_same_logits(sliding_tp2, chunk):
    ids = random_ids(30, 384, seed=5)
    full = sliding_tp2.logits(ids)
    s = sliding_tp2.session()
    last = [s.append(ids[i:i + chunk]) for i in range(0, 30, chunk)]
    ends = [min(i + chunk, 30) - 1 for i in range(0, 30, chunk)]
    np.testing.assert_allclose(np.stack(last), full[ends], rtol=0, atol=1e-5)


def test_fork_continues_independently_of_its_original(sliding_tp2):
    prefix, a, b = random_ids(11, 384, 1), random_ids(6, 384, 2), random_ids(9, 384, 3)
    s = sliding_tp2.session()
    s.append(prefix)
    f = s.fork()
    assert f.position == 11
    got_a, got_b = s.append(a), f.append(b)
    np.testing.assert_allclose(got_a, sliding_tp2.logits(prefix + a)[-1], atol=1e-5)
    np.testing.assert_allclose(got_b, sliding_tp2.logits(prefix + b)[-1], atol=1e-5)
    assert (s.position, f.position) == (17, 20)


def test_reset_empties_the_session(sliding_tp2):
    s = sliding_tp2.session()
    s.append(random_ids(20, 384, 6))
    s.reset()
    assert s.position == 0
    np.testing.assert_allclose(s.append([3, 4, 5]), sliding_tp2.logits([3, 4, 5])[-1], atol=1e-6)


def test_a_batch_of_three_sequences_gives_the_logits_of_each_alone(sliding_tp2):
    seqs = [random_ids(3, 384, 10), random_ids(17, 384, 11), random_ids(40, 384, 12)]
    batch = sliding_tp2.logits_batch(seqs)
    assert [b.shape for b in batch] == [(3, 384), (17, 384), (40, 384)]
    for got, ids in zip(batch, seqs):
        np.testing.assert_allclose(got, sliding_tp2.logits(ids), rtol=0, atol=1e-6)


def test_append_batch_serves_sessions_at_different_positions_in_one_pass(sliding_tp2):
    prefixes = [random_ids(n, 384, 20 + n) for n in (1, 9, 25)]
    news = [random_ids(n, 384, 30 + n) for n in (1, 8, 3)]
    sessions = [sliding_tp2.session() for _ in prefixes]
    for s, p in zip(sessions, prefixes):
        s.append(p)
    got = sliding_tp2.append_batch(sessions, news)
    for g, p, n in zip(got, prefixes, news):
        np.testing.assert_allclose(g, sliding_tp2.logits(p + n)[-1], rtol=0, atol=1e-5)
    assert [s.position for s in sessions] == [2, 17, 28]


def test_a_batchs_logits_are_disjoint_arrays_that_outlive_the_model(converted):
    # each request's rows are a view of the one buffer of the forward pass, which they own together
    _, out = converted("sliding_window_5_mixed_layers", 2)
    seqs = [random_ids(n, 384, 40 + n) for n in (1, 6, 3)]
    with runtime.load(out, threads=2) as m:
        batch = m.logits_batch(seqs)
        alone = [m.logits(ids) for ids in seqs]
    gc.collect()
    assert not any(np.shares_memory(a, b) for i, a in enumerate(batch) for b in batch[i + 1:])
    batch[0][:] = 0  # a request's array is writable, and the others do not see it
    for got, want in zip(batch[1:], alone[1:]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


DECODE_FAULTS = """
import resource, sys, qwen3pack
with qwen3pack.load(sys.argv[1], threads=1, max_context=64) as m:
    s = m.session()
    for token in range(8):
        s.append([token])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for token in range(8, 40):
        s.append([token])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_decode_step_with_a_real_vocabulary_takes_no_fresh_pages(tmp_path):
    # 151936 logits are 600 KB a step: copied into a second buffer and both freed, malloc gave
    # their pages back and the next step faulted in 265 pages afresh (3-4% of a decode step).
    # In a fresh process: how malloc returns memory depends on what the process freed before.
    source = make_checkpoint(tmp_path / "source", vocab_size=151936, num_hidden_layers=1)
    convert(source, tmp_path / "model")
    done = subprocess.run([sys.executable, "-c", DECODE_FAULTS, str(tmp_path / "model")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 32  # 32 steps: 8000-8500 before


def test_a_session_cannot_appear_twice_in_one_batch(sliding_tp2):
    s = sliding_tp2.session()
    with pytest.raises(ValueError, match="twice"):
        sliding_tp2.append_batch([s, s], [[1], [2]])


def test_python_threads_may_call_one_model_concurrently(sliding_tp2):
    # The GIL is released during compute; the engine runs one forward pass at a time.
    seqs = [random_ids(20, 384, 40 + i) for i in range(4)]
    want = [sliding_tp2.logits(s) for s in seqs]
    got = [None] * 4

    def work(i):
        session = sliding_tp2.session()
        got[i] = np.stack([session.append(seqs[i][:10]), session.append(seqs[i][10:])])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w[[9, 19]], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Limits and errors


def test_exceeding_max_context_raises_and_leaves_the_session_usable(converted):
    _, out = converted("sliding_window_5_mixed_layers", 1)
    with runtime.load(out, threads=1, max_context=8) as m:  # max_context smaller than... the window is 5
        s = m.session()
        s.append(list(range(6)))
        with pytest.raises(runtime.ContextLengthError, match="max_context = 8"):
            s.append([1, 2, 3])
        assert s.position == 6
        s.append([1, 2])  # exactly full
        with pytest.raises(runtime.ContextLengthError):
            m.logits(list(range(9)))
        assert isinstance(runtime.ContextLengthError("x"), ValueError)


def test_a_max_context_below_the_sliding_window_still_computes_exactly(converted):
    checkpoint, out = converted("sliding_window_5_mixed_layers", 1)
    ids = random_ids(4, 384, 9)
    with runtime.load(out, threads=1, max_context=4) as m:
        s = m.session()
        steps = np.stack([s.append([t]) for t in ids])
    np.testing.assert_allclose(steps, hf_logits(checkpoint, ids), atol=F32_ATOL)


def test_bad_token_ids_raise_value_errors(base_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        base_model.logits([1, 384])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        base_model.session().append([-1])
    with pytest.raises(ValueError, match="empty"):
        base_model.logits([])
    with pytest.raises(ValueError, match="integers"):
        base_model.logits([1.5])
    with pytest.raises(ValueError, match="1-D"):
        base_model.logits([[1, 2]])
    with pytest.raises(ValueError, match="verify"):
        runtime.load("/nonexistent", verify="sometimes")


def test_use_after_close_raises_and_close_is_idempotent(converted):
    _, out = converted("head_dim_not_hidden_over_heads", 1)
    m = runtime.load(out, threads=1)
    s = m.session()
    s.append([1, 2])
    m.close()
    m.close()
    assert m.closed
    for call in (lambda: m.logits([1]), m.session, lambda: s.append([3]), s.fork, lambda: m.generate([1])):
        with pytest.raises(runtime.ClosedError, match="closed"):
            call()


def test_load_is_reexported_and_exposes_the_model_object(converted):
    _, out = converted("yarn_rope", 1)
    assert getattr(qwen3pack, "load", runtime.load) is runtime.load  # the package re-exports it
    with runtime.load(out) as m:
        assert m.threads == len(os.sched_getaffinity(0))  # threads=None: every usable CPU
        assert m.config == qwen3pack.formats.open(out).model
        assert m.config["rope"]["type"] == "yarn"
        assert m.vocab_size == 384 and m.max_context == 4096


def test_full_verification_accepts_an_intact_model(converted):
    _, out = converted("untied_one_kv_head", 2)
    with runtime.load(out, threads=2, verify="full") as m:
        assert m.logits([1, 2, 3]).shape == (3, 384)


# ---------------------------------------------------------------------------------------------
# Memory: the weights are mapped, never copied


def _status(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _mapped(path):
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_load_maps_the_weights_without_copying_them_and_close_unmaps(tmp_path):
    # ~40 MB of f32 weights: embedding and lm_head 16384 x 256 each, plus 2 layers.
    checkpoint = make_checkpoint(tmp_path / "hf", tie=False, vocab_size=16384, hidden_size=256,
                                 intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=64)
    out = tmp_path / "q3p"
    convert(checkpoint, out, tp=1, dtype="f32")
    shutil.rmtree(checkpoint)
    rank_path = (out / "rank-00000-of-00001.q3p").resolve()
    weights = rank_path.stat().st_size
    assert weights > 35e6
    gc.collect()
    before = _status("RssAnon")
    m = runtime.load(out, threads=2, max_context=64)
    assert _mapped(rank_path)
    loaded = _status("RssAnon")
    m.logits(list(range(16)))  # touches every weight page: file-backed, not anonymous memory
    computed = _status("RssAnon")
    assert loaded - before < weights / 10, (before, loaded, weights)
    assert computed - before < weights / 4, (before, computed, weights)
    m.close()
    assert not _mapped(rank_path)
    # Dropping the model (no close) unmaps as well.
    m = runtime.load(out, threads=1)
    assert _mapped(rank_path)
    del m
    gc.collect()
    assert not _mapped(rank_path)
