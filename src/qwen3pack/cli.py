"""The `qwen3pack` command (and `qwen3-convert`, the same as `qwen3pack convert`)."""
import json
import sys

import click

from . import __version__

# What a user can get wrong: each is reported as one line naming the file, tensor or field.
def _user_errors():
    from .convert import ConfigError, ConversionError, SourceError
    from .formats import FormatError, LayoutError
    from .schema import SchemaError
    return (ConfigError, ConversionError, SourceError, FormatError, LayoutError, SchemaError)


def _fail(error):
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
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f16", "f32"]), default="auto", show_default=True,
              help="Weights' dtype; auto keeps the checkpoint's. Norms are always f32.")
@click.option("--dry-run", is_flag=True, help="Print the plan (file sizes, memory per rank) and write nothing.")
@click.option("--context", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Context length for the dry run's KV-cache estimate.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def convert_command(source, output, tp, dtype, dry_run, context, force):
    """Convert SOURCE (a local checkpoint directory or a hub id) into OUTPUT."""
    from . import convert
    try:
        if dry_run:
            click.echo(convert.dry_run(source, tp, dtype, context))
            return
        if output is None:
            raise click.UsageError("OUTPUT is required unless --dry-run")
        plan = convert.convert(source, output, tp=tp, dtype=dtype, force=force)
    except _user_errors() as error:
        _fail(error)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)
    size = sum(r.file_size for r in plan.ranks)
    click.echo(f"wrote {output}: {len(plan.ranks)} rank files, {plan.tensor_count} tensors, {size / 1e9:.3f} GB")


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
        f"layout       tp {layout['world_size']}, {layout['dtype']} weights, "
        f"{layout['kv_heads_per_rank']} kv heads per rank"
        + (f" (replicated on {layout['kv_head_replicas']} ranks)" if layout["kv_head_replicas"] > 1 else ""),
        f"format       {manifest['format_version'][0]}.{manifest['format_version'][1]}, conversion {manifest['conversion_id']}",
        f"converted by {manifest['provenance']['converter']} with {manifest['provenance']['options']}",
    ]
    for rank_file in converted.ranks:
        lines.append(f"  {rank_file.path.name}  {rank_file.file_size / 1e6:10.1f} MB  "
                     f"{len(rank_file.tensors)} tensors")
    return "\n".join(lines)


@main.command("bench", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args):
    """Speed beside transformers and llama.cpp, measured in one run (`qwen3pack bench --help`)."""
    from . import bench
    bench.main(list(args))


def convert_main():
    """`qwen3-convert`: the same command as `qwen3pack convert`."""
    convert_command(prog_name="qwen3-convert")
