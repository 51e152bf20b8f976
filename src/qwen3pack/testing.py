"""Small random Hugging Face Qwen3 checkpoints, for tests, the demo and the bench (numpy only), and
the logits to compare their conversions by (transformers_logits needs torch and transformers)."""
import json
import os
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file

from .formats.dtypes import float32_to_bf16_bits

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's chat tokens: the first three are special (decode skips them), the others are text.
QWEN3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer builds the same).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# What the BPE trainer learns merges from: several scripts, so that some tokens hold whole
# multi-byte characters and others only part of one.
BPE_CORPUS = [
    "The capital of France is Paris. The weather is nice today, isn't it? Let me think about that.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Qwen3 models think before they answer: <think>\nreasoning\n</think>\n\nThe answer.",
    "北京是中国的首都。我们今天去公园散步吧。你好，世界！",
    "東京は日本の首都です。こんにちは、元気ですか？",
    "Crème brûlée, café, naïve, Zürich, São Paulo, Ærø, façade.",
    "Emoji: 😀 🎉 👍🏽 ❤️ 🇫🇷 and more 😀😀 🎉🎉.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
]
# A template with the features of Qwen3's official one: tools in the system turn, <think> blocks
# of assistant turns (kept only after the last user query), tool calls with dict or string
# arguments, consecutive tool results in one user turn, enable_thinking=false writing an empty
# think block; and raise_exception for a role it does not know.
QWEN3_STYLE_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if (loop.first and content) or (not loop.first) %}
                {{- '\\n' }}
            {%- endif %}
            {%- if tool_call.function %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif not (message.role == "system" and loop.first) %}
        {{- raise_exception('Unknown message role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""
SAFETENSORS_DTYPE = {"f32": ("float32", np.float32), "f16": ("float16", np.float16), "bf16": ("bfloat16", None)}

DEFAULT_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # deliberately not hidden_size / heads, as in Qwen3-0.6B
    "vocab_size": 384,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "max_window_layers": 2,
    "bos_token_id": 256,
    "eos_token_id": 258,
}


def _weights(config, rng, tie, trained_like=False):
    """Random weights scaled so that activations stay of order 1 and logits of order 1 to 10.
    `trained_like` draws them more like a trained model's: in every matrix 1% of the input
    columns (at least one) are 8 times larger, as trained models have a few large input channels
    (they set the scale of their quantization blocks), and the embedding is 0.15 instead of 0.5
    (logits of standard deviation about 2.5 rather than 8, as a trained model's)."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    embedding_scale = np.float32(0.15 if trained_like else 0.5)
    d = config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def matrix(rows, cols):
        w = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))
        if trained_like:
            w[:, rng.choice(cols, max(1, cols // 100), replace=False)] *= np.float32(8)
        return w

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], h), dtype=np.float32) * embedding_scale}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.input_layernorm.weight": norm(h),
            f"{p}.self_attn.q_proj.weight": matrix(q_rows, h),
            f"{p}.self_attn.k_proj.weight": matrix(kv_rows, h),
            f"{p}.self_attn.v_proj.weight": matrix(kv_rows, h),
            f"{p}.self_attn.q_norm.weight": norm(d),
            f"{p}.self_attn.k_norm.weight": norm(d),
            f"{p}.self_attn.o_proj.weight": matrix(h, q_rows),
            f"{p}.post_attention_layernorm.weight": norm(h),
            f"{p}.mlp.gate_proj.weight": matrix(inter, h),
            f"{p}.mlp.up_proj.weight": matrix(inter, h),
            f"{p}.mlp.down_proj.weight": matrix(h, inter),
        })
    tensors["model.norm.weight"] = norm(h)
    if not tie:
        tensors["lm_head.weight"] = rng.standard_normal((config["vocab_size"], h), dtype=np.float32) * embedding_scale
    return tensors


def _save_safetensors(tensors, path, dtype):
    name, np_dtype = SAFETENSORS_DTYPE[dtype]
    buffers = {k: (float32_to_bf16_bits(v) if dtype == "bf16" else v.astype(np_dtype)) for k, v in tensors.items()}
    specs = {k: TensorSpec(dtype=name, shape=list(b.shape), data_ptr=b.ctypes.data, data_len=b.nbytes)
             for k, b in buffers.items()}
    serialize_file(specs, str(path), {"format": "pt"})  # buffers stay referenced until here


def _write_tokenizer(directory):
    """A byte-level BPE with no merges: every byte is a token, plus Qwen's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def _write_qwen3_tokenizer(directory, vocab_size, added_tokens=()):
    """A Qwen3-like tokenizer: byte-level BPE trained on BPE_CORPUS up to `vocab_size` tokens with
    Qwen2's normalizer and pre-tokenizer, Qwen3's special and added tokens (and `added_tokens`), and
    QWEN3_STYLE_TEMPLATE. Returns the ids of <|im_end|> and <|endoftext|>, Qwen3's eos ids."""
    added = [*QWEN3_ADDED_TOKENS, *added_tokens]
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added), special_tokens=QWEN3_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(BPE_CORPUS, trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in added])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 1024, "chat_template": QWEN3_STYLE_TEMPLATE}, indent=2))
    return tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")


