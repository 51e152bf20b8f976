"""`qwen3-convert`: a Hugging Face Qwen3 checkpoint in, a qwen3pack directory out.

Reads config.json and the safetensors headers, plans every rank file, then streams the weights.
"""
from .hf_config import ConfigError
from .plan import DTYPE_CHOICES, describe, make_plan, parse_keep
from .source import SourceError, resolve
from .interrupts import Interrupted
from .output import commit_atomically
from .reshard import reshard
from .write import ConversionError, write_directory

__all__ = ["convert", "dry_run", "reshard", "ConfigError", "ConversionError", "Interrupted", "SourceError", "DTYPE_CHOICES"]


def convert(source, output, tp=1, dtype="auto", force=False, keep=""):
    """Converts `source` (a local directory or a hub id) into `output`; returns the Plan.
    `keep` ("lm_head=q8,embed=bf16") sets the dtype of groups of weights (formats.layout.GROUPS)."""
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    overrides = parse_keep(keep)
    source_dir = resolve(str(source))
    plan = make_plan(source_dir, tp, dtype, overrides)
    options = {"tp": tp, "dtype": dtype}
    if overrides:
        options["keep"] = overrides
    sources = [source_dir, *plan.files, *plan.copied_files]
    commit_atomically(output, force, sources, lambda staging: write_directory(plan, staging, options))
    return plan


def dry_run(source, tp=1, dtype="auto", context=4096, keep=""):
    """The plan's report, without writing anything."""
    return describe(make_plan(resolve(str(source)), tp, dtype, parse_keep(keep)), context)
