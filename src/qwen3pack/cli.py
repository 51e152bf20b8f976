"""The `qwen3pack` command (and `qwen3-convert`, the same as `qwen3pack convert`)."""
import contextlib
import json
import sys
import time

import click

from . import __version__

# What a user can get wrong: each is reported as one line naming the file, tensor or field.
def _user_errors():
    from .convert import ConfigError, ConversionError, SourceError
    from .formats import FormatError, LayoutError
    from .schema import SchemaError
    return (ConfigError, ConversionError, SourceError, FormatError, LayoutError, SchemaError)


def _fail(error):
    if isinstance(error, OSError) and error.filename:  # "path: Permission denied", as the others read
        error = f"{error.filename}: {error.strerror}"
    click.echo(f"error: {error}", err=True)
    sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="qwen3pack")
def main():
    """Convert Qwen3 checkpoints into tensor-parallel rank files, check them, and run them."""


@main.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(), required=False)
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel world size: one rank file per rank.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f16", "f32", "q8", "q4", "q6"]), default="auto", show_default=True,
              help="Weights' dtype; auto keeps the checkpoint's; q8: int8 blocks of 32 with an f16 scale; q6: "
                   "6-bit blocks of 256 as llama.cpp's q6_K; q4: 4-bit blocks of 256 as llama.cpp's q4_K, with "
                   "the embedding and lm_head in q6 unless --keep says otherwise. Norms are always f32.")
@click.option("--keep", default="", metavar="GROUP=DTYPE,...",
              help="Another dtype for groups of weights (embed, lm_head, qkv, o_proj, gate_up, down), "
                   "e.g. --dtype q8 --keep embed=bf16, --dtype q4 --keep lm_head=q4,embed=q4.")
