"""`make bench` in its quick mode: it runs end to end and reports every field (never a speed)."""
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

import pytest

from qwen3pack import bench
from qwen3pack.formats.rankfile import WRITE_BLOCK

RUN_FIELDS = {"tp", "threads", "activations", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "decode_of_roofline",
              "prefill_of_fma_peak"}


def stand_in_llama_cpp(directory, monkeypatch):
    """A llama.cpp tree and build in `directory` that run as the real ones are run, quickly: a
    converter whose tokenizer check refuses make_checkpoint's tokenizer (as the real one does) and
    writes 5 MB, a llama-quantize that copies, and a llama-bench that reports fixed speeds."""
    tree = directory / "llama.cpp"
    (tree / "conversion").mkdir(parents=True)
    (tree / "conversion" / "__init__.py").write_text("")
    (tree / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n")
    (tree / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom conversion import base\n"
        "header = (sys.argv[1] + ' ' + base.TextModel().get_vocab_base_pre(None) + '\\n').encode()\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(header + bytes(5 << 20))\n")
    build = directory / "build"
    build.mkdir()
    scripts = {
        "llama-bench": "import json, sys\n"
                       "a = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
                       "rows = [dict(n_prompt=int(a['-p']), n_gen=0, avg_ts=100.0)] if int(a['-p']) else []\n"
                       "rows += [dict(n_prompt=0, n_gen=int(a['-n']), avg_ts=10.0)] if int(a['-n']) else []\n"
                       "print(json.dumps(rows))\n",
        "llama-quantize": "import shutil, sys\nshutil.copyfile(sys.argv[-3], sys.argv[-2])\n"}
    for name, text in scripts.items():
        (build / name).write_text(f"#!{sys.executable}\n{text}")
        (build / name).chmod(0o755)
    monkeypatch.setenv("LLAMA_BENCH", str(build / "llama-bench"))
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tree))


