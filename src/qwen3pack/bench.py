"""`make bench`: the runtime's speed beside its baselines, all measured in the same run.

A checkpoint with the real shapes of Qwen3-0.6B (or 1.7B: --size 1.7b), taken from the configs in
tests/fixtures/configs/ and filled with random bf16 weights (or --checkpoint DIR), converted at
tp 1 and 2, then at tp 1 with 1 and 2 threads and at tp 2 with 2 (one per rank), with f32
activations, and at tp 1 with 1 and 2 threads with activations rounded to bf16 (load(...,
activations="bf16"), a bf16 model's default), each with the KV cache in bf16 (--kv-dtype: the
runtime's default for a bf16 model; llama.cpp keeps its cache in f16):
- load time and time to first token of a 16-token prompt right after the load (page cache warm);
- prefill tokens/s of a 512-token prompt; decode tokens/s over 128 tokens at batch 1, and in all
  at batch 4 and 16 (one token per sequence per step);
- decode tokens/s over 32 tokens from position 2000 (tp 1, 2 threads), with the KV cache in f32
  and in bf16: at long context, attention reads the cache as much as the weights;
- this machine's memory read bandwidth (numpy, same threads, the best read of the run) and decode
  at batch 1 as a share of that roofline (every weight byte read once per token); the peak f32
  FMA rate of the threads (a register-only loop) and prefill as a share of it (2 flops per
  weight per token), or for bf16 activations the peak of the bf16 dot product (vdpbf16ps);
- transformers (torch CPU, bf16, same threads, same weights): prefill and decode, as ratios;
- llama.cpp's llama-bench on the same weights when LLAMA_BENCH names it (the GGUF made by the
  convert_hf_to_gguf.py of LLAMA_CPP_DIR), run right after ours at the same threads; otherwise
  "llama.cpp: not found". A ratio to a baseline is the median of each round's ratio;
- decode alone at batch 1, ours and llama-bench alternated 4 more times a round at each thread
  count (the figure the machine's bandwidth moves most), with llama.cpp's files rewritten in 2 MB
  blocks first so that the page cache holds them in 2 MB folios as it holds ours; each file's
  share in 2 MB folios is printed;
- conversion (bf16, and q4) against `cp` + `sync` of the same bytes, in wall and CPU time, and
  checksum validation;
- with the qwen3pack[mpi] extra, tp 2 as `mpiexec -n 2` processes of one thread each: decode
  tokens/s at batch 1 against tp 2 with 2 threads in one process, and the latency of one
  all-reduce of a decode step's hidden vector over MPI and between threads (two per layer);
  otherwise "MPI: not installed".
- q8 and q4 weights (tp 1, 1 and 2 threads; q4 as `--dtype q4` converts, its embedding in q6):
  the same figures, each measured right after bf16 at the same threads in every round, as ratios
  over bf16, each beside llama.cpp's file of its layout and the same weights (with LLAMA_BENCH:
  q8_0, and Q4_K made by the llama-quantize beside llama-bench; llama_cpp_quantized); and their
  accuracy against the f32 model on the same checkpoint and prompts
  (the bf16 conversion: the runtime computes in f32 and holds the bf16 weights exactly): mean KL
  divergence of the next-token distributions, top-1 agreement, largest logit error. The random
  checkpoint is drawn trained-like (testing.make_checkpoint: outlier columns, logits of a
  trained model's spread); the same figures for its bf16 weights against the f32 weights they
  were rounded from give the scale: how sensitive this checkpoint is to weight error.
Every figure is the median of --repeats runs, interleaved over the configurations. --json prints
the results as JSON instead of the table; --quick runs everything on a tiny model in seconds
(the test suite does, to keep this script working; its numbers mean nothing).
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import formats
from .convert import convert
from .formats import validate
from .formats.rankfile import WRITE_BLOCK
from .testing import logit_agreement, make_checkpoint, runtime_logits, share_in_2mb_folios

SIZES = {"0.6b": "Qwen3-0.6B.json", "1.7b": "Qwen3-1.7B.json"}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps")
RUNS = [(1, 1, "f32"), (1, 2, "f32"), (2, 2, "f32"), (1, 1, "bf16"), (1, 2, "bf16")]  # (tp, threads, activations)
QUANTIZED = ("q8", "q4")  # at tp 1
LLAMA_CPP_TYPES = {"q8": "q8_0", "q4": "Q4_K"}  # llama.cpp's files of our layouts (llama_cpp_quantized)
QUANTIZED_THREADS = (1, 2)
BATCHES = (1, 4, 16)
LONG_CONTEXT_THREADS = 2  # at tp 1
KV_DTYPES = ("f32", "bf16")


def plan(quick):
    """Sizes of the measurements: the issue's, or tiny ones for --quick."""
    if quick:
        return dict(prompt=16, prefill=24, decode=4, long_context=40, long_decode=4, bandwidth_bytes=1 << 24,
                    fma_seconds=0.01, accuracy_prompts=2, accuracy_tokens=8, alternations=1)
    return dict(prompt=16, prefill=512, decode=128, long_context=2000, long_decode=32, bandwidth_bytes=1 << 30,
                fma_seconds=0.2, accuracy_prompts=8, accuracy_tokens=64, alternations=4)


