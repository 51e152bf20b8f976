"""The JSON Schemas of the files qwen3pack reads and writes, and a validator whose messages name
the file and the offending field.

Schemas, by the name `validate` takes:
- "qwen3_config": a Hugging Face Qwen3 config.json
- "manifest": manifest.json of a converted directory
- "rank_header": the JSON header of a rank file (it shares the manifest's definitions)
- "model": the model object alone (the manifest's definition): the one set of model rules that
  the converter, the reader and the C++ loader apply
"""
import json
from functools import cache
from importlib import resources

import jsonschema
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_NAMES = ("qwen3_config", "manifest", "rank_header")
# Definitions inside a schema file, validated on their own.
SUBSCHEMAS = {"model": "manifest.schema.json#/$defs/model"}


class SchemaError(ValueError):
    """A JSON document does not match its schema."""


def validate(instance, schema_name, what):
    """Raise SchemaError, naming `what` (a file, usually) and the field's JSON path, unless
    `instance` matches the schema `schema_name`."""
    error = best_match(_validator(schema_name).iter_errors(instance))
    if error is not None:
        raise SchemaError(f"{what}: {_field_path(error, instance)}: {error.message}")


def _field_path(error, instance):
    """`rope_scaling.factor`, `layer_types[3]`, `tensors[7](model.norm.weight).offset`: the path of
    the offending value, as a reader writes it, with the name of any named entry on the way."""
    path, node = "", instance
    for key in error.absolute_path:
        node = node[key] if isinstance(node, (dict, list)) else None
        if isinstance(key, int):
            path += f"[{key}]"
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                path += f"({node['name']})"
        else:
            path += f".{key}" if path else key
    return path or "(top level)"


def _is_integer(checker, instance):
    # JSON Schema counts 1024.0 as an integer; transformers' Qwen3Config and the C++ runtime do not.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)


def _file_name(schema_name):
    return f"{schema_name}.schema.json"


def _load(schema_name):
    text = resources.files(__name__).joinpath(_file_name(schema_name)).read_text(encoding="utf-8")
    return json.loads(text)


@cache
def _registry():
    # Registered under their file names, so that a relative "$ref": "manifest.schema.json#/..."
    # resolves here exactly as it does for a tool reading the files side by side.
    return Registry().with_resources(
        (_file_name(name), Resource.from_contents(_load(name))) for name in SCHEMA_NAMES
    )


@cache
def _validator(schema_name):
    if schema_name in SUBSCHEMAS:
        return _Validator({"$ref": SUBSCHEMAS[schema_name]}, registry=_registry())
    if schema_name not in SCHEMA_NAMES:
        raise KeyError(f"no schema named {schema_name!r}; there are {', '.join(SCHEMA_NAMES + tuple(SUBSCHEMAS))}")
    return _Validator(_registry()[_file_name(schema_name)].contents, registry=_registry())