# How far load(..., activations="bf16") may put the logits of make_checkpoint's models (logits of
# order 20) from transformers' f32 ones: each matrix product's input is rounded to bf16, and the
# logits were measured within 0.08-0.10 (with f32 activations: 1e-5). On Qwen3-0.6B shapes with
# random weights (logits of std 16) the mean KL divergence of the next-token distributions from
# f32 activations was 0.0017 and the top-1 token the same at 98% of positions, where transformers
# in bf16 gives 0.015 and 95%.
BF16_ACTIVATIONS_ATOL = 0.25


def make_checkpoint(directory, seed=0, shards=1, tie=True, dtype="f32", qwen3_tokenizer=False, trained_like=False,
                    added_tokens=(), **config_overrides):
    """Writes a small random Qwen3 checkpoint (config.json, safetensors, tokenizer, generation
    config) to `directory`, deterministic by `seed`. `shards` > 1 splits the weights over that
    many files with a model.safetensors.index.json. The tokenizer is byte-level with a ChatML
    template, or with qwen3_tokenizer a trained BPE with Qwen3's chat tokens, a Qwen3-style template
    (thinking, tools) and Qwen3's generation_config.json (its eos ids and sampling defaults), and
    `added_tokens` as further added tokens of that tokenizer.
    `trained_like` draws the weights more like a trained model's (see _weights). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**DEFAULT_CONFIG, "tie_word_embeddings": tie, "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype], **config_overrides}
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"], 256],
                  "do_sample": False}
    if qwen3_tokenizer:
        im_end, end_of_text = _write_qwen3_tokenizer(directory, config["vocab_size"], added_tokens)
        config.update(bos_token_id=end_of_text, eos_token_id=im_end)
        generation = {"bos_token_id": end_of_text, "eos_token_id": [im_end, end_of_text], "pad_token_id": end_of_text,
                      "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    else:
        _write_tokenizer(directory)
    tensors = _weights(config, np.random.default_rng(seed), tie, trained_like)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    names = list(tensors)
    if shards == 1:
        _save_safetensors(tensors, directory / "model.safetensors", dtype)
        return directory
    weight_map = {}
    for shard, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        _save_safetensors({n: tensors[n] for n in chunk}, directory / file, dtype)
        weight_map.update({n: file for n in chunk})
    total = sum(v.size for v in tensors.values()) * {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2))
    return directory


def script_successors(directory, chain):
    """Rewrites the weights of the untied f32 checkpoint at `directory` (make_checkpoint's) so that
    greedy decoding follows `chain`, token ids all different: after chain[i] the model writes
    chain[i + 1], whatever came before. Every layer's output projections are zeroed, so the last
    hidden state is the current token's embedding; chain[i]'s embedding is the unit vector i, which
    the final norm keeps (its weights set to 1) and the output head maps to chain[i + 1]."""
    from safetensors.numpy import load_file
    assert len(set(chain)) == len(chain), "a token with two successors"
    tensors = load_file(Path(directory) / "model.safetensors")
    embed, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    assert len(chain) <= embed.shape[1], "more tokens than the hidden size has unit vectors"
    for name, tensor in tensors.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor[:] = 0
    tensors["model.norm.weight"][:] = 1
    head[:] = 0
    for i, (token, successor) in enumerate(zip(chain, chain[1:])):
        embed[token] = 0
        embed[token, i] = 1
        head[successor, i] = 1
    _save_safetensors(tensors, Path(directory) / "model.safetensors", "f32")


# A tool call as Qwen3 writes one, the tool it calls, and a question for it.
WEATHER_CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}\n'
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}
WEATHER_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def make_tool_caller(directory):
    """A converted model in directory/model that answers WEATHER_QUESTION, offered WEATHER_TOOL
    without thinking, by greedy decoding, with "<tool_call>" WEATHER_CALL "</tool_call>" and its
    eos: the call's JSON is one added token of its tokenizer, and its weights follow that chain
    (script_successors). Returns that directory."""
    import qwen3pack
    from .convert import convert
    directory = Path(directory)
    source = make_checkpoint(directory / "source", qwen3_tokenizer=True, tie=False, num_hidden_layers=1,
                             added_tokens=[WEATHER_CALL])
    convert(source, directory / "unscripted")
    with qwen3pack.load(directory / "unscripted", threads=1) as model:
        prompt = model.tokenizer.encode(model.render(WEATHER_QUESTION, tools=[WEATHER_TOOL], enable_thinking=False))
        call = [model.tokenizer.encode(text) for text in ("<tool_call>", WEATHER_CALL, "</tool_call>")]
        assert all(len(ids) == 1 for ids in call), call
        eos = model.generation["eos_token_ids"][0]
    script_successors(source, [prompt[-1], *(ids[0] for ids in call), eos])
    convert(source, directory / "model")
    return directory / "model"


def logit_agreement(reference, logits):
    """How close next-token distributions are to the reference's, over rows of logits [n, vocab]:
    the mean KL divergence KL(reference || logits) in nats, the share of rows with the same top
    token, and the largest absolute logit difference."""
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(logits)
    kl = (np.exp(p) * (p - q)).sum(axis=-1)
    return dict(mean_kl=float(kl.mean()), top1=float((reference.argmax(-1) == logits.argmax(-1)).mean()),
                max_logit_error=float(np.abs(reference - logits).max()))


def runtime_logits(directory, prompts):
    """The runtime's logits of every position of each prompt, concatenated [positions, vocab]: the
    converted model in `directory`, on all the CPUs (the bits do not depend on the thread count),
    with f32 activations and KV cache, so that the error measured is the weights' alone."""
    from .runtime import load
    with load(directory, threads=os.cpu_count() or 1, max_context=max(map(len, prompts)), kv_dtype="f32",
              activations="f32") as model:
        return np.concatenate([model.logits(prompt) for prompt in prompts])


def transformers_logits(source, prompts):
    """transformers' float32 logits (eager attention) of every position of each prompt, concatenated
    [positions, vocab]: the reference for the checkpoint in `source`."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([prompt])).logits[0].numpy() for prompt in prompts])


TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_enabled():
    """Whether the kernel gives 2 MB pages to memory that asks for them (transparent huge pages,
    not "never")."""
    return TRANSPARENT_HUGE_PAGES.exists() and "[never]" not in TRANSPARENT_HUGE_PAGES.read_text()


def mappings_of(path):
    """{field: value} of each of this process's mappings of `path`, from /proc/self/smaps (sizes in
    kB; "VmFlags" as the list of its flags)."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                current = {} if fields[-1] == str(path) else None
                if current is not None:
                    found.append(current)
            elif current is not None:
                key = fields[0].rstrip(":")
                current[key] = fields[1:] if key == "VmFlags" else int(fields[1])
    return found


def share_in_2mb_folios(path):
    """The share of the file `path` that the page cache holds in 2 MB folios (each mapped with one
    TLB entry), as a mapping of it shows after every page is touched (read in first where it was
    not cached): FilePmdMapped over Rss in /proc/self/smaps; 0 where the kernel has no such pages."""
    import mmap
    path = Path(path).resolve()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        view = memoryview(mapped)[::mmap.PAGESIZE]  # one byte a page
        bytes(view)
        view.release()
        mapping = mappings_of(path)
        resident = sum(m.get("Rss", 0) for m in mapping)
        return sum(m.get("FilePmdMapped", 0) for m in mapping) / resident if resident else 0.0
