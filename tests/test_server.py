"""`qwen3pack serve`, the OpenAI-compatible server, as its users see it: started as a subprocess the
way a user starts it, on loopback, and called with the official `openai` client and with raw HTTP
(httpx, as `curl -N` sees a stream). The answers are compared with the runtime's own (model.chat,
model.complete) on the same directory.

The model is tiny and random; its chat template opens a think block after the assistant header
(as Qwen3's thinking-only templates do), so that its answers are reasoning unless
enable_thinking is false.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import qwen3pack  # noqa: E402
from qwen3pack.convert import convert  # noqa: E402
from qwen3pack.testing import QWEN3_STYLE_TEMPLATE, make_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent
API_KEY = "test-key"
MAX_CONTEXT = 4096
NAME = "tiny-qwen3"
# The random model repeats itself greedily; a repetition penalty makes its answers varied.
VARIED = {"temperature": 0, "extra_body": {"repetition_penalty": 1.8}}
THINKING_TEMPLATE = QWEN3_STYLE_TEMPLATE.replace(
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}",
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- else %}\n        {{- '<think>\\n' }}\n    {%- endif %}")


@pytest.fixture(scope="module", autouse=True)
def loopback_without_proxy():
    """A CI machine may set HTTP(S)_PROXY to reach PyPI: the server on loopback is called directly."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("NO_PROXY", "no_proxy"):
            patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
        yield


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    source = make_checkpoint(work / "source", seed=5, qwen3_tokenizer=True, num_hidden_layers=2)
    out = work / "tp2"
    convert(source, out, tp=2)
    assert THINKING_TEMPLATE != QWEN3_STYLE_TEMPLATE
    (out / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def model(directory):
    with qwen3pack.load(directory, threads=1, max_context=MAX_CONTEXT) as m:
        yield m


@contextmanager
def serving(directory, *options):
    """A `qwen3pack serve` process on a port the system picks; yields (base URL, process, its log
    so far as a function, the line it printed once listening), kills it at the end whatever
    happened."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe that a long log would fill
        process = subprocess.Popen([str(BIN / "qwen3pack"), "serve", str(directory), "--port", "0", "--threads", "2",
                                    *options], stdout=subprocess.PIPE, stderr=log, text=True)

        def read_log():
            log.seek(0)
            return log.read()

        try:
            line = process.stdout.readline()  # printed once the socket listens
            assert "http://127.0.0.1:" in line, (line, process.wait(timeout=10), read_log())
            yield line.split(" on ")[1].split()[0].removesuffix("/v1"), process, read_log, line
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


@pytest.fixture(scope="module")
def server(directory):
    with serving(directory, "--api-key", API_KEY, "--max-batch", "8", "--max-context", str(MAX_CONTEXT),
                 "--served-model-name", NAME) as (url, _, _, _):
        yield url


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def messages(text="Tell me a story 😀"):
    return [{"role": "user", "content": text}]


def no_thinking(options):
    return {**options, "extra_body": {**options.get("extra_body", {}), "chat_template_kwargs": {"enable_thinking": False}}}


def runtime_chat(model, text="Tell me a story 😀", **options):
    return model.chat(messages(text), temperature=0, repetition_penalty=1.8, **options)


def metric(url, name):
    """The value of one sample of the server's Prometheus text."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


# ---------------------------------------------------------------- answers

def test_models_lists_the_served_model(client):
    listed = client.models.list().data
    assert [(m.id, m.object) for m in listed] == [(NAME, "model")]


def test_a_chat_completion_is_the_runtime_answer(client, model):
    answer = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=24,
                                            **no_thinking(VARIED))
    expected = runtime_chat(model, max_tokens=24, enable_thinking=False)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == NAME
    assert choice.message.role == "assistant" and choice.message.content == expected.content != ""
    assert choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == \
        (expected.usage.prompt_tokens, 24, expected.usage.prompt_tokens + 24)


