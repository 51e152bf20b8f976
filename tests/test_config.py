"""config.json -> the model object of SPEC.md, the tensor-parallel layout, and the JSON Schemas
(qwen3pack.convert.hf_config, qwen3pack.schema)."""
import copy
import json
import math
import re
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from qwen3pack.convert.hf_config import (
    ConfigError,
    generation_hints,
    normalize_config,
)
from qwen3pack.convert.source import SourceError, read_json
from qwen3pack.formats.layout import LayoutError, make_layout
from qwen3pack.schema import SchemaError, validate

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
MOE = "Qwen3-30B-A3B.json"
DENSE = sorted(p.name for p in CONFIGS.glob("*.json") if p.name != MOE)
SCHEMA_FILES = ("qwen3_config.schema.json", "manifest.schema.json", "rank_header.schema.json")


def released(name):
    return json.loads((CONFIGS / name).read_text())


def mutated(name="Qwen3-0.6B.json", **changes):
    return {**released(name), **changes}


def refusal(raw):
    with pytest.raises(ConfigError) as caught:
        normalize_config(raw)
    return str(caught.value)


# --- released configs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
def test_every_released_dense_config_normalizes_to_a_model_the_rank_header_schema_accepts(name):
    model = normalize_config(released(name), name)
    layout = make_layout(model, 1, "bf16")
    validate(rank_header(model, layout), "rank_header", name)
    assert len(model["layer_types"]) == model["num_hidden_layers"]
    assert model["head_dim"] == 128 and model["sliding_window"] is None


def test_qwen3_0_6b_keeps_head_dim_128_although_hidden_over_heads_is_64():
    model = normalize_config(released("Qwen3-0.6B.json"))
    assert model == {
        "architecture": "qwen3",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope": {"type": "default", "theta": 1000000.0},
        "layer_types": ["full_attention"] * 28,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }


def test_untied_released_models_say_so():
    assert normalize_config(released("Qwen3-14B.json"))["tie_word_embeddings"] is False


def test_transformers_5_spelling_normalizes_to_the_same_model_as_the_4x_spelling():
    v5 = normalize_config(released("Qwen3-1.7B-v5-style.json"))
    v4 = normalize_config(released("Qwen3-1.7B.json"))
    assert v5 == v4


def test_long_context_2507_refresh_keeps_its_own_rope_theta():
    model = normalize_config(released("Qwen3-4B-Instruct-2507.json"))
    assert model["rope"] == {"type": "default", "theta": 5e6}
    assert model["max_position_embeddings"] == 262144


def test_yarn_8b_resolves_every_yarn_field():
    rope = normalize_config(released("Qwen3-8B-yarn-131k.json"))["rope"]
    assert rope == {
        "type": "yarn",
        "theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": True,
        "attention_factor": pytest.approx(0.1 * math.log(4) + 1, rel=1e-15),
    }


def test_mixture_of_experts_config_is_refused_with_the_moe_sentence():
    message = refusal(released(MOE))
    assert "mixture-of-experts (qwen3_moe) is not supported yet" in message
    assert "model_type" in message


def test_expert_fields_under_model_type_qwen3_are_refused_with_the_moe_sentence():
    message = refusal(mutated(num_experts=128, num_experts_per_tok=8))
    assert "num_experts: mixture-of-experts (qwen3_moe) is not supported yet" in message


# --- refused configs: each a small mutation of a released one ------------------------------


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"hidden_size": "1024"}, "config.json: hidden_size: '1024' is not of type 'integer'"),
        ({"hidden_size": 1024.0}, "config.json: hidden_size: 1024.0 is not of type 'integer'"),
        ({"tie_word_embeddings": "yes"}, "config.json: tie_word_embeddings: 'yes' is not of type 'boolean'"),
        ({"num_attention_heads": -1}, "config.json: num_attention_heads: -1 is less than the minimum of 1"),
        ({"intermediate_size": 0}, "config.json: intermediate_size: 0 is less than the minimum of 1"),
        ({"head_dim": 127}, "config.json: head_dim: 127 is not a multiple of 2"),
        ({"rms_norm_eps": 0}, "config.json: rms_norm_eps: 0 is less than or equal to the minimum of 0"),
        ({"eos_token_id": [151645, -1]}, "config.json: eos_token_id[1]: -1 is less than the minimum of 0"),
        ({"layer_types": ["full_attention"] * 27 + ["local"]}, "config.json: layer_types[27]: 'local' is not one of"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "config.json: rope_scaling.factor: 0.5 is less than"),
    ],
    ids=[
        "size_as_string",
        "size_as_float",
        "flag_as_string",
        "negative_heads",
        "zero_intermediate",
        "odd_head_dim",
        "zero_eps",
        "negative_eos",
        "unknown_layer_type",
        "rope_factor_below_one",
    ],
)
def test_wrong_types_and_out_of_range_values_are_refused_naming_the_field(changes, expected):
    assert refusal(mutated(**changes)).startswith(expected)


