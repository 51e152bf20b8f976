"""`qwen3pack serve`: an OpenAI-compatible HTTP server over a loaded model (Starlette under uvicorn).

Routes (each also without the /v1 prefix): POST /v1/chat/completions, POST /v1/completions,
GET /v1/models; and GET /health, GET /metrics, POST /tokenize, POST /detokenize. Generation goes
through the continuous-batching Scheduler (scheduler.py), which calls the runtime's Python API;
this module turns HTTP requests into text.Generation objects and the scheduler's events into
OpenAI's response objects.
"""
import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid

import anyio
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import __version__
from .runtime import ContextLengthError, text
from .scheduler import QueueFull, Request, Scheduler

log = logging.getLogger("qwen3pack.server")
SYSTEM_FINGERPRINT = f"qwen3pack-{__version__}"
MAX_TOP_LOGPROBS = 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat has none (the context's room)
# The runtime's ValueError messages begin with the argument's name: the request field it comes from.
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "seed", "stop", "logit_bias")


class APIError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, type="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def response(self):
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------- request fields

KINDS = {"integer": int, "number": (int, float), "boolean": bool, "string": str, "array": list, "object": dict}


def field(body, name, kind, default=None):
    """body[name] checked to be of `kind` (a JSON type); absent or null gives the default."""
    value = body.get(name)
    if value is None:
        return default
    number = kind in ("integer", "number")
    if not isinstance(value, KINDS[kind]) or (number and isinstance(value, bool)):
        raise APIError(400, f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {json.dumps(value)}",
                       param=name)
    return value


def sampling_options(body, default_max_tokens):
    """The text.generation options of a request (their values are checked by the runtime)."""
    n = field(body, "n", "integer", 1)
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", param="n")
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or isinstance(stop, list)):
        raise APIError(400, f"stop must be a string or a list of strings, got {json.dumps(stop)}", param="stop")
    max_tokens = field(body, "max_completion_tokens", "integer", field(body, "max_tokens", "integer"))
    top_k = field(body, "top_k", "integer")
    return dict(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=field(body, "temperature", "number"),
        top_p=field(body, "top_p", "number"),
        top_k=0 if top_k == -1 else top_k,  # vLLM's clients write -1 for "off"
        min_p=field(body, "min_p", "number"),
        presence_penalty=field(body, "presence_penalty", "number"),
        frequency_penalty=field(body, "frequency_penalty", "number", 0.0),
        repetition_penalty=field(body, "repetition_penalty", "number"),
        seed=field(body, "seed", "integer"),
        stop=stop or None,
        logit_bias=field(body, "logit_bias", "object"))


def stream_options(body):
    """(stream, include_usage)."""
    stream = field(body, "stream", "boolean", False)
    options = field(body, "stream_options", "object", {})
    include_usage = field(options, "include_usage", "boolean", False)
    if options and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return stream, include_usage


def top_logprobs_count(value, name):
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {value}", param=name)
    return value


def tools_offered(body):
    """The request's tools as the chat template gets them: none with tool_choice "none"; tool_choice
    "auto" (the default) leaves the choice to the model, and forcing a call is not supported."""
    tools = field(body, "tools", "array")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice != "auto":
        raise APIError(400, f'tool_choice must be "auto" or "none" (forcing a call is not supported), got '
                            f"{json.dumps(choice)}", param="tool_choice")
    return tools


def tool_call_object(call, index=None):
    """A runtime ToolCall as OpenAI's: an id, and the arguments as a JSON string; `index` in a stream."""
    item = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
    return item if index is None else {"index": index, **item}


