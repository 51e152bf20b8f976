"""Converted directories built to hang, exhaust or crash a reader: every one ends in a clean error
(or a problem line from `validate`, and valid JSON from `validate --json`), quickly."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3pack import _core, formats, runtime, validate
from qwen3pack.convert import convert
from qwen3pack.formats import FormatError
from qwen3pack.formats.files import MAX_JSON_BYTES
from qwen3pack.testing import make_checkpoint

RANK0, RANK1 = "rank-00000-of-00002.q3p", "rank-00001-of-00002.q3p"
EMBED = "model.embed_tokens.weight"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    convert(make_checkpoint(root / "source"), root / "out", tp=2)
    return root / "out"


@pytest.fixture
def model(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "model")
    return tmp_path / "model"


def cli_run(*args, timeout=60):
    """The installed command, in a subprocess with a timeout: a hang fails instead of stalling."""
    return subprocess.run([str(BIN / "qwen3pack"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def reseal(path, header):
    """Writes `header` into the rank file at `path` with a valid length and checksum, and updates
    the manifest's entry for it: damage that only the bounds checks can catch."""
    data = bytearray(path.read_bytes())
    data_offset = struct.unpack_from("<Q", data, 32)[0]
    encoded = json.dumps(header).encode()
    data[64:data_offset] = encoded + bytes(data_offset - 64 - len(encoded))
    struct.pack_into("<IQ", data, 20, _core.crc32c(encoded), len(encoded))
    path.write_bytes(data)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["rank_files"][int(path.name[5:10])]["header_crc32c"] = f"{_core.crc32c(encoded):08x}"
    manifest_path.write_text(json.dumps(manifest))


def header_of(path):
    data = path.read_bytes()
    return json.loads(data[64:64 + struct.unpack_from("<Q", data, 24)[0]])


# ---- file kinds ----------------------------------------------------------------------------

def test_a_manifest_that_is_a_fifo_is_refused_without_waiting_for_a_writer(model):
    (model / "manifest.json").unlink()
    os.mkfifo(model / "manifest.json")
    for command in (["validate"], ["validate", "--json"], ["inspect"]):
        result = cli_run(*command, model)
        assert result.returncode == 1 and "manifest.json: a FIFO, not a regular file" in result.stdout + result.stderr
    with pytest.raises(FormatError, match="manifest.json: a FIFO, not a regular file"):
        runtime.load(model)


