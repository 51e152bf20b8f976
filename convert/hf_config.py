"""A Hugging Face Qwen3 config.json, read into the model object of formats/SPEC.md, and the
tensor-parallel layout that a world size gives that model.

Every value is resolved the way transformers resolves it (Qwen3Config and modeling_rope_utils),
so that the runtime computes what the Hugging Face model computes and nothing is left to a default.
"""
import json
import math

from qwen3pack.schema import SchemaError, validate

# Qwen3Config's defaults, for the fields a config.json leaves out. An explicit null is not a
# left-out field: transformers keeps it (sliding_window: null stays null).
QWEN3_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
}
# RotaryEmbeddingConfigMixin.default_theta: the base when no rope_theta is given anywhere
DEFAULT_ROPE_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
# YaRN's defaults in transformers' _compute_yarn_parameters
YARN_BETA_FAST = 32
YARN_BETA_SLOW = 1

MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
MOE_SENTENCE = "mixture-of-experts (qwen3_moe) is not supported yet"


class ConfigError(ValueError):
    """A config.json (or a tensor-parallel size) that qwen3pack cannot convert; the message names the field."""


def normalize_config(raw, source="config.json"):
    """The model object of SPEC.md for the config.json object `raw`; `source` names it in errors.

    Raises ConfigError, naming `source` and the field, for a config that is not a dense Qwen3
    that qwen3pack can run.
    """
    _refuse_mixture_of_experts(raw, source)
    try:
        validate(raw, "qwen3_config", source)
    except SchemaError as e:
        raise ConfigError(str(e)) from e
    config = {**QWEN3_DEFAULTS, **raw}
    _refuse_unsupported_features(config, source)
    num_key_value_heads = _num_key_value_heads(config, source)
    sliding_window = config["sliding_window"] if config["use_sliding_window"] else None
    layer_types = _layer_types(config, sliding_window, source)
    model = {
        "architecture": "qwen3",
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": num_key_value_heads,
        "head_dim": config["head_dim"],
        "vocab_size": config["vocab_size"],
        "rms_norm_eps": float(config["rms_norm_eps"]),
        "max_position_embeddings": config["max_position_embeddings"],
        "rope": _rope(config, source),
        "layer_types": layer_types,
        "sliding_window": sliding_window,
        "tie_word_embeddings": config["tie_word_embeddings"],
        "hidden_act": config["hidden_act"],
    }
    _check_model_rules(model, source)
    return model


def _check_model_rules(model, source):
    """The model object must pass the rules that the reader and the runtime apply to it (the
    manifest schema's model definition), so that nothing converts that will not load. The
    config's own schema names most problems by their config.json field first; this catches the
    rest (a resolved YaRN factor, a non-finite value) under the model object's name."""
    for path, value in _numbers(model):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: resolves to model.{path} = {value}, which is not a finite number")
    try:
        validate(model, "model", f"{source}: resolves to a model object whose")
    except SchemaError as e:
        raise ConfigError(str(e)) from e


def _numbers(node, path=""):
    """(dotted path, value) of every number in a nested object."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(node, float):
        yield path, node


def generation_hints(raw):
    """The token ids config.json gives: {"bos_token_id", "eos_token_ids": [...], "pad_token_id"}."""
    eos = raw.get("eos_token_id")
    if eos is None:
        eos_token_ids = []
    elif isinstance(eos, int):
        eos_token_ids = [eos]
    else:
        eos_token_ids = list(eos)
    return {
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": eos_token_ids,
        "pad_token_id": raw.get("pad_token_id"),
    }


def _refuse_mixture_of_experts(raw, source):
    # Before the schema: its model_type "qwen3" would refuse qwen3_moe as a mere mismatch.
    if not isinstance(raw, dict):
        return
    if raw.get("model_type") == "qwen3_moe":
        raise ConfigError(f"{source}: model_type: {MOE_SENTENCE}")
    for field in MOE_FIELDS:
        if raw.get(field):
            raise ConfigError(f"{source}: {field}: {MOE_SENTENCE}")


def _refuse_unsupported_features(config, source):
    if config["attention_bias"]:
        raise ConfigError(f"{source}: attention_bias: true is not supported (Qwen3's projections have no bias)")
    if config["hidden_act"] != "silu":
        raise ConfigError(f"{source}: hidden_act: {config['hidden_act']!r} is not supported; Qwen3 uses silu")


def _num_key_value_heads(config, source):
    # null means multi-head attention, as in Qwen3Config; a left-out field took its default above
    kv_heads = config["num_key_value_heads"] or config["num_attention_heads"]
    heads = config["num_attention_heads"]
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}; "
            "every KV head must serve the same number of query heads"
        )
    return kv_heads


def _layer_types(config, sliding_window, source):
    """The attention of each layer: config.json's layer_types, else derived as Qwen3Config does."""
    layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types")
    if layer_types is None:
        return [
            "sliding_attention" if sliding_window is not None and i >= config["max_window_layers"] else "full_attention"
            for i in range(layers)
        ]
    if len(layer_types) != layers:
        raise ConfigError(
            f"{source}: layer_types: {len(layer_types)} entries for num_hidden_layers {layers}; "
            "there must be one per layer"
        )
    if sliding_window is None and "sliding_attention" in layer_types:
        layer = layer_types.index("sliding_attention")
        raise ConfigError(
            f"{source}: sliding_window: layer_types[{layer}] is sliding_attention but there is no sliding window "
            f"(sliding_window {json.dumps(config['sliding_window'])}, "
            f"use_sliding_window {json.dumps(config['use_sliding_window'])})"
        )
    return list(layer_types)


