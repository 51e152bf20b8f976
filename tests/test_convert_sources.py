"""qwen3-convert refuses a hostile or broken checkpoint with one line naming the file (and the
tensor or field), before a byte of weights is streamed, and never hangs or reads without bound."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3pack import _core
from qwen3pack.convert import convert, write
from qwen3pack.convert.source import read_safetensors_header
from qwen3pack.testing import make_checkpoint

BIN = Path(sys.executable).parent
USER_ERROR = "error: "


def run_cli(*args):
    return subprocess.run([str(BIN / "qwen3-convert"), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def source(tmp_path, checkpoints):
    """A copy of a small checkpoint, free to break."""
    copy = tmp_path / "src"
    shutil.copytree(checkpoints(), copy)
    return copy


@pytest.fixture
def sharded(tmp_path, checkpoints):
    copy = tmp_path / "src"
    shutil.copytree(checkpoints(shards=2), copy)
    return copy


def refused(source, tmp_path, monkeypatch, message, **options):
    """Converts in this process, asserting the refusal comes before any weight is streamed and
    leaves nothing behind; returns the error."""
    def streamed(*args):
        raise AssertionError("a weight was streamed before the refusal")

    monkeypatch.setattr(write, "_stream_tensor", streamed)
    from qwen3pack.cli import _user_errors
    with pytest.raises(_user_errors()) as raised:
        convert(source, tmp_path / "out", **options)
    assert message in str(raised.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    return raised.value


def test_a_checkpoint_without_the_embedding_names_it_with_dtype_auto(source, tmp_path, monkeypatch):
    tensors = load_file(source / "model.safetensors")
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, source / "model.safetensors")
    refused(source, tmp_path, monkeypatch,
            "tensor model.embed_tokens.weight is missing from the checkpoint (--dtype auto keeps its dtype)")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"])
def test_a_directory_where_a_file_is_expected_is_named(source, tmp_path, monkeypatch, name):
    (source / name).unlink()
    (source / name).mkdir()
    refused(source, tmp_path, monkeypatch, f"{source / name}: a directory, not a regular file")


def test_a_directory_where_a_shard_is_expected_is_named(sharded, tmp_path, monkeypatch):
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    refused(sharded, tmp_path, monkeypatch, f"{shard}: a directory, not a regular file")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"])
def test_a_fifo_where_a_file_is_expected_is_refused_without_waiting_for_a_writer(source, tmp_path, name):
    (source / name).unlink()
    os.mkfifo(source / name)
    result = run_cli(source, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == f"{USER_ERROR}{source / name}: a FIFO, not a regular file"


def test_a_config_linked_to_a_device_is_refused_without_reading_it(source, tmp_path, monkeypatch):
    (source / "config.json").unlink()
    (source / "config.json").symlink_to("/dev/zero")
    refused(source, tmp_path, monkeypatch, f"{source / 'config.json'}: a device, not a regular file")


def test_an_unreadable_source_file_is_named(checkpoints, unprivileged):
    as_user, folder = unprivileged
    source = shutil.copytree(checkpoints(), folder / "src")
    source.chmod(0o755)  # copied from a folder only root may enter
    (source / "model.safetensors").chmod(0)
    result = subprocess.run([*as_user, str(BIN / "qwen3-convert"), str(source), str(folder / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{USER_ERROR}{source / 'model.safetensors'}: cannot be read: Permission denied"
    assert sorted(p.name for p in folder.iterdir()) == ["src"]


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_a_json_file_beyond_its_size_bound_is_refused_unread(source, tmp_path, monkeypatch, name):
    (source / name).write_text("{" + " " * (2 << 20) + "}")
    refused(source, tmp_path, monkeypatch, f"{name}: larger than 1048576 bytes")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_an_error_not_a_recursion_error(sharded, tmp_path, monkeypatch, name):
    (sharded / name).write_text("[" * 200_000 + "]" * 200_000)
    refused(sharded, tmp_path, monkeypatch, f"{name}: not valid JSON: nested too deeply")


def test_generation_config_that_is_not_an_object_is_named(source, tmp_path, monkeypatch):
    (source / "generation_config.json").write_text("[1, 2]")
    refused(source, tmp_path, monkeypatch, "generation_config.json: not a JSON object")


@pytest.mark.parametrize("field, value, expected", [
    ("eos_token_id", "2", "is not a token id or a list of them"),
    ("eos_token_id", [258, "2"], "is not a token id or a list of them"),
    ("eos_token_id", 2.5, "is not a token id or a list of them"),
    ("bos_token_id", -1, "is not a token id (an integer >= 0)"),
    ("pad_token_id", True, "is not a token id (an integer >= 0)"),
    ("do_sample", "yes", "is not true or false"),
    ("temperature", "0.7", "is not a number >= 0"),
    ("temperature", -1, "is not a number >= 0"),
    ("top_k", 2.5, "is not an integer >= 0"),
    ("top_p", 1.5, "is not a number in (0, 1]"),
    ("top_p", 0, "is not a number in (0, 1]"),
    ("min_p", [0.1], "is not a number in [0, 1]"),
    ("repetition_penalty", 0, "is not a number > 0"),
])
def test_a_mistyped_generation_config_field_is_reported_against_that_file(source, tmp_path, monkeypatch, field,
                                                                         value, expected):
    config = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, field: value}))
    refused(source, tmp_path, monkeypatch, f"generation_config.json: {field}: {value!r} {expected}")


def test_an_infinite_temperature_is_refused_as_not_json(source, tmp_path, monkeypatch):
    (source / "generation_config.json").write_text('{"do_sample": true, "temperature": Infinity}')
    refused(source, tmp_path, monkeypatch, "generation_config.json: not valid JSON: Infinity is not a JSON value")


@pytest.mark.parametrize("index, expected", [
    ({"weight_map": {"model.norm.weight": 5}}, "weight_map is not an object of tensor names to file names"),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, "weight_map is not an object"),
    ({"metadata": {}}, "weight_map is not an object"),
    ([], "weight_map is not an object"),
])
def test_an_index_whose_weight_map_is_not_names_to_files_is_named(sharded, tmp_path, monkeypatch, index, expected):
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(sharded, tmp_path, monkeypatch, f"model.safetensors.index.json: {expected}")


def write_safetensors(path, header, data_bytes):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))
    return path


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data_bytes, expected", [
    ([F32x4], 16, "t.safetensors: safetensors header is not a JSON object"),
    ({"a": 5}, 16, "t.safetensors: tensor a: its entry is not a JSON object"),
    ({"a": {"shape": [4], "data_offsets": [0, 16]}}, 16, "tensor a: dtype None is not one of"),
    ({"a": {**F32x4, "dtype": 7}}, 16, "tensor a: dtype 7 is not one of"),
    ({"a": {**F32x4, "dtype": ["F32"]}}, 16, "tensor a: dtype ['F32'] is not one of"),
    ({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, 16, "tensor a: shape None is not a list of non-negative"),
    ({"a": {**F32x4, "shape": "4"}}, 16, "tensor a: shape '4' is not a list of non-negative integers"),
    ({"a": {**F32x4, "shape": [-4]}}, 16, "tensor a: shape [-4] is not a list of non-negative integers"),
    ({"a": {**F32x4, "shape": [4.0]}}, 16, "tensor a: shape [4.0] is not a list of non-negative integers"),
    ({"a": {**F32x4, "shape": [True]}}, 16, "tensor a: shape [True] is not a list of non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [4]}}, 16, "tensor a: data_offsets None is not two non-negative integers"),
    ({"a": {**F32x4, "data_offsets": [0]}}, 16, "tensor a: data_offsets [0] is not two non-negative integers"),
    ({"a": {**F32x4, "data_offsets": ["0", 16]}}, 16, "tensor a: data_offsets ['0', 16] is not two non-negative"),
    ({"a": {**F32x4, "data_offsets": {"0": 16}}}, 16, "tensor a: data_offsets {'0': 16} is not two non-negative"),
    ({"a": {**F32x4, "data_offsets": [0, 12]}}, 12, "tensor a: data_offsets [0, 12] hold 12 bytes, but shape [4] "
                                                    "of f32 takes 16"),
    ({"a": {**F32x4, "shape": [1 << 62, 1 << 62]}}, 16, "of f32 takes more than the file's 16 bytes of data"),
    ({"a": F32x4, "b": F32x4}, 16, "tensor b: data_offsets [0, 16] do not start where the tensor before it ends "
                                   "(16): tensors' bytes must be contiguous, without gaps or overlaps"),
    ({"a": F32x4, "b": {**F32x4, "data_offsets": [32, 48]}}, 48, "tensor b: data_offsets [32, 48] do not start "
                                                                 "where the tensor before it ends (16)"),
    ({"a": {**F32x4, "data_offsets": [16, 32]}}, 32, "tensor a: data_offsets [16, 32] do not start where"),
    ({"a": F32x4}, 32, "t.safetensors: the tensors end at byte 16 of the data, which has 32 bytes"),
    ({"__metadata__": {"format": 1}, "a": F32x4}, 16, "t.safetensors: __metadata__ is not an object of strings"),
])
def test_a_safetensors_header_is_checked_as_the_safetensors_library_checks_it(tmp_path, header, data_bytes,
                                                                              expected):
    from qwen3pack.convert import SourceError
    path = write_safetensors(tmp_path / "t.safetensors", header, data_bytes)
    with pytest.raises(SourceError) as raised:
        read_safetensors_header(path)
    assert expected in str(raised.value)


def test_a_valid_header_with_metadata_and_an_empty_tensor_is_accepted(tmp_path):
    header = {"__metadata__": {"format": "pt"}, "e": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]},
              "a": F32x4}
    tensors = read_safetensors_header(write_safetensors(tmp_path / "t.safetensors", header, 16))
    assert sorted(tensors) == ["a", "e"] and tensors["a"].nbytes == 16 and tensors["e"].nbytes == 0


def test_a_malformed_header_is_one_error_line_from_the_cli(source, tmp_path):
    write_safetensors(source / "model.safetensors", {"a": {**F32x4, "shape": [-4]}}, 16)
    result = run_cli(source, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: model.safetensors: tensor a: shape [-4] is not a list of "
                                     "non-negative integers")


@pytest.mark.parametrize("dtype, to", [("f32", "auto"), ("f32", "bf16"), ("bf16", "auto"), ("bf16", "f16"),
                                       ("f16", "f32")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_weights_are_refused_naming_the_file_tensor_and_position(tmp_path, dtype, to, value):
    from qwen3pack.convert import ConversionError
    source = make_checkpoint(tmp_path / "src", dtype=dtype)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][70, 3] = value
    save_file(tensors, source / "model.safetensors")
    with pytest.raises(ConversionError) as raised:
        convert(source, tmp_path / "out", dtype=to)
    assert str(raised.value) == (f"model.safetensors: tensor {name}: holds a NaN or infinite value (at [70, 3]); "
                                 "only finite weights are converted")
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("bits, mask, largest", [(np.uint16, 0x7F80, 0x7F7F), (np.uint16, 0x7C00, 0x7BFF),
                                                  (np.uint32, 0x7F800000, 0x7F7FFFFF)])
def test_the_first_nan_or_infinity_is_found_wherever_it_is(bits, mask, largest):
    # the C++ search tests blocks of 4096 values at a time, then the block with a hit value by value
    values = np.full(3 * 4096 + 5, largest, dtype=bits)  # finite: one below the exponent of all ones
    values[1::2] |= bits(1 << (8 * values.itemsize - 1))  # and their negatives
    assert _core.first_nonfinite(values, mask) == -1
    for at in (0, 4095, 4096, 2 * 4096 + 17, len(values) - 1):
        hit = values.copy()
        hit[at] = mask | 1  # a NaN
        hit[-1] = mask      # an infinity after it
        assert _core.first_nonfinite(hit, mask) == at


def test_the_largest_finite_values_convert(tmp_path):
    source = make_checkpoint(tmp_path / "src", dtype="bf16")
    tensors = load_file(source / "model.safetensors")
    tensors["model.norm.weight"][:2] = torch.tensor([torch.finfo(torch.bfloat16).max, -torch.finfo(torch.bfloat16).max], dtype=torch.bfloat16)
    save_file(tensors, source / "model.safetensors")
    convert(source, tmp_path / "out")


def test_a_source_file_truncated_while_converting_is_named(source, tmp_path, monkeypatch):
    from qwen3pack.convert import SourceError
    original = write._stream_all

    def truncate_then_stream(*args):
        os.truncate(source / "model.safetensors", 4096)
        return original(*args)

    monkeypatch.setattr(write, "_stream_all", truncate_then_stream)
    with pytest.raises(SourceError, match="model.safetensors: ends at byte .*, before its tensors do"):
        convert(source, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [source]


def test_an_os_error_while_writing_is_one_error_line(source, tmp_path, monkeypatch):
    import errno
    from click.testing import CliRunner
    from qwen3pack.cli import main

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(write, "_write_rows", disk_full)
    result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == [source]


def test_a_source_folder_that_cannot_be_entered_is_one_error_line(checkpoints, unprivileged):
    as_user, folder = unprivileged
    source = shutil.copytree(checkpoints(), folder / "src")
    source.chmod(0o700)  # only its owner, root, may enter
    result = subprocess.run([*as_user, str(BIN / "qwen3-convert"), str(source), str(folder / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{USER_ERROR}{source / 'config.json'}: Permission denied"