def message_text(message, i):
    """A message with its content as one string: OpenAI's clients may send a list of text parts."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        parts.append(part["text"])
    return {**message, "content": "".join(parts)}


# ---------------------------------------------------------------- the application

class Server:
    """The routes' handlers over one model and its scheduler, with the Prometheus metrics."""

    def __init__(self, model, model_name, scheduler_options, api_key=None):
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self._metrics()
        self.scheduler = Scheduler(model, on_step=self.batch_size.observe, **scheduler_options)
        self.waiting.set_function(lambda: self.scheduler.waiting)
        self.running.set_function(lambda: self.scheduler.running)
        self.kept.set_function(lambda: self.scheduler.kept)

    def _metrics(self):
        r = self.registry
        self.requests = Counter("qwen3pack_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=r)
        self.finished = Counter("qwen3pack_generations", "Generations ended, by finish reason "
                                "(stop, length, tool_calls, cancelled, error).", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("qwen3pack_prompt_tokens", "Prompt tokens of the requests.", registry=r)
        self.cached_prompt_tokens = Counter("qwen3pack_prompt_tokens_cached", "Prompt tokens whose keys and values "
                                            "were taken from an ended request's cache, not computed.", registry=r)
        self.generation_tokens = Counter("qwen3pack_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "qwen3pack_time_to_first_token_seconds", "From the request's arrival to its first token.", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.waiting = Gauge("qwen3pack_waiting_requests", "Requests queued for a place in the batch.", registry=r)
        self.running = Gauge("qwen3pack_running_requests", "Requests in the running batch.", registry=r)
        self.kept = Gauge("qwen3pack_kept_caches", "KV caches of ended requests kept for prompts that begin "
                          "with their tokens.", registry=r)
        self.batch_size = Histogram("qwen3pack_batch_size", "Requests in each forward pass.", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    def app(self):
        routes = []
        for path, handler, methods in (("/chat/completions", self.chat_completions, ["POST"]),
                                       ("/completions", self.completions, ["POST"]),
                                       ("/models", self.models, ["GET"])):
            routes += [Route("/v1" + path, handler, methods=methods), Route(path, handler, methods=methods)]
        routes += [Route("/health", self.health, methods=["GET"]), Route("/metrics", self.metrics, methods=["GET"]),
                   Route("/tokenize", self.tokenize, methods=["POST"]),
                   Route("/detokenize", self.detokenize, methods=["POST"])]
        app = Starlette(routes=routes, lifespan=self._lifespan,
                        exception_handlers={HTTPException: self._http_error, APIError: self._api_error})
        return APIKeyCheck(app, self.api_key) if self.api_key else app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.scheduler.start()
        yield
        # uvicorn has waited for the running requests by now (bounded by its graceful timeout)
        await anyio.to_thread.run_sync(self.scheduler.stop)

    async def _api_error(self, request, error):
        self.requests.labels(request.url.path, str(error.status)).inc()
        return error.response()

    async def _http_error(self, request, error):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", type=kind).response()

    async def health(self, request):
        return JSONResponse({"status": "ok"})

    async def metrics(self, request):
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        self.requests.labels(request.url.path, "200").inc()
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "qwen3pack",
            "root": self.model_name, "parent": None, "max_model_len": self.model.max_context}]})

    # ---- tokens, as vLLM's server gives them

    async def tokenize(self, request):
        """{"prompt": text} as it is, or {"messages": [...]} (with tools and chat_template_kwargs)
        through the chat template: {"count", "max_model_len", "tokens"}."""
        body = await self._body(request)
        if "messages" in body:
            prompt = self._chat_prompt(body)[0]
        else:
            prompt = field(body, "prompt", "string")
            if prompt is None:
                raise APIError(400, "prompt (a string) or messages is required", param="prompt")
        tokens = self.model.tokenizer.encode(prompt)
        self.requests.labels(request.url.path, "200").inc()
        return JSONResponse({"count": len(tokens), "max_model_len": self.model.max_context, "tokens": tokens})

    async def detokenize(self, request):
        """{"tokens": [ids]}: {"prompt": their text} (special tokens kept, as they were written)."""
        body = await self._body(request)
        tokens = field(body, "tokens", "array")
        vocab = self.model.vocab_size
        if tokens is None or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
            raise APIError(400, f"tokens must be a list of token ids from 0 to {vocab - 1}", param="tokens")
        self.requests.labels(request.url.path, "200").inc()
        return JSONResponse({"prompt": self.model.tokenizer.decode(tokens, skip_special_tokens=False)})

    # ---- the two generation routes

    def _chat_prompt(self, body):
        """(the prompt that the chat template renders for the request's messages, its tools offered)."""
        messages = field(body, "messages", "array")
        if messages is None:
            raise APIError(400, "messages is required", param="messages")
        template_options = field(body, "chat_template_kwargs", "object", {})
        enable_thinking = field(template_options, "enable_thinking", "boolean")
        tools = tools_offered(body)
        try:
            prompt = self.model.render([message_text(m, i) for i, m in enumerate(messages)], tools=tools,
                                       enable_thinking=enable_thinking)
        except ValueError as error:
            raise APIError(400, str(error), param="tools" if str(error).startswith("tools") else "messages") from None
        return prompt, tools

    async def chat_completions(self, request):
        body = await self._body(request)
        response_format = field(body, "response_format", "object", {"type": "text"})
        if response_format.get("type") != "text":  # refused rather than ignored: nothing here enforces it
            raise APIError(400, f"response_format {json.dumps(response_format.get('type'))} is not supported "
                                "(this server does not constrain generation); only \"text\"", param="response_format")
        prompt, tools = self._chat_prompt(body)
        top_logprobs = None
        if field(body, "logprobs", "boolean", False):
            top_logprobs = top_logprobs_count(field(body, "top_logprobs", "integer", 0), "top_logprobs")
        elif body.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        stream, include_usage = stream_options(body)
        options = {**sampling_options(body, None), "parse_tool_calls": bool(tools)}
        job = self._job(request, prompt, options, top_logprobs, "chatcmpl", "messages")
        if stream:
            return JobResponse(job, self._close, lines=self._chat_events(job, include_usage))
        return JobResponse(job, self._close, whole=self._chat_whole(job))

    async def completions(self, request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
        if field(body, "echo", "boolean", False):
            raise APIError(400, "echo is not supported", param="echo")
        if field(body, "best_of", "integer", 1) != 1:
            raise APIError(400, "best_of must be 1", param="best_of")
        top_logprobs = field(body, "logprobs", "integer")
        if top_logprobs is not None:
            top_logprobs = top_logprobs_count(top_logprobs, "logprobs")
        stream, include_usage = stream_options(body)
        job = self._job(request, prompt, sampling_options(body, COMPLETIONS_DEFAULT_MAX_TOKENS), top_logprobs, "cmpl",
                        "prompt")
        if stream:
            return JobResponse(job, self._close, lines=self._completion_events(job, include_usage))
        return JobResponse(job, self._close, whole=self._completion_whole(job))

    async def _body(self, request):
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise APIError(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                           param="model", type="NotFoundError", code="model_not_found")
        return body

    def _job(self, http_request, prompt, options, top_logprobs, prefix, prompt_field):
        """Checks the generation's options, queues it in the scheduler, returns the Job (every
        other field of the request is checked before: a queued job is answered)."""
        try:
            generation = text.generation(self.model, prompt, **options)
        except ContextLengthError as error:
            raise APIError(400, f"This model's maximum context length is {self.model.max_context} tokens: {error}.",
                           param=prompt_field, code="context_length_exceeded") from None
        except ValueError as error:
            name = str(error).split(" ")[0]
            raise APIError(400, str(error), param=name if name in SAMPLING_FIELDS else prompt_field) from None
        job = Job(f"{prefix}-{uuid.uuid4().hex}", http_request.url.path, generation, top_logprobs)
        try:
            self.scheduler.submit(job.request)
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return job

    def _close(self, job):
        """The end of a job's response, complete or not: a job still generating is cancelled."""
        if job.outcome is None:
            job.outcome = "cancelled"
            self.scheduler.cancel(job.request)
        self._account(job)

    def _account(self, job):
        if job.accounted:
            return
        job.accounted = True
        request, generated = job.request, len(job.request.generation.token_ids)
        self.requests.labels(job.route, "200").inc()
        self.finished.labels(job.outcome).inc()
        self.prompt_tokens.inc(len(request.generation.prompt_ids))
        self.cached_prompt_tokens.inc(request.generation.text.cached_tokens)
        self.generation_tokens.inc(generated)
        ttft = None if request.first_token_at is None else request.first_token_at - request.arrived
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
        ended = request.finished_at or time.perf_counter()
        # the decoding speed: the tokens after the first over the time after it
        speed = (generated - 1) / (ended - request.first_token_at) if generated > 1 else 0.0
        log.info("%s: %d prompt tokens, %d completion tokens, time to first token %s, %.1f tokens/s, finish %s",
                 job.id, len(request.generation.prompt_ids), generated,
                 "-" if ttft is None else f"{ttft:.3f} s", speed, job.outcome)

    # ---- chat responses

    def _base(self, job, kind):
        return {"id": job.id, "object": kind, "created": job.created, "model": self.model_name,
                "system_fingerprint": SYSTEM_FINGERPRINT}

    async def _chat_whole(self, job):
        reasoning, content, tool_calls, entries, last = [], [], [], [], None
        try:
            async for chunk, logprob_entries in job.pieces():
                entries += logprob_entries
                if chunk is not None:
                    reasoning.append(chunk.reasoning)
                    content.append(chunk.content)
                    tool_calls += chunk.tool_calls
                    last = chunk
        except GenerationFailed as error:
            raise APIError(500, str(error), type="internal_server_error") from None
        text = "".join(content)
        message = {"role": "assistant", "content": None if tool_calls and not text else text,
                   "reasoning_content": "".join(reasoning) or None,
                   "tool_calls": [tool_call_object(call) for call in tool_calls]}
        return {**self._base(job, "chat.completion"), "choices": [{
            "index": 0, "message": message, "logprobs": self._chat_logprobs(job, entries),
            "finish_reason": last.finish_reason}], "usage": usage(last.usage)}

    async def _chat_events(self, job, include_usage):
        base = self._base(job, "chat.completion.chunk")
        extra = {"usage": None} if include_usage else {}

        def event(delta, finish_reason=None, logprobs=None):
            return sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish_reason}], **extra})

        yield event({"role": "assistant", "content": ""})
        entries, calls_sent = [], 0
        try:
            async for chunk, logprob_entries in job.pieces():
                entries += logprob_entries
                if chunk is None:
                    continue
                delta = {}
                if chunk.reasoning:
                    delta["reasoning_content"] = chunk.reasoning
                if chunk.content:
                    delta["content"] = chunk.content
                if chunk.tool_calls:  # each call whole, in the chunk that completes it
                    delta["tool_calls"] = [tool_call_object(call, calls_sent + i) for i, call in enumerate(chunk.tool_calls)]
                    calls_sent += len(chunk.tool_calls)
                if delta:
                    yield event(delta, logprobs=self._chat_logprobs(job, entries))
                    entries = []
                if chunk.finish_reason is not None:
                    yield event({}, chunk.finish_reason, self._chat_logprobs(job, entries))
                    if include_usage:
                        yield sse({**base, "choices": [], "usage": usage(chunk.usage)})
        except GenerationFailed as error:  # the status went out already: the stream says it
            yield sse(error.body())
        yield b"data: [DONE]\n\n"

    def _chat_logprobs(self, job, entries):
        if job.request.top_logprobs is None:
            return None

        def item(token, logprob):
            piece, raw = self._token_text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(raw)}

        return {"content": [{**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]}
                            for token, logprob, top in entries]}

    # ---- completion responses

    async def _completion_whole(self, job):
        pieces, entries, last = [], [], None
        try:
            async for chunk, logprob_entries in job.pieces():
                entries += logprob_entries
                if chunk is not None:
                    pieces.append(chunk.text)
                    last = chunk
        except GenerationFailed as error:
            raise APIError(500, str(error), type="internal_server_error") from None
        return {**self._base(job, "text_completion"), "choices": [{
            "index": 0, "text": "".join(pieces), "logprobs": self._completion_logprobs(job, entries, 0),
            "finish_reason": last.finish_reason}], "usage": usage(last.usage)}

    async def _completion_events(self, job, include_usage):
        base = self._base(job, "text_completion")
        extra = {"usage": None} if include_usage else {}
        entries, offset = [], 0
        try:
            async for chunk, logprob_entries in job.pieces():
                entries += logprob_entries
                if chunk is None:
                    continue
                if chunk.text or chunk.finish_reason:
                    logprobs = self._completion_logprobs(job, entries, offset)
                    yield sse({**base, "choices": [{"index": 0, "text": chunk.text, "logprobs": logprobs,
                                                    "finish_reason": chunk.finish_reason}], **extra})
                    offset += len(chunk.text)
                    entries = []
                if chunk.finish_reason is not None and include_usage:
                    yield sse({**base, "choices": [], "usage": usage(chunk.usage)})
        except GenerationFailed as error:  # the status went out already: the stream says it
            yield sse(error.body())
        yield b"data: [DONE]\n\n"

    def _completion_logprobs(self, job, entries, offset):
        if job.request.top_logprobs is None:
            return None
        tokens = [self._token_text(token)[0] for token, _, _ in entries]
        offsets = []
        for piece in tokens:
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": [{self._token_text(t)[0]: lp for t, lp in top} for _, _, top in entries],
                "text_offset": offsets}

    def _token_text(self, token):
        """(the token's text, its bytes); a token that holds part of a UTF-8 character is written
        "bytes:\\xe5\\x8c" as OpenAI writes it, so that no two tokens look the same."""
        raw = self.model.tokenizer.token_bytes(token)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def usage(counts):
    return {"prompt_tokens": counts.prompt_tokens, "completion_tokens": counts.completion_tokens,
            "total_tokens": counts.total_tokens, "prompt_tokens_details": {"cached_tokens": counts.cached_tokens}}


