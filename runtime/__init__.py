"""The qwen3pack runtime: runs a converted directory with the C++ core (qwen3pack._core).

    m = qwen3pack.runtime.load(directory, threads=None, max_context=4096, verify="quick")
    m = load(directory, backend="mpi", ranks_per_process=1)  # under mpiexec: ranks as processes (mpi.py)
    m.config                       # the model object of the manifest (formats/SPEC.md)
    m.logits(ids)                  # float32 [len(ids), vocab_size], a fresh forward pass
    m.logits_batch([a, b, c])      # one batched forward pass; a list of [len_i, vocab_size]
    for token in m.generate(ids, max_new_tokens=32, temperature=0.0): ...
    s = m.session(); s.append(ids) # KV-cached: logits [vocab_size] of the last position
    s2 = s.fork(); s.reset(); s.position
    s.truncate(n); s.generate(ids, max_new_tokens=32)  # generation that reuses the session's cache
    m.append_batch([s, s2], [ids_s, ids_s2])  # one forward over several sessions
    m.close()                      # or `with load(...) as m:`; dropping the model also unmaps

    m.tokenizer.encode("Hi"); m.tokenizer.decode(ids)
    m.render(messages, tools=None, enable_thinking=None)   # the chat template, as transformers renders it
    m.complete("Once upon", max_tokens=32).text            # text in, text out (text.py)
    for chunk in m.chat(messages, stream=True): chunk.reasoning, chunk.content
    c = m.chat_session(system="Be brief."); c.send("Hi").content   # keeps the KV cache between turns
    g = text.generation(m, prompt, max_tokens=32)  # stepped by its caller (a batching server):
    token, chunk = g.step(logits)                  # logits of an append_batch row; until g.finished
    m.tokenizer.token_bytes(token)                 # the bytes a token stands for (maybe part of a character)

Each rank file is mapped read-only by the C++ engine, checked there again (prefix, every
offset and size, the geometry the model implies) and computed from in place, one thread per
rank. Errors are Python exceptions: `qwen3pack.formats.FormatError` for a bad directory or rank
file, `ContextLengthError` past max_context, `ValueError` for bad arguments naming the argument,
`ClosedError` (a RuntimeError) after close(), `ForkedError` (a RuntimeError) in a child forked
after the model was loaded (the child exits cleanly, but must load its own), `NumericalError`
(a RuntimeError) when the logits come out NaN or Inf.
"""
from .model import (VERIFY_MODES, ClosedError, ContextLengthError, ForkedError, Model, NumericalError, Session,
                    load)
from .text import ChatSession, Chunk, Completion, ToolCall, Usage
from .tokenizer import Tokenizer

__all__ = ["load", "Model", "Session", "ContextLengthError", "ClosedError", "ForkedError", "NumericalError",
           "VERIFY_MODES", "Tokenizer", "ChatSession", "Chunk", "Completion", "ToolCall", "Usage"]
