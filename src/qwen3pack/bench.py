"""`make bench`: speed measured against baselines in the same run, printed as medians and ratios.

- convert: a Qwen3-0.6B-shaped bf16 checkpoint (random weights) converted at tp=2, against `cp`
  of the same safetensors bytes (page cache warm for both).
- validate: full checksum validation of the result, in GB/s.
"""
import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .convert import convert
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=QWEN3_0_6B["num_hidden_layers"])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwen3pack-bench-") as tmp:
        work = Path(tmp)
        print(f"making a Qwen3-0.6B-shaped bf16 checkpoint with {args.layers} layers ...", flush=True)
        source = make_checkpoint(work / "source", dtype="bf16", **{**QWEN3_0_6B, "num_hidden_layers": args.layers})
        converted = bench_convert(work, source, args.tp, args.repeats)
        bench_validate(converted, args.repeats)


if __name__ == "__main__":
    main()