@click.option("--dry-run", is_flag=True, help="Print the plan (file sizes, memory per rank) and write nothing.")
@click.option("--context", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Context length for the dry run's KV-cache estimate.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is a directory that qwen3pack wrote (never the source, a symlink or a file).")
def convert_command(source, output, tp, dtype, keep, dry_run, context, force):
    """Convert SOURCE (a local checkpoint directory or a hub id) into OUTPUT."""
    from . import convert
    from .convert.interrupts import conversion_signals
    with _reporting(output):
        if dry_run:
            click.echo(convert.dry_run(source, tp, dtype, context, keep))
            return
        if output is None:
            raise click.UsageError("OUTPUT is required unless --dry-run")
        # SIGINT and SIGTERM are handled until the report is out, so that what it says is true.
        with conversion_signals():
            plan = convert.convert(source, output, tp=tp, dtype=dtype, force=force, keep=keep)
            _report_written(output, plan)


@contextlib.contextmanager
def _reporting(output):
    """Ends a command that writes OUTPUT on a user's error with one line, and on SIGINT or SIGTERM
    with what became of OUTPUT."""
    from .convert.interrupts import Interrupted
    try:
        yield
    except (*_user_errors(), OSError) as error:
        _fail(error)
    except Interrupted as interrupt:
        click.echo(f"interrupted: {output} is complete" if interrupt.output_complete
                   else "interrupted: nothing was written", err=True)
        sys.exit(interrupt.exit_status)
    except KeyboardInterrupt:  # before the handlers were installed: nothing was written yet
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


def _report_written(output, plan):
    size = sum(r.file_size for r in plan.ranks)
    click.echo(f"wrote {output}: {len(plan.ranks)} rank files, {plan.tensor_count} tensors, {size / 1e9:.3f} GB")


@main.command("reshard")
@click.argument("directory", type=click.Path())
@click.argument("output", type=click.Path())
@click.option("--tp", type=click.IntRange(min=1), required=True,
              help="The new tensor-parallel world size: one rank file per rank.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is a directory that qwen3pack wrote (never DIRECTORY, a symlink or a file).")
def reshard_command(directory, output, tp, force):
    """Rewrite the converted model in DIRECTORY for another tensor-parallel size into OUTPUT, from
    its rank files alone (the checkpoint is not needed). The weights keep their dtype."""
    from . import convert
    from .convert.interrupts import conversion_signals
    with _reporting(output), conversion_signals():
        _report_written(output, convert.reshard(directory, output, tp=tp, force=force))


@main.command("validate")
@click.argument("directory", type=click.Path())
@click.option("--quick", is_flag=True, help="Skip the checksums: structure and bounds only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, for CI pipelines.")
def validate_command(directory, quick, as_json):
    """Check a converted model: manifest, rank headers, bounds, geometry and checksums."""
    from .formats import validate
    report = validate(directory, quick=quick)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    else:
        for problem in report.problems:
            click.echo(problem)
        if report.ok:
            what = "structure" if quick else "structure and checksums"
            click.echo(f"valid: {directory} ({report.files} files, {report.bytes / 1e9:.3f} GB, "
                       f"{what} checked in {report.seconds:.2f} s)")
        else:
            click.echo(f"invalid: {len(report.problems)} problem(s)", err=True)
    sys.exit(0 if report.ok else 1)


@main.command("inspect")
@click.argument("directory", type=click.Path())
def inspect_command(directory):
    """Print a summary of a converted model."""
    from . import formats
    try:
        converted = formats.open(directory)
    except _user_errors() as error:
        _fail(error)
    click.echo(summary(converted))


def summary(converted):
    m, layout, manifest = converted.model, converted.layout, converted.manifest
    kinds = {}
    for kind in m["layer_types"]:
        kinds[kind] = kinds.get(kind, 0) + 1
    rope = m["rope"]
    lines = [
        f"model        qwen3: {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
        f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}",
        f"attention    {m['num_attention_heads']} q heads, {m['num_key_value_heads']} kv heads, head_dim {m['head_dim']}, "
        f"rope {rope['type']} theta {rope['theta']:g}",
        "layer types  " + ", ".join(f"{n} {k}" for k, n in kinds.items())
        + (f" (window {m['sliding_window']})" if "sliding_attention" in kinds else ""),
        f"embeddings   {'tied' if m['tie_word_embeddings'] else 'untied'}",
        f"layout       tp {layout['world_size']}, {layout['dtype']} weights"
        + "".join(f", {group} {dtype}" for group, dtype in layout.get("dtype_overrides", {}).items()) + ", "
        f"{layout['kv_heads_per_rank']} kv heads per rank"
        + (f" (replicated on {layout['kv_head_replicas']} ranks)" if layout["kv_head_replicas"] > 1 else ""),
        f"format       {manifest['format_version'][0]}.{manifest['format_version'][1]}, conversion {manifest['conversion_id']}",
        f"converted by {manifest['provenance']['converter']} with {manifest['provenance']['options']}",
    ]
    resharded_from = manifest["provenance"].get("resharded_from")
    if resharded_from:
        lines.append(f"resharded    from conversion {resharded_from['conversion_id']} at tp {resharded_from['tp']}")
    for rank_file in converted.ranks:
        lines.append(f"  {rank_file.path.name}  {rank_file.file_size / 1e6:10.1f} MB  "
                     f"{len(rank_file.tensors)} tensors")
    return "\n".join(lines)


def sampling_options(command):
    """The sampling options of `generate` and `chat` (unset: the model's generation_config.json)."""
    for option in reversed([
        click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Generated tokens at most (per answer)."),
        click.option("--temperature", type=float, help="0 is greedy. Default: the model's."),
        click.option("--top-p", type=float, help="Default: the model's."),
        click.option("--top-k", type=int, help="Default: the model's."),
        click.option("--seed", type=int, help="The same seed gives the same text."),
        click.option("--threads", type=click.IntRange(min=1), help="Compute threads (default: all CPUs)."),
        click.option("--max-context", type=click.IntRange(min=1), default=4096, show_default=True,
                     help="Tokens of prompt and answer (the conversation, in chat) at most."),
    ]):
        command = option(command)
    return command