def test_layer_types_of_the_wrong_length_are_refused_naming_the_field():
    message = refusal(mutated("Qwen3-1.7B-v5-style.json", layer_types=["full_attention"] * 27))
    assert message.startswith("config.json: layer_types: 27 entries for num_hidden_layers 28")


def test_sliding_layer_without_window_is_refused_naming_the_field():
    message = refusal(mutated(layer_types=["full_attention"] * 27 + ["sliding_attention"]))
    assert message.startswith("config.json: sliding_window: layer_types[27] is sliding_attention")


def test_kv_heads_that_do_not_divide_the_heads_are_refused_naming_the_field():
    message = refusal(mutated(num_key_value_heads=5))
    assert message.startswith("config.json: num_key_value_heads: 5 does not divide num_attention_heads 16")


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "llama3"])
def test_unsupported_rope_type_is_refused_naming_the_field_and_the_type(rope_type):
    message = refusal(mutated(rope_scaling={"rope_type": rope_type, "factor": 2.0}))
    assert message.startswith(f"config.json: rope_scaling.rope_type: rope type '{rope_type}' is not supported")


def test_unsupported_rope_type_under_the_legacy_key_type_is_refused_naming_that_key():
    message = refusal(mutated(rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert message.startswith("config.json: rope_scaling.type: rope type 'dynamic' is not supported")


def test_linear_rope_without_factor_is_refused_naming_the_field():
    message = refusal(mutated(rope_scaling=None, rope_parameters={"rope_type": "linear", "rope_theta": 1e6}))
    assert message.startswith("config.json: rope_parameters.factor:")


def test_attention_bias_is_refused_naming_the_field():
    assert refusal(mutated(attention_bias=True)).startswith("config.json: attention_bias: true is not supported")


def test_activation_other_than_silu_is_refused_naming_the_field():
    assert refusal(mutated(hidden_act="gelu")).startswith("config.json: hidden_act: 'gelu' is not supported")


def test_partial_rotary_embedding_is_refused_naming_the_field():
    assert refusal(mutated(partial_rotary_factor=0.5)).startswith("config.json: partial_rotary_factor:")


def test_refusals_name_the_source_they_are_given():
    with pytest.raises(ConfigError, match=r"^models/x/config.json: num_attention_heads:"):
        normalize_config(mutated(num_attention_heads=0), source="models/x/config.json")


def test_a_file_that_is_not_json_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(SourceError, match=f"^{re.escape(str(path))}: not valid JSON"):
        read_json(path, 1 << 20)


# --- fields left out take Qwen3Config's defaults -------------------------------------------


def test_a_config_without_model_type_is_refused_naming_the_field():
    raw = released("Qwen3-0.6B.json")
    del raw["model_type"]
    assert refusal(raw) == "config.json: (top level): 'model_type' is a required property"


def test_a_config_naming_only_the_model_type_takes_every_qwen3config_default():
    model = normalize_config({"model_type": "qwen3"})
    assert model["head_dim"] == 128 and model["hidden_size"] == 4096
    assert model["num_key_value_heads"] == 32
    assert model["tie_word_embeddings"] is False
    assert model["rope"] == {"type": "default", "theta": 10000.0}
    assert model["sliding_window"] is None and model["layer_types"] == ["full_attention"] * 32


def test_null_kv_heads_mean_one_kv_head_per_query_head():
    assert normalize_config(mutated(num_key_value_heads=None))["num_key_value_heads"] == 16


def test_sliding_layers_start_at_max_window_layers_when_the_window_is_on():
    model = normalize_config(mutated(use_sliding_window=True, sliding_window=4096, max_window_layers=20))
    assert model["sliding_window"] == 4096
    assert model["layer_types"] == ["full_attention"] * 20 + ["sliding_attention"] * 8


def test_a_window_size_without_use_sliding_window_is_ignored():
    model = normalize_config(mutated(use_sliding_window=False, sliding_window=4096, max_window_layers=20))
    assert model["sliding_window"] is None
    assert model["layer_types"] == ["full_attention"] * 28


def test_yarn_without_original_length_takes_max_position_embeddings():
    rope = normalize_config(mutated(rope_scaling={"rope_type": "yarn", "factor": 4.0}))["rope"]
    assert rope["original_max_position_embeddings"] == 40960


def test_generation_hints_always_list_the_eos_ids():
    assert generation_hints(released("Qwen3-0.6B.json")) == {
        "bos_token_id": 151643,
        "eos_token_ids": [151645],
        "pad_token_id": None,
    }
    assert generation_hints(mutated(eos_token_id=[151645, 151643]))["eos_token_ids"] == [151645, 151643]
    assert generation_hints(mutated(eos_token_id=None))["eos_token_ids"] == []


# --- tensor-parallel layout ----------------------------------------------------------------


def model_of(name="Qwen3-0.6B.json", **changes):
    return normalize_config(mutated(name, **changes))


@pytest.mark.parametrize(
    "name, world_size, expected",
    [
        ("Qwen3-0.6B.json", 1, (16, 8, 1, 3072, 151936)),
        ("Qwen3-0.6B.json", 2, (8, 4, 1, 1536, 75968)),
        ("Qwen3-8B.json", 8, (4, 1, 1, 1536, 18992)),
        ("Qwen3-32B.json", 8, (8, 1, 1, 3200, 18992)),
        ("Qwen3-0.6B.json", 16, (1, 1, 2, 192, 9496)),
    ],
)
def test_released_models_split_into_equal_rank_shares(name, world_size, expected):
    layout = make_layout(model_of(name), world_size, "bf16")
    assert layout["world_size"] == world_size
    assert layout["padded_vocab_size"] == 151936
    shares = ("heads_per_rank", "kv_heads_per_rank", "kv_head_replicas", "intermediate_per_rank", "vocab_rows_per_rank")
    assert tuple(layout[key] for key in shares) == expected


def test_eight_ranks_over_four_kv_heads_replicate_each_kv_head_on_two_ranks():
    layout = make_layout(model_of("Qwen3-8B.json", num_key_value_heads=4), 8, "bf16")
    assert (layout["heads_per_rank"], layout["kv_heads_per_rank"], layout["kv_head_replicas"]) == (4, 1, 2)


def test_vocabulary_is_padded_to_the_smallest_multiple_of_the_world_size():
    layout = make_layout(model_of(vocab_size=151643), 4, "bf16")
    assert (layout["padded_vocab_size"], layout["vocab_rows_per_rank"]) == (151644, 37911)


def test_heads_that_do_not_split_over_the_ranks_are_refused_naming_num_attention_heads():
    with pytest.raises(LayoutError, match=r"^num_attention_heads: 16 does not split over 3 tensor-parallel ranks"):
        make_layout(model_of(), 3, "bf16")


def test_three_ranks_over_two_kv_heads_are_refused_naming_num_key_value_heads():
    model = model_of(num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(LayoutError, match=r"^num_key_value_heads: 2 KV heads cannot be shared by 3 ranks"):
        make_layout(model, 3, "bf16")


def test_kv_heads_that_do_not_split_over_fewer_ranks_are_refused_naming_num_key_value_heads():
    model = model_of(num_attention_heads=12, num_key_value_heads=6)
    with pytest.raises(LayoutError, match=r"^num_key_value_heads: 6 does not split over 4"):
        make_layout(model, 4, "bf16")


def test_intermediate_rows_that_do_not_split_are_refused_naming_intermediate_size():
    with pytest.raises(LayoutError, match=r"^intermediate_size: 3080 does not split over 16"):
        make_layout(model_of(intermediate_size=3080), 16, "bf16")


def test_a_world_of_no_ranks_is_refused_naming_world_size():
    with pytest.raises(LayoutError, match=r"^world_size: 0 ranks"):
        make_layout(model_of(), 0, "bf16")


# --- the same values as transformers -------------------------------------------------------

# Configs beyond the released ones, each exercising one rule of Qwen3Config or of the RoPE resolution.
VARIANTS = {
    "sliding_window": ("Qwen3-0.6B.json", {"use_sliding_window": True, "sliding_window": 2048, "max_window_layers": 20}),
    "sliding_window_default_size": ("Qwen3-0.6B.json", {"use_sliding_window": True, "max_window_layers": 4}),
    "kv_heads_null": ("Qwen3-0.6B.json", {"num_key_value_heads": None}),
    "linear": ("Qwen3-0.6B.json", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "yarn_mscale": ("Qwen3-8B.json", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
        "mscale": 1.0, "mscale_all_dim": 0.8}}),
    "yarn_legacy_type_betas_no_truncate": ("Qwen3-8B.json", {"rope_scaling": {
        "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 20480,
        "beta_fast": 16, "beta_slow": 2, "truncate": False}}),
    "yarn_explicit_attention_factor": ("Qwen3-8B.json", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "attention_factor": 1.25}}),
    "yarn_without_original_length": ("Qwen3-8B.json", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    "yarn_null_factor": ("Qwen3-8B-yarn-131k.json", {"rope_scaling": {
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32768}}),
    "yarn_top_level_original_length": ("Qwen3-8B-yarn-131k.json", {"original_max_position_embeddings": 16384}),
    "yarn_v5_rope_parameters": ("Qwen3-1.7B-v5-style.json", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}}),
}