def test_a_streamed_chat_joins_into_the_whole_answer(client, model):
    stream = client.chat.completions.create(model=NAME, messages=messages("北京 😀 café"), max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}, **no_thinking(VARIED))
    chunks = list(stream)
    expected = runtime_chat(model, "北京 😀 café", max_tokens=40, enable_thinking=False)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected.content  # multi-byte characters included, whole in one piece
    assert len([p for p in pieces if p]) > 1
    *_, finish, last = chunks
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert last.choices == [] and last.usage.completion_tokens == 40
    assert last.usage.prompt_tokens == expected.usage.prompt_tokens


def test_thinking_is_reasoning_content_beside_content(client, model):
    answer = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=20, **VARIED)
    expected = runtime_chat(model, max_tokens=20)
    message = answer.choices[0].message
    assert message.reasoning_content == expected.reasoning != "" and message.content == expected.content == ""
    stream = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=20, stream=True, **VARIED)
    deltas = [c.choices[0].delta for c in stream]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == expected.reasoning
    assert "".join(d.content or "" for d in deltas) == ""


def test_tools_and_text_parts_are_given_to_the_chat_template(client, model):
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Météo",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story 😀"}]}]
    answer = client.chat.completions.create(model=NAME, messages=parts, tools=[tool], max_tokens=1)
    with_tools = len(model.tokenizer.encode(model.render(messages(), tools=[tool])))
    assert answer.usage.prompt_tokens == with_tools > len(model.tokenizer.encode(model.render(messages())))


def test_a_completion_continues_the_prompt_as_the_runtime_does(client, model):
    answer = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, logprobs=3, **VARIED)
    expected = model.complete("Once upon a time", max_tokens=12, temperature=0, repetition_penalty=1.8)
    choice = answer.choices[0]
    assert answer.object == "text_completion" and choice.text == expected.text
    assert answer.usage.completion_tokens == 12 and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == 12 and all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    streamed = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, stream=True, **VARIED)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_completions_default_to_16_tokens_as_openai(client):
    answer = client.completions.create(model=NAME, prompt="Once upon a time", **VARIED)
    assert answer.usage.completion_tokens == 16


def test_chat_logprobs_cover_every_token_and_its_bytes(client):
    answer = client.chat.completions.create(model=NAME, messages=messages("北京 😀 café"), max_tokens=12,
                                            logprobs=True, top_logprobs=2, **no_thinking(VARIED))
    entries = answer.choices[0].logprobs.content
    assert len(entries) == 12 and all(len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob for e in entries)  # greedy takes the likeliest
    # a token holding part of a character is "bytes:\x.." with its bytes: they join into the text
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == \
        answer.choices[0].message.content


def test_logprobs_of_an_id_without_text_are_empty(tmp_path):
    # An id of the output head that the tokenizer lacks (make_checkpoint's byte-level tokenizer has
    # 259 tokens for 384 rows; Qwen3 151669 for 151936), here forced by a logit bias: no text in the
    # answer, and none in its logprobs, where it used to fail the request with a 500.
    convert(make_checkpoint(tmp_path / "source"), tmp_path / "model", tp=1)
    with serving(tmp_path / "model") as (url, _, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="model", messages=messages(), max_tokens=2, logprobs=True,
                                                top_logprobs=1, logit_bias={"300": 100})
        assert answer.choices[0].message.content == ""
        assert [(e.token, e.bytes) for e in answer.choices[0].logprobs.content] == [("", [])] * 2


def test_a_stop_string_ends_the_answer_before_it(client, model):
    full = runtime_chat(model, max_tokens=30, enable_thinking=False).content
    stop = full[10:13]
    cut = full.find(stop)
    answer = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=30, stop=["never", stop],
                                            **no_thinking(VARIED))
    assert answer.choices[0].message.content == full[:cut] and answer.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=30, stop=stop, stream=True,
                                            **no_thinking(VARIED))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full[:cut]


