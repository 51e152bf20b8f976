"""Which tensors each rank file holds, with what shape and from which slices of the Hugging Face
tensors: the per-rank layout of SPEC.md, written down once for the converter (to plan) and the
reader (to check)."""

NORM_DTYPE = "f32"
MAX_WORLD_SIZE = 4096  # the runtime's limit, and the manifest schema's
WEIGHT_DTYPES = ("bf16", "f16", "f32", "q8", "q4", "q6")
# The groups of weight matrices whose dtype layout.dtype_overrides may set, by rank tensor.
GROUPS = ("embed", "lm_head", "qkv", "o_proj", "gate_up", "down")


def group_dtype(layout, group):
    """The dtype of one group of weight matrices: its override, else layout.dtype."""
    return layout.get("dtype_overrides", {}).get(group, layout["dtype"])


def _part(source, axis, start, end, at, replicas):
    return {"source": source, "axis": axis, "start": start, "end": end, "at": at, "replicas": replicas}


def _replicated(source, length, world_size):
    return [_part(source, None, 0, length, 0, world_size)]


def _rows_of_rank(rank, rows_per_rank):
    return rank * rows_per_rank, (rank + 1) * rows_per_rank


def kv_heads_of_rank(layout, rank):
    """The first KV head that `rank` holds, and how many ranks hold it."""
    replicas = layout["kv_head_replicas"]
    if replicas > 1:
        return rank // replicas, replicas
    return rank * layout["kv_heads_per_rank"], 1


def _vocab_parts(source, model, layout, rank):
    rows = layout["vocab_rows_per_rank"]
    start, end = _rows_of_rank(rank, rows)
    real_end = min(end, model["vocab_size"])
    parts = []
    if real_end > start:
        parts.append(_part(source, 0, start, real_end, 0, 1))
    pad_start = max(start, model["vocab_size"])
    if end > pad_start:
        parts.append(_part(None, 0, pad_start, end, pad_start - start, 1))
    return parts


def _attention_parts(prefix, model, layout, rank):
    d = model["head_dim"]
    q_rows = layout["heads_per_rank"] * d
    kv_rows = layout["kv_heads_per_rank"] * d
    first_kv_head, replicas = kv_heads_of_rank(layout, rank)
    kv_start = first_kv_head * d
    q_start, q_end = _rows_of_rank(rank, q_rows)
    return [
        _part(f"{prefix}.q_proj.weight", 0, q_start, q_end, 0, 1),
        _part(f"{prefix}.k_proj.weight", 0, kv_start, kv_start + kv_rows, q_rows, replicas),
        _part(f"{prefix}.v_proj.weight", 0, kv_start, kv_start + kv_rows, q_rows + kv_rows, replicas),
    ]


