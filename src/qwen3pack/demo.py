"""`make demo`: a Qwen3 checkpoint (a small random one made here, or MODEL=path-or-hub-id),
converted at tp=2, validated, loaded, and asked to continue a prompt."""
import argparse
import time
from pathlib import Path

from tokenizers import Tokenizer

from . import formats, load
from .cli import summary
from .convert import convert
from .testing import make_checkpoint

DEMO_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64)
PROMPT = "The capital of France is"


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
        source = make_checkpoint(out / "checkpoint", seed=0, tie=False, **DEMO_MODEL)
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

    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT).ids
    with load(converted, max_context=len(ids) + args.tokens) as model:
        sampling = sampling_settings(model.generation["defaults"])
        print(f"4. continuing {PROMPT!r} with {sampling}:")
        print(f"   {PROMPT}", end="", flush=True)
        started, new, shown = time.perf_counter(), [], ""
        for token in model.generate(ids, max_new_tokens=args.tokens, seed=0, **sampling):
            new.append(token)
            text = tokenizer.decode(new)
            print(text[len(shown):], end="", flush=True)  # stream as the tokens come
            shown = text
        seconds = time.perf_counter() - started
    print(f"\n   ({len(new)} tokens in {seconds:.2f} s)")


def sampling_settings(defaults):
    """The model's own sampling defaults (generation_config.json), or mild sampling when those are
    greedy: greedy decoding of random weights repeats one token."""
    settings = {k: v for k, v in defaults.items() if k in ("temperature", "top_k", "top_p", "min_p")}
    if settings.get("temperature", 0.0) > 0:
        return settings
    return {"temperature": 0.8, "top_p": 0.95}


if __name__ == "__main__":
    main()
