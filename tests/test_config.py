"""``InfoSteerConfig``: validation in code and on disk, JSON round trip, safetensors only."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from peft_infosteer import InfoSteerConfig
from peft_infosteer._registration import INFOSTEER

BAD_VALUES = [
    ("intervention", "scale"),
    ("intervention", None),
    ("usage", "entropy"),
    ("usage", 1),
    ("entropy_weight", -0.1),
    ("entropy_weight", "0.1"),
    ("entropy_weight", float("nan")),
    ("entropy_weight", float("inf")),
    ("entropy_weight", True),
    ("entropy_weight", None),
    ("flatten_strength", -0.01),
    ("flatten_strength", 1.5),
    ("flatten_strength", "0.5"),
    ("usage_temperature", 0.0),
    ("usage_temperature", -1.0),
    ("usage_temperature", "1"),
    ("lora", 5),
    ("lora", "r=8"),
    ("elevate_fraction", 0.0),
    ("elevate_fraction", 1.0),
    ("elevate_fraction", -0.01),
    ("elevate_fraction", float("nan")),
    ("elevate_fraction", "0.01"),
    ("elevate_fraction", True),
    ("elevate_scale", -1.0),
    ("elevate_scale", float("nan")),
    ("elevate_scale", float("inf")),
    ("elevate_scale", "2"),
    ("elevate_scale", None),
    ("elevate_rank", "abs"),
    ("elevate_rank", None),
    ("elevate_at_inference", "yes"),
    ("elevate_at_inference", 1),
    ("max_entropy_weight", 0.0),
    ("max_entropy_weight", float("inf")),
]


def test_defaults():
    config = InfoSteerConfig()
    assert config.peft_type is INFOSTEER
    # the paper's method: its intervention with p = 1%, alpha = 1; the regularizer (lambda) off
    assert (config.entropy_weight, config.usage, config.usage_temperature) == (0.0, "abs", 1.0)
    assert (config.intervention, config.flatten_strength, config.lora) == ("elevate", 0.2, None)
    assert (config.elevate_fraction, config.elevate_scale, config.elevate_rank) == (0.01, 1.0, "magnitude")
    assert config.elevate_at_inference is True and not config.is_mergeable
    assert config.max_entropy_weight == 100.0 and config.lambda_in_paper_units
    assert config.target_modules is None
    # fields PEFT and TRL read by attribute
    for name in ("modules_to_save", "trainable_token_indices", "target_parameters", "layers_to_transform"):
        assert hasattr(config, name)


@pytest.mark.parametrize(("field_name", "value"), BAD_VALUES)
def test_bad_value_raises_naming_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        InfoSteerConfig(**{field_name: value})


def test_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"'elevate', 'none', 'gain', 'flatten'"):
        InfoSteerConfig(intervention="scale")
    with pytest.raises(ValueError, match=r"'abs', 'softmax'"):
        InfoSteerConfig(usage="entropy")
    with pytest.raises(ValueError, match=r"'magnitude', 'value'"):
        InfoSteerConfig(elevate_rank="abs")


def test_lora_must_describe_lora():
    with pytest.raises(ValueError, match="lora"):
        InfoSteerConfig(lora={"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match=r"lora.*bogus_key"):
        InfoSteerConfig(lora={"r": 4, "bogus_key": 1})


def test_edge_values_are_accepted():
    InfoSteerConfig(intervention="flatten", entropy_weight=0, flatten_strength=0)
    InfoSteerConfig(
        intervention="flatten", entropy_weight=2, flatten_strength=1, usage="softmax", usage_temperature=1e-3
    )
    InfoSteerConfig(elevate_fraction=1e-9, elevate_scale=0, elevate_rank="value", elevate_at_inference=False)
    InfoSteerConfig(elevate_fraction=0.999, elevate_scale=5)


@pytest.mark.parametrize("intervention", ["none", "gain", "flatten"])
@pytest.mark.parametrize(
    ("field_name", "value"),
    [("elevate_fraction", 0.02), ("elevate_scale", 2.0), ("elevate_rank", "value"), ("elevate_at_inference", False)],
)
def test_elevate_fields_with_another_intervention_raise_naming_the_field(intervention, field_name, value):
    with pytest.raises(ValueError, match=rf"{field_name}.*intervention='elevate'") as info:
        InfoSteerConfig(intervention=intervention, **{field_name: value})
    assert str(info.value).count("\n") == 0 and repr(intervention) in str(info.value)
    InfoSteerConfig(intervention=intervention, **{field_name: getattr(InfoSteerConfig(), field_name)})  # default: ok


def test_mergeable_interventions():
    assert InfoSteerConfig(intervention="gain").is_mergeable and InfoSteerConfig(intervention="none").is_mergeable
    assert not InfoSteerConfig(intervention="flatten").is_mergeable
    assert not InfoSteerConfig().is_mergeable
    assert InfoSteerConfig(elevate_at_inference=False).is_mergeable


def test_lora_round_trips_through_dict_and_json(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True)
    config = InfoSteerConfig(intervention="gain", entropy_weight=0.3, lora=lora, task_type="CAUSAL_LM")
    data = config.to_dict()
    assert data["peft_type"] == "INFOSTEER"
    assert isinstance(data["lora"], dict)
    assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    text = json.dumps(data)  # JSON-ready
    assert config.lora is lora  # to_dict leaves the config intact

    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["lora"]["r"] == 4 and on_disk["lora"]["use_rslora"] is True
    assert on_disk["infosteer_version"]
    for loaded in (InfoSteerConfig.from_pretrained(tmp_path), PeftConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, InfoSteerConfig)
        assert isinstance(loaded.lora, LoraConfig)
        assert loaded.lora.r == 4 and loaded.lora.lora_alpha == 8 and loaded.lora.lora_dropout == 0.05
        assert loaded.lora.use_rslora is True
        assert set(loaded.lora.target_modules) == {"q_proj", "v_proj"}
        assert loaded.entropy_weight == 0.3 and loaded.intervention == "gain"
        assert json.dumps(loaded.to_dict()) == text


def _saved_adapter(tmp_path, tiny, **config_kwargs):
    config_kwargs.setdefault("intervention", "gain")
    model = get_peft_model(tiny("llama"), InfoSteerConfig(**config_kwargs))
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("entropy_weight", -1),
        ("intervention", "boost"),
        ("usage", "l2"),
        ("flatten_strength", 2.0),
        ("lora", 3),
        ("elevate_fraction", 1.5),
        ("elevate_scale", -2),
        ("elevate_rank", "max"),
    ],
)
def test_bad_value_on_disk_raises_on_load(tmp_path, tiny, field_name, value):
    intervention = "elevate" if field_name.startswith("elevate") else "gain"  # the field's own intervention
    path = _saved_adapter(tmp_path, tiny, intervention=intervention, lora=LoraConfig(r=2, target_modules=["q_proj"]))
    data = json.loads((path / "adapter_config.json").read_text())
    data[field_name] = value
    (path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=field_name):
        PeftConfig.from_pretrained(path)
    with pytest.raises(ValueError, match=field_name):
        PeftModel.from_pretrained(tiny("llama"), path)


def test_unknown_or_truncated_config_on_disk_raises(tmp_path, tiny):
    path = _saved_adapter(tmp_path, tiny)
    data = json.loads((path / "adapter_config.json").read_text())
    data["entropy_wieght"] = 0.5  # a typo must not silently fall back to the default
    (path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="entropy_wieght"):
        PeftModel.from_pretrained(tiny("llama"), path)
    (path / "adapter_config.json").write_text(json.dumps(data)[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        InfoSteerConfig.from_pretrained(path)


def test_pickled_weights_load_exactly_with_weights_only(tmp_path, tiny):
    """``save_pretrained(safe_serialization=False)`` writes adapter_model.bin; PEFT reads it with weights_only=True."""
    model = get_peft_model(tiny("llama"), InfoSteerConfig(lora=LoraConfig(r=2, target_modules="all-linear")))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
        expected = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=torch.tensor([[5, 6, 7, 8]])).logits, expected)


def test_default_targets_are_filled_per_architecture(tiny):
    config = InfoSteerConfig(intervention="gain")
    get_peft_model(tiny("gpt2"), config)
    assert set(config.target_modules) == {"mlp.c_proj"}
