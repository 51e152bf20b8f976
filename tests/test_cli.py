"""`qwen3pack validate` and `qwen3pack inspect` as CI pipelines and users run them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3pack.convert import convert

BIN = Path(sys.executable).parent


def run(*args):
    return subprocess.run([str(BIN / "qwen3pack"), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from qwen3pack.testing import make_checkpoint
    root = tmp_path_factory.mktemp("cli")
    source = make_checkpoint(root / "source", dtype="bf16", use_sliding_window=True, sliding_window=16,
                             max_window_layers=1, num_hidden_layers=3)
    convert(source, root / "out", tp=2)
    return root / "out"


def test_validate_exits_zero_and_says_valid(converted):
    result = run("validate", converted)
    assert result.returncode == 0
    assert result.stdout.startswith(f"valid: {converted} (2 files,")


def test_validate_json_reports_for_ci(converted):
    result = run("validate", converted, "--json", "--quick")
    report = json.loads(result.stdout)
    assert result.returncode == 0
    assert report["valid"] is True and report["problems"] == [] and report["files"] == 2
    assert report["checksums_checked"] is False


def test_validate_lists_every_problem_and_exits_non_zero(converted, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    (broken / "rank-00001-of-00002.q3p").unlink()
    data = bytearray((broken / "rank-00000-of-00002.q3p").read_bytes())
    offset = json.loads(data[64:64 + int.from_bytes(data[24:32], "little")])["tensors"][0]["offset"]
    data[offset] ^= 0xFF
    (broken / "rank-00000-of-00002.q3p").write_bytes(data)
    result = run("validate", broken, "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["valid"] is False
    assert report["problems"] == [
        "rank-00001-of-00002.q3p: missing",
        "rank-00000-of-00002.q3p: tensor model.embed_tokens.weight: checksum mismatch (the data is damaged)",
    ]
    assert run("validate", broken).stdout.splitlines()[:2] == report["problems"]


def test_validate_of_a_directory_that_is_no_conversion_names_it(tmp_path):
    result = run("validate", tmp_path)
    assert result.returncode == 1
    assert result.stdout.strip() == f"{tmp_path}/manifest.json: missing"


def test_inspect_summarizes_model_layout_and_layer_types(converted):
    result = run("inspect", converted)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "3 layers, hidden 64" in text
    assert "layer types  1 full_attention, 2 sliding_attention (window 16)" in text
    assert "tp 2, bf16 weights" in text
    assert "rank-00001-of-00002.q3p" in text


def test_the_demo_converts_validates_and_generates_text(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen3pack.demo", "--out", str(tmp_path), "--tokens", "8"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2. converted at tp=2" in result.stdout
    assert "3. validated: valid (2 rank files" in result.stdout
    assert "(8 tokens in" in result.stdout


def test_bench_is_a_subcommand_with_the_benchmark_s_own_options():
    result = run("bench", "--help")
    assert result.returncode == 0
    assert "--quick" in result.stdout and "--json" in result.stdout and "--size" in result.stdout
