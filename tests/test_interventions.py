"""Forward interventions (gain, flatten), the flux regularizer and its token mask, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerLayer, information_flux, infosteer_loss, last_flux

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 11, 30], [9, 9, 31, 77, 4, 100, 56, 23, 7, 81]])


def _steer_layers(model) -> list[InfoSteerLayer]:
    return [m for m in model.modules() if isinstance(m, InfoSteerLayer)]


def _capture_keys(model) -> tuple[list[torch.Tensor], list]:
    """Record what each steering layer passes on to its base layer (k after the intervention)."""
    keys: list[torch.Tensor] = []
    handles = [
        layer.base_layer.register_forward_pre_hook(lambda _m, args: keys.append(args[0].detach()))
        for layer in _steer_layers(model)
    ]
    return keys, handles


class _DDPLike(nn.Module):
    """What accelerate / DDP put around the model: the real one lives in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _randomise_gains(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _steer_layers(model):
            for gain in layer.infosteer_gain.values():
                gain.copy_(0.5 + torch.rand(gain.shape, generator=g))


def test_gain_is_trainable_and_gets_gradient(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.5))
    model.train()
    gains = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(gains) == 2 and all(p.shape == (64,) for p in gains)
    out = model(IDS, labels=IDS)
    (task_grads) = torch.autograd.grad(out.loss, gains, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in task_grads)
    aux_grads = torch.autograd.grad(infosteer_loss(model), gains)
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in aux_grads)
    # a step against the regularizer gradient raises the flux
    before = last_flux(model)
    with torch.no_grad():
        for p, g in zip(gains, aux_grads):
            p -= 50.0 * g
    model(IDS, labels=IDS)
    assert last_flux(model) > before


def test_gain_changes_outputs_when_moved(tiny):
    base = tiny("llama")
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    _randomise_gains(model)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, reference)
        with model.disable_adapter():
            assert torch.equal(model(IDS).logits, reference)


def test_flatten_identity_at_zero_strength(tiny):
    for model_type in ("llama", "gpt2"):
        base = tiny(model_type)
        with torch.no_grad():
            reference = base(IDS).logits
        model = get_peft_model(
            tiny(model_type), InfoSteerConfig(intervention="flatten", flatten_strength=0.0, entropy_weight=0.0)
        )
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, reference)
        model = get_peft_model(
            tiny(model_type), InfoSteerConfig(intervention="flatten", flatten_strength=0.5, entropy_weight=0.0)
        )
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
        model = get_peft_model(
            base, InfoSteerConfig(intervention="flatten", flatten_strength=strength, entropy_weight=0.0)
        )
        with torch.no_grad():
            model(**batch)
        flux[strength] = last_flux(model)
        base = model.unload()
    assert 0.0 < flux[0.0] < flux[0.3] <= 1.0, flux


def test_entropy_weight_without_anything_trainable_says_what_to_enable(tiny):
    for intervention in ("none", "flatten"):
        with pytest.raises(ValueError, match="entropy_weight") as info:
            get_peft_model(tiny("llama"), InfoSteerConfig(intervention=intervention, entropy_weight=0.1))
        message = str(info.value)
        assert "intervention='gain'" in message and "lora=LoraConfig" in message
    # each of these makes the regularizer meaningful
    get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.1))
    get_peft_model(tiny("llama"), InfoSteerConfig(entropy_weight=0.1, lora=LoraConfig(r=2, target_modules=["up_proj"])))
    get_peft_model(tiny("llama"), InfoSteerConfig(intervention="flatten", entropy_weight=0.0))


def test_infosteer_loss_is_zero_without_weight(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.0))
    model.train()
    model(IDS, labels=IDS)
    loss = infosteer_loss(model)
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0
    assert last_flux(model) > 0  # the flux is still measured