def sse(obj):
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class GenerationFailed(Exception):
    """The model failed under a request (NaN logits, the server stopping)."""

    def body(self):
        return {"error": {"message": str(self), "type": "internal_server_error", "param": None, "code": None}}


class Job:
    """A request's generation as seen from its response: the scheduler's events, received on the
    event loop's queue."""

    def __init__(self, id, route, generation, top_logprobs):
        self.id = id
        self.route = route
        self.created = int(time.time())
        self.outcome = None  # stop, length, cancelled or error, once known
        self.accounted = False
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self.request = Request(generation, self._deliver, top_logprobs)

    def _deliver(self, event):  # called from the scheduler's thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server has stopped, nobody listens
            pass

    async def pieces(self):
        """(chunk or None, [(token, logprob, top)]) per sampled token, until the generation ends.
        A failure of the model raises GenerationFailed."""
        while True:
            event = await self._events.get()
            kind = event[0]
            if kind == "token":
                _, token, chunk, scores = event
                entries = [] if scores is None else [(token, scores[0], scores[1])]
                if chunk is not None and chunk.finish_reason is not None:
                    self.outcome = chunk.finish_reason
                yield chunk, entries
            elif kind == "end":
                return
            else:
                self.outcome = "error"
                raise GenerationFailed(f"generation failed: {event[1]}")


