"""Text in, text out: the tokenizer and chat template against transformers, incremental decoding,
stop strings, the reasoning/content split, completions and chat against transformers' greedy
generate, and conversations that reuse their KV cache.

The checkpoint's tokenizer is Qwen3-like (qwen3pack.testing: byte-level BPE trained on a small
corpus, Qwen3's chat tokens, a Qwen3-style template with thinking and tools).
"""
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qwen3pack  # noqa: E402
from qwen3pack.convert import convert  # noqa: E402
from qwen3pack.runtime import ContextLengthError, Tokenizer  # noqa: E402
from qwen3pack.runtime.chat_template import ChatTemplate  # noqa: E402
from qwen3pack.runtime.text import ReasoningSplit, StopStrings, ToolCall, ToolCallSplit, generation  # noqa: E402
from qwen3pack.testing import make_checkpoint  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

REFERENCE_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen3-tokenizer"
MULTI_BYTE = ["北京是中国的首都。", "東京は日本の首都です", "😀 🎉 👍🏽 ❤️ 🇫🇷", "Cre\u0300me bru\u0302le\u0301e, café, Zürich",
              "mixed: 北京 😀 e\u0301 ñ"]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("text") / "source", seed=3, qwen3_tokenizer=True,
                           num_hidden_layers=2)


@pytest.fixture(scope="module")
def converted(source):
    out = source.parent / "tp2"
    convert(source, out, tp=2)
    return out


@pytest.fixture(scope="module")
def model(converted):
    with qwen3pack.load(converted, threads=2, max_context=256) as m:
        yield m


@pytest.fixture(scope="module")
def hf_tokenizer(source):
    return transformers.AutoTokenizer.from_pretrained(source)


@pytest.fixture(scope="module")
def hf_model(source):
    return transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


# ---------------------------------------------------------------- the chat template

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "Hello"}],
    "system prompt": [{"role": "system", "content": "Sé breve. ☕"}, {"role": "user", "content": "北京在哪里？"}],
    "multi-turn, earlier thinking dropped": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nSimple sum.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nAgain.\n</think>\n\n6"},
        {"role": "user", "content": "Thanks 😀"}],
    "reasoning_content field": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Bye"}],
    "tools": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich?"}],
    "tool calls with dict and string arguments, several results in a row": [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "<think>\nTwo calls.\n</think>\n\nLet me check.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
        {"role": "tool", "content": "18 °C"},
        {"role": "tool", "content": "12 °C"}],
    "tool call without content, then the answer": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 °C"},
        {"role": "assistant", "content": "It is 18 °C."},
        {"role": "user", "content": "Merci"}],
}
TOOLS = {"tools", "tool calls with dict and string arguments, several results in a row",
         "tool call without content, then the answer"}


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_rendering_equals_transformers_apply_chat_template(source, hf_tokenizer, case, enable_thinking):
    messages = CONVERSATIONS[case]
    tools = [WEATHER_TOOL] if case in TOOLS else None
    thinking = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                                **thinking)
    rendered = Tokenizer.from_directory(source).chat_template.render(messages, tools=tools,
                                                                     enable_thinking=enable_thinking)
    assert rendered == expected


def test_the_template_drops_earlier_thinking_and_writes_an_empty_block_without_thinking(model):
    messages = CONVERSATIONS["multi-turn, earlier thinking dropped"]
    prompt = model.render(messages, enable_thinking=False)
    assert "Simple sum." not in prompt and "<|im_start|>assistant\n4<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>user\nThanks 😀<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_helpers_that_transformers_gives_templates():
    template = ChatTemplate("{{ messages[0].content | tojson }} {{ {'a': [1, 2]} | tojson(indent=1) }} "
                            "{{ strftime_now('%Y') | length }} {{ eos_token }}", {"eos_token": "<|im_end|>"})
    assert template.render([{"role": "user", "content": "é <b>"}]) == '"é <b>" {\n "a": [\n  1,\n  2\n ]\n} 4 <|im_end|>'


