"""`make bench`: speed measured against baselines in the same run, printed as medians and ratios.

- convert: a Qwen3-0.6B-shaped bf16 checkpoint (random weights) converted at tp=2, against `cp`
  of the same safetensors bytes (page cache warm for both).
- validate: full checksum validation of the result, in GB/s.
- decode: greedy tokens/s of the runtime on the converted model, against transformers (torch, CPU,
  bf16) on the source checkpoint, and against the memory-bandwidth roofline (weight bytes read per
  token over the bandwidth that numpy measures here, with the same threads).
"""
import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .convert import convert
from . import formats
from .formats import validate
from .testing import make_checkpoint

QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1000000.0)


def median_seconds(run, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_convert(work, source, tp, repeats):
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    copy_dir = work / "copy"

    def copy():
        shutil.rmtree(copy_dir, ignore_errors=True)
        copy_dir.mkdir()
        subprocess.run(["cp", *map(str, source.glob("*.safetensors")), str(copy_dir)], check=True)
        subprocess.run(["sync"], check=True)

    out = work / "converted"
    cp_seconds = median_seconds(copy, repeats)
    convert_seconds = median_seconds(lambda: convert(source, out, tp=tp, force=True), repeats)
    shutil.rmtree(copy_dir)
    print(f"convert   {source_bytes / 1e9:.2f} GB at tp={tp}: {convert_seconds:.2f} s "
          f"({source_bytes / convert_seconds / 1e9:.2f} GB/s); cp of the same bytes {cp_seconds:.2f} s "
          f"({source_bytes / cp_seconds / 1e9:.2f} GB/s); convert/cp speed ratio {cp_seconds / convert_seconds:.2f} "
          f"(target >= 0.5)")
    return out


def bench_validate(converted, repeats):
    report = validate(converted)
    assert report.ok, report.problems
    seconds = median_seconds(lambda: validate(converted), repeats)
    print(f"validate  {report.bytes / 1e9:.2f} GB with checksums: {seconds:.2f} s "
          f"({report.bytes / seconds / 1e9:.2f} GB/s, target >= 1)")


def memory_bandwidth(threads):
    """Bytes/s of reading a 1 GiB array, split over `threads` threads (numpy releases the GIL)."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor
    data = np.ones(1 << 27, dtype=np.float64)
    chunks = np.array_split(data, threads)
    with ThreadPoolExecutor(threads) as pool:
        seconds = median_seconds(lambda: list(pool.map(np.sum, chunks)), 5)
    return data.nbytes / seconds


def decode_seconds_per_token(generate, prompt, tokens):
    started = time.perf_counter()
    count = sum(1 for _ in generate(prompt, tokens))
    return (time.perf_counter() - started) / count


def bench_decode(source, converted, threads, tokens, repeats):
    import numpy as np
    from . import load
    prompt = list(np.random.default_rng(0).integers(0, 1000, 16))
    weights_per_token = sum(r.file_size for r in formats.open(converted).ranks)
    with load(converted, threads=threads, max_context=len(prompt) + tokens + 1) as model:
        ours = statistics.median(
            decode_seconds_per_token(lambda p, n: model.generate(p, max_new_tokens=n, stop_token_ids=[]),
                                     prompt, tokens)
            for _ in range(repeats))
    bandwidth = memory_bandwidth(threads)
    roofline = weights_per_token / bandwidth
    theirs = transformers_seconds_per_token(source, prompt, tokens, threads)
    print(f"decode    {1 / ours:.1f} tokens/s with {threads} threads; transformers bf16 {1 / theirs:.1f} tokens/s "
          f"(ours/theirs {theirs / ours:.2f}); roofline {1 / roofline:.1f} tokens/s at "
          f"{bandwidth / 1e9:.1f} GB/s for {weights_per_token / 1e9:.2f} GB of weights (ours/roofline "
          f"{roofline / ours:.2f})")


def transformers_seconds_per_token(source, prompt, tokens, threads):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("          (transformers not installed: `make test` installs it)")
        return float("nan")
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return (time.perf_counter() - started) / (out.shape[1] - len(prompt))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen3pack-bench-") as tmp:
        work = Path(tmp)
        print(f"making a Qwen3-0.6B-shaped bf16 checkpoint with {args.layers} layers ...", flush=True)
        source = make_checkpoint(work / "source", dtype="bf16", **{**QWEN3_0_6B, "num_hidden_layers": args.layers})
        converted = bench_convert(work, source, args.tp, args.repeats)
        bench_validate(converted, args.repeats)
        bench_decode(source, converted, args.threads, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
