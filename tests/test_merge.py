"""``merge_and_unload`` / ``merge_adapter``: gain and nested LoRA folded into plain transformers weights."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from peft_infosteer import InfoSteerConfig

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])
# LoRA on the output projection too: the nested case PEFT's default unload would silently drop
LORA_TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}


def _randomise(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * 0.3
                p.copy_(1.0 + noise if "infosteer_gain" in name else noise)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _adapter(tiny, model_type: str, **kwargs):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_type], fan_in_fan_out=model_type == "gpt2")
    config = InfoSteerConfig(intervention="gain", lora=lora, **kwargs)
    model = get_peft_model(tiny(model_type), config)
    _randomise(model)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_and_unload_gives_plain_model_with_same_logits(tiny, model_type):
    base_logits = _logits(tiny(model_type))
    model = _adapter(tiny, model_type)
    expected = _logits(model)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really does something
    merged = model.merge_and_unload()
    assert isinstance(merged, PreTrainedModel) and type(merged).__name__ == type(tiny(model_type)).__name__
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in n or "infosteer_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    proj = merged.get_submodule(
        "model.layers.0.mlp.down_proj" if model_type == "llama" else "transformer.h.0.mlp.c_proj"
    )
    assert type(proj) is (nn.Linear if model_type == "llama" else Conv1D)
    # same parameter names as the base model: loadable by plain transformers
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in tiny(model_type).named_parameters()}
    assert (_logits(merged) - expected).abs().max() <= 1e-4


def test_merged_model_saves_and_loads_with_plain_transformers(tiny, tmp_path):
    model = _adapter(tiny, "llama")
    expected = _logits(model)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (_logits(reloaded) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(tiny, model_type):
    model = _adapter(tiny, model_type)
    expected = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.merged for m in layers)
    assert (_logits(model) - expected).abs().max() <= 1e-4
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert any("down_proj" in n or "mlp.c_proj" in n for n in changed)
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-5, rtol=1e-5)
    assert (_logits(model) - expected).abs().max() <= 1e-5
    # disabling a merged adapter unmerges it and gives the base outputs back
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(tiny(model_type)), atol=1e-5, rtol=1e-5)


def test_unload_without_merge_restores_the_base(tiny):
    base_logits = _logits(tiny("llama"))
    model = _adapter(tiny, "llama")
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert torch.equal(_logits(plain), base_logits)


def test_merging_flatten_raises(tiny):
    model = get_peft_model(
        tiny("llama"), InfoSteerConfig(intervention="flatten", flatten_strength=0.2, entropy_weight=0)
    )
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="flatten"):
            merge()
    # nothing was changed by the refused merge
    assert all(not m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_merging_on_a_4bit_base_raises(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    model = get_peft_model(
        base, InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"]))
    )
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="4-bit"):
            merge()
