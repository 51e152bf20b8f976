"""The conversion plan: every rank file's header, offsets and size, made from config.json and the
safetensors headers alone, before a byte of weights is read."""
import math
from dataclasses import dataclass
from pathlib import Path

from ..formats.dtypes import element_size, tensor_bytes
from ..formats.layout import GROUPS, WEIGHT_DTYPES, global_tensors, make_layout, rank_tensors
from ..formats.rankfile import crc_hex, plan_offsets
from .hf_config import generation_hints, normalize_config
from .source import SourceError, copied_files, read_json, read_tensors, source_files

DTYPE_CHOICES = ("auto", *WEIGHT_DTYPES)
KV_CACHE_DTYPES = ("f32", "bf16")  # the runtime's kv_dtype choices (load(..., kv_dtype=...))
MAX_CONFIG_BYTES = 1 << 20  # config.json and generation_config.json: a few kB in practice
EMBEDDING = "model.embed_tokens.weight"


@dataclass
class RankPlan:
    header: dict
    data_offset: int
    file_size: int


@dataclass
class Plan:
    source_dir: Path
    model: dict
    layout: dict
    generation: dict
    global_tensors: dict  # HF name -> {"shape", "dtype"} as stored: the manifest's "tensors"
    sources: dict       # HF name -> SourceTensor, only those converted
    ignored: list       # HF names in the checkpoint that the model does not use
    ranks: list         # RankPlan per rank
    files: list         # the source files that define the conversion, for provenance
    copied_files: list  # tokenizer and generation files carried into the output

    @property
    def tensor_count(self):
        return sum(len(r.header["tensors"]) for r in self.ranks)


def _weights_dtype(requested, sources):
    if requested != "auto":
        return requested
    if EMBEDDING not in sources:
        raise SourceError(f"tensor {EMBEDDING} is missing from the checkpoint (--dtype auto keeps its dtype)")
    return sources[EMBEDDING].dtype


def _check_sources(used, sources):
    """The checkpoint must hold every tensor that the config implies, with the implied shape."""
    for name, spec in used.items():
        if name not in sources:
            raise SourceError(f"tensor {name} is missing from the checkpoint")
        if list(sources[name].shape) != spec["shape"]:
            raise SourceError(f"{sources[name].file.name}: tensor {name} has shape {list(sources[name].shape)}, "
                              f"config.json implies {spec['shape']}")


def _generation(raw_config, source_dir):
    """The manifest's "generation": the token ids and sampling defaults of generation_config.json,
    else the token ids of config.json (which its schema has checked)."""
    hints = generation_hints(raw_config)
    path = source_dir / "generation_config.json"
    config = read_json(path, MAX_CONFIG_BYTES) if path.exists() else {}
    _check_generation_config(config, path.name)
    eos = config.get("eos_token_id", hints["eos_token_ids"])
    defaults = {"temperature": 0.0}
    if config.get("do_sample"):
        defaults = {key: config[key] for key in SAMPLING_RULES if config.get(key) is not None}
        defaults.setdefault("temperature", 1.0)
    return {
        "bos_token_id": config.get("bos_token_id", hints["bos_token_id"]),
        "eos_token_ids": eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        "pad_token_id": config.get("pad_token_id", hints["pad_token_id"]),
        "defaults": defaults,
    }


def _is_non_negative_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The sampling defaults taken from generation_config.json, each with what the manifest's schema
# (and the sampler) accepts.
SAMPLING_RULES = {
    "temperature": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "top_k": ("an integer >= 0", _is_non_negative_int),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "min_p": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "repetition_penalty": ("a number > 0", lambda v: _is_number(v) and v > 0),
}


def _check_generation_config(config, name):
    """The fields of generation_config.json that go into the manifest, checked here, before any
    weight is streamed, so that a problem is reported against this file and its field."""
    if not isinstance(config, dict):
        raise SourceError(f"{name}: not a JSON object")
    for key in ("bos_token_id", "pad_token_id"):
        if config.get(key) is not None and not _is_non_negative_int(config[key]):
            raise SourceError(f"{name}: {key}: {config[key]!r} is not a token id (an integer >= 0)")
    eos = config.get("eos_token_id")
    if eos is not None and not (_is_non_negative_int(eos) or isinstance(eos, list) and all(map(_is_non_negative_int, eos))):
        raise SourceError(f"{name}: eos_token_id: {eos!r} is not a token id or a list of them")
    if config.get("do_sample") is not None and not isinstance(config["do_sample"], bool):
        raise SourceError(f"{name}: do_sample: {config['do_sample']!r} is not true or false")
    for key, (expected, accepts) in SAMPLING_RULES.items():
        if config.get(key) is not None and not accepts(config[key]):
            raise SourceError(f"{name}: {key}: {config[key]!r} is not {expected}")


def plan_ranks(model, layout):
    """The RankPlan of every rank, in rank order."""
    return [_rank_plan(model, layout, rank) for rank in range(layout["world_size"])]