@pytest.mark.parametrize("messages, message", [
    ("Hello", "messages must be a list of {'role': ..., 'content': ...} objects, got str"),
    ([], "messages is empty"),
    (["Hello"], "messages[0] must be an object with role and content, got str"),
    ([{"role": "robot", "content": "beep"}], "messages[0].role must be one of system, user, assistant, tool, "
                                             "got 'robot'"),
    ([{"content": "Hi"}], "messages[0].role must be one of system, user, assistant, tool, got None"),
    ([{"role": "user"}], "messages[0] has no content"),
    ([{"role": "user", "content": 3}], "messages[0].content must be a string, got int"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "messages[1].tool_calls[0] must be an object with a function name"),
])
def test_bad_messages_are_named(model, messages, message):
    with pytest.raises(ValueError) as error:
        model.render(messages)
    assert str(error.value) == message


def test_template_errors_are_value_errors_not_jinja_tracebacks():
    user = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="^chat template error: no system prompt$"):
        ChatTemplate("{{ raise_exception('no system prompt') }}", {}).render(user)
    with pytest.raises(ValueError, match="^chat template does not compile: "):
        ChatTemplate("{% for m in messages %}", {})
    with pytest.raises(ValueError, match="^chat template error: TypeError: "):
        ChatTemplate("{{ messages[0].content + 1 }}", {}).render(user)
    with pytest.raises(ValueError, match="^chat template error: .*unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}", {}).render(user)
    with pytest.raises(ValueError, match="^enable_thinking must be True, False or None, got 'yes'$"):
        ChatTemplate("", {}).render(user, enable_thinking="yes")
    with pytest.raises(ValueError, match="^tools must be a list of JSON-schema objects$"):
        ChatTemplate("", {}).render(user, tools=WEATHER_TOOL)