def model_shape(size, configs_dir, quick):
    if quick:
        return dict(tie_word_embeddings=True)  # make_checkpoint's tiny default model
    config = json.loads((Path(configs_dir) / SIZES[size]).read_text())
    return {**{k: config[k] for k in SHAPE_KEYS}, "tie_word_embeddings": config["tie_word_embeddings"]}


def median(values):
    return statistics.median(values) if values else float("nan")


def seconds(run):
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------
# The runtime


def bench_runtime(directory, threads, p, rng, kv_dtype="f32", activations="f32"):
    """One measurement of every runtime figure for the converted model in `directory`."""
    from . import load
    vocab = formats.open(directory).model["vocab_size"]
    ids = rng.integers(0, vocab, p["prefill"]).tolist()
    context = p["prefill"] + p["decode"] + 1
    started = time.perf_counter()
    model = load(directory, threads=threads, max_context=context, kv_dtype=kv_dtype, activations=activations)
    load_s = time.perf_counter() - started
    with model:
        next(iter(model.generate(ids[:p["prompt"]], max_new_tokens=1, stop_token_ids=[])))
        ttft_s = time.perf_counter() - started - load_s
        prefill_s = seconds(lambda: model.session().append(ids))
        decode = {}
        for batch in BATCHES:
            sessions = [model.session() for _ in range(batch)]
            model.append_batch(sessions, [ids[:p["prompt"]]] * batch)
            steps = [[ids[i % len(ids)]] for i in range(p["decode"])]
            decode_s = seconds(lambda: [model.append_batch(sessions, [step] * batch) for step in steps])
            decode[batch] = batch * p["decode"] / decode_s
    return dict(load_s=load_s, ttft_s=ttft_s, prefill_tok_s=p["prefill"] / prefill_s, decode_tok_s=decode)


def accuracy(reference, quantized, p):
    """logit_agreement of `quantized` with `reference` over every position of random prompts."""
    vocab = formats.open(reference).model["vocab_size"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, vocab, p["accuracy_tokens"]).tolist() for _ in range(p["accuracy_prompts"])]
    return dict(prompts=len(prompts), tokens=p["accuracy_tokens"],
                **logit_agreement(runtime_logits(reference, prompts), runtime_logits(quantized, prompts)))


def summarize(tp, threads, activations, got, weight_bytes, bandwidth, flops_per_token, peak):
    """The medians of one configuration's measurements, and their shares of the rooflines (the
    prefill's of the f32 FMA peak, or of the bf16 dot product's with bf16 activations)."""
    decode = {b: median([g["decode_tok_s"][b] for g in got]) for b in BATCHES}
    prefill = median([g["prefill_tok_s"] for g in got])
    return dict(tp=tp, threads=threads, activations=activations, load_s=median([g["load_s"] for g in got]),
                ttft_s=median([g["ttft_s"] for g in got]), prefill_tok_s=prefill, decode_tok_s=decode,
                decode_of_roofline=decode[1] * weight_bytes / bandwidth[threads],
                prefill_of_fma_peak=prefill * flops_per_token / peak[activations][threads])


def bf16_rounding_accuracy(work, drawn, bf16_converted, p, args):
    """What rounding the weights to bf16 costs on the random checkpoint: the accuracy of its bf16
    conversion against the f32 weights they were rounded from (make_checkpoint's same draw, saved
    in f32). It measures the checkpoint's sensitivity, the scale for q8's and q4's figures: a
    random network is more sensitive to weight error than a trained one."""
    log(args, "bf16 accuracy against the f32 draw of the same checkpoint ...")
    source = make_checkpoint(work / "source-f32", dtype="f32", **drawn)
    convert(source, work / "f32", tp=1)
    shutil.rmtree(source)
    try:
        return accuracy(work / "f32", bf16_converted, p)
    finally:
        shutil.rmtree(work / "f32")


def bench_long_context(converted, p, rng, kv_dtype):
    """Decode tokens/s at batch 1 from position p["long_context"] (the prompt before it untimed)."""
    from . import load
    vocab = formats.open(converted[1]).model["vocab_size"]
    ids = rng.integers(0, vocab, p["long_context"] + p["long_decode"]).tolist()
    with load(converted[1], threads=LONG_CONTEXT_THREADS, max_context=len(ids), kv_dtype=kv_dtype,
              activations="f32") as model:
        return session_decode_tok_s(model, ids[:p["long_context"]], ids[p["long_context"]:])


def session_decode_tok_s(model, prompt, steps):
    """Tokens/s of one session decoding `steps` one token at a time after `prompt` (untimed)."""
    session = model.session()
    session.append(prompt)
    return len(steps) / seconds(lambda: [session.append([token]) for token in steps])