def load_options(command):
    """How the commands that load a model load it: the KV cache's and activations' precision, and
    the MPI backend."""
    for option in reversed([
        click.option("--kv-dtype", type=click.Choice(["auto", "f32", "bf16"]), default="auto", show_default=True,
                     help="How the KV cache stores keys and values: bf16 takes half the memory (for a small "
                          "accuracy cost, see the README); auto: f32 for f32 models, bf16 for the others."),
        click.option("--activations", type=click.Choice(["auto", "f32", "bf16"]), default="auto", show_default=True,
                     help="bf16 (bf16 models): each matrix product's input rounded to bf16, for the CPU's bf16 "
                          "dot product (faster prefill, logits within the README's stated bound); auto: bf16 "
                          "for bf16 models, f32 for the others; f32: transformers' f32 logits within 1e-4."),
        click.option("--mpi", is_flag=True,
                     help="Run the ranks as the processes of `mpiexec -n P` (P * ranks per process = the "
                          "model's tp); process 0 prints and serves, each maps only its own rank files. "
                          "Needs pip install 'qwen3pack[mpi]'."),
        click.option("--ranks-per-process", type=click.IntRange(min=1),
                     help="With --mpi: consecutive ranks per MPI process, computed by threads (default 1)."),
    ]):
        command = option(command)
    return command


def _load(directory, threads, max_context, kv_dtype, activations, mpi, ranks_per_process):
    """The model (under --mpi: process 0's; the other processes follow it inside this call and exit)."""
    from . import load
    if ranks_per_process is not None and not mpi:
        raise click.UsageError("--ranks-per-process applies to --mpi")
    try:
        return load(directory, threads=threads, max_context=max_context, kv_dtype=kv_dtype, activations=activations,
                    backend="mpi" if mpi else "threads", ranks_per_process=ranks_per_process or 1)
    except (ValueError, ImportError) as error:  # every bad-directory error of the runtime is a ValueError;
        _fail(error)                            # ImportError: --mpi without the extra


@main.command("generate")
@click.argument("directory", type=click.Path())
@click.argument("prompt")
@sampling_options
@click.option("--stop", multiple=True, help="End the text before this string (repeatable).")
@click.option("--raw", is_flag=True, help="The prompt as it is (a completion), not a user message.")
@click.option("--chat", is_flag=True, help="The prompt as a user message in the chat template (the default).")
@click.option("--think/--no-think", default=None, help="Let the model think first (default: the template's).")
@load_options
def generate_command(directory, prompt, max_tokens, temperature, top_p, top_k, seed, threads, max_context, stop,
                     raw, chat, think, **load_options):
    """Stream the model's text for PROMPT to stdout: its answer to it as a user message, or with
    --raw its continuation of it."""
    if raw and chat:
        raise click.UsageError("--raw and --chat exclude each other")
    if raw and think is not None:
        raise click.UsageError("--think/--no-think apply to --chat, not to --raw")
    model = _load(directory, threads, max_context, **load_options)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                    stop=list(stop), stream=True)
    try:
        if raw:
            chunks = model.complete(prompt, **sampling)
        else:
            chunks = model.chat([{"role": "user", "content": prompt}], enable_thinking=think, **sampling)
        text = ""
        for chunk in chunks:
            click.echo(chunk.text, nl=False)
            text += chunk.text
    except ValueError as error:
        _fail(error)
    except KeyboardInterrupt:
        click.echo("")
        sys.exit(130)
    if not text.endswith("\n"):
        click.echo("")


CHAT_COMMANDS = {"/reset": "forget the conversation", "/think": "let the model think first",
                 "/no_think": "answer without thinking", "/exit": "leave (or Ctrl-D)"}


