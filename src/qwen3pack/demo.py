"""`make demo`: a Qwen3 checkpoint (a small random one made here, with a Qwen3-like tokenizer
and chat template, or MODEL=path-or-hub-id), converted at tp=2, validated, loaded, asked to
continue a prompt, then chatted with for two turns."""
import argparse
import time
from pathlib import Path

from . import formats, load
from .cli import summary
from .convert import convert
from .testing import make_checkpoint

DEMO_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64)
PROMPT = "The capital of France is"
QUESTIONS = ["What is the capital of France?", "And of Italy?"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a local checkpoint directory or a hub id (default: a random one)")
    parser.add_argument("--out", default="demo", help="working directory")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    out = Path(args.out)

    source = args.model
    if source is None:
        source = make_checkpoint(out / "checkpoint", seed=0, tie=False, qwen3_tokenizer=True, **DEMO_MODEL)
        print(f"1. made a small random Qwen3 checkpoint in {source} (random weights: expect gibberish)")
    else:
        print(f"1. source checkpoint: {source}")

    started = time.perf_counter()
    converted = out / f"converted-tp{args.tp}"
    convert(source, converted, tp=args.tp, force=True)
    print(f"2. converted at tp={args.tp} into {converted} in {time.perf_counter() - started:.1f} s")

    report = formats.validate(converted)
    print(f"3. validated: {'valid' if report.ok else 'INVALID'} ({report.files} rank files, "
          f"{report.bytes / 1e6:.1f} MB, checksums checked in {report.seconds:.2f} s)")
    for problem in report.problems:
        print("   ", problem)
    print(summary(formats.open(converted)))

    with load(converted, max_context=1024) as model:
        print(f"4. continuing {PROMPT!r} with the model's sampling defaults {model.generation['defaults']}:")
        print(f"   {PROMPT}", end="", flush=True)
        started = time.perf_counter()
        for chunk in model.complete(PROMPT, max_tokens=args.tokens, seed=0, stream=True):
            print(chunk.text, end="", flush=True)  # streamed as the tokens come
        seconds = time.perf_counter() - started
        print(f"\n   ({chunk.usage.completion_tokens} tokens in {seconds:.2f} s)")

        print(f"5. chatting through the chat template (as `qwen3pack chat {converted}` does in a terminal):")
        conversation = model.chat_session(system="You are a helpful assistant.")
        for question in QUESTIONS:
            print(f"   user: {question}\n   assistant: ", end="", flush=True)
            for chunk in conversation.send(question, max_tokens=args.tokens, seed=0, stream=True):
                print(chunk.text, end="", flush=True)
            usage = chunk.usage
            print(f"\n   ({usage.completion_tokens} tokens; {usage.cached_tokens} of the {usage.prompt_tokens} "
                  f"prompt tokens reused from the cache, finish: {chunk.finish_reason})")


if __name__ == "__main__":
    main()
