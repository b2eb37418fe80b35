"""Default injection on the FFN output projection of every supported architecture (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import TINY_CONFIGS, expected_targets, tiny_model
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from peft_infosteer import FFN_OUTPUT_PROJECTIONS, InfoSteerConfig, InfoSteerLayer, default_target_modules
from peft_infosteer.architectures import MOE_MODEL_TYPES
from peft_infosteer.layer import Linear

ARCHS = sorted(TINY_CONFIGS)
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])


def _wrapped(peft_model) -> list[str]:
    return [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, InfoSteerLayer)]


def test_all_twelve_architectures_are_known():
    assert len(ARCHS) == 12
    for model_type in ARCHS:
        assert model_type in FFN_OUTPUT_PROJECTIONS


@pytest.mark.parametrize("model_type", ARCHS)
def test_identity_at_init_and_right_modules(model_type):
    base = tiny_model(model_type, num_layers=2)
    expected = expected_targets(base)
    assert len(expected) == 2
    with torch.no_grad():
        reference = base(IDS).logits
    for intervention in ("none", "gain"):
        config = InfoSteerConfig(intervention=intervention, entropy_weight=0.0 if intervention == "none" else 0.1)
        model = get_peft_model(tiny_model(model_type, num_layers=2), config)
        assert _wrapped(model) == expected
        for name in expected:
            layer = model.base_model.model.get_submodule(name)
            assert isinstance(layer, Linear)
            # the wrapped projection's input width is d_ff
            assert layer.in_features == 64
            assert not isinstance(layer.base_layer, InfoSteerLayer)
            if intervention == "gain":
                assert torch.equal(layer.infosteer_gain["default"], torch.ones(64))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if intervention == "gain":
            assert len(trainable) == 2 and all("infosteer_gain" in n for n in trainable)
        else:
            assert not trainable
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, reference), (model_type, intervention)


def test_layers_to_transform_and_custom_targets():
    model = get_peft_model(
        tiny_model("llama", num_layers=3), InfoSteerConfig(layers_to_transform=[1], entropy_weight=0)
    )
    assert _wrapped(model) == ["model.layers.1.mlp.down_proj"]
    model = get_peft_model(
        tiny_model("llama", num_layers=3),
        InfoSteerConfig(layers_to_transform=[0, 2], layers_pattern="layers", intervention="gain"),
    )
    assert _wrapped(model) == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    model = get_peft_model(
        tiny_model("gpt2", num_layers=3), InfoSteerConfig(target_modules=["h.2.mlp.c_proj"], intervention="gain")
    )
    assert _wrapped(model) == ["transformer.h.2.mlp.c_proj"]
    # a regex over full module names
    model = get_peft_model(
        tiny_model("qwen2", num_layers=3),
        InfoSteerConfig(target_modules=r".*\.(0|1)\.mlp\.down_proj", entropy_weight=0),
    )
    assert _wrapped(model) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = get_peft_model(
        tiny_model("llama"), InfoSteerConfig(exclude_modules=["model.layers.0.mlp.down_proj"], entropy_weight=0)
    )
    assert _wrapped(model) == ["model.layers.1.mlp.down_proj"]


class _NewArchConfig(LlamaConfig):
    model_type = "my_new_arch"  # what transformers reports for an architecture InfoSteer has no default for


def _new_arch_model() -> LlamaForCausalLM:
    config = _NewArchConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def test_custom_target_works_on_unknown_architecture():
    base = _new_arch_model()
    model = get_peft_model(base, InfoSteerConfig(target_modules=["down_proj"], intervention="gain"))
    assert len(_wrapped(model)) == 2


def test_unknown_model_type_without_targets_says_what_to_do():
    base = _new_arch_model()
    assert base.config.to_dict()["model_type"] == "my_new_arch"
    with pytest.raises(ValueError, match="my_new_arch") as info:
        get_peft_model(base, InfoSteerConfig(intervention="gain"))
    assert "target_modules" in str(info.value)


def test_moe_model_type_mentions_mixture_of_experts():
    assert "mixtral" in MOE_MODEL_TYPES
    with pytest.raises(ValueError, match="mixture-of-experts") as info:
        default_target_modules("mixtral")
    assert "mixtral" in str(info.value) and "target_modules" in str(info.value)
    # the same error reaches the user through get_peft_model
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="mixture-of-experts"):
        get_peft_model(AutoModelForCausalLM.from_config(config), InfoSteerConfig(intervention="gain"))


def test_non_linear_target_is_refused():
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises((TypeError, ValueError), match="linear"):
        get_peft_model(base, InfoSteerConfig(target_modules=["mlp.act_fn"], intervention="gain"))