COMPARISON_CONFIGS = [pytest.param(released(name), id=name) for name in DENSE] + [
    pytest.param(mutated(name, **changes), id=variant) for variant, (name, changes) in VARIANTS.items()
]


@pytest.fixture(scope="module")
def transformers_qwen3():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers.models.qwen3.modeling_qwen3")


@pytest.mark.parametrize("raw", COMPARISON_CONFIGS)
def test_model_object_agrees_with_transformers_qwen3config(raw, transformers_qwen3):
    model = normalize_config(copy.deepcopy(raw))
    config = transformers_qwen3.Qwen3Config(**copy.deepcopy(raw))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                  "layer_types", "sliding_window", "tie_word_embeddings", "hidden_act"):
        assert model[field] == getattr(config, field), field
    assert model["rope"]["type"] == config.rope_parameters["rope_type"]
    assert model["rope"]["theta"] == config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("raw", COMPARISON_CONFIGS)
def test_rope_frequencies_derived_from_the_model_object_match_transformers(raw, transformers_qwen3):
    model = normalize_config(copy.deepcopy(raw))
    rotary = transformers_qwen3.Qwen3RotaryEmbedding(transformers_qwen3.Qwen3Config(**copy.deepcopy(raw)))
    inv_freq, attention_factor = rope_from_model_object(model)
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=2e-6)
    assert attention_factor == pytest.approx(rotary.attention_scaling, rel=1e-12)