def test_the_same_seed_samples_the_same_answer(client):
    def sample(seed):
        message = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=16, temperature=1.0,
                                                 seed=seed, extra_body={"repetition_penalty": 1.8}).choices[0].message
        return message.reasoning_content, message.content

    assert sample(3) == sample(3) != sample(4)


# ---------------------------------------------------------------- errors

def test_bad_fields_are_400_naming_the_field(client):
    cases = [({"temperature": "hot"}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
             ({"top_p": 1.5}, "top_p"), ({"n": 2}, "n"), ({"stop": 5}, "stop"), ({"stream": "yes"}, "stream"),
             ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages"), ({"messages": "Hi"}, "messages")]
    for fields, param in cases:
        body = {"model": NAME, "messages": messages(), **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**{k: v for k, v in body.items() if k in ("model", "messages")},
                                           extra_body={k: v for k, v in body.items() if k not in ("model", "messages")})
        assert caught.value.status_code == 400
        error = caught.value.body
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (fields, error)


def test_unknown_fields_are_ignored(client):
    answer = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=2,
                                            extra_body={"user_tag": "x", "guided_choice": None})
    assert answer.usage.completion_tokens == 2


def test_a_prompt_beyond_the_context_is_400_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=messages("word " * 5000), max_tokens=4)
    message = caught.value.body["message"]
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_CONTEXT} tokens" in message and "prompt" in message
    with pytest.raises(openai.BadRequestError, match=f"max_tokens={MAX_CONTEXT}"):
        client.completions.create(model=NAME, prompt="Hi", max_tokens=MAX_CONTEXT)


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=messages())
    assert caught.value.body["code"] == "model_not_found"


def test_the_api_key_is_checked_on_every_route_but_health(server):
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=NAME, messages=messages())
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.get(server + "/health").status_code == 200


# ---------------------------------------------------------------- raw SSE, as `curl -N` sees it

