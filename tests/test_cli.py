"""`qwen3pack validate` and `qwen3pack inspect` as CI pipelines and users run them."""
import json
import re
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


def test_the_demo_converts_validates_generates_text_and_chats(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qwen3pack.demo", "--out", str(tmp_path), "--tokens", "8"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "2. converted at tp=2" in result.stdout
    assert "3. validated: valid (2 rank files" in result.stdout
    assert re.search(r"\n   \(\d tokens in ", result.stdout)
    chat = result.stdout[result.stdout.index("5. chatting"):]
    assert chat.count("   user: ") == 2 and chat.count("   assistant: ") == 2
    assert re.search(r"\(\d tokens; [1-9]\d* of the \d+ prompt tokens reused from the cache", chat)  # 2nd turn


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A random checkpoint with a Qwen3-like tokenizer and template, converted at tp=2."""
    from qwen3pack.testing import make_checkpoint
    root = tmp_path_factory.mktemp("chat")
    convert(make_checkpoint(root / "source", seed=3, qwen3_tokenizer=True), root / "out", tp=2)
    return root / "out"


def run_with_input(text, *args):
    return subprocess.run([str(BIN / "qwen3pack"), *map(str, args)], input=text, capture_output=True, text=True)


def test_generate_streams_the_answer_to_a_user_message(chat_model):
    import qwen3pack
    result = run("generate", chat_model, "Hello", "--max-tokens", 8, "--temperature", 0, "--threads", 2)
    assert result.returncode == 0, result.stderr
    with qwen3pack.load(chat_model, threads=1) as m:
        expected = m.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0).text
        continued = m.complete("Hello", max_tokens=8, seed=4, stop="x").text
    assert result.stdout == expected.rstrip("\n") + "\n" and expected.strip()
    raw = run("generate", chat_model, "Hello", "--raw", "--max-tokens", 8, "--seed", 4, "--stop", "x")
    assert raw.returncode == 0 and raw.stdout == continued.rstrip("\n") + "\n"


def test_generate_with_a_bf16_kv_cache_gives_the_text_of_the_python_api(chat_model):
    import qwen3pack
    result = run("generate", chat_model, "Hello", "--max-tokens", 8, "--temperature", 0, "--kv-dtype", "bf16")
    assert result.returncode == 0, result.stderr
    with qwen3pack.load(chat_model, threads=1, kv_dtype="bf16") as m:
        expected = m.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0).text
    assert result.stdout == expected.rstrip("\n") + "\n"


def test_chat_from_a_pipe_answers_one_turn_per_line(chat_model):
    import qwen3pack
    result = run_with_input("Hello\n/no_think\nHow are you?\n", "chat", chat_model, "--system", "Be brief.",
                            "--max-tokens", 6, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    with qwen3pack.load(chat_model, threads=1) as m:
        conversation = m.chat_session(system="Be brief.")
        first = conversation.send("Hello", max_tokens=6, temperature=0).content
        conversation.enable_thinking = False
        second = conversation.send("How are you?", max_tokens=6, temperature=0).content
    assert result.stdout == f"{first}\n{second}\n"
    assert result.stderr.count("tokens/s") == 2 and "(thinking off)" in result.stderr


def run_in_a_terminal(text, *args, timeout=120):
    """Runs a command with a pseudo-terminal as its stdin, stdout and stderr, as a user at a terminal
    does, typing `text`; returns its exit status and everything it wrote (line ends as "\n")."""
    import os
    import pty
    import select
    controller, terminal = pty.openpty()
    process = subprocess.Popen([str(BIN / "qwen3pack"), *map(str, args)], stdin=terminal, stdout=terminal,
                               stderr=terminal, close_fds=True)
    os.close(terminal)
    os.write(controller, text.encode())
    output = b""
    while select.select([controller], [], [], timeout)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: every process holding the terminal has closed it
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return process.wait(timeout=timeout), output.decode().replace("\r\n", "\n")


def test_chat_in_a_terminal_names_its_precision_prompts_and_answers(chat_model):
    import qwen3pack
    status, output = run_in_a_terminal("Hello\n/exit\n", "chat", chat_model, "--no-think", "--max-tokens", 6,
                                       "--temperature", 0)
    assert status == 0, output
    with qwen3pack.load(chat_model, threads=1) as m:
        answer = m.chat_session(enable_thinking=False).send("Hello", max_tokens=6, temperature=0).content
        banner = (f"qwen3pack chat: {chat_model} (max context {m.max_context}, KV cache f32, activations f32). "
                  "/reset forget the conversation, /think let the model think first")
    assert f"\n{banner}" in output, output  # after the terminal's echo of what was typed; an f32 model computes in f32
    assert f"> {answer}" in output and "tokens/s" in output


def test_generate_with_bf16_activations_gives_the_text_of_the_api_with_them(converted):
    import qwen3pack
    result = run("generate", converted, "Hello", "--raw", "--max-tokens", 8, "--temperature", 0,
                 "--activations", "bf16")
    assert result.returncode == 0, result.stderr
    with qwen3pack.load(converted, threads=1, activations="bf16") as m:
        assert result.stdout == m.complete("Hello", max_tokens=8, temperature=0).text.rstrip("\n") + "\n"
    for command in ("generate", "chat", "serve"):
        help_text = run(command, "--help").stdout
        assert "--activations [auto|f32|bf16]" in help_text and "--kv-dtype [auto|f32|bf16]" in help_text


@pytest.mark.parametrize("args, message", [
    (["generate", "{model}", "hi", "--max-tokens", "0"], "Invalid value for '--max-tokens'"),
    (["generate", "{model}", "hi", "--raw", "--chat"], "--raw and --chat exclude each other"),
    (["generate", "{model}", "hi", "--raw", "--no-think"], "--think/--no-think apply to --chat, not to --raw"),
    (["generate", "{model}"], "Missing argument 'PROMPT'"),
    (["chat", "{model}", "--temperature", "warm"], "Invalid value for '--temperature'"),
    (["generate", "{model}", "hi", "--kv-dtype", "f16"], "Invalid value for '--kv-dtype': 'f16' is not one of"),
    (["serve", "{model}", "--kv-dtype", "int8"], "Invalid value for '--kv-dtype': 'int8' is not one of"),
])
def test_text_commands_give_usage_errors_for_bad_arguments(chat_model, args, message):
    result = run(*[a.format(model=chat_model) for a in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "{model}", "hi", "--temperature", "-1"], "error: temperature must be a finite number >= 0"),
    (["generate", "{model}", "hi", "--max-context", "8"], "error: the prompt has 17 tokens, beyond max_context = 8"),
    (["generate", "{missing}", "hi"], "error: {missing}"),
    (["chat", "{missing}"], "error: {missing}"),
    (["chat", "{bare}"], "error: this model has no tokenizer.json"),
    (["generate", "{model}", "hi", "--activations", "bf16"],
     "error: activations='bf16' needs bf16 weights; this model's are f32"),
])
def test_text_commands_report_bad_values_in_one_line(chat_model, tmp_path, args, message):
    import shutil
    missing, bare = tmp_path / "missing", tmp_path / "bare"
    shutil.copytree(chat_model, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    result = run(*[a.format(model=chat_model, missing=missing, bare=bare) for a in args])
    assert result.returncode == 1
    assert result.stderr.startswith(message.format(missing=missing)) and result.stderr.count("\n") == 1


def test_bench_is_a_subcommand_with_the_benchmark_s_own_options():
    result = run("bench", "--help")
    assert result.returncode == 0
    assert "--quick" in result.stdout and "--json" in result.stdout and "--size" in result.stdout