def test_a_manifest_linked_to_dev_zero_is_refused_not_read_forever(model):
    (model / "manifest.json").unlink()
    (model / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(FormatError, match="manifest.json: a device, not a regular file"):
        formats.open(model)


def test_a_manifest_that_is_a_directory_says_so(model):
    (model / "manifest.json").unlink()
    (model / "manifest.json").mkdir()
    assert validate(model).problems == [f"{model / 'manifest.json'}: a directory, not a regular file"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_rank_file_of_the_wrong_kind_is_named_as_such_not_missing(model, kind):
    (model / RANK1).unlink()
    if kind == "directory":
        (model / RANK1).mkdir()
        expected = f"{RANK1}: a directory, not a regular file"
    else:
        os.mkfifo(model / RANK1)
        expected = f"{RANK1}: a FIFO, not a regular file"
    report = json.loads(cli_run("validate", "--json", model).stdout)
    assert report["problems"] == [expected]
    with pytest.raises(FormatError, match=expected):
        runtime.load(model)


def test_an_unreadable_rank_file_is_a_problem_line_and_json_still_comes_out(pristine, unprivileged):
    as_user, folder = unprivileged
    model = shutil.copytree(pristine, folder / "model")
    model.chmod(0o755)
    for file in model.iterdir():
        file.chmod(0o644)
    (model / RANK1).chmod(0)
    result = subprocess.run([*as_user, str(BIN / "qwen3pack"), "validate", "--json", str(model)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["problems"] == [f"{RANK1}: cannot be read: Permission denied"]


# ---- sizes ---------------------------------------------------------------------------------

def test_a_sparse_rank_file_declaring_an_8_gib_header_is_refused_before_allocating(model):
    path = model / RANK0
    header_length = 8 << 30
    data_offset = file_size = header_length + 4096
    with open(path, "r+b") as f:
        prefix = bytearray(f.read(64))
        struct.pack_into("<QQQ", prefix, 24, header_length, data_offset, file_size)
        f.seek(0)
        f.write(prefix)
        f.truncate(file_size)  # sparse: no disk used
    expected = f"{RANK0}: header_length {header_length} is more than the {MAX_JSON_BYTES} bytes a reader accepts"
    with pytest.raises(FormatError, match=expected):
        formats.open(model)
    assert validate(model).problems == [expected]


def test_a_huge_sparse_manifest_is_refused_by_its_size(model):
    with open(model / "manifest.json", "r+b") as f:
        f.truncate(1 << 40)
    with pytest.raises(FormatError, match=f"manifest.json: larger than {MAX_JSON_BYTES} bytes"):
        formats.open(model)


def test_a_manifest_claiming_400k_layers_fails_fast_on_the_layer_limit(model):
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["model"]["num_hidden_layers"] = 400_000
    manifest["model"]["layer_types"] = ["full_attention"] * 400_000
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="model.num_hidden_layers: 400000 is greater than the maximum of 1024"):
        formats.open(model)


def test_nan_and_infinity_are_not_json(model):
    text = (model / "manifest.json").read_text()
    (model / "manifest.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    with pytest.raises(FormatError, match="manifest.json: not valid JSON: NaN is not a JSON value"):
        formats.open(model)


# ---- offsets -------------------------------------------------------------------------------

def test_an_offset_near_2_to_the_63_is_one_problem_line_in_text_and_json(model):
    header = header_of(model / RANK1)
    header["tensors"][0]["offset"] = 2 ** 63 - 64
    reseal(model / RANK1, header)
    expected = (f"{RANK1}: tensor {EMBED}: bytes [{2 ** 63 - 64}, {2 ** 63 - 64 + header['tensors'][0]['nbytes']}) "
                f"lie outside the file ({(model / RANK1).stat().st_size} bytes)")
    result = cli_run("validate", "--json", model)  # the full check: no attempt to read those bytes
    assert result.returncode == 1 and json.loads(result.stdout)["problems"] == [expected]
    result = cli_run("validate", model)
    assert result.returncode == 1 and result.stdout.splitlines() == [expected]
    assert "Traceback" not in result.stderr


def test_one_bad_offset_gives_one_line_not_a_cascade_of_overlaps(model):
    header = header_of(model / RANK0)
    records = header["tensors"]
    records[3]["offset"] = records[-2]["offset"]  # inside the file, on top of a later tensor
    reseal(model / RANK0, header)
    assert records[3]["offset"] + records[3]["nbytes"] <= (model / RANK0).stat().st_size
    assert validate(model, quick=True).problems == [
        f"{RANK0}: tensor {records[4]['name']}: offset {records[4]['offset']} overlaps tensor {records[3]['name']} "
        f"(bytes [{records[3]['offset']}, {records[3]['offset'] + records[3]['nbytes']})) or comes before it"]


def test_a_record_moved_past_the_end_is_reported_once(model):
    header = header_of(model / RANK0)
    header["tensors"][2]["offset"] = 1 << 50
    reseal(model / RANK0, header)
    problems = validate(model).problems
    assert len(problems) == 1 and "lie outside the file" in problems[0], problems


# ---- the text files a loaded model reads ----------------------------------------------------

@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_a_tokenizer_file_that_is_a_fifo_is_refused_at_load_without_hanging(model, name):
    (model / name).unlink(missing_ok=True)
    os.mkfifo(model / name)
    with pytest.raises(FormatError, match=f"{name}: a FIFO, not a regular file"):
        runtime.load(model, threads=1)


def test_a_huge_sparse_tokenizer_is_refused_by_its_size(model):
    with open(model / "tokenizer.json", "r+b") as f:
        f.truncate(1 << 40)
    with pytest.raises(FormatError, match=f"tokenizer.json: larger than {MAX_JSON_BYTES} bytes"):
        runtime.load(model, threads=1)


def test_a_tokenizer_config_that_is_not_json_names_the_file(model):
    (model / "tokenizer_config.json").write_text('{"chat_template": NaN}')
    with pytest.raises(FormatError, match="tokenizer_config.json: not valid JSON: NaN is not a JSON value"):
        runtime.load(model, threads=1)