def test_a_raw_stream_is_data_lines_ending_with_done_also_on_the_alias(server):
    body = {"messages": messages(), "max_tokens": 10, "stream": True, "temperature": 0}
    for path in ("/v1/chat/completions", "/chat/completions"):
        with httpx.stream("POST", server + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        objects = [json.loads(line[6:]) for line in lines[:-1]]
        assert objects[-1]["choices"][0]["finish_reason"] == "length"
    assert httpx.get(server + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"] == NAME


# ---------------------------------------------------------------- continuous batching

PROMPTS = [f"Story {i}: {topic}" for i, topic in enumerate(
    ["dragons", "北京", "the sea", "café ☕", "robots", "😀 joy", "winter", "a cat"])]


def stream_answer(client, prompt, max_tokens):
    stream = client.chat.completions.create(model=NAME, messages=messages(prompt), max_tokens=max_tokens, stream=True,
                                            **no_thinking(VARIED))
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def concurrent_answers(client, prompts, tokens):
    """The answers to the prompts, streamed at the same time."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: stream_answer(client, p, tokens), prompts))


def test_concurrent_streams_are_batched_and_answer_as_alone(client, server):
    tokens = 200
    alone = [stream_answer(client, p, tokens) for p in PROMPTS]
    steps_before, requests_before = metric(server, "qwen3pack_batch_size_count"), \
        metric(server, "qwen3pack_batch_size_sum")
    together = concurrent_answers(client, PROMPTS, tokens)
    assert together == alone
    steps = metric(server, "qwen3pack_batch_size_count") - steps_before
    mean_batch = (metric(server, "qwen3pack_batch_size_sum") - requests_before) / steps
    # one forward pass served several streams at once (they start and end a little apart: not all 8);
    # what that gains in tokens per second is measured by `make bench` (bench_serve), not timed here
    assert mean_batch > 2, (steps, mean_batch)


def wait_until_nothing_runs(server):
    deadline = time.monotonic() + 10
    while metric(server, "qwen3pack_running_requests") != 0:
        assert time.monotonic() < deadline, "a disconnected request still runs"
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot(client, server):
    generated = metric(server, "qwen3pack_generation_tokens_total")
    stream = client.chat.completions.create(model=NAME, messages=messages(), max_tokens=4000, stream=True, **VARIED)
    for _, _ in zip(stream, range(5)):
        pass
    stream.close()
    wait_until_nothing_runs(server)
    assert metric(server, 'qwen3pack_generations_total{finish_reason="cancelled"}') == 1
    assert metric(server, "qwen3pack_generation_tokens_total") - generated < 4000
    # a whole (not streamed) answer whose client goes away while it is computed is cancelled too
    body = json.dumps({"messages": messages(), "max_tokens": 4000, "repetition_penalty": 1.8}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                           % (host.encode(), API_KEY.encode(), len(body), body))
        deadline = time.monotonic() + 10
        while metric(server, "qwen3pack_running_requests") != 1:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.001)
    wait_until_nothing_runs(server)
    assert metric(server, 'qwen3pack_generations_total{finish_reason="cancelled"}') == 2
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: stream_answer(client, p, 8), PROMPTS))
    assert all(answers)


def test_tool_calls_come_back_as_openai_tool_calls_whole_and_streamed(tool_caller):
    from qwen3pack.testing import WEATHER_QUESTION, WEATHER_TOOL
    paris = {"city": "Paris", "unit": "°C"}
    ask = dict(model="model", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], temperature=0,
               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    with serving(tool_caller) as (url, _, _, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == paris
        chunks = list(client.chat.completions.create(**ask, stream=True))
        deltas = [chunk.choices[0].delta for chunk in chunks]
        [streamed] = [c for d in deltas for c in d.tool_calls or []]
        assert streamed.index == 0 and streamed.id.startswith("call_") and streamed.function.name == "get_weather"
        assert json.loads(streamed.function.arguments) == paris
        assert "".join(d.content or "" for d in deltas) == "" and chunks[-1].choices[0].finish_reason == "tool_calls"
        # the conversation goes on with the call and the tool's answer, as OpenAI's clients send them
        result = {"role": "tool", "tool_call_id": call.id, "content": "18"}
        follow = client.chat.completions.create(**{**ask, "messages": [
            *WEATHER_QUESTION, choice.message.model_dump(exclude_none=True), result]}, max_tokens=1)
        assert follow.usage.prompt_tokens > client.chat.completions.create(**ask).usage.prompt_tokens
        # tool_choice "none": the tools are not offered and nothing is parsed; forcing a call is refused
        plain = client.chat.completions.create(**ask, tool_choice="none").choices[0]
        assert not plain.message.tool_calls and plain.finish_reason == "stop" and "<tool_call>" in plain.message.content
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, tool_choice="required")
        assert refused.value.body["param"] == "tool_choice"


def test_a_conversation_sent_again_with_a_new_turn_is_computed_from_where_they_differ(client, server, model):
    first = [{"role": "system", "content": "You tell long stories."}, {"role": "user", "content": "Once upon a time"}]
    answer = client.chat.completions.create(model=NAME, messages=first, max_tokens=8, **no_thinking(VARIED))
    turn = [*first, {"role": "assistant", "content": answer.choices[0].message.content},
            {"role": "user", "content": "And then?"}]
    cached = metric(server, "qwen3pack_prompt_tokens_cached_total")
    again = client.chat.completions.create(model=NAME, messages=turn, max_tokens=8, **no_thinking(VARIED))
    # the first request's cache held its prompt (and answer), which the new prompt begins with
    # up to the assistant header, where the template wrote the empty think block before
    first_ids, turn_ids = (model.tokenizer.encode(model.render(m, enable_thinking=False)) for m in (first, turn))
    common = next(i for i, (a, b) in enumerate(zip(first_ids, turn_ids)) if a != b)
    assert again.usage.prompt_tokens_details.cached_tokens == common > 10
    assert metric(server, "qwen3pack_prompt_tokens_cached_total") - cached == common
    expected = model.chat(turn, enable_thinking=False, temperature=0, repetition_penalty=1.8, max_tokens=8)
    assert again.choices[0].message.content == expected.content  # computed in part, answered the same


def test_tokenize_and_detokenize_answer_as_vllms_routes_do(server, model):
    def post(route, body):
        return httpx.post(server + route, json=body, headers={"Authorization": f"Bearer {API_KEY}"})

    text = post("/tokenize", {"prompt": "Hello 😀"}).json()
    assert text == {"count": len(model.tokenizer.encode("Hello 😀")), "max_model_len": MAX_CONTEXT,
                    "tokens": model.tokenizer.encode("Hello 😀")}
    rendered = model.render(messages(), enable_thinking=False)
    chat = post("/tokenize", {"messages": messages(), "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert chat["tokens"] == model.tokenizer.encode(rendered)
    assert post("/detokenize", {"tokens": chat["tokens"]}).json() == {"prompt": rendered}
    for route, body, param in (("/detokenize", {"tokens": [0, -1]}, "tokens"), ("/tokenize", {}, "prompt"),
                               ("/tokenize", {"messages": "Hi"}, "messages")):
        refused = post(route, body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_a_response_format_that_is_not_text_is_refused_not_ignored(client):
    ask = dict(model=NAME, messages=messages(), max_tokens=1)
    assert client.chat.completions.create(**ask, response_format={"type": "text"}).choices
    with pytest.raises(openai.BadRequestError, match='response_format "json_object" is not supported') as refused:
        client.chat.completions.create(**ask, response_format={"type": "json_object"})
    assert refused.value.body["param"] == "response_format"


def test_metrics_count_requests_tokens_and_time_to_first_token(server):
    assert metric(server, "qwen3pack_generation_tokens_total") > 0
    assert metric(server, "qwen3pack_prompt_tokens_total") > 0
    assert metric(server, "qwen3pack_time_to_first_token_seconds_count") > 0
    assert metric(server, 'qwen3pack_requests_total{route="/v1/chat/completions",status="200"}') > 0
    assert metric(server, "qwen3pack_waiting_requests") == 0


def test_the_server_says_where_it_listens_and_how_the_model_computes(directory):
    # an f32 model computes in f32 by default; the KV cache here is asked for in bf16
    with serving(directory, "--kv-dtype", "bf16") as (url, _, _, banner):
        assert banner == (f"qwen3pack serve: tp2 on {url}/v1 (max batch 16, max context 4096, KV cache bf16, "
                          "activations f32)\n")


# ---------------------------------------------------------------- a full queue, and SIGTERM

def test_a_full_queue_is_429_and_sigterm_lets_the_running_stream_finish(directory):
    with serving(directory, "--max-batch", "1", "--max-queue", "0") as (url, process, read_log, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tp2", messages=messages(), max_tokens=1000, stream=True,
                                                **VARIED)
        first = next(stream)
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="tp2", messages=messages(), max_tokens=2)
        assert caught.value.response.headers["retry-after"] == "1"
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert process.wait(timeout=30) == 0
        log = read_log()
        assert "Traceback" not in log and "completion tokens" in log


# ---------------------------------------------------------------- the scheduler itself

def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(model):
    from qwen3pack.runtime.text import generation
    from qwen3pack.scheduler import Request, Scheduler
    events = []
    scheduler = Scheduler(model, max_batch=4, prefill_chunk=32)
    scheduler.start()
    try:
        def submit(name, prompt, max_tokens):
            request = Request(generation(model, prompt, max_tokens=max_tokens, temperature=0),
                              lambda event: events.append((name, event[0])))
            scheduler.submit(request)
            return request

        running = submit("running", "Once upon a time", 400)
        while not events:
            time.sleep(0.001)
        submitted = len(events)
        long = submit("long", "word " * 300, 4)
        deadline = time.monotonic() + 30
        while ("long", "end") not in events or ("running", "end") not in events:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        scheduler.stop()
    prompt_steps = -(-len(long.generation.prompt_ids) // 32)
    first = events.index(("long", "token"))
    # the running stream got a token at every step while the long prompt was computed, 32 tokens a step
    assert prompt_steps > 5 and events[submitted:first].count(("running", "token")) >= prompt_steps - 1
    assert len(running.generation.token_ids) == 400 and scheduler.largest_batch == 2


def test_ended_requests_caches_are_reused_by_prompts_that_begin_with_their_tokens_within_max_batch(model):
    from qwen3pack.runtime.text import generation
    from qwen3pack.scheduler import Request, Scheduler
    scheduler = Scheduler(model, max_batch=2, prefill_chunk=32)
    scheduler.start()

    def answer(prompt):
        events = []
        request = Request(generation(model, prompt, max_tokens=4, temperature=0), events.append)
        scheduler.submit(request)
        deadline = time.monotonic() + 30
        while not events or events[-1][0] != "end":
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return request.generation.text

    try:
        first = answer("Once upon a time there was")
        assert first.cached_tokens == 0 and scheduler.kept == 1
        longer = "Once upon a time there was" + first.content + " a king"  # the first's prompt and answer
        again = answer(longer)
        assert again.cached_tokens > len(model.tokenizer.encode("Once upon a time there was"))
        assert again.token_ids == model.complete(longer, max_tokens=4, temperature=0).token_ids  # as computed whole
        assert scheduler.kept == 1  # the first's session, taken and kept again
        answer("Far away")
        answer("Long ago")  # three ended, two places: the oldest cache is given up
        assert scheduler.kept == 2
        assert answer("Once upon a time").cached_tokens == 0
    finally:
        scheduler.stop()


def test_logit_bias_pushes_tokens_up_or_out(client, model):
    ask = dict(model=NAME, prompt="Once upon a time", max_tokens=3, temperature=0)
    plain = client.completions.create(**ask, logprobs=1).choices[0]
    first = model.tokenizer.encode(plain.logprobs.tokens[0])[0]
    banned = client.completions.create(**ask, logprobs=1, logit_bias={str(first): -100}).choices[0]
    assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]
    forced = model.tokenizer.encode("Z")[0]
    assert client.completions.create(**ask, logit_bias={str(forced): 100}).choices[0].text == "ZZZ"
    for bias, wrong in (({"-1": 5}, "not a token id"), ({str(forced): 101}, "from -100 to 100")):
        with pytest.raises(openai.BadRequestError, match=wrong) as refused:
            client.completions.create(**ask, logit_bias=bias)
        assert refused.value.body["param"] == "logit_bias"


def test_a_kept_cache_that_sliding_window_layers_cannot_cut_back_is_not_reused(tmp_path):
    from qwen3pack.runtime.text import generation
    from qwen3pack.scheduler import Request, Scheduler
    source = make_checkpoint(tmp_path / "source", num_hidden_layers=2, use_sliding_window=True, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention"])
    convert(source, tmp_path / "model")
    with qwen3pack.load(tmp_path / "model", threads=1) as model:
        scheduler = Scheduler(model, max_batch=2)
        scheduler.start()
        try:
            texts = []
            for prompt in ("Once upon a time there was a king", "Once upon a time there was a queen"):
                events = []
                request = Request(generation(model, prompt, max_tokens=4, temperature=0), events.append)
                scheduler.submit(request)
                deadline = time.monotonic() + 30
                while not events or events[-1][0] != "end":
                    assert time.monotonic() < deadline and "error" not in [e[0] for e in events]
                    time.sleep(0.001)
                texts.append(request.generation.text)
        finally:
            scheduler.stop()
        # the common prefix lies more than a window behind the first cache's end: computed afresh
        assert texts[1].cached_tokens == 0
        assert texts[1].token_ids == model.complete("Once upon a time there was a queen", max_tokens=4,
                                                    temperature=0).token_ids
