"""The MPI backend under a real `mpiexec -n 2` (the processes are subprocesses of the test): the
same bits as the threads backend, each process mapping only its own rank files, and failures that
end every process with a message instead of a hang."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import qwen3pack
from qwen3pack.convert import convert

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
NO_EXTRA = "import sys; sys.modules['mpi4py'] = None\n"  # a Python without the qwen3pack[mpi] extra


def mpi_installed():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return MPIEXEC.exists()


needs_mpi = pytest.mark.skipif(not mpi_installed(), reason="MPI not installed: pip install 'qwen3pack[mpi]'")


def mpiexec(*args, timeout=60):
    return subprocess.run([str(MPIEXEC), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def run_script(tmp_path, code, *args, processes=2, timeout=60):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return mpiexec("-n", processes, sys.executable, script, *args, timeout=timeout)


@pytest.fixture(scope="module")
def models(tmp_path_factory, checkpoints):
    """model(tp) -> a converted directory of a checkpoint with sliding-window and full layers."""
    checkpoint = checkpoints(seed=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                             num_hidden_layers=3, sliding_window=5, use_sliding_window=True, max_window_layers=3)
    made = {}

    def model(tp):
        if tp not in made:
            made[tp] = tmp_path_factory.mktemp("mpi") / f"tp{tp}"
            convert(checkpoint, made[tp], tp=tp)
        return made[tp]

    return model


COMPARE = """
    import json, sys
    import numpy as np
    import qwen3pack
    directory, ranks_per_process, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model = qwen3pack.load(directory, backend="mpi", ranks_per_process=ranks_per_process, threads=1)
    # only process 0 gets here; it reads which rank files every process maps, while they are mapped
    maps = {p["process"]: sorted({line.split()[-1] for line in open(f"/proc/{p['pid']}/maps") if line.strip().endswith(".q3p")})
            for p in model.processes}
    ids = [(7 * i + 3) % model.vocab_size for i in range(12)]
    session = model.session()
    steps = [session.append(ids[:9])] + [session.append([t]) for t in ids[9:]]
    refused = []  # steps that process 0 refuses reach no other process: the run goes on in step
    for step in (lambda: model.session().append([1] * (model.max_context + 1)), lambda: session.truncate(99)):
        try:
            step()
        except ValueError as error:
            refused.append(type(error).__name__)
    try:
        qwen3pack.load(directory, backend="mpi")
    except ValueError as error:
        refused.append(str(error))
    np.savez(out + "/logits.npz", full=model.logits(ids), steps=np.stack(steps),
             batch=np.concatenate(model.logits_batch([ids[:5], ids[:11]])))
    json.dump({"maps": maps, "greedy": [int(t) for t in model.generate(ids, 24, stop_token_ids=[])],
               "refused": refused}, open(out + "/result.json", "w"))
"""


@needs_mpi
@pytest.mark.parametrize("tp,ranks_per_process", [(2, 1), (4, 2)])
def test_logits_and_greedy_tokens_over_mpi_equal_the_threads_backend_bit_for_bit(models, tmp_path, tp,
                                                                                  ranks_per_process):
    directory = models(tp)
    result = run_script(tmp_path, COMPARE, directory, ranks_per_process, tmp_path)
    assert result.returncode == 0, result.stderr
    over_mpi = np.load(tmp_path / "logits.npz")
    report = json.loads((tmp_path / "result.json").read_text())
    with qwen3pack.load(directory, threads=2) as model:
        ids = [(7 * i + 3) % model.vocab_size for i in range(12)]
        session = model.session()
        steps = [session.append(ids[:9])] + [session.append([t]) for t in ids[9:]]
        assert np.array_equal(over_mpi["full"], model.logits(ids))
        assert np.array_equal(over_mpi["steps"], np.stack(steps))
        assert np.array_equal(over_mpi["batch"], np.concatenate(model.logits_batch([ids[:5], ids[:11]])))
        assert report["greedy"] == [int(t) for t in model.generate(ids, 24, stop_token_ids=[])]
    assert report["refused"] == ["ContextLengthError", "UsageError",
                                 "an MPI run loads one model (backend='mpi'): this one was loaded already"]
    # each process maps the files of its own ranks, and no other
    files = sorted(str(p.resolve()) for p in Path(directory).glob("*.q3p"))
    assert report["maps"] == {str(p): files[p * ranks_per_process:(p + 1) * ranks_per_process] for p in range(2)}


DEFAULT_PRECISION = """
    import sys
    import numpy as np
    import qwen3pack
    directory, out = sys.argv[1], sys.argv[2]
    model = qwen3pack.load(directory, backend="mpi", threads=1)  # "auto": the weights' own precision
    session = model.session()
    steps = [session.append(list(range(1, 10)))] + [session.append([t]) for t in (11, 12, 13)]
    np.savez(out + "/logits.npz", steps=np.stack(steps), kv_cache_bytes=session.kv_cache_bytes,
             precision=[model.kv_dtype, model.activations])
