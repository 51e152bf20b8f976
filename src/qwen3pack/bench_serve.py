"""`make bench`, serving: `qwen3pack serve` started as a user starts it, then streamed chat requests
sent at concurrency 1, 4 and 16 (the official `openai` client, one thread per stream). Printed per
concurrency: the median time to first token, and the aggregate tokens per second (all streams'
tokens over the wall time of the run) as a ratio to one stream's. Then a conversation's second
turn, sent whole as chat clients send it, against a prompt as long that shares nothing with any
earlier one: the time to the first token with and without prompt caching.

The model is a random bf16 checkpoint with Qwen3-0.6B's widths and fewer layers (--layers), and
the Qwen3-like test tokenizer (its small vocabulary: the weights of the layers dominate, as in a
real model); answers are greedy with a repetition penalty, max_tokens long unless an eos id comes.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .bench import model_shape
from .convert import convert
from .testing import make_checkpoint


def start_server(directory, threads, max_batch):
    """(the process, its base URL), once it listens."""
    process = subprocess.Popen([str(Path(sys.executable).parent / "qwen3pack"), "serve", str(directory), "--port", "0",
                                "--threads", str(threads), "--max-batch", str(max_batch)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if "http://" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return process, line.split(" on ")[1].split()[0]


def one_stream(client, model, prompt, tokens):
    """(seconds to the first token, tokens received) of one streamed chat request."""
    first, usage, _ = streamed(client, model, [{"role": "user", "content": prompt}], tokens)
    return first, usage.completion_tokens


def streamed(client, model, messages, tokens):
    """(seconds to the first token, usage, answer) of one streamed chat request."""
    started = time.perf_counter()
    first, usage, answer = None, None, []
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=tokens, stream=True,
        stream_options={"include_usage": True}, temperature=0,
        extra_body={"repetition_penalty": 1.3, "chat_template_kwargs": {"enable_thinking": False}})
    for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - started
        if chunk.choices:
            answer.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    return first, usage, "".join(answer)


def conversation_turns(client, model, rounds, rules):
    """Medians over `rounds` of (the second turn's prompt tokens, of them cached, its time to the
    first token, that of a prompt as long that shares nothing cached): a system prompt of `rules`
    lines and a question, its answer, and a follow-up, each round its own conversation."""
    results = []
    for round in range(rounds):
        system = "\n".join(f"Rule {i}: answer questions about topic {i} in one sentence." for i in range(rules))
        first = [{"role": "system", "content": f"Conversation {round}.\n{system}"},
                 {"role": "user", "content": "What about topic 7?"}]
        answer = streamed(client, model, first, 16)[2]
        turn = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And topic 9?"}]
        cached_ttft, usage, _ = streamed(client, model, turn, 1)
        fresh = [{"role": "system", "content": f"Elsewhere {round}.\n{system}"}, *turn[1:]]
        fresh_ttft = streamed(client, model, fresh, 1)[0]
        results.append((usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, cached_ttft, fresh_ttft))
    return tuple(statistics.median(r[i] for r in results) for i in range(4))


def batch_totals(url):
    """(forward passes, requests in them) so far: the server's qwen3pack_batch_size histogram."""
    import httpx
    values = {}
    for line in httpx.get(url.removesuffix("/v1") + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["qwen3pack_batch_size_count"]), float(values["qwen3pack_batch_size_sum"])


def run_at(client, url, model, concurrency, tokens, run):
    """(median time to first token, aggregate tokens per second, mean batch of the server's forward
    passes) of `concurrency` streams at once. The prompts begin with `run`: no prompt repeats an
    earlier run's, which the server's prompt caching would answer from its cache."""
    prompts = [f"{run}, request {i}: tell me about topic number {i}." for i in range(concurrency)]
    steps, requests = batch_totals(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda prompt: one_stream(client, model, prompt, tokens), prompts))
    seconds = time.perf_counter() - started
    steps_after, requests_after = batch_totals(url)
    return (statistics.median(first for first, _ in results), sum(count for _, count in results) / seconds,
            (requests_after - requests) / (steps_after - steps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--configs", default="tests/fixtures/configs", help="where the Qwen3 config.json files are")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model, 4 tokens, concurrency 1 and 2: checks that the benchmark runs (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.concurrency = 4, [1, 2]
    import openai
    for name in ("NO_PROXY", "no_proxy"):  # the server on loopback is called directly, whatever proxy is set
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    with tempfile.TemporaryDirectory(prefix="qwen3pack-bench-serve-") as tmp:
        work = Path(tmp)
        shape = model_shape("0.6b", args.configs, args.quick)
        widths = {k: v for k, v in shape.items() if k not in ("vocab_size", "num_hidden_layers", "tie_word_embeddings")}
        source = make_checkpoint(work / "source", qwen3_tokenizer=True, dtype="bf16", num_hidden_layers=args.layers,
                                 **widths)
        convert(source, work / "model", tp=args.tp)
        process, url = start_server(work / "model", args.threads, max(args.concurrency))
        try:
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            run_at(client, url, model, 1, 4, "Warm-up")
            print(f"serve     {'tiny' if args.quick else 'Qwen3-0.6B'} widths, {args.layers} layers, bf16, tp {args.tp}, {args.threads} threads, "
                  f"{args.tokens} tokens per streamed answer")
            single = None
            for concurrency in sorted({1, *args.concurrency}):  # one stream first: the baseline
                ttft, rate, batch = run_at(client, url, model, concurrency, args.tokens, f"Run {concurrency}")
                single = single or rate
                print(f"          concurrency {concurrency:3d}: time to first token {ttft * 1000:7.1f} ms (median), "
                      f"{rate:8.1f} tokens/s in all ({rate / single:.2f} x one stream), "
                      f"{batch:.1f} requests per forward pass", flush=True)
            rounds = 3
            tokens, cached, with_cache, without = conversation_turns(client, model, rounds, 4 if args.quick else 40)
            print(f"          a conversation's second turn of {tokens:.0f} prompt tokens ({cached:.0f} cached): time to "
                  f"first token {with_cache * 1000:.1f} ms, against {without * 1000:.1f} ms for as many with none "
                  f"cached ({without / with_cache:.1f} x), medians of {rounds}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