@pytest.mark.parametrize("wrap", [False, True])
def test_infosteer_loss_equals_minus_lambda_flux_and_has_grad(tiny, wrap):
    weight = 0.37
    peft_model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=weight))
    peft_model.train()
    model = _DDPLike(peft_model) if wrap else peft_model
    model(input_ids=IDS, labels=IDS)
    loss = infosteer_loss(model)
    assert loss.requires_grad and loss.grad_fn is not None
    flux = last_flux(model)
    assert 0.0 < flux < 1.0
    assert loss.item() == pytest.approx(-weight * flux, rel=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in peft_model.parameters() if p.requires_grad)
    with pytest.raises(TypeError, match="InfoSteer"):
        last_flux(_DDPLike(tiny("llama")))


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_each_forward_starts_a_fresh_record(tiny, task_type):
    """PeftModel (no task_type) and generate() call the wrapped model directly: records must still be per forward."""
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", task_type=task_type))
    recorder = model.base_model.flux_recorder
    with torch.no_grad():
        model(input_ids=IDS)
        first = last_flux(model)
        model(input_ids=IDS[:1])
        # two layers, one sequence: only this forward's tokens are counted
        assert len(recorder.records) == 2 and recorder.totals()[1].item() == 2 * IDS.shape[1]
        model(input_ids=IDS)
        assert last_flux(model) == first
        model.generate(input_ids=IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        # the last generation step sees one new token per sequence
        assert len(recorder.records) == 2 and recorder.totals()[1].item() == 2
    # the plain model handed back by unload() no longer reports to the tuner
    plain = model.unload()
    recorder.clear()
    with torch.no_grad():
        plain(input_ids=IDS)
    assert recorder.records == [] and not plain._forward_pre_hooks


def _manual_flux(keys: list[torch.Tensor], mask: torch.Tensor | None) -> float:
    total, count = 0.0, 0.0
    for k in keys:
        flux = information_flux(k)  # (batch, seq)
        weight = torch.ones_like(flux) if mask is None else mask.float()
        total += float((flux * weight).sum())
        count += float(weight.sum())
    return total / count


def test_token_mask_follows_labels_then_attention_mask(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.2))
    _randomise_gains(model)
    keys, handles = _capture_keys(model)
    labels = IDS.clone()
    labels[0, :6] = -100  # prompt tokens
    labels[1, :3] = -100
    labels[1, -1] = -100
    attention_mask = torch.ones_like(IDS)
    attention_mask[1, -3:] = 0
    # position t counts when the prediction of token t+1 is in the loss
    label_mask = torch.zeros_like(IDS, dtype=torch.bool)
    label_mask[:, :-1] = labels[:, 1:] != -100
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=attention_mask, labels=labels)
        with_labels = last_flux(model)
        assert with_labels == pytest.approx(_manual_flux(keys, label_mask), rel=1e-6)
        keys.clear()
        model(input_ids=IDS, attention_mask=attention_mask)
        assert last_flux(model) == pytest.approx(_manual_flux(keys, attention_mask.bool()), rel=1e-6)
        keys.clear()
        model(input_ids=IDS)
        assert last_flux(model) == pytest.approx(_manual_flux(keys, None), rel=1e-6)
    for handle in handles:
        handle.remove()
    # the masks really select different tokens
    assert _manual_flux(keys, label_mask) != pytest.approx(_manual_flux(keys, None), rel=1e-6)
    # and the loss uses the same mean
    model.train()
    model(input_ids=IDS, labels=labels)
    assert infosteer_loss(model).item() == pytest.approx(-0.2 * last_flux(model), rel=1e-6)


def test_nothing_counted_gives_none_and_zero_loss(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.2))
    model.train()
    model(input_ids=IDS, labels=torch.full_like(IDS, -100))
    assert last_flux(model) is None
    loss = infosteer_loss(model)
    assert loss.item() == 0.0 and torch.isfinite(loss)


def _aux_grads(model, gains) -> list[torch.Tensor]:
    out = model(input_ids=IDS, labels=IDS)
    aux = infosteer_loss(model)
    grads = torch.autograd.grad(out.loss + aux, gains)
    return [g.clone() for g in grads]


def test_non_reentrant_checkpointing_gives_the_same_gradient(tiny):
    config = InfoSteerConfig(intervention="gain", entropy_weight=0.5, lora=LoraConfig(r=2, target_modules=["up_proj"]))
    model = get_peft_model(tiny("llama"), config)
    _randomise_gains(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = _aux_grads(model, params)
    recorder = model.base_model.flux_recorder
    assert len(recorder.records) == 2

    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    in_backward = []
    for layer in _steer_layers(model):
        # a pre-hook: recomputation stops early, inside the layer, once it has what backward needs
        layer.register_forward_pre_hook(lambda *_: in_backward.append(torch._C._current_graph_task_id() != -1))
    checkpointed = _aux_grads(model, params)
    assert in_backward == [False, False, True, True]  # the steered layers really were re-run during backward ...
    assert len(recorder.records) == 2  # ... without recording extra terms
    for a, b in zip(reference, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


def test_reentrant_checkpointing_raises(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.5))
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.base_model.model.enable_input_require_grads()
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        infosteer_loss(model)
    out.loss.backward()  # the task loss itself still trains
    # no regularizer, no problem
    model.base_model.peft_config["default"].entropy_weight = 0.0
    model(input_ids=IDS, labels=IDS)
    assert infosteer_loss(model).item() == 0.0


def test_public_names():
    for name in ("InfoSteerConfig", "infosteer_loss", "last_flux", "fused_information_flux"):
        assert name in peft_infosteer.__all__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_identity_and_float32_regularizer(tiny, dtype):
    base = tiny("llama").to(dtype)
    with torch.no_grad():
        reference = base(input_ids=IDS).logits
    config = InfoSteerConfig(
        intervention="gain", entropy_weight=0.3, lora=LoraConfig(r=2, target_modules=["down_proj"])
    )
    model = get_peft_model(tiny("llama").to(dtype), config)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference)
    fp32 = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", entropy_weight=0.3))
    with torch.no_grad():
        fp32(input_ids=IDS)
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    aux = infosteer_loss(model)
    assert aux.dtype == torch.float32
    assert last_flux(model) == pytest.approx(last_flux(fp32), abs=5e-3)
    (out.loss + aux).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