@main.command("chat")
@click.argument("directory", type=click.Path())
@click.option("--system", help="The system prompt.")
@sampling_options
@click.option("--think/--no-think", default=None, help="Let the model think first (default: the template's).")
@load_options
def chat_command(directory, system, max_tokens, temperature, top_p, top_k, seed, threads, max_context, think,
                 **load_options):
    """Talk with the model in the terminal; the KV cache is kept from turn to turn. Its thinking is
    shown dimmed, before the answer. Ctrl-C stops an answer. From a pipe: one user turn per line."""
    model = _load(directory, threads, max_context, **load_options)
    try:
        conversation = model.chat_session(system=system, enable_thinking=think)
    except ValueError as error:
        _fail(error)
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"qwen3pack chat: {directory} (max context {model.max_context}, KV cache {model.kv_dtype}, "
                   f"activations {model.activations}). "
                   + ", ".join(f"{c} {what}" for c, what in CHAT_COMMANDS.items()), err=True)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for line in _user_lines(interactive):
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            conversation.reset()
            click.echo(click.style("(conversation forgotten)", dim=True), err=True)
        elif command in ("/think", "/no_think"):
            conversation.enable_thinking = command == "/think"
            state = "on" if conversation.enable_thinking else "off"
            click.echo(click.style(f"(thinking {state})", dim=True), err=True)
        elif command.startswith("/") and command.split()[0] not in CHAT_COMMANDS:
            click.echo(f"error: unknown command {command.split()[0]}; the commands are "
                       + ", ".join(CHAT_COMMANDS), err=True)
        elif command:
            _answer(conversation, line, sampling)


def _user_lines(interactive):
    """The user's lines, from the terminal (with a prompt) or from a pipe, until end of input."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            click.echo("", err=True)
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


def _answer(conversation, line, sampling):
    """Streams one answer: the reasoning dimmed, then the answer, then the speed."""
    started = time.perf_counter()
    shown = None  # "reasoning" or "content": what the last piece printed was
    last = stream = None
    try:
        stream = conversation.send(line, stream=True, **sampling)
        for chunk in stream:
            for part, text in (("reasoning", chunk.reasoning), ("content", chunk.content)):
                if not text:
                    continue
                if shown == "reasoning" and part == "content":
                    click.echo("\n")
                click.echo(click.style(text, dim=True) if part == "reasoning" else text, nl=False)
                shown = part
            last = chunk
    except ValueError as error:
        click.echo(f"error: {error}", err=True)
        return
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()  # the conversation keeps what was shown
        click.echo(click.style(" [stopped]", dim=True), nl=False)
    seconds = time.perf_counter() - started
    click.echo("")
    if last is not None and last.usage is not None:
        tokens = last.usage.completion_tokens
        click.echo(click.style(f"({tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s, "
                               f"{last.usage.cached_tokens} of {last.usage.prompt_tokens} prompt tokens cached)",
                               dim=True), err=True)


@main.command("serve")
@click.argument("directory", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="The port to listen on (0: one the system picks; the URL printed says which).")
@click.option("--threads", type=click.IntRange(min=1), help="Compute threads (default: all CPUs).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests computed together in one forward pass at most.")
@click.option("--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests waiting for a place in the batch at most; more get 429.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt tokens computed per step at most, so that a long prompt does not stall the streams.")
@click.option("--max-context", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens of prompt and answer of one request at most.")
@click.option("--api-key", envvar="QWEN3PACK_API_KEY",
              help="Require `Authorization: Bearer KEY` on every route but /health (or $QWEN3PACK_API_KEY).")
@click.option("--served-model-name", help="The model's name in the API (default: DIRECTORY's name).")
@click.option("--shutdown-timeout", type=click.IntRange(min=0), default=30, show_default=True,
              help="Seconds that running requests may take to finish after SIGTERM or Ctrl-C.")
@load_options
def serve_command(directory, host, port, threads, max_batch, max_queue, prefill_chunk, max_context, api_key,
                  served_model_name, shutdown_timeout, **load_options):
    """Serve the model over an OpenAI-compatible HTTP API (chat completions, completions, models),
    streaming, with continuous batching of concurrent requests."""
    from pathlib import Path
    from .server import serve
    model = _load(directory, threads, max_context, **load_options)
    try:
        model.tokenizer.chat_template  # a model without text fails now, not at each request
    except ValueError as error:
        _fail(error)
    name = served_model_name or Path(directory).resolve().name
    serve(model, name, host, port, dict(max_batch=max_batch, max_waiting=max_queue, prefill_chunk=prefill_chunk),
          api_key=api_key, shutdown_timeout=shutdown_timeout)


@main.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Speed beside transformers and llama.cpp, measured in one run (`qwen3pack bench --help`)."""
    from . import bench
    bench.main(list(args))


def convert_main():
    """`qwen3-convert`: the same command as `qwen3pack convert`."""
    convert_command(prog_name="qwen3-convert")
