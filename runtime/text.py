"""Text in, text out: completions of a prompt string, chat over messages, and conversations that
keep their KV cache from turn to turn, streamed or whole.

A generation's text is the decode of its tokens (special tokens skipped, as transformers), cut
before the first stop string. It is split at the <think> and </think> tags into `reasoning` and
`content`: generation starts inside reasoning when the prompt ends inside an open think block (a
template that writes "<think>\\n" after the assistant header), otherwise in content. The newlines
that templates put around a think block (after <think>, before </think>, after </think>) belong
to neither part, the tags to neither; `text` keeps everything.

When the chat was given tools, the content's tool calls are taken out of it: Qwen3 writes each as
a JSON object {"name": ..., "arguments": {...}} between <tool_call> and </tool_call> (the prompt
that its template writes for tools asks for exactly that), and each becomes a ToolCall of the
chunk that completes it. A block that is not such an object stays in the content as written.
"""
import json
from dataclasses import dataclass

import numpy as np

from .. import _core
from . import model as _model  # its argument checks (a module: model.py imports this one)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# The sampling settings, and their values when neither the caller nor generation_config.json gives one.
NEUTRAL_SAMPLING = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "presence_penalty": 0.0,
                    "repetition_penalty": 1.0}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed

    @property
    def total_tokens(self):
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ToolCall:
    """A call of one of the chat's tools that the model wrote: the function's name and its
    arguments (a JSON object, as a dict)."""
    name: str
    arguments: dict


@dataclass
class Chunk:
    """A piece of a stream: the new text, and that text split into reasoning and content, and the
    tool calls it completes. The last chunk of a stream carries finish_reason ("stop", "length",
    or "tool_calls" when the model stopped after calling tools), usage and the generated token_ids."""
    text: str
    reasoning: str
    content: str
    finish_reason: str = None
    usage: Usage = None
    token_ids: list = None
    tool_calls: tuple = ()


@dataclass
class Completion:
    text: str
    reasoning: str
    content: str
    finish_reason: str
    usage: Usage
    token_ids: list
    tool_calls: list


def complete(model, prompt, *, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
             presence_penalty=None, repetition_penalty=None, seed=None, stop=None, stream=False):
    """Continues `prompt`, a string given to the model as it is (no template). max_tokens: generated
    tokens at most (None: up to max_context). A sampling setting left None takes the model's
    default (generation_config.json, then the neutral value); temperature 0 is greedy. stop: a
    string or a list of them; the text ends before the first one. Generation also stops at the
    model's eos ids. stream=True returns an iterator of Chunk, else a Completion. Arguments are
    checked at the call."""
    return _complete(model, prompt, False, max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
                     repetition_penalty, seed, stop, stream)


def chat(model, messages, *, tools=None, enable_thinking=None, max_tokens=None, temperature=None, top_p=None,
         top_k=None, min_p=None, presence_penalty=None, repetition_penalty=None, seed=None, stop=None, stream=False):
    """The assistant's answer to `messages` (the options as for complete): the chat template
    rendered with tools and enable_thinking, then generation; with tools, the tool calls in the
    answer's content are taken out of it into tool_calls."""
    prompt = model.render(messages, tools=tools, enable_thinking=enable_thinking)
    return _complete(model, prompt, bool(tools), max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
                     repetition_penalty, seed, stop, stream)


def _complete(model, prompt, parse_tool_calls, max_tokens, temperature, top_p, top_k, min_p, presence_penalty,
              repetition_penalty, seed, stop, stream):
    prompt_ids = _encode_prompt(model, prompt)
    sampling = _sampling(model, temperature, top_k, top_p, min_p, presence_penalty, repetition_penalty)
    chunks = _generate(model, model.session(), prompt, prompt_ids, 0, max_tokens, sampling, seed, stop,
                       parse_tool_calls)
    return chunks if stream else collect(chunks)


def collect(chunks):
    """A stream gathered into one Completion."""
    parts = list(chunks)
    last = parts[-1]
    return Completion("".join(c.text for c in parts), "".join(c.reasoning for c in parts),
                      "".join(c.content for c in parts), last.finish_reason, last.usage, last.token_ids,
                      [call for c in parts for call in c.tool_calls])


def _sampling(model, temperature, top_k, top_p, min_p, presence_penalty, repetition_penalty):
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
             "presence_penalty": presence_penalty, "repetition_penalty": repetition_penalty}
    defaults = model.generation.get("defaults", {})
    return {name: value if value is not None else defaults.get(name, NEUTRAL_SAMPLING[name])
            for name, value in given.items()}