"""


@needs_mpi
@pytest.mark.parametrize("dtype,activations", [("q8", "f32"), ("q4", "f32"), ("bf16", "bf16")])
def test_quantized_or_bf16_weights_in_their_default_precision_over_mpi_equal_the_threads_backend_bit_for_bit(
        checkpoints, tmp_path, dtype, activations):
    directory = tmp_path / dtype
    convert(checkpoints(seed=5), directory, tp=2, dtype=dtype)
    result = run_script(tmp_path, DEFAULT_PRECISION, directory, tmp_path)
    assert result.returncode == 0, result.stderr
    over_mpi = np.load(tmp_path / "logits.npz")
    assert list(over_mpi["precision"]) == ["bf16", activations]  # a bf16 KV cache for all three
    with qwen3pack.load(directory, threads=2, kv_dtype="bf16", activations=activations) as model:
        session = model.session()
        steps = [session.append(list(range(1, 10)))] + [session.append([t]) for t in (11, 12, 13)]
        assert np.array_equal(over_mpi["steps"], np.stack(steps))
        # process 0's cache holds its own rank's KV heads: half of the threads backend's two ranks
        assert int(over_mpi["kv_cache_bytes"]) * 2 == session.kv_cache_bytes


@needs_mpi
def test_cli_generate_over_mpi_prints_the_text_of_the_threads_backend(models):
    directory = models(2)
    args = [directory, "Hello there", "--raw", "--temperature", "0", "--max-tokens", "12"]
    threads = subprocess.run([str(BIN / "qwen3pack"), "generate", *map(str, args)], capture_output=True, text=True)
    assert threads.returncode == 0, threads.stderr
    over_mpi = mpiexec("-n", 2, BIN / "qwen3pack", "generate", *args, "--mpi")
    assert over_mpi.returncode == 0, over_mpi.stderr
    assert over_mpi.stdout == threads.stdout
    assert re.search(r"MPI process 1 \(ranks 1 to 1\) is pid \d+", over_mpi.stderr)


@needs_mpi
def test_each_host_needs_only_the_manifest_and_its_own_rank_files(models, tmp_path):
    directory = models(2)
    hosts = {0: tmp_path / "host0", 1: tmp_path / "host1"}
    for process, host in hosts.items():
        host.mkdir()
        (host / "manifest.json").write_bytes((directory / "manifest.json").read_bytes())
        rank_file = f"rank-0000{process}-of-00002.q3p"
        (host / rank_file).write_bytes((directory / rank_file).read_bytes())
    for path in directory.glob("tokenizer*"):  # process 0 tokenizes
        (hosts[0] / path.name).write_bytes(path.read_bytes())
    args = ["Hello there", "--raw", "--temperature", "0", "--max-tokens", "12", "--mpi"]
    command = [BIN / "qwen3pack", "generate"]
    over_mpi = mpiexec("-n", 1, *command, hosts[0], *args, ":", "-n", 1, *command, hosts[1], *args)
    assert over_mpi.returncode == 0, over_mpi.stderr
    threads = subprocess.run([str(BIN / "qwen3pack"), "generate", str(directory), *args[:-1]], capture_output=True,
                             text=True)
    assert over_mpi.stdout == threads.stdout


@needs_mpi
def test_serve_over_mpi_answers_as_the_threads_backend_and_stops_every_process_on_sigterm(models):
    import httpx
    directory = models(2)
    server = subprocess.Popen([str(MPIEXEC), "-n", "2", str(BIN / "qwen3pack"), "serve", str(directory), "--mpi",
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # printed by process 0 once the socket listens
        assert "http://127.0.0.1:" in line, (line, server.stderr.read())
        url = line.split(" on ")[1].split()[0]
        prompts = ["Hello", "Once upon a time"]
        with httpx.Client(trust_env=False, timeout=60) as http:  # loopback, never a proxy
            answers = [http.post(url + "/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0})
                       for p in prompts]
        with qwen3pack.load(directory, threads=2) as model:
            for prompt, answer in zip(prompts, answers):
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"] == model.complete(prompt, max_tokens=8, temperature=0).text
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate(timeout=30)


@needs_mpi
def test_a_process_killed_mid_generation_ends_every_process_with_a_message_naming_it(models, tmp_path):
    code = """
        import os, signal, sys
        import qwen3pack
        model = qwen3pack.load(sys.argv[1], backend="mpi", threads=1)
        follower = model.processes[1]["pid"]
        for step, token in enumerate(model.generate([1, 2, 3], 1000, stop_token_ids=[])):
            if step == 3:
                os.kill(follower, signal.SIGKILL)
        print("generation went on without process 1")
    """
    started = time.monotonic()
    result = run_script(tmp_path, code, models(2), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "went on" not in result.stdout
    pid = re.search(r"MPI process 1 \(ranks 1 to 1\) is pid (\d+)", result.stderr).group(1)
    # the launcher names the process that died by its pid, and how it ended
    assert f"PID {pid}" in result.stdout + result.stderr
    assert "Killed (signal 9)" in result.stdout + result.stderr


@needs_mpi
def test_a_process_that_cannot_map_its_rank_file_stops_every_process_naming_its_ranks_and_the_cause(
        models, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    for path in Path(models(2)).iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    with open(directory / "rank-00001-of-00002.q3p", "r+b") as f:
        f.truncate(1000)
    started = time.monotonic()
    result = mpiexec("-n", 2, BIN / "qwen3pack", "generate", directory, "Hi", "--raw", "--mpi", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    # both processes say it (each exits with the error): the process, its ranks, the file and why
    messages = [line for line in result.stderr.splitlines() if line.startswith("error: MPI process 1 (ranks 1 to 1")]
    assert len(messages) == 2
    assert "rank-00001-of-00002.q3p" in messages[0] and "truncated" in messages[0]


@needs_mpi
def test_processes_given_different_conversions_are_refused_at_start(checkpoints, tmp_path):
    one, other = tmp_path / "one", tmp_path / "other"
    convert(checkpoints(seed=0), one, tp=2)
    convert(checkpoints(seed=1), other, tp=2)
    command = [BIN / "qwen3pack", "generate"]
    result = mpiexec("-n", 1, *command, one, "Hi", "--mpi", ":", "-n", 1, *command, other, "Hi", "--mpi")
    assert result.returncode != 0
    ids = [json.loads((d / "manifest.json").read_text())["conversion_id"] for d in (one, other)]
    assert (f"error: the processes disagree on the model: process 0 has conversion {ids[0]} of tp 2 with 1 ranks "
            f"per process; process 1 has conversion {ids[1]} of tp 2") in result.stderr


@needs_mpi
def test_a_world_size_that_does_not_match_the_conversion_is_refused_at_start(models):
    result = mpiexec("-n", 2, BIN / "qwen3pack", "generate", models(4), "Hi", "--mpi")
    assert result.returncode != 0
    assert "was converted for tp 4, but 2 MPI processes with 1 ranks per process hold 2" in result.stderr


@needs_mpi
def test_a_process_whose_rank_file_is_truncated_mid_generation_stops_every_process_naming_it(models, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    for path in Path(models(2)).iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    code = """
        import os, sys
        import qwen3pack
        model = qwen3pack.load(sys.argv[1], backend="mpi", threads=1)
        for step, token in enumerate(model.generate([1, 2, 3], 1000, stop_token_ids=[])):
            if step == 3:  # process 1's file, which process 0 does not map
                os.truncate(sys.argv[1] + "/rank-00001-of-00002.q3p", 4096)
        print("generation went on")
    """
    result = run_script(tmp_path, code, directory, timeout=60)
    assert result.returncode != 0
    assert "went on" not in result.stdout
    assert ("qwen3pack: MPI process 1 (ranks 1 to 1, pid " in result.stderr
            and "rank-00001-of-00002.q3p: the file was truncated while the model was loaded" in result.stderr
            and "stopping every process" in result.stderr)


@needs_mpi
def test_after_non_finite_logits_every_process_keeps_the_same_sessions(tmp_path, checkpoints):
    from safetensors.numpy import load_file, save_file
    source = tmp_path / "source"
    source.mkdir()
    for path in Path(checkpoints(seed=4)).iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"][:] = 3e38  # the logits overflow to infinity
    save_file(weights, source / "model.safetensors")
    convert(source, tmp_path / "model", tp=2)
    code = """
        import sys
        import qwen3pack
        model = qwen3pack.load(sys.argv[1], backend="mpi", threads=1, max_context=4)
        session = model.session()
        for attempt in range(2):  # had process 1 kept the 3 tokens, the second would pass its context
            try:
                session.append([1, 2, 3])
            except qwen3pack.runtime.NumericalError:
                print("not finite at position", session.position)
    """
    result = run_script(tmp_path, code, tmp_path / "model", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "not finite at position 0\n" * 2


def test_without_the_extra_the_mpi_backend_says_how_to_install_it(models):
    code = NO_EXTRA + f"import qwen3pack; qwen3pack.load({str(models(2))!r}, backend='mpi')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install 'qwen3pack[mpi]'" in result.stderr
    code = NO_EXTRA + "from qwen3pack.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "generate", str(models(2)), "Hi", "--mpi"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("error: the MPI backend needs mpi4py and an MPI library: "
                                    "pip install 'qwen3pack[mpi]'")


def test_ranks_per_process_applies_to_the_mpi_backend_only(models):
    with pytest.raises(ValueError, match="ranks_per_process applies to backend='mpi'"):
        qwen3pack.load(models(2), backend="threads", ranks_per_process=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        qwen3pack.load(models(2), backend="nccl")
