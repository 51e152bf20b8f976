"""A loaded model: the C++ engine over the mapped rank files, and its KV-cached sessions."""
import math
import os
import secrets
import socket
from pathlib import Path

import numpy as np

from .. import _core
from .. import formats
from . import mpi, text
from .tokenizer import TOKENIZER_FILE, Tokenizer

ContextLengthError = _core.ContextLengthError
ClosedError = _core.ClosedError
ForkedError = _core.ForkedError        # a model used in a child forked after it was loaded
NumericalError = _core.NumericalError  # NaN or Inf logits
VERIFY_MODES = ("quick", "full")
BACKENDS = ("threads", "mpi")
KV_DTYPES = ("auto", "f32", "bf16")
ACTIVATIONS = ("auto", "f32", "bf16")


def load(directory, threads=None, max_context=4096, verify="quick", kv_dtype="auto", activations="auto",
         backend="threads", ranks_per_process=1):
    """Opens a converted directory and maps its rank files.

    threads: compute threads in all (None: the CPUs this process may use); each of the W ranks
    computes with max(1, threads // W) of them. max_context: the longest sequence (prompt and
    generated tokens) of a session; the KV cache is sized by it, not by the model's
    max_position_embeddings. verify: "quick" checks every header, offset, size and shape;
    "full" also checks every tensor's CRC32C (reads all the weights once). kv_dtype: how the KV
    cache stores keys and values, "f32" or "bf16" (half the memory; see the README for what it
    costs in accuracy). activations: "f32" multiplies the weights by f32 activations
    (transformers' logits within 1e-4); "bf16" (bf16 models only) rounds each matrix product's
    input to bf16 once, for the CPU's bf16 dot product, and with a bf16 KV cache attention's
    queries and softmax weights too: prefill about 1.7x as fast, logits within the bound the
    README's performance section states. "auto" (both): the model's own precision,
    see `precision`.

    backend: "threads" computes every rank in this process; "mpi" (under mpiexec, with the
    qwen3pack[mpi] extra) computes ranks_per_process ranks in each MPI process, which maps only
    their files (`threads` is then per process). Process 0 gets the Model; the others follow it
    until it closes the model and then exit, inside this call (see qwen3pack.runtime.mpi). One
    model per MPI run.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ranks_per_process = _positive_int(ranks_per_process, "ranks_per_process", MAX_THREADS)
    if backend == "threads" and ranks_per_process != 1:
        raise ValueError("ranks_per_process applies to backend='mpi' (the threads backend holds every rank)")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = _positive_int(threads, "threads", MAX_THREADS)
    max_context = _positive_int(max_context, "max_context", MAX_CONTEXT)
    if backend == "mpi":  # it resolves "auto" from the manifest that every process reads
        return mpi.load(directory, threads, max_context, verify == "full", kv_dtype, activations,
                        ranks_per_process, lambda engine, manifest: Model(engine, manifest, _tokenizer_of(Path(directory))))
    converted = formats.open(directory)
    kv_dtype, activations = precision(converted.layout, kv_dtype, activations)
    engine = _core.Engine(converted.model, converted.layout, rank_sources(converted), threads, max_context,
                          verify == "full", kv_dtype, activations == "bf16")
    return Model(engine, converted.manifest, _tokenizer_of(converted.path))


def precision(layout, kv_dtype, activations):
    """The KV cache's dtype and the activations' for a model of `layout`, with "auto" resolved to
    the weights' own precision, as llama.cpp, vLLM and transformers run a model: bf16 activations
    for bf16 weights, and a bf16 KV cache for every model but an f32 one (its cost, a mean KL
    divergence of 2e-6 to 4e-4 in the README's measurements, is a quarter of bf16 activations' or
    less, and a small part of quantized weights'). f32 for both keeps the logits within 1e-4 of
    transformers in f32."""
    if kv_dtype == "auto":
        kv_dtype = "f32" if layout["dtype"] == "f32" else "bf16"
    if activations == "auto":
        activations = "bf16" if layout["dtype"] == "bf16" else "f32"
    return kv_dtype, activations


def _tokenizer_of(directory):
    """The directory's tokenizer, or None for a model converted without one (token ids only)."""
    return Tokenizer.from_directory(directory) if os.path.lexists(directory / TOKENIZER_FILE) else None


def rank_sources(converted):
    """What the C++ engine is told about each rank file (it checks all of it again itself)."""
    return [{
        "path": os.path.abspath(rank_file.path),
        "rank": rank_file.rank,
        "world_size": rank_file.world_size,
        "conversion_id": bytes(rank_file.conversion_id),
        "file_size": rank_file.file_size,
        "data_offset": rank_file.data_offset,
        "tensors": list(rank_file.header["tensors"]),
    } for rank_file in converted.ranks]


MAX_THREADS = 1024
MAX_CONTEXT = 1 << 24  # the engine's limit


def _integer(value, name, low=None, high=None):
    """An int (or numpy integer) in [low, high]; bool and float are refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}")
    return int(value)


def _positive_int(value, name, high=None):
    return _integer(value, name, 1, high)


def _number(value, name, ok, rule):
    """A real number (int or float, not bool or str) for which ok(value) holds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def make_sampler(vocab_size, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0,
                 repetition_penalty=1.0, seed=None):
    """The C++ sampler for these settings, every argument checked here with a message naming it
    (seed=None draws one)."""
    if seed is None:
        seed = secrets.randbits(64)
    seed = _integer(seed, "seed")  # any integer, taken modulo 2^64
    return _core.Sampler(
        vocab_size,
        _number(temperature, "temperature", lambda t: t >= 0, "a finite number >= 0 (0 is greedy)"),
        _integer(top_k, "top_k", 0, (1 << 63) - 1),
        _number(top_p, "top_p", lambda p: 0 < p <= 1, "in (0, 1]"),
        _number(min_p, "min_p", lambda p: 0 <= p <= 1, "in [0, 1]"),
        _number(presence_penalty, "presence_penalty", lambda p: True, "a finite number"),
        _number(repetition_penalty, "repetition_penalty", lambda p: p > 0, "a finite number > 0"),
        seed % (1 << 64))


def _stop_token_ids(value, default, vocab_size):
    """A frozenset of token ids from None (the manifest's eos ids, those the vocabulary holds), or
    a list, tuple, set or array of ints."""
    if value is None:
        return frozenset(t for t in default if 0 <= t < vocab_size)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"stop_token_ids must be a list of token ids or None, got {value!r}")
    return frozenset(_integer(t, "stop_token_ids entry", 0, vocab_size - 1) for t in value)