def _max_new_tokens(model, prompt_ids, max_tokens):
    """max_tokens checked against the context; None: as many as the context leaves (the last token
    generated is never fed back, so it needs no position)."""
    room = model.max_context - len(prompt_ids) + 1
    if len(prompt_ids) > model.max_context:
        raise _core.ContextLengthError(f"the prompt has {len(prompt_ids)} tokens, beyond max_context = "
                                       f"{model.max_context}")
    if max_tokens is None:
        return room
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1 or None, got {max_tokens!r}")
    if max_tokens > room:
        raise _core.ContextLengthError(
            f"the prompt ({len(prompt_ids)} tokens) and max_tokens={max_tokens} need "
            f"{len(prompt_ids) + max_tokens - 1} positions, beyond max_context = {model.max_context}")
    return max_tokens


def _stop_strings(stop):
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stops)


def _generate(model, session, prompt, prompt_ids, cached_tokens, max_tokens, sampling, seed, stop, parse_tool_calls,
              on_end=None):
    """Checks every argument, starts generating on `session` (which holds the first cached_tokens of
    prompt_ids), and returns the stream of chunks. on_end(GenerationText) runs when the stream
    ends, even when its reader stops early."""
    text = _generation_text(model, prompt, prompt_ids, max_tokens, stop, parse_tool_calls, cached_tokens)
    tokens = session.generate(prompt_ids, text.max_tokens, seed=seed, stop_token_ids=text.eos, **sampling)
    return _stream(text, tokens, on_end)


def _encode_prompt(model, prompt):
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    return model.tokenizer.encode(prompt)