def rope_from_model_object(model):
    """(inv_freq, attention factor) from the model object alone, as the runtime computes them:
    written from the YaRN paper's formulas, independently of the converter."""
    rope, dim = model["rope"], model["head_dim"]
    theta = rope["theta"]
    extrapolation = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    if rope["type"] == "default":
        return extrapolation, 1.0
    if rope["type"] == "linear":
        return extrapolation / rope["factor"], 1.0
    original = rope["original_max_position_embeddings"]

    def dimension_of(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_of(rope["beta_fast"]), dimension_of(rope["beta_slow"])
    if rope["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    interpolated_share = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    interpolation = extrapolation / rope["factor"]
    inv_freq = interpolation * interpolated_share + extrapolation * (1 - interpolated_share)
    return inv_freq, rope["attention_factor"]


# --- the schemas themselves ----------------------------------------------------------------


@pytest.mark.parametrize("file_name", SCHEMA_FILES)
def test_schema_files_ship_in_the_installed_package_and_are_valid_2020_12_schemas(file_name):
    schema_file = resources.files("qwen3pack.schema").joinpath(file_name)
    assert schema_file.is_file()
    jsonschema.Draft202012Validator.check_schema(json.loads(schema_file.read_text()))


def test_schema_errors_are_value_errors_naming_the_file_and_the_json_path():
    with pytest.raises(SchemaError) as caught:
        validate(mutated(num_attention_heads=-1), "qwen3_config", "config.json")
    assert isinstance(caught.value, ValueError)
    assert str(caught.value) == "config.json: num_attention_heads: -1 is less than the minimum of 1"


def rank_header(model, layout):
    norm = {
        "name": "model.norm.weight", "dtype": "f32", "shape": [model["hidden_size"]],
        "offset": 4096, "nbytes": 4 * model["hidden_size"], "crc32c": "00000000",
        "parts": [{"source": "model.norm.weight", "axis": None, "start": 0, "end": model["hidden_size"],
                   "at": 0, "replicas": layout["world_size"]}],
    }
    return {"model": model, "layout": layout, "tensors": [norm]}


def manifest(model, layout):
    return {
        "format": "qwen3pack",
        "format_version": [1, 0],
        "conversion_id": "0123456789abcdef0123456789abcdef",
        "model": model,
        "layout": layout,
        "rank_files": [{"rank": 0, "file": "rank-00000-of-00001.q3p", "size": 8192, "header_crc32c": "0000abcd"}],
        "tensors": {"model.norm.weight": {"shape": [model["hidden_size"]], "dtype": "f32"}},
        "generation": {**generation_hints(released("Qwen3-0.6B.json")), "defaults": {"temperature": 0.6, "top_k": 20, "top_p": 0.95}},
        "provenance": {"converter": "qwen3pack 0.1.0", "options": {},
                       "sources": [{"file": "config.json", "sha256": "0" * 64, "size": 726}]},
    }


@pytest.fixture
def model_and_layout():
    model = normalize_config(released("Qwen3-0.6B.json"))
    return model, make_layout(model, 1, "bf16")


def test_a_manifest_as_spec_md_describes_it_is_accepted(model_and_layout):
    validate(manifest(*model_and_layout), "manifest", "manifest.json")


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("conversion_id",), "0123", "manifest.json: conversion_id: '0123' does not match"),
        (("format_version",), [2, 0], "manifest.json: format_version[0]: 1 was expected"),
        (("model", "rope"), {"type": "yarn", "theta": 1e6, "factor": 4.0},
         "manifest.json: model.rope: 'original_max_position_embeddings' is a required property"),
        (("layout", "dtype"), "f64", "manifest.json: layout.dtype: 'f64' is not one of"),
        (("rank_files", 0, "file"), "rank-0-of-1.q3p", "manifest.json: rank_files[0].file: 'rank-0-of-1.q3p' does not match"),
        (("generation", "eos_token_ids"), 151645, "manifest.json: generation.eos_token_ids: 151645 is not of type 'array'"),
    ],
    ids=["short_conversion_id", "newer_major_version", "yarn_left_unresolved", "unknown_dtype",
         "unpadded_rank_file_name", "single_eos_id"],
)
def test_a_broken_manifest_is_refused_naming_the_field(model_and_layout, path, value, expected):
    document = manifest(*model_and_layout)
    *parents, last = path
    target = document
    for key in parents:
        target = target[key]
    target[last] = value
    with pytest.raises(SchemaError) as caught:
        validate(document, "manifest", "manifest.json")
    assert str(caught.value).startswith(expected)


def test_a_rank_header_part_held_by_no_rank_is_refused_naming_the_field(model_and_layout):
    header = rank_header(*model_and_layout)
    header["tensors"][0]["parts"][0]["replicas"] = 0
    with pytest.raises(SchemaError, match=r"^rank-00000-of-00001.q3p: tensors\[0\]\(model.norm.weight\).parts\[0\].replicas: 0 is less"):
        validate(header, "rank_header", "rank-00000-of-00001.q3p")