def _rank_plan(model, layout, rank):
    records = rank_tensors(model, layout, rank)
    for record in records:
        record["offset"] = 0
        record["nbytes"] = tensor_bytes(record["dtype"], record["shape"])
        record["crc32c"] = crc_hex(0)
        # key order as SPEC.md lists them
        record["parts"] = record.pop("parts")
    header = {"model": model, "layout": layout, "tensors": records}
    data_offset, file_size = plan_offsets(header)
    return RankPlan(header, data_offset, file_size)


def parse_keep(text):
    """--keep "lm_head=q8,embed=bf16" as {group: dtype}; raises SourceError naming the item."""
    keep = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        group, equals, dtype = (s.strip() for s in item.partition("="))
        if not equals or group not in GROUPS or dtype not in WEIGHT_DTYPES:
            raise SourceError(f"--keep: {item!r} is not GROUP=DTYPE with a group of {', '.join(GROUPS)} "
                              f"and a dtype of {', '.join(WEIGHT_DTYPES)}")
        if group in keep:
            raise SourceError(f"--keep: {group} is given twice")
        keep[group] = dtype
    return keep


def default_keep(dtype, model):
    """The groups that a conversion to `dtype` keeps in another dtype unless --keep names them: q4
    keeps the embedding and the output head in q6, as llama.cpp's Q4_K_M keeps its output head.
    Measured on the test checkpoints (README, "Quantized weights"): q6 there lowers q4's mean KL
    from 0.12 to 0.10 (plain weights) and from 0.64 to 0.52 (trained-like), as q8 does (0.10, 0.51),
    for 12% more bytes on Qwen3-0.6B where q8 took 23%."""
    if dtype != "q4":
        return {}
    return {"embed": "q6"} if model["tie_word_embeddings"] else {"embed": "q6", "lm_head": "q6"}


def make_plan(source_dir, tp, dtype="auto", keep=None):
    config_path = source_dir / "config.json"
    if not config_path.exists():
        raise SourceError(f"{source_dir}: no config.json")
    raw_config = read_json(config_path, MAX_CONFIG_BYTES)
    model = normalize_config(raw_config, source=str(config_path))
    all_sources = read_tensors(source_dir)
    layout = make_layout(model, tp, _weights_dtype(dtype, all_sources), {**default_keep(dtype, model), **(keep or {})})
    used = global_tensors(model, layout)
    _check_sources(used, all_sources)
    sources = {name: all_sources[name] for name in used}
    ignored = sorted(set(all_sources) - set(used))
    return Plan(source_dir, model, layout, _generation(raw_config, source_dir),
                used, sources, ignored, plan_ranks(model, layout), source_files(source_dir, all_sources), copied_files(source_dir))


def kv_cache_bytes_per_rank(model, layout, context, kv_dtype):
    """Keys and values of one sequence of `context` tokens on one rank, stored in `kv_dtype`;
    sliding layers keep only their window."""
    per_token = 2 * layout["kv_heads_per_rank"] * model["head_dim"] * element_size(kv_dtype)
    total = 0
    for layer_type in model["layer_types"]:
        window = model["sliding_window"] if layer_type == "sliding_attention" else context
        total += min(window, context) * per_token
    return total


def describe(plan, context):
    """The --dry-run report."""
    model, layout = plan.model, plan.layout
    gib = 1 << 30
    lines = [
        f"source      {plan.source_dir}",
        f"model       qwen3, {model['num_hidden_layers']} layers, hidden {model['hidden_size']}, "
        f"heads {model['num_attention_heads']}/{model['num_key_value_heads']} kv, head_dim {model['head_dim']}, "
        f"vocab {model['vocab_size']} (padded {layout['padded_vocab_size']})",
        f"layout      tp={layout['world_size']}, weights {layout['dtype']}"
        + "".join(f", {group} {dtype}" for group, dtype in layout.get("dtype_overrides", {}).items())
        + ", norms f32, "
        f"{layout['heads_per_rank']} q heads and {layout['kv_heads_per_rank']} kv heads per rank"
        + (f" (each kv head on {layout['kv_head_replicas']} ranks)" if layout["kv_head_replicas"] > 1 else ""),
        f"tensors     {plan.tensor_count} in {len(plan.ranks)} rank files, from {len(plan.sources)} source tensors",
    ]
    kv = {kv_dtype: kv_cache_bytes_per_rank(model, layout, context, kv_dtype) for kv_dtype in KV_CACHE_DTYPES}
    for rank, rank_plan in enumerate(plan.ranks):
        weights = sum(r["nbytes"] for r in rank_plan.header["tensors"])
        lines.append(f"rank {rank:<6} file {rank_plan.file_size / gib:8.3f} GiB   weights {weights / gib:8.3f} GiB   "
                     f"KV cache at {context} tokens {kv['bf16'] / gib:8.3f} GiB in bf16, {kv['f32'] / gib:.3f} in f32")
    if plan.ignored:
        lines.append(f"ignored     {', '.join(plan.ignored)}")
    return "\n".join(lines)