def _generation_text(model, prompt, prompt_ids, max_tokens, stop, parse_tool_calls, cached_tokens=0):
    """The GenerationText of a generation of prompt_ids, its limits checked: the prompt, the stop
    strings, max_tokens against the context; it stops at the model's eos ids."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    stops = _stop_strings(stop)
    max_new_tokens = _max_new_tokens(model, prompt_ids, max_tokens)
    eos = frozenset(model.generation.get("eos_token_ids") or [])
    return GenerationText(model.tokenizer, prompt, len(prompt_ids), max_new_tokens, eos, stops, parse_tool_calls,
                          cached_tokens)


def _stream(text, tokens, on_end):
    try:
        for token in tokens:
            chunk = text.add(token)
            if chunk is not None:
                yield chunk
            if text.finished:
                return
    finally:
        if on_end is not None:
            on_end(text)


class GenerationText:
    """The text of one generation as its tokens come, one call per token: the incremental decode,
    cut before the first stop string, split into reasoning and content, and with parse_tool_calls
    the content's tool calls taken out. add(token) returns the chunk that the token completes (None
    while it completes no text); the token that ends the generation (an eos id, one that completes
    a stop string, the max_tokens-th) returns the last chunk, with finish_reason, usage and
    token_ids. token_ids, reasoning, content and tool_calls are what was handed out; eos and
    max_tokens are the limits it stops at; cached_tokens, the prompt tokens taken from a cache
    rather than computed (usage), is set by whoever reused the cache."""

    def __init__(self, tokenizer, prompt, prompt_tokens, max_tokens, eos, stops, parse_tool_calls=False,
                 cached_tokens=0):
        self._decoder = tokenizer.decoder()
        self._stops = StopStrings(list(stops))
        self._split = ReasoningSplit(prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE))
        self._tool_calls = ToolCallSplit() if parse_tool_calls else None
        self.eos = frozenset(eos)
        self.max_tokens = max_tokens
        self._prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        self.token_ids = []
        self.reasoning = self.content = ""
        self.tool_calls = []
        self.finished = False

    def add(self, token):
        if self.finished:
            raise ValueError("the generation has ended")
        self.token_ids.append(int(token))
        text, stopped = self._stops.feed(self._decoder.add(token))
        if stopped or token in self.eos or len(self.token_ids) == self.max_tokens:
            return self._last(text, stopped)
        if not text:
            return None
        reasoning, content = self._split.feed(text)
        content, calls = self._take_tool_calls(content)
        return self._chunk(Chunk(text, reasoning, content, tool_calls=tuple(calls)))

    def _last(self, text, stopped):
        self.finished = True
        if not stopped:
            rest, stopped = self._stops.feed(self._decoder.finish())
            text += rest if stopped else rest + self._stops.flush()
        reasoning, content = self._split.feed(text)
        rest_reasoning, rest_content = self._split.finish()
        content, calls = self._take_tool_calls(content + rest_content, last=True)
        finish_reason = "stop" if stopped or self.token_ids[-1] in self.eos else "length"
        if finish_reason == "stop" and (self.tool_calls or calls):
            finish_reason = "tool_calls"
        return self._chunk(Chunk(text, reasoning + rest_reasoning, content, finish_reason,
                                 Usage(self._prompt_tokens, len(self.token_ids), self.cached_tokens),
                                 list(self.token_ids), tuple(calls)))

    def _take_tool_calls(self, content, last=False):
        if self._tool_calls is None:
            return content, []
        content, calls = self._tool_calls.feed(content)
        return (content + self._tool_calls.finish(), calls) if last else (content, calls)

    def _chunk(self, chunk):
        self.reasoning += chunk.reasoning
        self.content += chunk.content
        self.tool_calls += chunk.tool_calls
        return chunk


def generation(model, prompt, *, max_tokens=None, temperature=None, top_p=None, top_k=None,
               min_p=None, presence_penalty=None, frequency_penalty=0.0, repetition_penalty=None, seed=None,
               stop=None, parse_tool_calls=False, logit_bias=None):
    """A Generation of `prompt` driven step by step by its caller: complete's options, checked here,
    frequency_penalty, logit_bias ({token id: bias from -100 to 100}, added to the token's logit
    before sampling, as OpenAI's) and parse_tool_calls (a chat given tools: chat's tool calls)."""
    prompt_ids = _encode_prompt(model, prompt)
    text = _generation_text(model, prompt, prompt_ids, max_tokens, stop, parse_tool_calls)
    frequency_penalty = _model._number(frequency_penalty, "frequency_penalty", lambda p: True, "a finite number")
    sampler = _model.make_sampler(
        model.vocab_size, seed=seed,
        **_sampling(model, temperature, top_k, top_p, min_p, presence_penalty, repetition_penalty))
    sampler.add_prompt(_model._token_ids(prompt_ids, model.vocab_size, "prompt"))
    return Generation(prompt_ids, sampler, text, frequency_penalty, _logit_bias(logit_bias, model.vocab_size),
                      model.vocab_size)


def _logit_bias(logit_bias, vocab_size):
    """(token ids, biases) as arrays, checked, or None."""
    if not logit_bias:
        return None
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must map token ids to biases, got {logit_bias!r}")
    ids, biases = [], []
    for token, bias in logit_bias.items():
        try:
            token_id = int(token)  # JSON's keys are strings
        except (TypeError, ValueError):
            token_id = -1
        if isinstance(token, bool) or not 0 <= token_id < vocab_size:
            raise ValueError(f"logit_bias names {token!r}, which is not a token id of this model (0 to {vocab_size - 1})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias gives token {token_id} the bias {bias!r}; a number from -100 to 100 is needed")
        ids.append(token_id)
        biases.append(bias)
    return np.array(ids, dtype=np.int64), np.array(biases, dtype=np.float32)


class Generation:
    """One generation whose caller computes the logits (say, one batched forward for many of
    them): feed `prompt_ids` to a session, then step(logits of its last token) samples the next
    token, which the caller feeds back, until `finished`. Sampling is generate's; frequency_penalty
    (as OpenAI's: subtracted once per time a token was generated) and logit_bias come first."""

    def __init__(self, prompt_ids, sampler, text, frequency_penalty, logit_bias, vocab_size):
        self.prompt_ids = prompt_ids
        self._sampler = sampler
        self.text = text
        self._frequency_penalty = frequency_penalty
        self._logit_bias = logit_bias
        self._counts = np.zeros(vocab_size, dtype=np.float32) if frequency_penalty else None

    @property
    def finished(self):
        return self.text.finished

    @property
    def token_ids(self):
        return self.text.token_ids

    def step(self, logits):
        """(the sampled token, the chunk it completes or None): GenerationText.add's."""
        if self._counts is not None:
            logits = logits - np.float32(self._frequency_penalty) * self._counts
        if self._logit_bias is not None:
            ids, biases = self._logit_bias
            logits = logits.copy() if self._counts is None else logits  # the caller's stay the model's (logprobs)
            np.add.at(logits, ids, biases)
        token = self._sampler.sample(np.ascontiguousarray(logits, dtype=np.float32))
        self._sampler.accept(token)
        if self._counts is not None:
            self._counts[token] += 1
        return token, self.text.add(token)


def _partial_match(text, word):
    """The length of the longest end of `text` that begins `word` (but is not all of it)."""
    for length in range(min(len(text), len(word) - 1), 0, -1):
        if text.endswith(word[:length]):
            return length
    return 0


class StopStrings:
    """Cuts streamed text before the first stop string, even one that spans several pieces: the
    end of the text that could begin a stop string is held back until the next piece decides."""

    def __init__(self, stops):
        self._stops = stops
        self._held = ""

    def feed(self, text):
        """(the text that is certainly before any stop string, whether a stop string was found)."""
        text = self._held + text
        found = [i for i in (text.find(stop) for stop in self._stops) if i >= 0]
        if found:
            self._held = ""
            return text[:min(found)], True
        keep = max((_partial_match(text, stop) for stop in self._stops), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self):
        """At the end, no stop string having come: the held text."""
        held, self._held = self._held, ""
        return held


class ReasoningSplit:
    """Splits streamed text into (reasoning, content) pieces at the think tags (see the module's
    docstring). A tag split over pieces, and newlines that may precede </think>, are held back."""

    def __init__(self, in_reasoning):
        self._in_reasoning = in_reasoning
        self._held = ""
        self._at_section_start = in_reasoning  # a section whose leading newlines are dropped

    def feed(self, text):
        pieces = {True: [], False: []}
        held = self._held + text
        tag = THINK_CLOSE if self._in_reasoning else THINK_OPEN
        while (at := held.find(tag)) >= 0:
            before = held[:at]
            self._emit(before.rstrip("\n") if self._in_reasoning else before, pieces)
            held = held[at + len(tag):]
            # into reasoning, or into the content after a think block: both start with template newlines
            self._in_reasoning, self._at_section_start = not self._in_reasoning, True
            tag = THINK_CLOSE if self._in_reasoning else THINK_OPEN
        keep = _partial_match(held, tag)
        ready, self._held = held[:len(held) - keep], held[len(held) - keep:]
        if self._in_reasoning:  # newlines right before </think> are the template's
            stripped = ready.rstrip("\n")
            ready, self._held = stripped, ready[len(stripped):] + self._held
        self._emit(ready, pieces)
        return "".join(pieces[True]), "".join(pieces[False])

    def finish(self):
        """At the end: the held text, an unfinished tag or newlines included."""
        pieces = {True: [], False: []}
        self._emit(self._held, pieces)
        self._held = ""
        return "".join(pieces[True]), "".join(pieces[False])

    def _emit(self, text, pieces):
        if self._at_section_start:
            text = text.lstrip("\n")
            self._at_section_start = not text
        pieces[self._in_reasoning].append(text)


class ToolCallSplit:
    """Takes Qwen3's tool calls out of streamed content (see the module's docstring): a block is
    held back until its </tool_call> comes, then parsed; text around blocks passes through. The
    newlines right before <tool_call> and right after </tool_call> are the template's, as for think
    tags, and belong to neither."""

    def __init__(self):
        self._held = ""         # the start of a block, or of a tag or newlines that may precede one
        self._in_block = False
        self._after_block = False  # the newlines after a block are dropped

    def feed(self, text):
        """(the content that is certainly outside any block, the tool calls completed)."""
        held, content, calls = self._held + text, [], []
        while True:
            if self._in_block:
                at = held.find(TOOL_CALL_CLOSE)
                if at < 0:
                    break
                body, held = held[:at], held[at + len(TOOL_CALL_CLOSE):]
                call = _tool_call(body)
                if call is None:  # not a call: the content keeps it as written
                    content.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
                else:
                    calls.append(call)
                self._in_block, self._after_block = False, True
            else:
                at = held.find(TOOL_CALL_OPEN)
                if at < 0:
                    break
                content.append(self._outside(held[:at]).rstrip("\n"))
                held, self._in_block = held[at + len(TOOL_CALL_OPEN):], True
        if not self._in_block:  # hold back what may begin a tag, and newlines that may precede one
            keep = _partial_match(held, TOOL_CALL_OPEN)
            ready = self._outside(held[:len(held) - keep])
            stripped = ready.rstrip("\n")
            content.append(stripped)
            held = ready[len(stripped):] + held[len(held) - keep:]
        self._held = held
        return "".join(content), calls

    def finish(self):
        """At the end: the held text, an unfinished block included, as content."""
        held = (TOOL_CALL_OPEN if self._in_block else "") + self._held
        self._held, self._in_block = "", False
        return held

    def _outside(self, text):
        if self._after_block:
            text = text.lstrip("\n")
            self._after_block = not text
        return text


def _tool_call(body):
    """The ToolCall that a block's text is, or None: a JSON object with a string "name" and an
    object "arguments" (or a string holding one, or none: no arguments)."""
    try:
        call = json.loads(body)
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
    except (ValueError, AttributeError):
        return None
    if not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
        return None
    return ToolCall(call["name"], arguments)


def reusable_tokens(held_ids, prompt_ids):
    """How many of prompt_ids a KV cache that holds the tokens held_ids can keep: their common
    prefix, short of the last prompt token, which is fed again for its logits."""
    common = 0
    for held, new in zip(held_ids, prompt_ids):
        if held != new:
            break
        common += 1
    return min(common, len(prompt_ids) - 1)


class ChatSession:
    """A conversation that keeps the KV cache of its tokens: each turn renders the whole
    conversation, reuses the cache for the longest common token prefix with what the cache holds,
    and computes only the rest (templates that drop earlier turns' thinking make the prefix end
    where the previous answer began). `messages` is the conversation so far."""

    def __init__(self, model, system=None, tools=None, enable_thinking=None):
        if system is not None and not isinstance(system, str):
            raise ValueError(f"system must be a string, got {type(system).__name__}")
        self._template = model.tokenizer.chat_template  # a model that cannot chat fails here, not at each turn
        self._model = model
        self.system = system
        self.tools = tools
        self.enable_thinking = enable_thinking
        self.messages = self._first_messages()
        self._session = model.session()
        self._cached = []  # the token ids whose keys and values self._session holds
        self._answering = None  # the stream of the answer under way: one at a time on one cache

    def _first_messages(self):
        return [] if self.system is None else [{"role": "system", "content": self.system}]

    def send(self, message, *, max_tokens=None, temperature=None, top_p=None, top_k=None, min_p=None,
             presence_penalty=None, repetition_penalty=None, seed=None, stop=None, stream=False):
        """Adds `message` (a user's text, or a message object such as a tool result) and answers it
        (the options as for complete). The answer joins `messages` when its stream ends, also when
        the reader stops early (it keeps what was streamed); a new message ends an answer still
        streaming."""
        if self._answering is not None:
            self._answering.close()
        if isinstance(message, str):
            message = {"role": "user", "content": message}
        messages = [*self.messages, message]
        prompt = self._template.render(messages, tools=self.tools, enable_thinking=self.enable_thinking)
        prompt_ids = self._model.tokenizer.encode(prompt)
        sampling = _sampling(self._model, temperature, top_k, top_p, min_p, presence_penalty, repetition_penalty)
        cached = self._reuse(prompt_ids)

        def on_end(text):
            self._answering = None
            answer = {"role": "assistant", "content": text.content}
            if text.reasoning:
                answer["reasoning_content"] = text.reasoning
            if text.tool_calls:
                answer["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                        for call in text.tool_calls]
            self.messages = [*messages, answer]
            held = self._session.position  # what the cache holds now: the prompt, then the tokens fed back
            known = [*prompt_ids, *text.token_ids]
            if held > len(known):  # interrupted between computing a token and handing it over
                self._session.reset()
                held = 0
            self._cached = known[:held]

        self._answering = _generate(self._model, self._session, prompt, prompt_ids, cached, max_tokens, sampling,
                                    seed, stop, bool(self.tools), on_end)
        return self._answering if stream else collect(self._answering)

    def _reuse(self, prompt_ids):
        """Cuts the cache back to the longest common prefix with prompt_ids; returns its length."""
        common = reusable_tokens(self._cached, prompt_ids)
        try:
            self._session.truncate(common)
        except ValueError:  # sliding-window layers cannot go back: start again
            self._session.reset()
            common = 0
        self._cached = self._cached[:common]
        return common

    def reset(self):
        """Forgets the conversation (the system prompt and tools stay) and empties the cache."""
        if self._answering is not None:
            self._answering.close()
        self.messages = self._first_messages()
        self._session.reset()
        self._cached = []
