"""The runtime in the situations that used to hang, abort or answer wrongly: a fork, an exit
during a forward pass, tiny temperatures, NaN weights, and arguments of the wrong type or range."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwen3pack import formats, runtime
from qwen3pack.convert import convert
from qwen3pack.testing import make_checkpoint

NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    convert(make_checkpoint(root / "source", seed=3), root / "out", tp=2)
    return root / "out"


@pytest.fixture(scope="module")
def model(model_dir):
    with runtime.load(model_dir, threads=2) as m:
        yield m


def run_python(code, timeout=120):
    """Runs `code` in a fresh interpreter (a hang fails the test instead of stalling the suite)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# ---- fork ----------------------------------------------------------------------------------

def test_a_forked_child_gets_a_clear_error_and_exits_cleanly(model_dir):
    result = run_python(f"""
        import os, sys
        import qwen3pack
        m = qwen3pack.load({str(model_dir)!r}, threads=2)
        m.logits([1, 2, 3])
        pid = os.fork()
        if pid == 0:
            try:
                m.logits([1, 2, 3])
                print("child: no error")
            except qwen3pack.runtime.ForkedError as e:
                print("child:", e)
            sys.exit(0)  # a normal exit: finalizers run, the model is dropped
        _, status = os.waitpid(pid, 0)
        print("child status", os.waitstatus_to_exitcode(status))
        print("parent still computes", m.logits([1, 2, 3]).shape)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("child: this model was loaded before the process forked")
    assert "load it again in the child" in lines[0]
    assert lines[1:] == ["child status 0", "parent still computes (3, 384)"]


def test_a_forked_child_that_never_touches_the_model_exits(model_dir):
    # a plain fork whose child exits normally (finalizers run), and multiprocessing's fork method
    result = run_python(f"""
        import multiprocessing, os, sys
        import qwen3pack
        m = qwen3pack.load({str(model_dir)!r}, threads=2)
        m.logits([1])
        pid = os.fork()
        if pid == 0:
            sys.exit(7)
        print("child status", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            print(pool.map(abs, [-1, -2, -3]))
        m.close()
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["child status 7", "[1, 2, 3]"]


# ---- exit while a daemon thread computes ---------------------------------------------------

def test_the_interpreter_exits_cleanly_while_a_daemon_thread_is_in_a_forward_pass(model_dir):
    code = f"""
        import threading, time
        import qwen3pack
        m = qwen3pack.load({str(model_dir)!r}, threads=2, max_context=1024)
        started = threading.Event()
        def work():
            while True:
                started.set()
                m.logits(list(range(300)))
        threading.Thread(target=work, daemon=True).start()
        started.wait()
        time.sleep({{delay}})
        print("main exits")
    """
    for delay in (0.0, 0.01, 0.03, 0.1):  # exit at different points of a forward pass
        result = run_python(code.replace("{delay}", str(delay)))
        assert (result.returncode, result.stdout) == (0, "main exits\n"), result.stderr


# ---- sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30, 1e-10])
def test_a_tiny_temperature_samples_the_argmax(model, temperature):
    greedy = list(model.generate([5, 6, 7], 12, temperature=0.0, stop_token_ids=[]))
    tiny = list(model.generate([5, 6, 7], 12, temperature=temperature, seed=1, stop_token_ids=[]))
    assert tiny == greedy


def test_a_tiny_temperature_picks_the_largest_logit_of_the_sampler():
    logits = np.array([-3.0, 7.5, 7.25, 100.0, 99.0], dtype=np.float32)
    for temperature in (1e-45, 1e-38, 1e-20):
        sampler = runtime.model.make_sampler(5, temperature=temperature, seed=0)
        assert [sampler.sample(logits) for _ in range(20)] == [3] * 20


# ---- non-finite weights --------------------------------------------------------------------

def poison(directory, name, value):
    """Writes `value` over the first element of a tensor in every rank file (checksums left
    stale: a quick load does not read them)."""
    for rank_file in formats.open(directory).ranks:
        record = rank_file.tensors[name]
        with open(rank_file.path, "r+b") as f:
            f.seek(record["offset"])
            f.write(np.array([value], dtype=np.float32).tobytes())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_stop_with_an_error_instead_of_token_0(model_dir, tmp_path, value):
    import shutil
    shutil.copytree(model_dir, tmp_path / "m")
    poison(tmp_path / "m", NORM, value)
    with runtime.load(tmp_path / "m", threads=1) as m:
        with pytest.raises(runtime.NumericalError, match="logits are not finite"):
            m.logits([1, 2, 3])
        with pytest.raises(runtime.NumericalError):
            next(m.generate([1, 2, 3], 4))
        session = m.session()
        with pytest.raises(runtime.NumericalError):
            session.append([1, 2])
        assert session.position == 0  # the failed step did not advance the sequence
    assert formats.validate(tmp_path / "m").problems == [
        f"rank-0000{r}-of-00002.q3p: tensor {NORM}: checksum mismatch (the data is damaged)" for r in (0, 1)]


# ---- arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=2 ** 63), "top_k must be an integer in"),
    (dict(top_k=-1), "top_k must be an integer in"),
    (dict(top_k=2.0), "top_k must be an integer, got 2.0"),
    (dict(temperature="1"), "temperature must be a number, got '1'"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=True), "top_p must be a number, got True"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(presence_penalty=float("inf")), "presence_penalty must be a finite number"),
    (dict(repetition_penalty=0), "repetition_penalty must be a finite number > 0"),
    (dict(seed=1.5), "seed must be an integer, got 1.5"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer, got 2.0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list of token ids or None, got 5"),
    (dict(stop_token_ids="12"), "stop_token_ids must be a list of token ids or None, got '12'"),
    (dict(stop_token_ids=[1.7]), "stop_token_ids entry must be an integer, got 1.7"),
    (dict(stop_token_ids=[384]), r"stop_token_ids entry must be an integer in \[0, 383\], got 384"),
])
def test_generate_names_a_bad_argument(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate([1, 2, 3], **{"max_new_tokens": 4, **kwargs})


def test_huge_seeds_and_numpy_scalars_are_accepted(model):
    a = list(model.generate([1, 2], np.int64(4), temperature=np.float32(1.5), seed=2 ** 70 + 5,
                            top_k=np.uint8(40), stop_token_ids=np.array([], dtype=np.int64)))
    b = list(model.generate([1, 2], 4, temperature=1.5, seed=5, top_k=40, stop_token_ids=[]))
    assert a == b  # seeds are taken modulo 2^64


@pytest.mark.parametrize("kwargs,message", [
    (dict(threads=2 ** 31), r"threads must be an integer in \[1, 1024\], got 2147483648"),
    (dict(threads=0), r"threads must be an integer in \[1, 1024\]"),
    (dict(threads="2"), "threads must be an integer, got '2'"),
    (dict(max_context=2 ** 40), r"max_context must be an integer in \[1, 16777216\]"),
    (dict(verify="none"), "verify must be one of"),
])
def test_load_names_a_bad_argument(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        runtime.load(model_dir, **kwargs)


@pytest.mark.parametrize("ids,message", [
    ("12", "must be a 1-D sequence"),
    ([1.7], "must hold integers"),
    ([2 ** 70], "must hold integers"),
    ([[1, 2]], "must be a 1-D sequence"),
    ([], "is empty"),
    ([384], r"token id 384 in ids is outside the vocabulary \[0, 384\)"),
])
def test_token_ids_of_the_wrong_kind_are_refused(model, ids, message):
    with pytest.raises(ValueError, match=message):
        model.generate(ids, 4)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.logits_batch(5), "sequences must be a list, got 5"),
    (lambda m: m.logits_batch("12"), "sequences must be a list, got '12'"),
    (lambda m: m.append_batch(m.session(), [[1]]), "sessions must be a list"),
    (lambda m: m.append_batch([m.session()], 7), "sequences must be a list, got 7"),
])
def test_batch_calls_name_an_argument_that_is_not_a_list(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


# ---- files changed under a loaded model ----------------------------------------------------

def test_a_rank_file_truncated_under_a_loaded_model_is_an_error_not_a_crash(model_dir, tmp_path):
    import shutil
    shutil.copytree(model_dir, tmp_path / "m")
    with runtime.load(tmp_path / "m", threads=2) as m:
        before = m.logits([1, 2, 3])
        victim = tmp_path / "m" / "rank-00001-of-00002.q3p"
        os.truncate(victim, 4096)  # keeps the prefix; every weight page is gone
        for _ in range(2):  # and stays an error: the lost pages read as zeros
            with pytest.raises(formats.FormatError, match=f"{victim}: the file was truncated while the model "
                                                          "was loaded"):
                m.logits([1, 2, 3])
    assert before.shape == (3, 384)


def test_a_sigbus_elsewhere_still_kills_the_process(model_dir):
    # The guard only takes faults inside its mappings: any other SIGBUS keeps its default action.
    result = run_python(f"""
        import mmap, os, tempfile
        import qwen3pack
        m = qwen3pack.load({str(model_dir)!r}, threads=1)
        m.logits([1])
        with tempfile.TemporaryFile() as f:
            f.truncate(8192)
            view = mmap.mmap(f.fileno(), 8192)
            f.truncate(0)
            print("about to fault", flush=True)
            view[4096]
        print("survived")
    """)
    assert result.stdout == "about to fault\n" and result.returncode == -7  # SIGBUS