def test_chat_template_jinja_is_preferred_to_tokenizer_config(source, tmp_path):
    directory = tmp_path / "tokenizer"
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    (directory / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert Tokenizer.from_directory(directory).chat_template.render([{"role": "user", "content": "x"}]) == "1 messages"


def test_a_directory_without_tokenizer_files_is_named(tmp_path, converted):
    with pytest.raises(ValueError, match=f"^{tmp_path}: no tokenizer.json: this model has no tokenizer"):
        Tokenizer.from_directory(tmp_path)
    bare = tmp_path / "bare"
    shutil.copytree(converted, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    with qwen3pack.load(bare, threads=1) as m:
        assert list(m.generate([1, 2], max_new_tokens=2, temperature=0))  # token ids still work
        with pytest.raises(ValueError, match="this model has no tokenizer.json"):
            m.complete("Hi")
    (bare / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer file"):
        qwen3pack.load(bare, threads=1)


@pytest.mark.skipif(not REFERENCE_TOKENIZER.is_dir(), reason="the reference Qwen tokenizer is not in ../shared")
def test_the_real_qwen_tokenizer_encodes_decodes_and_renders_as_transformers():
    ours = Tokenizer.from_directory(REFERENCE_TOKENIZER)
    theirs = transformers.AutoTokenizer.from_pretrained(REFERENCE_TOKENIZER)
    text = "Hello, world! 12345 北京 😀 Crème\n\n  def f(x):\n\treturn x  <think>ok</think><|im_end|>"
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    messages = CONVERSATIONS["system prompt"]
    assert ours.chat_template.render(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)


# ---------------------------------------------------------------- incremental decoding


def streamed(tokenizer, ids):
    decoder = tokenizer.decoder()
    return [decoder.add(token) for token in ids] + [decoder.finish()]


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_streamed_decoding_of_multi_byte_text_equals_the_whole_decode(source, text):
    tokenizer = Tokenizer.from_directory(source)
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)  # some token splits a character
    pieces = streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert not any("\ufffd" in piece for piece in pieces)


def test_streamed_decoding_emits_each_character_once_complete(source):
    tokenizer = Tokenizer.from_directory(source)
    ids = tokenizer.encode("😀")
    assert len(ids) > 1
    assert streamed(tokenizer, ids) == [""] * (len(ids) - 1) + ["😀", ""]


def test_an_unfinished_character_at_the_end_decodes_as_the_whole_decode_does(source):
    tokenizer = Tokenizer.from_directory(source)
    ids = tokenizer.encode("ab😀")[:-1]
    assert "".join(streamed(tokenizer, ids)) == tokenizer.decode(ids) == "ab\ufffd"


def test_special_tokens_are_skipped_as_transformers_does(source, hf_tokenizer):
    tokenizer = Tokenizer.from_directory(source)
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nOK<|im_end|><|endoftext|>")
    assert "".join(streamed(tokenizer, ids)) == hf_tokenizer.decode(ids, skip_special_tokens=True) == \
        "assistant\n<think>\nhm\n</think>\n\nOK"


def test_each_step_decodes_a_short_window_not_the_whole_output(source):
    tokenizer = Tokenizer.from_directory(source)
    windows = []

    class Counting:
        def decode(self, ids):
            windows.append(len(ids))
            return tokenizer.decode(ids)

    ids = tokenizer.encode(" ".join(MULTI_BYTE) * 20)
    decoder = type(tokenizer.decoder())(Counting())
    text = "".join(decoder.add(token) for token in ids) + decoder.finish()
    assert text == tokenizer.decode(ids) and len(ids) > 500
    assert max(windows) <= 8


@pytest.mark.parametrize("text", [*MULTI_BYTE, "<|im_start|>user\n<think>x</think><|im_end|>"])
def test_token_bytes_join_into_the_text_even_where_tokens_split_characters(source, text):
    tokenizer = Tokenizer.from_directory(source)
    ids = tokenizer.encode(text)
    assert b"".join(tokenizer.token_bytes(token) for token in ids) == \
        tokenizer.decode(ids, skip_special_tokens=False).encode()


def test_an_id_the_tokenizer_lacks_stands_for_no_bytes_as_decode_gives_it_no_text(tmp_path):
    # make_checkpoint's byte-level tokenizer has 259 tokens for an output head of 384 rows (Qwen3:
    # 151669 for 151936): the model may pick an id past them.
    tokenizer = Tokenizer.from_directory(make_checkpoint(tmp_path))
    ids = tokenizer.encode("hi") + [300] + tokenizer.encode("!")
    assert tokenizer.token_bytes(300) == b""
    assert b"".join(tokenizer.token_bytes(token) for token in ids) == tokenizer.decode(ids).encode() == b"hi!"


# ---------------------------------------------------------------- stop strings and the reasoning split


def stop_pieces(stops, pieces):
    matcher, out = StopStrings(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    return out + [matcher.flush()], False


def test_a_stop_string_across_pieces_ends_the_text_before_it_and_nothing_past_it_is_streamed():
    pieces, stopped = stop_pieces(["STOP"], ["Hello S", "T", "OP and more"])
    assert pieces == ["Hello ", "", ""] and stopped
    pieces, stopped = stop_pieces(["\n\nUser:", "###"], ["a\n", "\nUs", "er: b"])
    assert "".join(pieces) == "a" and stopped


def test_text_that_only_begins_a_stop_string_is_released():
    assert stop_pieces(["STOP"], ["a ST", "b"]) == (["a ", "STb", ""], False)
    assert stop_pieces(["STOP"], ["a ST"]) == (["a ", "ST"], False)


def split_pieces(pieces, in_reasoning=False):
    split, reasoning, content = ReasoningSplit(in_reasoning), [], []
    for piece in pieces:
        r, c = split.feed(piece)
        reasoning.append(r)
        content.append(c)
    r, c = split.finish()
    return "".join(reasoning) + r, "".join(content) + c


@pytest.mark.parametrize("text, in_reasoning, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.", "Paris."),
    ("Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris."),
    ("Paris.", False, "", "Paris."),
    ("\n\nParis.", False, "", "\n\nParis."),
    ("<think>\n\n</think>\n\nParis.", False, "", "Paris."),
    ("<think>\nStill thinking\n", False, "Still thinking\n", ""),
    ("a < b, <thin", False, "", "a < b, <thin"),
    ("x </think> y", False, "", "x </think> y"),
])
def test_text_is_split_at_the_think_tags_the_same_streamed_and_whole(text, in_reasoning, reasoning, content):
    assert split_pieces([text], in_reasoning) == (reasoning, content)
    assert split_pieces(list(text), in_reasoning) == (reasoning, content)  # one character at a time


def tool_call_pieces(pieces):
    split, content, calls = ToolCallSplit(), [], []
    for piece in pieces:
        c, new_calls = split.feed(piece)
        content.append(c)
        calls += new_calls
    return "".join(content) + split.finish(), calls


WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARIS = ToolCall("get_weather", {"city": "Paris"})


@pytest.mark.parametrize("text, content, calls", [
    (WEATHER, "", [PARIS]),
    ("Let me check.\n\n" + WEATHER, "Let me check.", [PARIS]),
    (WEATHER + "\n" + WEATHER.replace("Paris", "Zürich") + "\n", "",
     [PARIS, ToolCall("get_weather", {"city": "Zürich"})]),
    ('<tool_call>{"name": "now"}</tool_call>', "", [ToolCall("now", {})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>', "", [ToolCall("f", {"x": [1, 2]})]),
    ("Paris.\n", "Paris.\n", []),
    ("a <tool_c", "a <tool_c", []),
    ("<tool_call>not json</tool_call> then", "<tool_call>not json</tool_call> then", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>\n{"name": "get_weather", "argu', '<tool_call>\n{"name": "get_weather", "argu', []),
])
def test_tool_calls_are_taken_out_of_the_content_the_same_streamed_and_whole(text, content, calls):
    assert tool_call_pieces([text]) == (content, calls)
    assert tool_call_pieces(list(text)) == (content, calls)  # one character at a time


# ---------------------------------------------------------------- generation against transformers


def hf_greedy(hf_model, ids, max_new_tokens, repetition_penalty=1.0):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                top_k=None, top_p=None, temperature=None, pad_token_id=0,
                                repetition_penalty=repetition_penalty)
    return out[0, len(ids):].tolist()


def test_chat_greedy_equals_transformers_generate(model, hf_model, hf_tokenizer):
    messages = CONVERSATIONS["system prompt"]
    prompt_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False)
    expected = hf_greedy(hf_model, prompt_ids, 12)
    result = model.chat(messages, max_tokens=12, temperature=0)
    assert result.token_ids == expected
    assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(prompt_ids) and result.usage.completion_tokens == 12
    assert result.finish_reason == "length"


@pytest.mark.parametrize("repetition_penalty", [1.0, 2.0])
def test_complete_greedy_equals_transformers_generate(model, hf_model, hf_tokenizer, repetition_penalty):
    prompt = "The capital of France is"
    expected = hf_greedy(hf_model, hf_tokenizer.encode(prompt, add_special_tokens=False), 10,
                         repetition_penalty=repetition_penalty)
    result = model.complete(prompt, max_tokens=10, temperature=0, repetition_penalty=repetition_penalty)
    assert result.token_ids == expected
    assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_defaults_come_from_generation_config(model, converted):
    assert model.generation["defaults"] == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    prompt = "Once upon a time"
    ids = model.tokenizer.encode(prompt)
    by_default = model.complete(prompt, max_tokens=16, seed=7).token_ids
    assert by_default == list(model.generate(ids, 16, temperature=0.6, top_k=20, top_p=0.95, seed=7))
    assert model.complete(prompt, max_tokens=16, temperature=0).token_ids == \
        list(model.generate(ids, 16, temperature=0.0))


def test_stream_chunks_join_into_the_whole_result(model):
    messages = [{"role": "user", "content": "Tell me a story 😀"}]
    varied = dict(max_tokens=40, temperature=1.0, seed=11, repetition_penalty=2.0)  # random weights repeat
    whole = model.chat(messages, **varied)
    chunks = list(model.chat(messages, stream=True, **varied))
    assert "".join(c.text for c in chunks) == whole.text == model.tokenizer.decode(whole.token_ids)
    assert "".join(c.reasoning for c in chunks) == whole.reasoning
    assert "".join(c.content for c in chunks) == whole.content
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage == whole.usage and chunks[-1].token_ids == whole.token_ids


def test_a_stop_string_spanning_tokens_cuts_the_text(model):
    prompt = model.render([{"role": "user", "content": "Tell me a story 😀"}])
    varied = dict(max_tokens=40, temperature=1.0, seed=11, repetition_penalty=2.0)  # random weights repeat
    full = model.complete(prompt, **varied)
    # a stop string of two characters, one on each side of a boundary between tokens
    boundary = next(len(head) for k in range(2, 40) if (head := model.tokenizer.decode(full.token_ids[:k]))
                    and not head.endswith("\ufffd") and len(full.text) > len(head) + 2)
    stop = full.text[boundary - 1:boundary + 1]
    cut = full.text.find(stop)
    chunks = list(model.complete(prompt, stop=["never here", stop], stream=True, **varied))
    assert 0 < cut < boundary
    assert "".join(c.text for c in chunks) == full.text[:cut]
    assert chunks[-1].finish_reason == "stop"
    assert full.token_ids[:len(chunks[-1].token_ids)] == chunks[-1].token_ids


def test_generation_stops_at_the_eos_ids_of_the_manifest(model, converted, tmp_path):
    prompt = "Once upon a time"
    free = model.complete(prompt, max_tokens=12, temperature=0)
    eos = free.token_ids[4]
    edited = tmp_path / "eos"
    shutil.copytree(converted, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["generation"]["eos_token_ids"] = [eos]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with qwen3pack.load(edited, threads=1) as m:
        result = m.complete(prompt, max_tokens=12, temperature=0)
    stop_at = free.token_ids.index(eos)
    assert result.token_ids == free.token_ids[:stop_at + 1]
    assert result.finish_reason == "stop" and result.usage.completion_tokens == stop_at + 1
    assert result.text == model.tokenizer.decode(free.token_ids[:stop_at + 1])


def test_a_prompt_that_opens_a_think_block_starts_in_reasoning(model):
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    varied = dict(max_tokens=20, temperature=1.0, seed=2, repetition_penalty=2.0)  # random weights repeat
    result = model.complete(prompt, **varied)
    assert "<think>" not in result.text and "</think>" not in result.text
    assert result.reasoning == result.text.lstrip("\n") != "" and result.content == ""
    chunks = list(model.complete(prompt, stream=True, **varied))
    assert "".join(c.reasoning for c in chunks) == result.reasoning


def test_bad_generation_arguments_are_value_errors(model):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="^max_tokens must be an integer >= 1 or None, got 0$"):
        model.chat(messages, max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        model.chat(messages, temperature=-1.0)
    with pytest.raises(ValueError, match="^stop must be a non-empty string or a list of them, got"):
        model.chat(messages, stop=[""])
    with pytest.raises(ValueError, match="^prompt must be a string, got list$"):
        model.complete([1, 2, 3])
    with pytest.raises(ContextLengthError, match=r"^the prompt has \d+ tokens, beyond max_context = 256$"):
        model.complete("word " * 300)
    with pytest.raises(ContextLengthError, match=r"and max_tokens=250 need \d+ positions, beyond max_context"):
        model.chat(messages, max_tokens=250)
    assert issubclass(ContextLengthError, ValueError)


# ---------------------------------------------------------------- generation stepped by its caller

def stepped(model, generations):
    """Runs generations together as a batching server does: one append_batch over all that are
    unfinished, each fed its prompt first, then its last token."""
    sessions = [model.session() for _ in generations]
    fed = [g.prompt_ids for g in generations]
    chunks = [[] for _ in generations]
    while True:
        live = [i for i, g in enumerate(generations) if not g.finished]
        if not live:
            return chunks
        logits = model.append_batch([sessions[i] for i in live], [fed[i] for i in live])
        for i, row in zip(live, logits):
            token, chunk = generations[i].step(row)
            fed[i] = [token]
            if chunk is not None:
                chunks[i].append(chunk)


def test_generations_stepped_in_one_batch_equal_complete(model):
    prompts = ["Once upon a time", "北京 😀", "<|im_start|>assistant\n<think>\n"]
    options = [dict(max_tokens=20, temperature=0, repetition_penalty=1.8),
               dict(max_tokens=12, temperature=1.0, seed=4, top_k=20),
               dict(max_tokens=16, temperature=0.7, seed=2, repetition_penalty=2.0, stop="e")]
    generations = [generation(model, p, **o) for p, o in zip(prompts, options)]
    for chunks, prompt, option in zip(stepped(model, generations), prompts, options):
        assert chunks == list(model.complete(prompt, stream=True, **option))


def test_frequency_penalty_is_checked_and_discourages_repeats(model):
    with pytest.raises(ValueError, match="^frequency_penalty must be a number, got 'x'$"):
        generation(model, "Hi", frequency_penalty="x")
    plain, penalized = stepped(model, [generation(model, "Once upon a time", max_tokens=30, temperature=0,
                                                       frequency_penalty=f) for f in (0.0, 2.0)])
    repeats = [len(chunks[-1].token_ids) - len(set(chunks[-1].token_ids)) for chunks in (plain, penalized)]
    assert repeats[1] < repeats[0]


# ---------------------------------------------------------------- conversations


def test_a_chat_session_prefills_only_the_new_tokens_and_answers_as_a_fresh_chat(model):
    chat = model.chat_session(system="Be brief.")
    first = chat.send("Hello 😀", max_tokens=8, temperature=0)
    first_prompt = model.tokenizer.encode(model.render(chat.messages[:2]))
    assert first.usage.cached_tokens == 0
    assert chat.messages[-1] == {"role": "assistant", "content": first.content}

    second = chat.send("And then?", max_tokens=8, temperature=0)
    prompt = model.tokenizer.encode(model.render(chat.messages[:4]))
    held = first_prompt + first.token_ids[:-1]  # the last token of an answer is never fed back
    common = next(i for i, (a, b) in enumerate(zip(held + [-1], prompt)) if a != b)
    assert second.usage.prompt_tokens == len(prompt)
    assert second.usage.cached_tokens == common >= len(first_prompt)  # only the rest is computed
    assert second.token_ids == model.chat(chat.messages[:4], max_tokens=8, temperature=0).token_ids


def test_a_stream_stopped_early_keeps_the_session(model):
    chat = model.chat_session(enable_thinking=False)
    stream = chat.send("Count to ten", max_tokens=30, temperature=1.0, seed=1, stream=True)
    shown = next(stream).content
    stream.close()  # as Ctrl-C in `qwen3pack chat`
    assert chat.messages[-1] == {"role": "assistant", "content": shown}
    after = chat.send("Go on", max_tokens=6, temperature=0)
    assert after.token_ids == model.chat(chat.messages[:3], enable_thinking=False, max_tokens=6,
                                         temperature=0).token_ids
    chat.reset()
    assert chat.messages == []


def test_a_new_message_ends_the_answer_still_streaming(model):
    chat = model.chat_session()
    stream = chat.send("One", max_tokens=30, temperature=0, stream=True)
    shown = next(stream).content
    answer = chat.send("Two", max_tokens=4, temperature=0)
    assert [m["content"] for m in chat.messages] == ["One", shown, "Two", answer.content]
    assert list(stream) == []


def test_session_generate_continues_the_cache_as_a_fresh_generate(model):
    prompt = list(range(3, 15))
    session = model.session()
    first = list(session.generate(prompt, 6, temperature=0))
    assert first == list(model.generate(prompt, 6, temperature=0))
    assert session.position == len(prompt) + 5  # the last token is not fed back
    longer = prompt + first + [7, 8]
    assert list(session.generate(longer, 6, temperature=0)) == list(model.generate(longer, 6, temperature=0))
    assert list(session.generate(prompt, 6, temperature=0)) == first  # holding more: cut back first
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        session.generate(prompt, -1)


def test_session_truncate_then_append_equals_a_fresh_pass(model):
    ids = np.arange(3, 23)
    session = model.session()
    session.append(ids)
    session.truncate(12)
    assert session.position == 12
    np.testing.assert_allclose(session.append(ids[12:17]), model.logits(ids[:17])[-1], atol=1e-4)
    with pytest.raises(ValueError, match="cannot truncate a sequence of 17 tokens to 18"):
        session.truncate(18)


def test_sliding_window_caches_cannot_go_back_and_chat_sessions_start_again(checkpoints, tmp_path):
    source = checkpoints(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    convert(source, tmp_path / "sliding", tp=1)
    with qwen3pack.load(tmp_path / "sliding", threads=1, max_context=64) as m:
        session = m.session()
        session.append(np.arange(3, 13))
        with pytest.raises(ValueError, match="its sliding-window layers have moved past them"):
            session.truncate(5)
        session.truncate(9)  # the last token again: always possible
        chat = m.chat_session()
        chat.send("Hi", max_tokens=4, temperature=0)
        second = chat.send("Again", max_tokens=4, temperature=0)
        assert second.usage.cached_tokens == 0
        assert second.token_ids == m.chat(chat.messages[:3], max_tokens=4, temperature=0).token_ids


# ---------------------------------------------------------------- tool calls of a chat given tools


def test_a_chat_given_tools_answers_with_the_tool_calls_taken_out_of_its_content(tool_caller):
    from qwen3pack.testing import WEATHER_CALL, WEATHER_QUESTION, WEATHER_TOOL
    paris = ToolCall("get_weather", {"city": "Paris", "unit": "°C"})
    with qwen3pack.load(tool_caller, threads=1) as model:
        answer = model.chat(WEATHER_QUESTION, tools=[WEATHER_TOOL], enable_thinking=False, temperature=0)
        assert answer.tool_calls == [paris]
        assert answer.content == "" and answer.finish_reason == "tool_calls"
        assert answer.text == "<tool_call>" + WEATHER_CALL + "</tool_call>"  # the text keeps everything
        chunks = list(model.chat(WEATHER_QUESTION, tools=[WEATHER_TOOL], enable_thinking=False, temperature=0,
                                 stream=True))
        assert [c.tool_calls for c in chunks if c.tool_calls] == [(paris,)]
        assert chunks[-1].finish_reason == "tool_calls"
        # without tools nothing is parsed: the same tokens are content
        plain = model.complete(model.render(WEATHER_QUESTION, tools=[WEATHER_TOOL], enable_thinking=False),
                               temperature=0)
        assert plain.tool_calls == [] and plain.content == plain.text and plain.finish_reason == "stop"
        # a conversation keeps the call in its history, for the template to write back
        session = model.chat_session(tools=[WEATHER_TOOL], enable_thinking=False)
        assert session.send(WEATHER_QUESTION[0]["content"], temperature=0, max_tokens=4).tool_calls == [paris]
        assert session.messages[-1] == {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]}
        session.send({"role": "tool", "content": "18"}, max_tokens=1)
        assert "<tool_response>\n18\n</tool_response>" in model.render(session.messages, tools=[WEATHER_TOOL])
