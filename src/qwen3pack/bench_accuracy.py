"""`make bench-accuracy`: what q8, q6 and q4 weights cost on a trained network, not a random one.

No trained Qwen3 checkpoint can be had on this project's machines, and a random network is far
more sensitive to weight error than a trained one (README, "Accuracy"). So this trains one: a
small Qwen3 (4 layers, hidden 256, a byte-level BPE of 4096 tokens) on the sources of this
Python's standard library, with transformers and torch on the CPU (the test dependencies), for
--steps steps of 16 windows of 256 tokens. It converts the checkpoint to f32, bf16, q8, q6, q4 (its
embedding in q6), q4 with a q8 and with a 4-bit embedding, and reports each against the f32
conversion on held-out files: the
mean KL divergence of the next-token distributions, top-1 agreement and the largest logit error,
over the second half of windows of 256 tokens (as llama.cpp's `llama-perplexity
--kl-divergence` counts them), and the f32 model's perplexity there, to say how trained it is.
--json prints JSON; --quick trains a tiny model for a few steps (the test suite runs it; its
numbers mean nothing).
"""
import argparse
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from .convert import convert
from .testing import logit_agreement, runtime_logits

WINDOW = 256
BATCH = 16
LEARNING_RATE = 3e-3
WARMUP_STEPS = 30
CONVERSIONS = {"bf16": dict(dtype="bf16"), "q8": dict(dtype="q8"), "q6": dict(dtype="q6"), "q4": dict(dtype="q4"),
               "q4, embed q8": dict(dtype="q4", keep="embed=q8"), "q4, embed q4": dict(dtype="q4", keep="embed=q4")}


def plan(quick):
    if quick:
        return dict(files=24, held_out_files=6, vocab=320, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, head_dim=32,
                    windows=2)
    return dict(files=None, held_out_files=40, vocab=4096, hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, head_dim=64,
                windows=48)


def corpus(n_files, held_out_files):
    """(training text, held-out text): this Python's standard library sources, tests left out, the
    files shuffled by a fixed seed (the first n_files of them, or all) and the first held_out_files
    held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idlelib"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skipped & set(p.relative_to(stdlib).parts))
    random.Random(0).shuffle(files)
    files = files[:n_files] if n_files else files
    texts = [p.read_text(errors="replace") for p in files]
    return "\n\n".join(texts[held_out_files:]), "\n\n".join(texts[:held_out_files])


def train_tokenizer(text, vocab, directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def train(ids, p, steps, directory):
    """Trains a Qwen3 of plan `p` on the token ids for `steps` steps (AdamW, warm-up then cosine)
    and saves it to `directory` in f32 safetensors; returns the last step's loss."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = Qwen3Config(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                         num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], head_dim=p["head_dim"], max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=0,
                         eos_token_id=0)
    model = Qwen3ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    for step in range(steps):
        warmup = min(1.0, (step + 1) / WARMUP_STEPS)
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        starts = rng.integers(0, len(ids) - WINDOW, BATCH)
        batch = torch.from_numpy(np.stack([ids[s:s + WINDOW] for s in starts]))
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    return loss.item()


def logits_of(directory, windows):
    """The logits of the second half of each window (the first half is context)."""
    logits = runtime_logits(directory, windows)
    return logits.reshape(len(windows), WINDOW, -1)[:, WINDOW // 2:].reshape(-1, logits.shape[-1])


def perplexity(logits, windows):
    """exp of the mean negative log-likelihood of each next token in the windows' second halves."""
    x = logits.astype(np.float64).reshape(len(windows), WINDOW // 2, -1)[:, :-1]
    log_p = x - x.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    targets = np.array([w[WINDOW // 2 + 1:] for w in windows])
    return float(np.exp(-np.take_along_axis(log_p, targets[..., None], -1).mean()))


def run(args):
    p = plan(args.quick)
    work = Path(tempfile.mkdtemp(prefix="qwen3pack-bench-accuracy-"))
    try:
        training_text, held_out_text = corpus(p["files"], p["held_out_files"])
        source = work / "hf"
        source.mkdir()
        tokenizer = train_tokenizer(training_text, p["vocab"], source)
        ids = np.array(tokenizer.encode(training_text).ids, dtype=np.int64)
        held_out = tokenizer.encode(held_out_text).ids
        loss = train(ids, p, args.steps, source)
        starts = np.linspace(0, len(held_out) - WINDOW, p["windows"]).astype(int)
        windows = [held_out[s:s + WINDOW] for s in starts]
        convert(source, work / "f32", tp=1, dtype="f32")
        reference = logits_of(work / "f32", windows)
        results = {}
        for name, options in CONVERSIONS.items():
            convert(source, work / name, tp=1, **options)
            results[name] = logit_agreement(reference, logits_of(work / name, windows))
        return dict(model={k: p[k] for k in ("vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim")},
                    steps=args.steps, training_tokens=len(ids), final_loss=loss, held_out_tokens=len(held_out),
                    windows=len(windows), window=WINDOW, perplexity=perplexity(reference, windows), against_f32=results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(r):
    m = r["model"]
    print(f"Qwen3 of {m['layers']} layers, hidden {m['hidden']}, vocabulary {m['vocab']}, trained {r['steps']} steps "
          f"of {BATCH} x {WINDOW} tokens from {r['training_tokens']} tokens of Python's standard library (last loss "
          f"{r['final_loss']:.2f})")
    print(f"held out: {r['held_out_tokens']} tokens; f32 perplexity {r['perplexity']:.1f} over the second halves of "
          f"{r['windows']} windows of {r['window']} tokens\n")
    print(f"{'weights':<14} {'mean KL':>9} {'top-1':>7} {'max logit error':>16}   against the f32 conversion")
    for name, a in r["against_f32"].items():
        print(f"{name:<14} {a['mean_kl']:>9.2e} {a['top1']:>7.2%} {a['max_logit_error']:>16.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 400; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps: checks that it runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 400
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return results


if __name__ == "__main__":
    main()
