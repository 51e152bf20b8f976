"""Continuous batching for the server: one thread owns the model. At every step it admits waiting
requests into the running batch, runs ONE forward pass (Model.append_batch) over all of them (a
chunk of prompt for a request still prefilling, the last sampled token for the others), samples
each with its own sampler (text.Generation) and hands each its piece of text. A finished or
cancelled request leaves the batch at once and its session (its KV cache) is dropped.

Prefill is chunked: a step feeds at most `prefill_chunk` prompt tokens in all, so a long prompt
arriving does not stall the running streams for longer than that.

Prompt caching: the session of a request that ended is kept, with the tokens its cache holds (its
prompt and answer). A new request takes the kept session whose tokens begin its prompt with the
longest common prefix, cut back to it, and computes only the rest: a chat client that sends the
whole conversation every turn has only the new turn computed. Kept sessions fill the places of
the batch that no request runs in, the oldest given up first, so the KV caches held are never
more than max_batch, as without them.
"""
import collections
import logging
import threading
import time

import numpy as np

from .runtime.text import reusable_tokens

log = logging.getLogger("qwen3pack.server")


class QueueFull(Exception):
    """More requests wait for a place in the batch than the scheduler accepts."""


class Request:
    """One generation in the scheduler. deliver(event) is called from the scheduler's thread with
    ("token", token id, chunk or None, logprobs or None) for every sampled token, then
    ("end", None) or ("error", exception). top_logprobs: None for no logprobs, else how many
    alternatives each token's logprobs list."""

    def __init__(self, generation, deliver, top_logprobs=None):
        self.generation = generation
        self.deliver = deliver
        self.top_logprobs = top_logprobs
        self.session = None
        self.fed = 0  # prompt tokens fed to the session
        self.last_token = None
        self.cancelled = False
        self.arrived = time.perf_counter()
        self.first_token_at = None
        self.finished_at = None

    @property
    def prefilling(self):
        return self.fed < len(self.generation.prompt_ids)


def logprobs(logits, token, top):
    """(the token's log-probability, [(id, log-probability)] of the `top` likeliest tokens), from
    the model's distribution (the logits before any penalty, temperature or filter)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max()
    log_probs = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-log_probs, top - 1)[:top] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-log_probs[best], kind="stable")]
    return float(log_probs[token]), [(int(i), float(log_probs[i])) for i in best]


class Scheduler:
    """The thread that owns the model's forward passes (see the module's docstring).

    max_batch: requests in the running batch at most; max_waiting: requests waiting for a place
    in a full batch, beyond which submit raises QueueFull. on_step(batch size) is called after every forward."""

    def __init__(self, model, max_batch=16, max_waiting=256, prefill_chunk=128, on_step=None):
        self._model = model
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self._on_step = on_step or (lambda size: None)
        self._waiting = collections.deque()
        self._running = []
        self._kept = []  # (the token ids its cache holds, session) of ended requests, the oldest first
        self._wake = threading.Condition()
        self._stopping = False
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="qwen3pack-scheduler", daemon=True)

    def start(self):
        self._thread.start()

    @property
    def waiting(self):
        return len(self._waiting)

    @property
    def running(self):
        return len(self._running)

    @property
    def kept(self):
        """Sessions of ended requests kept for prompt caching."""
        return len(self._kept)

    def submit(self, request):
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_waiting + max(self.max_batch - len(self._running), 0):
                raise QueueFull(f"{len(self._running)} requests are running and {len(self._waiting)} waiting")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request):
        """Takes the request out at the next step (a client that went away); its session is freed then."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def stop(self):
        """Ends the thread; requests still waiting or running end with an error event."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _run(self):
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as error:  # a bug here must not leave every later request waiting forever
                    log.exception("scheduler step failed")
                    for request in list(self._running):
                        self._retire(request, ("error", error))
        for request in [*self._waiting, *self._running]:
            request.deliver(("error", RuntimeError("the server is shutting down")))

    def _admit(self):
        """Drops cancelled requests and fills the batch from the queue (the condition's lock held)."""
        self._running = [r for r in self._running if not r.cancelled]
        self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            request.session, request.fed = self._session_for(request.generation.prompt_ids)
            request.generation.text.cached_tokens = request.fed
            self._running.append(request)
        self._give_up_kept()

    def _session_for(self, prompt_ids):
        """(a session, how many of prompt_ids its cache holds): the kept session with the longest
        common prefix, cut back to it, else a new one. The last prompt token is always computed:
        its logits are needed."""
        best = max(self._kept, key=lambda kept: reusable_tokens(kept[0], prompt_ids), default=None)
        reused = 0 if best is None else reusable_tokens(best[0], prompt_ids)
        if reused > 0:
            self._kept.remove(best)
            try:
                best[1].truncate(reused)
                return best[1], reused
            except ValueError:  # sliding-window layers cannot go back that far
                pass
        return self._model.session(), 0

    def _give_up_kept(self):
        """Drops the oldest kept sessions beyond the places of the batch that no request runs in."""
        del self._kept[:max(0, len(self._kept) + len(self._running) - self.max_batch)]

    def _step(self):
        batch, pieces = self._plan()
        try:
            all_logits = self._model.append_batch([r.session for r in batch], pieces)
        except Exception as error:  # NaN logits, a rank file damaged under the model: these requests end
            log.error("forward pass failed: %s", error)
            for request in batch:
                self._retire(request, ("error", error))
            return
        self._on_step(len(batch))
        self.largest_batch = max(self.largest_batch, len(batch))
        for request, piece, logits in zip(batch, pieces, all_logits):
            if request.prefilling:
                request.fed += len(piece)
                if request.prefilling:
                    continue  # the next chunk of its prompt comes at the next step
            self._sample(request, logits)

    def _plan(self):
        """The requests of this step and what each is fed: its last token, or its next chunk of
        prompt while the step's prefill budget lasts (first come, first fed)."""
        batch, pieces = [], []
        budget = self.prefill_chunk
        for request in self._running:
            if request.prefilling:
                if budget == 0:
                    continue
                piece = request.generation.prompt_ids[request.fed:request.fed + budget]
                budget -= len(piece)
            else:
                piece = [request.last_token]
            batch.append(request)
            pieces.append(piece)
        return batch, pieces

    def _sample(self, request, logits):
        try:
            token, chunk = request.generation.step(logits)
        except Exception as error:
            self._retire(request, ("error", error))
            return
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        scores = None if request.top_logprobs is None else logprobs(logits, token, request.top_logprobs)
        request.last_token = token
        request.deliver(("token", token, chunk, scores))
        if request.generation.finished:
            self._retire(request, ("end", None))

    def _retire(self, request, event):
        request.finished_at = time.perf_counter()
        session, request.session = request.session, None
        with self._wake:
            self._running.remove(request)
            if event[0] == "end":  # kept for a prompt that begins with its tokens (the module's docstring)
                held = [*request.generation.prompt_ids, *request.generation.token_ids][:session.position]
                self._kept.append((held, session))
                self._give_up_kept()
        request.deliver(event)