def _rope_parameters(config):
    """(field name, parameters): rope_scaling (4.x) takes precedence over rope_parameters (5.x),
    as in transformers' convert_rope_params_to_dict."""
    for field in ("rope_scaling", "rope_parameters"):
        if config.get(field):
            return field, config[field]
    return "rope_parameters", {}


def _rope(config, source):
    """The rope member of the model object: the type and every parameter it uses, resolved."""
    field, params = _rope_parameters(config)
    nested = [key for key in params if key in LAYER_TYPES]
    if nested:
        raise ConfigError(f"{source}: {field}.{nested[0]}: RoPE parameters per layer type are not supported")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(
            f"{source}: partial_rotary_factor: {partial} is not supported; RoPE must rotate the whole head_dim"
        )
    type_key = "rope_type" if "rope_type" in params else "type"
    rope_type = params.get(type_key, "default")
    theta = float(params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    if rope_type == "default":
        return {"type": "default", "theta": theta}
    if rope_type == "linear":
        return {"type": "linear", "theta": theta, "factor": float(_required_factor(params, field, rope_type, source))}
    if rope_type == "yarn":
        return {"type": "yarn", "theta": theta, **_yarn(config, params, field, source)}
    raise ConfigError(
        f"{source}: {field}.{type_key}: rope type {rope_type!r} is not supported "
        f"(qwen3pack runs {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


def _required_factor(params, field, rope_type, source):
    if params.get("factor") is None:
        raise ConfigError(f"{source}: {field}.factor: rope type {rope_type!r} needs a factor")
    return params["factor"]


def _yarn(config, params, field, source):
    """YaRN's parameters as transformers' _compute_yarn_parameters resolves them."""
    if "factor" not in params:
        raise ConfigError(f"{source}: {field}.factor: rope type 'yarn' needs a factor")
    # A top-level original_max_position_embeddings wins over rope_scaling's (standardize_rope_params),
    # and without either the model's own length is the pretraining length.
    original = config.get(
        "original_max_position_embeddings",
        params.get("original_max_position_embeddings", config["max_position_embeddings"]),
    )
    factor = params["factor"]
    if factor is None:
        # DeepSeek-V3's convention: the factor is implied by the two lengths
        factor = config["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = _yarn_attention_factor(factor, params.get("mscale"), params.get("mscale_all_dim"))
    return {
        "factor": float(factor),
        "original_max_position_embeddings": original,
        # `or`, as transformers has it: a null beta takes the default
        "beta_fast": float(params.get("beta_fast") or YARN_BETA_FAST),
        "beta_slow": float(params.get("beta_slow") or YARN_BETA_SLOW),
        "truncate": params.get("truncate", True),
        "attention_factor": float(attention_factor),
    }


def _yarn_attention_factor(factor, mscale, mscale_all_dim):
    """The cos/sin scale of YaRN: the ratio of two mscales when both are given (and non-zero),
    else the paper's 0.1 * ln(factor) + 1."""
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def _yarn_mscale(factor, mscale=1.0):
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