def test_the_quick_benchmark_reports_every_field(capsys, monkeypatch, tmp_path):
    stand_in_llama_cpp(tmp_path, monkeypatch)
    results = bench.main(["--quick", "--json", "--repeats", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["runs"] and set(printed) >= {"model", "machine", "sizes", "runs", "long_context", "conversion",
                                                 "transformers", "llama.cpp"}
    assert [(r["tp"], r["threads"], r["activations"]) for r in printed["runs"]] == [
        (1, 1, "f32"), (1, 2, "f32"), (2, 2, "f32"), (1, 1, "bf16"), (1, 2, "bf16")]
    for run in printed["runs"]:
        assert set(run) == RUN_FIELDS
        assert set(run["decode_tok_s"]) == {"1", "4", "16"}
        assert all(v > 0 for v in run["decode_tok_s"].values())
    long_context = printed["long_context"]
    assert (long_context["position"], long_context["tp"], long_context["threads"]) == (40, 1, 2)
    assert set(long_context["decode_tok_s"]) == {"f32", "bf16"} and all(v > 0 for v in long_context["decode_tok_s"].values())
    assert set(printed["machine"]["read_bandwidth_bytes_s"]) == {"1", "2"}
    assert set(printed["machine"]["fma_peak_flops"]) == set(printed["machine"]["bf16_peak_flops"]) == {"1", "2"}
    assert set(printed["conversion"]) == {"bytes", "tp", "convert_s", "q4_convert_s", "cp_sync_s", "convert_over_cp",
                                          "q4_over_cp", "cpu_s", "validate_gb_s"}
    assert set(printed["conversion"]["cpu_s"]) == {"cp_sync", "convert", "convert_q4"}
    assert set(printed["transformers"]) == {"1", "2"}
    assert set(printed["transformers"]["1"]) == {"prefill_tok_s", "decode_tok_s", "ours_over"}
    assert set(printed["llama.cpp"]) == {"1", "2"}
    assert set(printed["llama.cpp"]["2"]) == {"prefill_tok_s", "decode_tok_s", "ours_over", "decode_alone"}
    alone = printed["llama.cpp"]["2"]["decode_alone"]
    assert alone["alternations"] == 1 and alone["decode_tok_s"] == 10.0  # the stand-in's
    assert alone["low"] == alone["ours_over"] == alone["high"] == alone["ours_tok_s"] / 10.0
    if bench.mpiexec() is None:
        assert printed["mpi"] is None
    else:
        assert set(printed["mpi"]) == {"processes", "tp", "decode_tok_s", "threads_decode_tok_s", "all_reduce_floats",
                                       "all_reduce_s", "threads_all_reduce_s"}
        assert printed["mpi"]["decode_tok_s"] > 0 and printed["mpi"]["all_reduce_s"] > 0
    for dtype in ("q8", "q4"):
        q = printed[dtype]
        assert [r["threads"] for r in q["runs"]] == [1, 2] and all(set(r) == RUN_FIELDS for r in q["runs"])
        assert set(q["over_bf16"]) == {"1", "2"} and set(q["over_bf16"]["1"]) == {"prefill", "decode"}
        assert set(q["accuracy"]) == {"prompts", "tokens", "mean_kl", "top1", "max_logit_error"}
        assert 0 <= q["accuracy"]["top1"] <= 1 and q["accuracy"]["mean_kl"] >= 0
    assert set(printed["q8"]["llama_cpp"]) == set(printed["q4"]["llama_cpp"]) == {"1", "2"}
    shares = printed["page_cache_in_2mb_folios"]
    assert set(shares["ours"]) == {"bf16", "q8", "q4"} and set(shares["llama_cpp"]) == {"bf16", "q8_0", "Q4_K"}
    assert all(0 <= v <= 1 for kind in shares.values() for v in kind.values())
    assert set(printed["bf16_accuracy"]) == {"prompts", "tokens", "mean_kl", "top1", "max_logit_error"}
    assert set(printed["machine"]["median_read_bandwidth_bytes_s"]) == {"1", "2"}
    assert set(printed["transformers"]["1"]["ours_over"]) == {"f32", "bf16"}

    bench.print_table(results)
    table = capsys.readouterr().out
    for line in ("read bandwidth", "FMA peak", "with bf16 activations", "decode b16", "decode from position 40",
                 "transformers (tokens/s)", "llama.cpp (tokens/s)", "decode alone in 1 alternations", "convert/cp", "x bf16, ",
                 "llama.cpp q8_0, 1 thread(s)", "llama.cpp Q4_K, 2 thread(s)", "page cache in 2 MB folios",
                 "q8 against the f32 model", "q4 weights at tp 1", "q4 against the f32 model", "x bf16's)",
                 "bf16 weights against the f32 weights they were rounded from", "the median of each round's ratio",
                 "MPI: not installed" if bench.mpiexec() is None else "MPI (mpiexec -n 2"):
        assert line in table


def test_a_ratio_to_a_baseline_pairs_the_runs_of_each_round():
    # Round 2 ran while the machine read memory at twice round 1's rate: both sides sped up. The
    # ratio of the medians (40/15 = 2.67) would mix a slow round of one side with a fast one of the other.
    ours = [dict(prefill_tok_s=20.0, decode_tok_s={1: 10.0}), dict(prefill_tok_s=60.0, decode_tok_s={1: 30.0}),
            dict(prefill_tok_s=40.0, decode_tok_s={1: 20.0})]
    theirs = [dict(prefill_tok_s=10.0, decode_tok_s=8.0), dict(prefill_tok_s=20.0, decode_tok_s=24.0), None]
    assert bench.ours_over(ours, theirs) == dict(prefill=2.5, decode=1.25)


def test_the_quick_accuracy_benchmark_trains_a_model_and_reports_each_conversion_against_f32(capsys):
    from qwen3pack import bench_accuracy
    results = bench_accuracy.main(["--quick", "--steps", "2"])
    assert results["steps"] == 2 and results["training_tokens"] > results["held_out_tokens"] > 0
    assert results["perplexity"] > 1
    kl = {name: a["mean_kl"] for name, a in results["against_f32"].items()}
    assert set(kl) == {"bf16", "q8", "q6", "q4", "q4, embed q8", "q4, embed q4"}
    assert 0 < kl["bf16"] < kl["q8"] < kl["q6"] < kl["q4"] < kl["q4, embed q4"]  # fewer bits, more error
    assert all(0 <= a["top1"] <= 1 for a in results["against_f32"].values())
    table = capsys.readouterr().out
    for line in ("trained 2 steps", "f32 perplexity", "against the f32 conversion", "q4, embed q4"):
        assert line in table


def test_llama_cpp_is_optional(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_BENCH", str(tmp_path / "missing-llama-bench"))
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    assert bench.llama_cpp_gguf(tmp_path, tmp_path) is None


def test_the_gguf_of_a_test_tokenizer_is_made_with_qwen2_s_pre_tokenizer(monkeypatch, tmp_path):
    # The stand-in converter refuses the tokenizer, as the real one refuses make_checkpoint's: the
    # benchmark's GGUF is still made (llama-bench feeds token ids).
    stand_in_llama_cpp(tmp_path, monkeypatch)
    gguf = bench.llama_cpp_gguf(tmp_path / "source", tmp_path)
    assert gguf.read_bytes().split(b"\n")[0].decode() == f"{tmp_path / 'source'} qwen2"


def test_llama_cpp_s_files_are_written_again_in_whole_2mb_blocks(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    data = np.random.default_rng(0).integers(0, 256, 5 * WRITE_BLOCK + 12345, dtype=np.uint8).tobytes()
    gguf.write_bytes(data)
    writes = []
    real_pwrite = os.pwrite

    def pwrite(fd, block, offset):
        writes.append((offset, len(block)))
        return real_pwrite(fd, block, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    assert bench.rewrite_in_2mb_blocks(gguf) == gguf
    assert gguf.read_bytes() == data and not list(tmp_path.glob("*.2mb"))
    assert writes == [(i * WRITE_BLOCK, WRITE_BLOCK) for i in range(5)] + [(5 * WRITE_BLOCK, 12345)]


@pytest.mark.parametrize("size", sorted(bench.SIZES))
def test_the_model_shapes_come_from_the_fixture_configs(size):
    shape = bench.model_shape(size, Path(__file__).with_name("fixtures") / "configs", quick=False)
    assert shape["hidden_size"] in (1024, 2048) and shape["vocab_size"] == 151936


def test_the_quick_serving_benchmark_reports_each_concurrency(capsys):
    from qwen3pack import bench_serve
    bench_serve.main(["--quick", "--layers", "2", "--tp", "1", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("serve     tiny widths, 2 layers, bf16, tp 1, 1 threads, 4 tokens")
    for line, concurrency in zip(lines[1:], (1, 2)):
        assert line.strip().startswith(f"concurrency {concurrency:3d}: time to first token")
        assert "tokens/s in all" in line and "requests per forward pass" in line
    assert "a conversation's second turn of" in lines[3] and "time to first token" in lines[3]
    cached, tokens = (int(x) for x in re.search(r"of (\d+) prompt tokens \((\d+) cached\)", lines[3]).groups()[::-1])
    assert 0 < cached < tokens
    assert len(lines) == 4
