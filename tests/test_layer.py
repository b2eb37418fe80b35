"""``InfoSteerLayer``: the interventions on the key coefficients, identity at init, and the gain's precision."""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import build, steering_layers

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerLayer

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 11, 30], [9, 9, 31, 77, 4, 100, 56, 23, 7, 81]])


def test_gain_is_trainable_and_a_step_along_the_regularizer_raises_flux():
    model = build(100.0, lora=None)
    gains = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(gains) == 3 and all(p.shape == (64,) and p.dtype == torch.float32 for p in gains)
    model(input_ids=IDS, labels=IDS)
    before = peft_infosteer.last_flux(model)
    # the gradient of the task loss alone, and with the regularizer
    plain = build(0.0, lora=None)
    plain(input_ids=IDS, labels=IDS).loss.backward()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
            if p.requires_grad:
                p -= 0.05 * (p.grad - q.grad) / (p.grad - q.grad).norm()  # the regularizer's own direction
    model(input_ids=IDS, labels=IDS)
    assert peft_infosteer.last_flux(model) > before


def test_identity_at_init_and_disable_adapter(tiny):
    base = tiny("llama")
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)
        for layer in steering_layers(model):
            for gain in layer.infosteer_gain.values():
                gain.uniform_(0.5, 1.5)
        assert not torch.allclose(model(IDS).logits, reference)
        with model.disable_adapter():
            assert torch.equal(model(IDS).logits, reference)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_flatten_identity_at_zero_strength(tiny, model_type):
    base = tiny(model_type)
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_peft_model(tiny(model_type), InfoSteerConfig(intervention="flatten", flatten_strength=0.0))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)
    model = get_peft_model(tiny(model_type), InfoSteerConfig(intervention="flatten", flatten_strength=0.5))
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, reference)


@pytest.mark.real_model
def test_flatten_raises_mean_flux_on_real_text(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = [
        "The mitochondria is the powerhouse of the cell, and it turns nutrients into energy.",
        "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on mountains.",
    ]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    flux = {}
    for strength in (0.0, 0.3):
        with pytest.warns(UserWarning, match="nothing to train"):
            model = get_peft_model(base, InfoSteerConfig(intervention="flatten", flatten_strength=strength))
        with torch.no_grad(), peft_infosteer.track_flux(model):
            model(**batch)
        flux[strength] = peft_infosteer.last_flux(model)
        base = model.unload()
    assert 0.0 < flux[0.0] < flux[0.3] <= 1.0, flux


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_in_and_out_features_of_the_wrapped_projection(tiny, model_type):
    model = get_peft_model(tiny(model_type), InfoSteerConfig(lora=LoraConfig(r=2, target_modules="all-linear")))
    layers = [m for m in model.modules() if isinstance(m, InfoSteerLayer)]
    assert layers and all((layer.in_features, layer.out_features) == (64, 32) for layer in layers)


def test_gains_stay_float32_when_something_casts_them(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL does to trainable parameters on quantized bases
    with pytest.warns(UserWarning, match="training it in float32"):
        model(input_ids=IDS, labels=IDS).loss.backward()
    gains = [p for n, p in model.named_parameters() if "infosteer_gain" in n]
    assert all(g.dtype == torch.float32 and g.grad.dtype == torch.float32 for g in gains)
    optimizer.step()  # the optimizer still holds the same parameter objects
    assert all(not torch.equal(g, torch.ones_like(g)) for g in gains)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_identity_at_init(tiny, dtype):
    base = tiny("llama").to(dtype)
    with torch.no_grad():
        reference = base(input_ids=IDS).logits
    config = InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"]))
    model = get_peft_model(tiny("llama").to(dtype), config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference)


def test_safe_merge_reports_nan_like_peft(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    with torch.no_grad():
        steering_layers(model)[0].infosteer_gain["default"][0] = float("nan")
    message = "NaNs detected in the merged weights. The adapter default seems to be broken"  # PEFT's own words
    with pytest.raises(ValueError, match=re.escape(message)):
        model.merge_adapter(safe_merge=True)