def _list(value, name):
    """A list of the items of a list-like argument (a string or a number is refused)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def _token_ids(ids, vocab_size, what="ids"):
    """A non-empty 1-D int32 array of token ids in [0, vocab_size)."""
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if array.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} in {what} is outside the vocabulary [0, {vocab_size})")
    return np.ascontiguousarray(array, dtype=np.int32)


class Model:
    """A loaded model (see `load`). Thread-safe: forward passes run one at a time."""

    def __init__(self, engine, manifest, tokenizer=None):
        self._engine = engine
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._vocab_size = manifest["model"]["vocab_size"]
        self.max_context = engine.max_context
        self.threads = engine.threads
        self.world_size = engine.world_size
        self.kv_dtype = engine.kv_dtype
        self.activations = engine.activations

    @property
    def config(self):
        """The validated model object (a dict: hidden_size, rope, layer_types, ...)."""
        return self._manifest["model"]

    @property
    def layout(self):
        return self._manifest["layout"]

    @property
    def generation(self):
        """The manifest's generation settings (bos/eos/pad ids, sampling defaults)."""
        return self._manifest.get("generation", {})

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def processes(self):
        """The processes computing the model, as dicts: process, ranks, pid, host. With the
        threads backend, this one process and every rank."""
        engine = self._live()
        if hasattr(engine, "processes"):  # mpi.DrivingEngine
            return engine.processes
        return [{"process": 0, "ranks": list(range(self.world_size)), "pid": os.getpid(), "host": socket.gethostname()}]

    @property
    def closed(self):
        return self._engine is None or self._engine.closed

    def _live(self):
        if self.closed:
            raise ClosedError("the model is closed")
        return self._engine

    def logits(self, ids):
        """float32 [len(ids), vocab_size]: a fresh forward pass over one sequence."""
        return self.logits_batch([ids])[0]

    def logits_batch(self, sequences):
        """A list of float32 [len_i, vocab_size], all sequences in ONE batched forward pass."""
        engine = self._live()
        arrays = [_token_ids(ids, self._vocab_size, f"sequence {i}")
                  for i, ids in enumerate(_list(sequences, "sequences"))]
        if not arrays:
            return []
        return engine.logits_batch(arrays)

    def session(self):
        """A new, empty KV-cached sequence."""
        return Session(self, self._live().new_session())

    def append_batch(self, sessions, sequences):
        """Appends sequences[i] to sessions[i] for every i in ONE batched forward pass (sessions
        at different positions); returns the float32 logits [vocab_size] of each one's last token."""
        engine = self._live()
        sessions, sequences = _list(sessions, "sessions"), _list(sequences, "sequences")
        if len(sessions) != len(sequences):
            raise ValueError(f"{len(sessions)} sessions but {len(sequences)} sequences")
        if not sessions:
            return []
        cores = []
        for i, session in enumerate(sessions):
            if not isinstance(session, Session) or session._model is not self:
                raise ValueError(f"sessions[{i}] is not a session of this model")
            cores.append(session._core)
        arrays = [_token_ids(ids, self._vocab_size, f"sequence {i}") for i, ids in enumerate(sequences)]
        return engine.forward(cores, arrays, [False] * len(arrays))

    def generate(self, ids, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 presence_penalty=0.0, repetition_penalty=1.0, seed=None, stop_token_ids=None):
        """Yields new token ids one by one. temperature 0 is greedy (argmax). The penalties come
        first (repetition_penalty as transformers, over prompt and generated tokens: positive
        logits divided, negative ones multiplied; presence_penalty subtracted from tokens already
        generated), then temperature, top_k, top_p, min_p. The same seed gives the same tokens;
        seed=None draws one. stop_token_ids: generation ends after yielding one of them; None
        means the manifest's eos_token_ids, [] never stops early.

        Arguments are checked at the call, before the first token is asked for."""
        return self.session().generate(ids, max_new_tokens, temperature, top_k, top_p, min_p, presence_penalty,
                                       repetition_penalty, seed, stop_token_ids)

    def _prepare_generation(self, ids, max_new_tokens, temperature, top_k, top_p, min_p, presence_penalty,
                            repetition_penalty, seed, stop_token_ids):
        """generate's arguments checked: (prompt array, max_new_tokens, a sampler that has seen the
        prompt, the stop ids). Session.generate checks its arguments here too."""
        prompt = _token_ids(ids, self._vocab_size, "ids")
        max_new_tokens = _integer(max_new_tokens, "max_new_tokens", 0)
        needed = len(prompt) + max(max_new_tokens - 1, 0)
        if needed > self.max_context:
            raise ContextLengthError(
                f"the prompt ({len(prompt)} tokens) and max_new_tokens={max_new_tokens} need {needed} "
                f"positions, beyond max_context = {self.max_context}")
        stops = _stop_token_ids(stop_token_ids, self.generation.get("eos_token_ids") or [], self._vocab_size)
        sampler = make_sampler(self._vocab_size, temperature, top_k, top_p, min_p, presence_penalty,
                               repetition_penalty, seed)
        sampler.add_prompt(prompt)
        return prompt, max_new_tokens, sampler, stops

    @property
    def tokenizer(self):
        """The directory's tokenizer (encode, decode) and chat template."""
        if self._tokenizer is None:
            raise ValueError("this model has no tokenizer.json: it takes token ids only")
        return self._tokenizer

    def render(self, messages, tools=None, enable_thinking=None):
        """The prompt string of a conversation: the chat template rendered as transformers'
        apply_chat_template(..., add_generation_prompt=True)."""
        return self.tokenizer.chat_template.render(messages, tools=tools, enable_thinking=enable_thinking)

    def complete(self, prompt, **options):
        """Continues a prompt string: a Completion, or an iterator of Chunk with stream=True (see
        qwen3pack.runtime.text.complete for the options)."""
        return text.complete(self, prompt, **options)

    def chat(self, messages, **options):
        """The assistant's answer to messages (see qwen3pack.runtime.text.chat)."""
        return text.chat(self, messages, **options)

    def chat_session(self, system=None, tools=None, enable_thinking=None):
        """A conversation that keeps its KV cache from turn to turn (a text.ChatSession)."""
        return text.ChatSession(self, system=system, tools=tools, enable_thinking=enable_thinking)

    def close(self):
        """Unmaps the rank files and stops the threads. Idempotent; later use raises ClosedError."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self.closed else (f"tp={self.world_size}, threads={self.threads}, max_context={self.max_context}, "
                                                 f"kv_dtype={self.kv_dtype}, activations={self.activations}")
        return f"<qwen3pack Model {state}>"


class Session:
    """One sequence with its KV cache (made by Model.session())."""

    def __init__(self, model, core):
        self._model = model
        self._core = core

    @property
    def position(self):
        """How many tokens the sequence holds."""
        return self._core.position

    @property
    def kv_cache_bytes(self):
        """The memory this sequence's KV cache holds, in bytes (it grows with the sequence in
        full-attention layers; half as much with kv_dtype="bf16")."""
        return self._core.kv_cache_bytes

    def append(self, ids):
        """Feeds tokens; returns the float32 logits [vocab_size] of the last one."""
        self._model._live()
        return self._core.append(_token_ids(ids, self._model.vocab_size))

    def fork(self):
        """An independent copy of this sequence (its cache copied)."""
        self._model._live()
        return Session(self._model, self._core.fork())

    def reset(self):
        """Empties the sequence (position 0), keeping its memory."""
        self._core.reset()

    def truncate(self, length):
        """Keeps the first `length` tokens. ValueError where sliding-window layers have already
        dropped keys that the shorter sequence needs (then only reset() goes back)."""
        self._model._live()
        self._core.truncate(_integer(length, "length", 0))

    def generate(self, prompt, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 presence_penalty=0.0, repetition_penalty=1.0, seed=None, stop_token_ids=None):
        """Model.generate on this sequence, computing only what its cache lacks. `prompt` is the
        whole sequence, of which the cache must hold the first min(position, len(prompt)) tokens
        (say, an earlier turn of a conversation); the rest is computed, at least the last prompt
        token, whose logits are needed. Each generated token but the last is fed back, so the
        session ends holding the prompt and them."""
        self._model._live()
        prompt, max_new_tokens, sampler, stops = self._model._prepare_generation(
            prompt, max_new_tokens, temperature, top_k, top_p, min_p, presence_penalty, repetition_penalty, seed,
            stop_token_ids)
        if max_new_tokens and self.position >= len(prompt):
            self.truncate(len(prompt) - 1)  # the last prompt token is fed again: its logits are needed
        return self._generate(prompt, max_new_tokens, sampler, stops)

    def _generate(self, prompt, max_new_tokens, sampler, stops):
        if max_new_tokens == 0:
            return
        logits = self._core.append(prompt[self.position:])
        for step in range(max_new_tokens):
            token = sampler.sample(logits)
            sampler.accept(token)
            yield token
            if token in stops or step + 1 == max_new_tokens:
                return
            logits = self._core.append(np.array([token], dtype=np.int32))

    def __repr__(self):
        return f"<qwen3pack Session position={self.position}>"