def rank_tensors(model, layout, rank):
    """The tensor records of one rank file, in file order, without offsets and checksums:
    [{"name", "dtype", "shape", "parts"}]."""
    h, d, w = model["hidden_size"], model["head_dim"], layout["world_size"]

    def weights(group):
        return group_dtype(layout, group)

    q_rows = layout["heads_per_rank"] * d
    kv_rows = layout["kv_heads_per_rank"] * d
    inter = layout["intermediate_per_rank"]
    vocab_rows = layout["vocab_rows_per_rank"]

    def tensor(name, dtype, shape, parts):
        return {"name": name, "dtype": dtype, "shape": list(shape), "parts": parts}

    def norm(name, length):
        return tensor(name, NORM_DTYPE, [length], _replicated(name, length, w))

    out = [tensor("model.embed_tokens.weight", weights("embed"), [vocab_rows, h],
                  _vocab_parts("model.embed_tokens.weight", model, layout, rank))]
    if not model["tie_word_embeddings"]:
        out.append(tensor("lm_head.weight", weights("lm_head"), [vocab_rows, h],
                          _vocab_parts("lm_head.weight", model, layout, rank)))
    out.append(norm("model.norm.weight", h))
    q_start, q_end = _rows_of_rank(rank, q_rows)
    i_start, i_end = _rows_of_rank(rank, inter)
    for i in range(model["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
        out += [
            norm(f"{layer}.input_layernorm.weight", h),
            tensor(f"{attn}.qkv_proj.weight", weights("qkv"), [q_rows + 2 * kv_rows, h],
                   _attention_parts(attn, model, layout, rank)),
            norm(f"{attn}.q_norm.weight", d),
            norm(f"{attn}.k_norm.weight", d),
            tensor(f"{attn}.o_proj.weight", weights("o_proj"), [h, q_rows],
                   [_part(f"{attn}.o_proj.weight", 1, q_start, q_end, 0, 1)]),
            norm(f"{layer}.post_attention_layernorm.weight", h),
            tensor(f"{mlp}.gate_up_proj.weight", weights("gate_up"), [2 * inter, h],
                   [_part(f"{mlp}.gate_proj.weight", 0, i_start, i_end, 0, 1),
                    _part(f"{mlp}.up_proj.weight", 0, i_start, i_end, inter, 1)]),
            tensor(f"{mlp}.down_proj.weight", weights("down"), [h, inter],
                   [_part(f"{mlp}.down_proj.weight", 1, i_start, i_end, 0, 1)]),
        ]
    return out


def global_tensors(model, layout):
    """The Hugging Face tensors that the rank files hold between them: {name: {"shape", "dtype"}}."""
    h, d, inter = model["hidden_size"], model["head_dim"], model["intermediate_size"]
    out = {"model.embed_tokens.weight": {"shape": [model["vocab_size"], h], "dtype": group_dtype(layout, "embed")}}
    if not model["tie_word_embeddings"]:
        out["lm_head.weight"] = {"shape": [model["vocab_size"], h], "dtype": group_dtype(layout, "lm_head")}
    out["model.norm.weight"] = {"shape": [h], "dtype": NORM_DTYPE}
    q_rows = model["num_attention_heads"] * d
    kv_rows = model["num_key_value_heads"] * d
    for i in range(model["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes = {
            "input_layernorm.weight": ([h], NORM_DTYPE),
            "self_attn.q_proj.weight": ([q_rows, h], group_dtype(layout, "qkv")),
            "self_attn.k_proj.weight": ([kv_rows, h], group_dtype(layout, "qkv")),
            "self_attn.v_proj.weight": ([kv_rows, h], group_dtype(layout, "qkv")),
            "self_attn.q_norm.weight": ([d], NORM_DTYPE),
            "self_attn.k_norm.weight": ([d], NORM_DTYPE),
            "self_attn.o_proj.weight": ([h, q_rows], group_dtype(layout, "o_proj")),
            "post_attention_layernorm.weight": ([h], NORM_DTYPE),
            "mlp.gate_proj.weight": ([inter, h], group_dtype(layout, "gate_up")),
            "mlp.up_proj.weight": ([inter, h], group_dtype(layout, "gate_up")),
            "mlp.down_proj.weight": ([h, inter], group_dtype(layout, "down")),
        }
        for suffix, (shape, dtype) in shapes.items():
            out[f"{layer}.{suffix}"] = {"shape": shape, "dtype": dtype}
    return out


class LayoutError(ValueError):
    """A tensor-parallel world size that the model's dimensions cannot be split by."""


def make_layout(model, world_size, dtype, dtype_overrides=None):
    """The layout object of SPEC.md that splits `model` over `world_size` ranks, its weights in
    `dtype` but for the groups that `dtype_overrides` ({group: dtype}) names.

    Raises LayoutError, naming the field, when the heads, the KV heads or the MLP rows do not
    split evenly, or an override names an unknown group or dtype (or lm_head of a tied model).
    """
    for group, value in (dtype_overrides or {}).items():
        if group not in GROUPS:
            raise LayoutError(f"dtype override: unknown tensor group {group!r} (groups: {', '.join(GROUPS)})")
        if value not in WEIGHT_DTYPES:
            raise LayoutError(f"dtype override {group}={value!r}: not one of {', '.join(WEIGHT_DTYPES)}")
    # only the groups that differ, in a fixed order: the same choice gives the same layout
    overrides = {group: value for group, value in sorted((dtype_overrides or {}).items()) if value != dtype}
    if "lm_head" in overrides and model["tie_word_embeddings"]:
        raise LayoutError("dtype override lm_head: the model ties its embeddings, so its output head is the "
                          "embedding: set embed instead")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise LayoutError(f"world_size: {world_size} ranks; tensor parallelism runs 1 to {MAX_WORLD_SIZE}")
    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    _require_split("num_attention_heads", heads, world_size)
    if world_size > kv_heads:
        # more ranks than KV heads: each KV head is replicated on an equal number of ranks
        if world_size % kv_heads:
            raise LayoutError(
                f"num_key_value_heads: {kv_heads} KV heads cannot be shared by {world_size} ranks; "
                "with more ranks than KV heads, world_size must be a multiple of num_key_value_heads")
    else:
        _require_split("num_key_value_heads", kv_heads, world_size)
    _require_split("intermediate_size", model["intermediate_size"], world_size)
    padded_vocab = -(-model["vocab_size"] // world_size) * world_size
    layout = {
        "world_size": world_size,
        "dtype": dtype,
        "padded_vocab_size": padded_vocab,
        "heads_per_rank": heads // world_size,
        "kv_heads_per_rank": max(1, kv_heads // world_size),
        "kv_head_replicas": max(1, world_size // kv_heads),
        "intermediate_per_rank": model["intermediate_size"] // world_size,
        "vocab_rows_per_rank": padded_vocab // world_size,
    }
    if overrides:
        layout["dtype_overrides"] = overrides
    return layout


def _require_split(field, value, world_size):
    if value % world_size:
        raise LayoutError(f"{field}: {value} does not split over {world_size} tensor-parallel ranks")