class JobResponse:
    """The ASGI response of a queued job: Server-Sent Events from an async iterator of `data:`
    lines, or one JSON body once the generation ends (`whole`, a coroutine giving the object).
    A client that goes away cancels the job at once, also while nothing is being sent;
    on_close(job) runs at the end, whole or not."""

    def __init__(self, job, on_close, lines=None, whole=None):
        self._job, self._on_close = job, on_close
        self._lines, self._whole = lines, whole

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as group:
                async def until_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(until_disconnect)
                if self._lines is not None:
                    await self._stream(send)
                else:
                    await (await self._response())(scope, receive, send)
                group.cancel_scope.cancel()
        except OSError:  # the client went away while a piece was being sent
            pass
        finally:
            if self._lines is not None:
                await self._lines.aclose()
            else:
                self._whole.close()  # never awaited if the client left first
            self._on_close(self._job)

    async def _stream(self, send):
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        async for line in self._lines:
            await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _response(self):
        try:
            return JSONResponse(await self._whole)
        except APIError as error:
            return error.response()


class APIKeyCheck:
    """ASGI middleware: every route but /health needs `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key):
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self._app(scope, receive, send)


class UvicornServer(uvicorn.Server):
    """uvicorn's server that prints the URL it listens on once its socket is bound."""

    def __init__(self, config, banner):
        super().__init__(config)
        self._banner = banner

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(self._banner(f"http://{host}:{port}"), flush=True)


def serve(model, model_name, host, port, scheduler_options, api_key=None, shutdown_timeout=30):
    """Serves until SIGINT or SIGTERM: then no new connection is accepted, the running requests
    finish (for up to shutdown_timeout seconds) and this returns."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(model, model_name, scheduler_options, api_key)
    config = uvicorn.Config(server.app(), host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    http = UvicornServer(config, lambda url: f"qwen3pack serve: {model_name} on {url}/v1 "
                                             f"(max batch {server.scheduler.max_batch}, "
                                             f"max context {model.max_context}, KV cache {model.kv_dtype}, "
                                             f"activations {model.activations})")
    # uvicorn raises the stopping signal again once it has shut down; a stop asked for and done
    # cleanly is not a failure: ignore it then, so that the command exits 0.
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *args: None)
    http.run()