def matrix_weights(config):
    """Weights of the matrix products per token (2 flops each), without the embedding lookup."""
    h, d, inter = config["hidden_size"], config["head_dim"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    return config["num_hidden_layers"] * (h * (q + 2 * kv) + q * h + 3 * h * inter)


def memory_bandwidth(threads, nbytes):
    """Bytes/s of reading an array of `nbytes`, split over `threads` threads (numpy releases the GIL):
    the best of 5 reads, as a roofline is the most the machine gives (others' load only lowers it).
    The read is numpy's max, whose loop waits on memory alone: numpy's sum adds pairwise, which on a
    Zen 5 core ran at 20.7 GB/s where max read 37.2 (and our bf16 decode 33.7: "158% of BW")."""
    from concurrent.futures import ThreadPoolExecutor
    chunks = np.array_split(np.ones(nbytes // 8, dtype=np.float64), threads)
    with ThreadPoolExecutor(threads) as pool:
        return nbytes / min(seconds(lambda: list(pool.map(np.max, chunks))) for _ in range(5))


MPI_PROCESSES = 2
ALL_REDUCE_ITERATIONS = 2000


def mpiexec():
    """The mpiexec of the [mpi] extra beside this Python, or None without the extra."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    launcher = Path(sys.executable).parent / "mpiexec"
    return launcher if launcher.exists() else None


def bench_mpi(directory, quick, kv_dtype):
    """The MPI figures of the model in `directory` (tp 2), measured by `mpiexec -n 2` processes
    running mpi_process; None without the [mpi] extra."""
    launcher = mpiexec()
    if launcher is None:
        return None
    done = subprocess.run([str(launcher), "-n", str(MPI_PROCESSES), sys.executable, "-m", "qwen3pack.bench",
                           "--mpi-process", str(directory), "--kv-dtype", kv_dtype, *(["--quick"] if quick else [])],
                          check=True, capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout)


def mpi_process(directory, quick, kv_dtype):
    """In each process of bench_mpi's run: the all-reduce latency, then decode at batch 1 (process 0
    drives and prints the results as JSON; the others follow it inside load)."""
    from . import _core, load
    from .runtime import mpi
    p = plan(quick)
    MPI = mpi.mpi_module()
    hidden = formats.read_manifest(directory)["model"]["hidden_size"]
    all_reduce_s = _core.all_reduce_seconds(hidden, ALL_REDUCE_ITERATIONS // (10 if quick else 1), mpi.library_path(),
                                            MPI.COMM_WORLD.Dup().handle)
    model = load(directory, backend="mpi", threads=1, max_context=p["prompt"] + p["decode"] + 1, kv_dtype=kv_dtype,
                 activations="f32")  # as the threads' tp 2 run it is compared with
    ids = np.random.default_rng(0).integers(0, model.vocab_size, p["prompt"] + p["decode"]).tolist()
    with model:
        decode_tok_s = session_decode_tok_s(model, ids[:p["prompt"]], ids[p["prompt"]:])
    print(json.dumps(dict(decode_tok_s=decode_tok_s, all_reduce_s=all_reduce_s)))


# ------------------------------------------------------------------------------------------
# Baselines


def bench_transformers(source, threads, p, rng):
    """(prefill tokens/s, decode tokens/s) of transformers in bf16, or None without it."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
    except ImportError:
        return None
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.tensor([rng.integers(0, vocab, p["prefill"]).tolist()])
    prompt = ids[:, :p["prompt"]]
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
        prefill_s = seconds(lambda: model(ids))
        decode_s = seconds(lambda: model.generate(prompt, max_new_tokens=p["decode"] + 1,
                                                  min_new_tokens=p["decode"] + 1, do_sample=False))
        first_s = seconds(lambda: model.generate(prompt, max_new_tokens=1, do_sample=False))
    return dict(prefill_tok_s=p["prefill"] / prefill_s, decode_tok_s=p["decode"] / max(decode_s - first_s, 1e-9))


def llama_cpp_gguf(source, work, outtype="bf16"):
    """The GGUF of `source` made by llama.cpp's converter with its weights in `outtype` ("bf16", or
    "q8_0": llama.cpp's q8, the layout and rounding of our q8), or None when llama.cpp is not set up."""
    bench, tree = os.environ.get("LLAMA_BENCH"), os.environ.get("LLAMA_CPP_DIR")
    if not bench or not Path(bench).is_file() or not tree or not (Path(tree) / "convert_hf_to_gguf.py").is_file():
        return None
    gguf = work / f"model-{outtype}.gguf"
    if not gguf.exists():
        done = subprocess.run([sys.executable, "-c", GGUF_CONVERT, str(Path(tree) / "convert_hf_to_gguf.py"), str(source),
                               "--outtype", outtype, "--outfile", str(gguf)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}")
    return gguf


def llama_cpp_quantized(dtype, source, gguf, work):
    """llama.cpp's file of our `dtype`'s layout, or None without llama.cpp: for q8 its converter's
    q8_0; for q4 every matrix in Q4_K with the embedding (and an untied head) in Q6_K, as our q4
    converts, made from the bf16 GGUF by the llama-quantize beside LLAMA_BENCH."""
    if gguf is None:
        return None
    if dtype == "q8":
        return llama_cpp_gguf(source, work, "q8_0")
    quantize = Path(os.environ["LLAMA_BENCH"]).with_name("llama-quantize")
    if not quantize.is_file():
        return None
    out = work / "model-q4_k.gguf"
    subprocess.run([str(quantize), "--pure", "--token-embedding-type", "q6_K", "--output-tensor-type", "q6_K",
                    str(gguf), str(out), "Q4_K_S"], check=True, capture_output=True)  # --pure: Q4_K everywhere else
    return out


# convert_hf_to_gguf.py, run with one change: a tokenizer whose pre-tokenizer it does not know (the
# test tokenizers of make_checkpoint) is written as Qwen2's instead of refused. The GGUF's
# tokenizer plays no part in llama-bench's speed, which feeds it token ids.
GGUF_CONVERT = """
import runpy, sys
script = sys.argv.pop(1)
sys.path.insert(0, script.rsplit("/", 1)[0])
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "qwen2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def llama_bench(gguf, threads, prompt, steps):
    """llama-bench's tokens/s on `gguf`: {"prefill": of a `prompt`-token prompt, "decode": over
    `steps` tokens}, each measured alone (0 leaves it out)."""
    done = subprocess.run([os.environ["LLAMA_BENCH"], "-m", str(gguf), "-p", str(prompt), "-n", str(steps),
                           "-t", str(threads), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    rows = json.loads(done.stdout)
    return {"prefill" if r["n_gen"] == 0 else "decode": r["avg_ts"] for r in rows}


def bench_llama_cpp(gguf, threads, p):
    """(prefill tokens/s, decode tokens/s) of llama-bench on `gguf`."""
    got = llama_bench(gguf, threads, p["prefill"], p["decode"])
    return dict(prefill_tok_s=got["prefill"], decode_tok_s=got["decode"])


def decode_alternations(directory, gguf, threads, p, rng, kv_dtype):
    """[(ours, llama.cpp's)] decode tokens/s at batch 1 over p["decode"] tokens, p["alternations"]
    times one right after the other: of all the figures, decode at two threads is the one this
    machine's read bandwidth moves most (README, Performance), so it gets more pairs than a round."""
    from . import load
    vocab = formats.open(directory).model["vocab_size"]
    pairs = []
    for _ in range(p["alternations"]):
        ids = rng.integers(0, vocab, p["prompt"] + p["decode"]).tolist()
        with load(directory, threads=threads, max_context=len(ids), kv_dtype=kv_dtype, activations="f32") as model:
            ours = session_decode_tok_s(model, ids[:p["prompt"]], ids[p["prompt"]:])
        pairs.append((ours, llama_bench(gguf, threads, 0, p["decode"])["decode"]))
    return pairs


def rewrite_in_2mb_blocks(path):
    """Writes the file `path` again in whole 2 MB blocks, so that the page cache holds llama.cpp's
    files in 2 MB folios, as our runtime reads its rank files back (formats/rankfile.py): its converter and
    llama-quantize write smaller pieces (39-65% of their files came out in 2 MB folios), and a file
    in small folios costs TLB misses (up to 17% of our q4 decode), which no kernel should be judged by."""
    staged = path.with_name(path.name + ".2mb")
    with open(path, "rb") as source, open(staged, "wb") as copy:
        offset = 0
        while block := source.read(WRITE_BLOCK):
            if os.pwrite(copy.fileno(), block, offset) != len(block):
                raise OSError(f"{staged}: short write (disk full?)")
            offset += len(block)
    staged.replace(path)
    return path


# ------------------------------------------------------------------------------------------
# Conversion


def bench_convert(work, source, tp, repeats):
    """bf16 and q4 conversions of `source` at `tp`, each round after a `cp` + `sync` of its
    safetensors: medians of wall and CPU seconds (the conversion runs in this process, the copy and
    sync as children), and the ratios. Both end with the bytes on disk: the converter writes past
    the page cache (formats/rankfile.py), cp into it, and sync writes that out."""
    files = sorted(source.glob("*.safetensors"))
    source_bytes = sum(f.stat().st_size for f in files)
    copy_dir = work / "copy"

    def copied():
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        subprocess.run(["cp", *map(str, files), str(copy_dir)], check=True)
        subprocess.run(["sync"], check=True)

    # Each run deletes what the last one wrote before it writes, as a user would: an output replaced
    # by --force is kept until the new one is whole, and what it holds of the disk and the page
    # cache would weigh on the run.
    def converted(output, **options):
        def run():
            shutil.rmtree(output, ignore_errors=True)
            convert(source, output, tp=tp, **options)
        return run

    out = work / f"tp{tp}"
    runs = {"cp_sync": copied, "convert": converted(out), "convert_q4": converted(work / f"q4-tp{tp}", dtype="q4")}
    wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            cpu_before = cpu_seconds()
            wall[name].append(seconds(run))
            cpu[name].append(cpu_seconds() - cpu_before)
    shutil.rmtree(copy_dir)
    shutil.rmtree(work / f"q4-tp{tp}")
    report = validate(out)
    assert report.ok, report.problems
    validate_s = median([seconds(lambda: validate(out)) for _ in range(repeats)])
    cp_s = median(wall["cp_sync"])
    return out, dict(bytes=source_bytes, tp=tp, convert_s=median(wall["convert"]), q4_convert_s=median(wall["convert_q4"]),
                     cp_sync_s=cp_s, convert_over_cp=median(wall["convert"]) / cp_s, q4_over_cp=median(wall["convert_q4"]) / cp_s,
                     cpu_s={name: median(v) for name, v in cpu.items()}, validate_gb_s=report.bytes / validate_s / 1e9)


def cpu_seconds():
    """User and system CPU seconds of this process (every thread) and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ------------------------------------------------------------------------------------------


def run(args):
    from . import _core
    p = plan(args.quick)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="qwen3pack-bench-"))
    try:
        shape = model_shape(args.size, args.configs, args.quick)
        if args.checkpoint:
            source = Path(args.checkpoint)
        else:
            log(args, f"making a random bf16 checkpoint with the shapes of Qwen3-{args.size.upper()} ...")
            # trained-like weights (for q8's accuracy) and Qwen3's kind of tokenizer (a BPE with
            # merges), which llama.cpp's GGUF needs
            drawn = dict(tie=shape.pop("tie_word_embeddings"), trained_like=True, qwen3_tokenizer=True, **shape)
            source = make_checkpoint(work / "source", dtype="bf16", **drawn)
        config = json.loads((source / "config.json").read_text())
        log(args, "converting ...")
        converted = {}
        converted[2], conversion = bench_convert(work, source, 2, args.repeats)
        converted[1] = work / "tp1"
        convert(source, converted[1], tp=1)
        weight_bytes = sum(r.file_size for r in formats.open(converted[1]).ranks)
        quantized_dirs = {}
        for dtype in QUANTIZED:
            quantized_dirs[dtype] = work / dtype
            convert(source, quantized_dirs[dtype], tp=1, dtype=dtype)
        bf16_accuracy = None if args.checkpoint else bf16_rounding_accuracy(work, drawn, converted[1], p, args)
        gguf = llama_cpp_gguf(source, work)
        gguf_quantized = {dtype: llama_cpp_quantized(dtype, source, gguf, work) for dtype in QUANTIZED}
        llama_files = {"bf16": gguf, **{LLAMA_CPP_TYPES[dtype]: f for dtype, f in gguf_quantized.items()}}
        for f in llama_files.values():
            if f:
                rewrite_in_2mb_blocks(f)

        isa = _core.supported_isas()[-1] if not os.environ.get("QWEN3PACK_ISA") else os.environ["QWEN3PACK_ISA"]
        threads_used = sorted({t for _, t, _ in RUNS})
        peak = {act: {t: t * _core.fma_peak_flops(isa, p["fma_seconds"], act) for t in threads_used}
                for act in ("f32", "bf16")}
        samples = {run: [] for run in RUNS}
        quantized_samples = {dtype: {t: [] for t in QUANTIZED_THREADS} for dtype in QUANTIZED}
        llama_quantized_samples = {dtype: {t: [] for t in QUANTIZED_THREADS} for dtype in QUANTIZED}
        long_context = {kv: [] for kv in KV_DTYPES}
        baselines = {name: {t: [] for t in threads_used} for name in ("transformers", "llama.cpp")}
        bandwidth = {t: [] for t in threads_used}
        alternations = {t: [] for t in threads_used}
        over_mpi, all_reduce_threads = [], []
        for repeat in range(args.repeats):
            log(args, f"round {repeat + 1} of {args.repeats} ...")
            for tp, threads, activations in RUNS:
                samples[(tp, threads, activations)].append(
                    bench_runtime(converted[tp], threads, p, rng, args.kv_dtype, activations))
                if tp == 1 and activations == "f32":  # each next to the run it is compared with: the same machine state
                    if gguf:
                        baselines["llama.cpp"][threads].append(bench_llama_cpp(gguf, threads, p))
                    for dtype in QUANTIZED:
                        quantized_samples[dtype][threads].append(
                            bench_runtime(quantized_dirs[dtype], threads, p, rng, args.kv_dtype))
                        if gguf_quantized[dtype]:
                            llama_quantized_samples[dtype][threads].append(
                                bench_llama_cpp(gguf_quantized[dtype], threads, p))
            for t in threads_used:
                if gguf:
                    alternations[t] += decode_alternations(converted[1], gguf, t, p, rng, args.kv_dtype)
            for kv in KV_DTYPES:
                long_context[kv].append(bench_long_context(converted, p, rng, kv))
            for t in threads_used:
                bandwidth[t].append(memory_bandwidth(t, p["bandwidth_bytes"]))
                if not args.no_transformers:
                    baselines["transformers"][t].append(bench_transformers(source, t, p, rng))
            over_mpi.append(bench_mpi(converted[2], args.quick, args.kv_dtype))
            all_reduce_threads.append(_core.all_reduce_seconds(
                config["hidden_size"], ALL_REDUCE_ITERATIONS // (10 if args.quick else 1), ranks=MPI_PROCESSES))

        bandwidth_median = {t: median(v) for t, v in bandwidth.items()}
        bandwidth = {t: max(v) for t, v in bandwidth.items()}
        flops_per_token = 2 * matrix_weights(config)
        runs = [summarize(tp, threads, activations, got, weight_bytes, bandwidth, flops_per_token, peak)
                for (tp, threads, activations), got in samples.items()]
        quantized = {dtype: summarize_quantized(dtype, quantized_dirs[dtype], quantized_samples[dtype], samples,
                                                converted[1], p, bandwidth, flops_per_token, peak, args)
                     for dtype in QUANTIZED}
        for dtype, by_threads in llama_quantized_samples.items():
            quantized[dtype]["llama_cpp"] = {
                t: {**{k: median([g[k] for g in got]) for k in ("prefill_tok_s", "decode_tok_s")},
                    "ours_over": ours_over(quantized_samples[dtype][t], got)}
                for t, got in by_threads.items() if got} or None
        baseline_results = {}
        for name, by_threads in baselines.items():
            results = {}
            for t, by_round in by_threads.items():
                got = [g for g in by_round if g]
                if got:
                    results[t] = {**{k: median([g[k] for g in got]) for k in ("prefill_tok_s", "decode_tok_s")},
                                  "ours_over": {act: ours_over(samples[(1, t, act)], by_round) for act in ("f32", "bf16")}}
            baseline_results[name] = results or None
        for t, results in (baseline_results["llama.cpp"] or {}).items():
            ratios = [ours / theirs for ours, theirs in alternations[t]]
            results["decode_alone"] = dict(alternations=len(ratios), ours_over=median(ratios), low=min(ratios),
                                           high=max(ratios), ours_tok_s=median([o for o, _ in alternations[t]]),
                                           decode_tok_s=median([theirs for _, theirs in alternations[t]]))
        ours_files = {"bf16": next(converted[1].glob("*.q3p")),
                      **{dtype: next(d.glob("*.q3p")) for dtype, d in quantized_dirs.items()}}
        page_cache = dict(ours={k: share_in_2mb_folios(f) for k, f in ours_files.items()},
                          llama_cpp={k: share_in_2mb_folios(f) for k, f in llama_files.items() if f} or None)
        mpi = None
        if over_mpi[0] is not None:
            threads_run = next(x for x in runs if x["tp"] == MPI_PROCESSES and x["threads"] == MPI_PROCESSES)
            mpi = dict(processes=MPI_PROCESSES, tp=MPI_PROCESSES, decode_tok_s=median([g["decode_tok_s"] for g in over_mpi]),
                       threads_decode_tok_s=threads_run["decode_tok_s"][1], all_reduce_floats=config["hidden_size"],
                       all_reduce_s=median([g["all_reduce_s"] for g in over_mpi]),
                       threads_all_reduce_s=median(all_reduce_threads))
        return dict(
            model=dict(size="tiny (--quick)" if args.quick else args.size, layers=config["num_hidden_layers"],
                       weight_bytes=weight_bytes, flops_per_token=flops_per_token),
            machine=dict(cpus=os.cpu_count(), isa=isa, fma_peak_flops=peak["f32"], bf16_peak_flops=peak["bf16"],
                         read_bandwidth_bytes_s=bandwidth, median_read_bandwidth_bytes_s=bandwidth_median),
            sizes=p, repeats=args.repeats, kv_dtype=args.kv_dtype, runs=runs, **quantized,
            long_context=dict(position=p["long_context"], tp=1, threads=LONG_CONTEXT_THREADS,
                              decode_tok_s={kv: median(v) for kv, v in long_context.items()}),
            bf16_accuracy=bf16_accuracy, conversion=conversion, mpi=mpi, page_cache_in_2mb_folios=page_cache,
            **baseline_results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ours_over(ours, theirs):
    """Our speed over a baseline's, prefill and decode at batch 1: the median over rounds of each
    round's ratio. The two runs of a round are measured minutes apart at most, and this machine's
    read bandwidth moves between rounds (see README, Performance), so a ratio of medians could
    compare a fast round of one with a slow round of the other."""
    pairs = [(o, t) for o, t in zip(ours, theirs) if t]
    return dict(prefill=median([o["prefill_tok_s"] / t["prefill_tok_s"] for o, t in pairs]),
                decode=median([o["decode_tok_s"][1] / t["decode_tok_s"] for o, t in pairs]))


def summarize_quantized(dtype, directory, got, samples, f32_directory, p, bandwidth, flops_per_token, peak, args):
    """The figures of the quantized conversion in `directory`: its runs, the median over rounds of
    its speed over the bf16 run just before it, and its accuracy against the f32 model."""
    weight_bytes = sum(r.file_size for r in formats.open(directory).ranks)
    runs = [summarize(1, threads, "f32", by_round, weight_bytes, bandwidth, flops_per_token, peak)
            for threads, by_round in got.items()]
    over_bf16 = {t: dict(prefill=median([q["prefill_tok_s"] / b["prefill_tok_s"]
                                         for q, b in zip(got[t], samples[(1, t, "f32")])]),
                         decode=median([q["decode_tok_s"][1] / b["decode_tok_s"][1]
                                        for q, b in zip(got[t], samples[(1, t, "f32")])]))
                 for t in QUANTIZED_THREADS}
    log(args, f"{dtype} accuracy against the f32 model ...")
    return dict(weight_bytes=weight_bytes, runs=runs, over_bf16=over_bf16, accuracy=accuracy(f32_directory, directory, p))


def log(args, message):
    if not args.json:
        print(message, file=sys.stderr, flush=True)


def ratio(ours, theirs):
    return f"{ours / theirs:.2f}x" if theirs else "-"


def print_table(r):
    m, mach, p = r["model"], r["machine"], r["sizes"]
    print(f"model: Qwen3-{m['size']} shapes, {m['layers']} layers, bf16, {m['weight_bytes'] / 1e9:.2f} GB of weights; "
          f"kernels: {mach['isa']}; KV cache {r['kv_dtype']}; {mach['cpus']} CPUs; medians of {r['repeats']}")
    for t, bw in mach["read_bandwidth_bytes_s"].items():
        print(f"machine, {t} thread(s): read bandwidth {bw / 1e9:.1f} GB/s, the best of the rounds (median "
              f"{mach['median_read_bandwidth_bytes_s'][t] / 1e9:.1f}; decode roofline "
              f"{bw / m['weight_bytes']:.1f} tokens/s); FMA peak {mach['fma_peak_flops'][t] / 1e9:.0f} GFLOP/s "
              f"(prefill roofline {mach['fma_peak_flops'][t] / m['flops_per_token']:.0f} tokens/s), with bf16 "
              f"activations {mach['bf16_peak_flops'][t] / 1e9:.0f} GFLOP/s")
    head = (f"{'tp':>2} {'thr':>3} {'act':>4} {'load s':>7} {'TTFT s':>7} {'prefill':>8} {'of peak':>7} "
            + " ".join(f"{'decode b' + str(b):>10}" for b in BATCHES) + f" {'of BW':>6}")
    print(f"\nqwen3pack (tokens/s; prefill of {p['prefill']} tokens, decode over {p['decode']} tokens)\n{head}")
    for x in r["runs"]:
        print(f"{x['tp']:>2} {x['threads']:>3} {x['activations']:>4} {x['load_s']:>7.2f} {x['ttft_s']:>7.2f} {x['prefill_tok_s']:>8.1f} "
              f"{x['prefill_of_fma_peak']:>6.0%} " + " ".join(f"{x['decode_tok_s'][b]:>10.1f}" for b in BATCHES)
              + f" {x['decode_of_roofline']:>6.0%}")
    lc = r["long_context"]
    f32, bf16 = lc["decode_tok_s"]["f32"], lc["decode_tok_s"]["bf16"]
    print(f"decode from position {lc['position']} (tp {lc['tp']}, {lc['threads']} threads): KV cache f32 {f32:.1f}, "
          f"bf16 {bf16:.1f} tokens/s (bf16 {ratio(bf16, f32)})")
    for name in ("transformers", "llama.cpp"):
        if not r[name]:
            print(f"\n{name}: not found" if name == "llama.cpp"
                  else f"\n{name}: not measured (--no-transformers, or not installed: make test installs it)")
            continue
        print(f"\n{name} (tokens/s), and qwen3pack at tp 1 over it, the median of each round's ratio "
              f"(f32 activations; bf16 activations)")
        for t, theirs in r[name].items():
            prefill = "; ".join(f"{theirs['ours_over'][act]['prefill']:.2f}x" for act in ("f32", "bf16"))
            decode = "; ".join(f"{theirs['ours_over'][act]['decode']:.2f}x" for act in ("f32", "bf16"))
            print(f"  {t} thread(s): prefill {theirs['prefill_tok_s']:.1f} (ours {prefill}), "
                  f"decode {theirs['decode_tok_s']:.1f} (ours {decode})")
        for t, theirs in r[name].items():
            if "decode_alone" in theirs:
                a = theirs["decode_alone"]
                print(f"  {t} thread(s), decode alone in {a['alternations']} alternations (f32 activations): ours "
                      f"{a['ours_tok_s']:.1f}, llama.cpp {a['decode_tok_s']:.1f}; ours over it {a['ours_over']:.2f}x "
                      f"(median; {a['low']:.2f}-{a['high']:.2f})")
    mpi = r["mpi"]
    if mpi is None:
        print("\nMPI: not installed (pip install 'qwen3pack[mpi]'; make test installs it)")
    else:
        print(f"\nMPI (mpiexec -n {mpi['processes']}, one thread per process), tp {mpi['tp']}: decode b1 "
              f"{mpi['decode_tok_s']:.1f} tokens/s, {ratio(mpi['decode_tok_s'], mpi['threads_decode_tok_s'])} of "
              f"{mpi['threads_decode_tok_s']:.1f} with {mpi['processes']} threads in one process; all-reduce of "
              f"{mpi['all_reduce_floats']} floats {mpi['all_reduce_s'] * 1e6:.1f} us over MPI, "
              f"{mpi['threads_all_reduce_s'] * 1e6:.1f} us between threads (2 per layer: "
              f"{2 * mpi['all_reduce_s'] * 1e6:.1f} us and {2 * mpi['threads_all_reduce_s'] * 1e6:.1f} us)")
    a = r["bf16_accuracy"]
    if a is None:
        print("\nbf16 against f32 weights: not measured (a --checkpoint has no f32 original here)")
    else:
        print(f"\nbf16 weights against the f32 weights they were rounded from, {a['prompts']} prompts of {a['tokens']} "
              f"tokens: mean KL {a['mean_kl']:.2e}, top-1 agreement {a['top1']:.1%}, largest logit error "
              f"{a['max_logit_error']:.3f} (this random checkpoint's sensitivity to weight error)")
    for dtype in QUANTIZED:
        q = r[dtype]
        print(f"\n{dtype} weights at tp 1 ({q['weight_bytes'] / 1e9:.2f} GB; tokens/s, and the median over rounds of "
              f"{dtype} / bf16 measured one after the other)")
        for x in q["runs"]:
            ratios = q["over_bf16"][x["threads"]]
            print(f"  {x['threads']} thread(s): prefill {x['prefill_tok_s']:.1f} ({ratios['prefill']:.2f}x bf16), "
                  f"decode b1 {x['decode_tok_s'][1]:.1f} ({ratios['decode']:.2f}x bf16, {x['decode_of_roofline']:.0%} of BW), "
                  f"b16 {x['decode_tok_s'][16]:.1f}")
        print_llama_quantized(dtype, q)
        a = q["accuracy"]
        print(f"{dtype} against the f32 model, {a['prompts']} prompts of {a['tokens']} tokens: mean KL {a['mean_kl']:.2e}"
              + (f" ({a['mean_kl'] / r['bf16_accuracy']['mean_kl']:.0f}x bf16's)" if r["bf16_accuracy"] else "")
              + f", top-1 agreement {a['top1']:.1%}, largest logit error {a['max_logit_error']:.3f}")
    shares = r["page_cache_in_2mb_folios"]
    print("\npage cache in 2 MB folios, after the rounds: ours "
          + ", ".join(f"{k} {v:.0%}" for k, v in shares["ours"].items())
          + ("; llama.cpp's files (rewritten in 2 MB blocks) "
             + ", ".join(f"{k} {v:.0%}" for k, v in shares["llama_cpp"].items()) if shares["llama_cpp"] else ""))
    c = r["conversion"]
    print(f"\nconvert {c['bytes'] / 1e9:.2f} GB at tp={c['tp']}: {c['convert_s']:.2f} s (q4 {c['q4_convert_s']:.2f} s); "
          f"cp + sync {c['cp_sync_s']:.2f} s; convert/cp {c['convert_over_cp']:.2f} (target <= 1.5), q4 "
          f"{c['q4_over_cp']:.2f} (target <= 3); CPU s: convert {c['cpu_s']['convert']:.2f}, q4 "
          f"{c['cpu_s']['convert_q4']:.2f}, cp + sync {c['cpu_s']['cp_sync']:.2f}; validate {c['validate_gb_s']:.2f} GB/s")


def print_llama_quantized(dtype, q):
    name = f"llama.cpp {LLAMA_CPP_TYPES[dtype]}"
    if not q["llama_cpp"]:
        print(f"  {name}: not found")
    for t, theirs in (q["llama_cpp"] or {}).items():
        print(f"  {name}, {t} thread(s): prefill {theirs['prefill_tok_s']:.1f} (ours "
              f"{theirs['ours_over']['prefill']:.2f}x), decode {theirs['decode_tok_s']:.1f} "
              f"(ours {theirs['ours_over']['decode']:.2f}x), medians of each round's ratio")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="0.6b")
    parser.add_argument("--configs", default="tests/fixtures/configs", help="where the Qwen3 config.json files are")
    parser.add_argument("--checkpoint", help="a bf16 checkpoint directory to take instead of making one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="bf16",
                        help="the KV cache of the runs of the table: bf16 is the runtime's default for a bf16 "
                             "model, and llama.cpp's f16 cache's like for like (the long-context line measures both)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few tokens: checks that it runs")
    parser.add_argument("--mpi-process", metavar="DIR", help=argparse.SUPPRESS)  # a process of bench_mpi's run
    args = parser.parse_args(argv)
    if args.mpi_process:
        return mpi_process(args.mpi_process, args.quick, args.kv_dtype)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return results


if __name__ == "__main__":
    main()
