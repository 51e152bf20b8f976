"""One set of model rules: what the converter accepts, `validate` accepts and the C++ loader
accepts are the same models. Each hostile model is refused by all three, each naming the field."""
import copy
import json
import math
import shutil

import pytest

from qwen3pack import _core, formats, runtime, validate
from qwen3pack.convert import ConfigError, convert
from qwen3pack.convert.hf_config import normalize_config
from qwen3pack.testing import DEFAULT_CONFIG, make_checkpoint

YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}}

# (case, config.json changes, model object changes, what the converter says, what validate says,
#  what the loader says). Model object changes are (path, value) pairs into the manifest's model.
CASES = [
    ("rope_theta_1", {"rope_theta": 1.0}, [(("rope", "theta"), 1.0)],
     "rope_theta: 1.0 is less than or equal to the minimum of 1", "model.rope.theta", "rope theta must be > 1"),
    ("rope_theta_below_1", {"rope_theta": 0.5}, [(("rope", "theta"), 0.5)],
     "rope_theta: 0.5 is less than or equal to the minimum of 1", "model.rope.theta", "rope theta must be > 1"),
    ("rms_norm_eps_0", {"rms_norm_eps": 0}, [(("rms_norm_eps",), 0.0)],
     "rms_norm_eps: 0 is less than or equal to the minimum of 0", "model.rms_norm_eps", "rms_norm_eps must be"),
    ("rms_norm_eps_infinite", {"rms_norm_eps": math.inf}, [(("rms_norm_eps",), 1e400)],
     "model.rms_norm_eps = inf, which is not a finite number", "not valid JSON", "rms_norm_eps must be"),
    ("yarn_factor_infinite", {"rope_scaling": {**YARN["rope_scaling"], "factor": math.inf}},
     [(("rope", "factor"), 1e400)],
     "model.rope.factor = inf, which is not a finite number", "not valid JSON", "rope factor must be >= 1"),
    ("yarn_factor_below_1", {"rope_scaling": {**YARN["rope_scaling"], "factor": 0.5}}, [(("rope", "factor"), 0.5)],
     "rope_scaling.factor: 0.5 is less than the minimum of 1", "model.rope.factor", "rope factor must be >= 1"),
    ("hidden_size_beyond_int64_products", {"hidden_size": 2 ** 40}, [(("hidden_size",), 2 ** 40)],
     "hidden_size: 1099511627776 is greater than the maximum of 16777216", "model.hidden_size",
     "hidden_size = 1099511627776 is out of range"),
    ("ten_million_layers", {"num_hidden_layers": 10 ** 7}, [(("num_hidden_layers",), 10 ** 7)],
     "num_hidden_layers: 10000000 is greater than the maximum of 1024", "model.num_hidden_layers",
     "num_hidden_layers = 10000000 is out of range [1, 1024]"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    convert(make_checkpoint(root / "source", **YARN), root / "out", tp=2)
    return root / "out"


def set_path(model, path, value):
    node = model
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


@pytest.mark.parametrize("case,config_changes,model_changes,by_converter,by_validate,by_loader", CASES,
                         ids=[c[0] for c in CASES])
def test_the_converter_refuses_it_naming_the_config_field(case, config_changes, model_changes, by_converter,
                                                          by_validate, by_loader):
    raw = {**DEFAULT_CONFIG, **YARN, **config_changes}
    with pytest.raises(ConfigError, match=f"config.json: .*{_escape(by_converter)}"):
        normalize_config(raw)


@pytest.mark.parametrize("case,config_changes,model_changes,by_converter,by_validate,by_loader", CASES,
                         ids=[c[0] for c in CASES])
def test_validate_refuses_it_naming_the_model_field(pristine, tmp_path, case, config_changes, model_changes,
                                                   by_converter, by_validate, by_loader):
    shutil.copytree(pristine, tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    for field, value in model_changes:
        set_path(manifest["model"], field, value)
    text = json.dumps(manifest).replace("Infinity", "1e400")  # how a hostile writer spells inf
    path.write_text(text)
    problems = validate(tmp_path / "m").problems
    assert len(problems) == 1 and by_validate in problems[0], problems
    with pytest.raises(formats.FormatError):
        runtime.load(tmp_path / "m")


@pytest.mark.parametrize("case,config_changes,model_changes,by_converter,by_validate,by_loader", CASES,
                         ids=[c[0] for c in CASES])
def test_the_cpp_loader_refuses_it_naming_the_rule(pristine, case, config_changes, model_changes, by_converter,
                                                   by_validate, by_loader):
    converted = formats.open(pristine)
    model, layout = copy.deepcopy(converted.model), copy.deepcopy(converted.layout)
    for field, value in model_changes:
        set_path(model, field, float("inf") if value == 1e400 else value)
    with pytest.raises(_core.FormatError, match=_escape(by_loader)):
        _core.Engine(model, layout, runtime.model.rank_sources(converted), 1, 64, False)


def test_the_pristine_model_passes_all_three(pristine):
    assert validate(pristine).ok
    with runtime.load(pristine, threads=1) as m:
        assert m.config["rope"]["type"] == "yarn"


def _escape(text):
    import re
    return re.escape(text)
