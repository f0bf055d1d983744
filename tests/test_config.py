"""params.yaml -> one validated, typed object; errors name the file and parameter."""

import copy

import pytest
import yaml

from spamlora.config import Params, ParamsError, load_params

from .conftest import REPO


@pytest.fixture
def raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_repositorys_params_are_valid_and_match_the_recipe():
    params = load_params(REPO / "params.yaml")
    assert (params.lora.rank, params.lora.alpha, params.train.epochs) == (8, 8.0, 2)
    assert (params.train.lr, params.train.weight_decay, params.train.seed) == (8e-4, 0.1, 123)
    assert (params.data.seed, params.data.train_frac, params.data.val_frac) == (123, 0.7, 0.1)
    assert params.model.base_url == ("https://huggingface.co/openai-community/gpt2/resolve/"
                                     "607a30d783dfa663caf39e06633721c8d4cfcd7e")
    assert params.flat()["lora.rank"] == 8


@pytest.mark.parametrize("path, value, message", [
    ("data.train_frac", 1.5, r"data\.train_frac must lie in \(0, 1\)"),
    ("data.val_frac", 0.4, r"data\.val_frac train_frac \+ val_frac must be < 1"),
    ("data.url", "ftp://example.org/x.zip", r"data\.url must be an http/https/file URL"),
    ("data.mirrors", ["gopher://x"], r"data\.mirrors\[0\] must be"),
    ("data.sha256", "abc", r"data\.sha256 must be 64 hex digits"),
    ("data.on_bad_line", "ignore", r"data\.on_bad_line must be 'error' or 'skip'"),
    ("lora.rank", "eight", r"lora\.rank must be int, got 'eight'"),
    ("lora.rank", 0, r"lora\.rank must be >= 1"),
    ("lora.targets", ["query", "c_attn"], r"lora\.targets unknown target\(s\) \['c_attn'\]"),
    ("train.lr", -1, r"train\.lr must be > 0"),
    ("train.epochs", 1.5, r"train\.epochs must be int"),
    ("train.group_by_length", "yes", r"train\.group_by_length must be bool"),
    ("train.padding", "ragged", r"train\.padding must be packed, batch or max_length"),
    ("lora.init", "xavier", r"lora\.init must be one of \['textbook', 'reference'\]"),
    ("data.dedupe", "yes", r"data\.dedupe must be bool"),
    ("train.precision", "fp16", r"train\.precision must be auto, fp32 or bf16"),
    ("model.name", "gpt3", r"model\.name must be one of"),
    ("train.checkpoint_seconds", -5, r"train\.checkpoint_seconds must be >= 0"),
    ("train.trainable", "lora_alternative",
     r"train\.trainable must be one of \['lora', 'all', 'last_block', 'last_two_blocks', "
     r"'last_layer'\], got 'lora_alternative'$"),
    ("train.trainable", None, r"train\.trainable must be str, got None"),
    ("model.weights", "untrained",
     r"model\.weights must be one of \['pretrained', 'random'\], got 'untrained'$"),
    ("train.max_length", "longest",
     r"train\.max_length must be null, model or an integer >= 1, got 'longest'$"),
    ("train.max_length", 0, r"train\.max_length must be null, model or an integer >= 1"),
    ("train.token", "flexible",
     r"train\.token must be one of \['last', 'first', 'mean'\], got 'flexible'$"),
])
def test_bad_values_are_named(raw, path, value, message):
    bad = copy.deepcopy(raw)
    section, key = path.split(".")
    bad[section][key] = value
    with pytest.raises(ParamsError, match=rf"^params\.yaml: {message}"):
        Params.from_dict(bad, source="params.yaml")


def test_missing_and_unknown_keys(raw):
    bad = copy.deepcopy(raw)
    del bad["train"]["lr"]
    with pytest.raises(ParamsError, match=r"missing parameter train\.lr"):
        Params.from_dict(bad, source="params.yaml")
    bad = copy.deepcopy(raw)
    bad["train"]["learning_rate"] = 0.1
    with pytest.raises(ParamsError, match=r"unknown parameter\(s\) train\.learning_rate"):
        Params.from_dict(bad)
    bad = copy.deepcopy(raw)
    del bad["lora"]
    with pytest.raises(ParamsError, match="missing section lora"):
        Params.from_dict(bad)


def test_yaml_11_exponent_without_dot_is_still_a_float(raw):
    raw["train"]["lr"] = "8e-4"  # what PyYAML makes of `lr: 8e-4`
    assert Params.from_dict(raw).train.lr == 8e-4


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_lora_init_defaults_to_the_reference_initialisation():
    """Decided (issue 24): a rank experiment compares capacity, not step size."""
    from spamlora.config import LoRAParams
    from spamlora.lora import LoRALayer

    assert load_params(REPO / "params.yaml").lora.init == "reference"
    assert LoRAParams().init == "reference"
    assert LoRALayer(768, 768, 2, alpha=8).A.abs().max() <= 1 / 768 ** 0.5


@pytest.mark.parametrize("key, value", [("train.trainable", "everything"),
                                        ("train.token", "middle"),
                                        ("model.weights", "noise")])
def test_a_bad_mode_stops_a_stage_before_any_work(raw, tmp_path, capsys, key, value):
    from spamlora import stage

    section, name = key.split(".")
    raw[section][name] = value
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    ran = []
    with pytest.raises(SystemExit) as e:
        stage.run(ran.append, str(params_file))
    assert e.value.code == 1 and ran == []
    assert f"error: {params_file}: {key} must be one of [" in capsys.readouterr().err


def test_the_modes_default_to_todays_lora_on_the_last_token():
    params = load_params(REPO / "params.yaml")
    assert (params.train.trainable, params.train.token) == ("lora", "last")


def test_max_length_model_is_the_models_context(raw):
    from spamlora.batching import resolve_max_length

    raw["train"]["max_length"] = "model"
    setting = Params.from_dict(raw).train.max_length
    assert resolve_max_length(setting, longest=120, context=1024) == 1024
    assert resolve_max_length(None, longest=120, context=1024) == 120
    assert resolve_max_length(64, longest=120, context=1024) == 64
    assert resolve_max_length(4096, longest=120, context=1024) == 1024
