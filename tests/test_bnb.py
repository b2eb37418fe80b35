"""A 4-bit NF4 bitsandbytes base (CPU) trains with InfoSteer (gain or the paper's elevate) + LoRA: forward, backward,
optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners import lora

from peft_infosteer import InfoSteerConfig, infosteer_loss, last_flux
from peft_infosteer.layer import Linear as InfoSteerLinear

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("bnb_base")
    # bitsandbytes' CPU 4-bit path needs in_features >= its block size (64)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(path)
    return path


def _load_4bit(path, compute_dtype):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


@pytest.mark.parametrize("intervention", ["gain", "elevate"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_4bit_base_trains_with_infosteer_and_lora(base_dir, compute_dtype, intervention):
    from peft import prepare_model_for_kbit_training

    base = _load_4bit(base_dir, compute_dtype)
    assert base.is_loaded_in_4bit
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = InfoSteerConfig(
        intervention=intervention,
        entropy_weight=0.5,
        lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    down = model.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, InfoSteerLinear)
    assert isinstance(down.base_layer, lora.Linear4bit)
    assert isinstance(down.get_base_layer(), bnb.nn.Linear4bit)
    # what reaches layer 0's 4-bit projection, seen in the training forwards below (a no_grad forward first would
    # leave the next backward of this CPU 4-bit base without LoRA gradients before the MLP: a bitsandbytes quirk that
    # plain LoRA shows too)
    seen: list[torch.Tensor] = []
    down.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    down.get_base_layer().register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any("infosteer_gain" in n for n in trainable) == (intervention == "gain")
    assert all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)

    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        aux = infosteer_loss(model)  # the regularizer's value, for logging; its gradient is in loss.backward()
        assert not aux.requires_grad and torch.isfinite(aux)
        # the paper's -lambda * sum over the 2 steered layers of the mean entropy (nats): H = flux * log(d_ff = 128)
        assert aux.item() == pytest.approx(-0.5 * 2 * math.log(128) * last_flux(model), rel=1e-5)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in trainable.items()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert all(grads[n].abs().sum() > 0 for n in trainable if "infosteer_gain" in n or "lora_B" in n)
        optimizer.step()
        losses.append(loss.item())
        keys, reached = seen[-2:]
        if intervention == "elevate":  # the paper's intervention reaches the 4-bit projection: ceil(1% of 128) = 2
            replaced = reached != keys
            assert reached.dtype == keys.dtype and 1 <= replaced.sum(-1).min() <= replaced.sum(-1).max() <= 2
            second_lowest = keys.float().abs().topk(2, dim=-1, largest=False).values[..., -1:].expand_as(keys)
            assert torch.all(keys.float().abs()[replaced] <= second_lowest[replaced])
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert len(changed) == len(trainable)
    assert losses[-1] < losses[0], losses


def test_4bit_forward_matches_after_steering_identity(base_dir):
    """Identity at init holds on the quantized base too (the wrapper casts to the input dtype)."""
    base = _load_4bit(base_dir, torch.float32)
    with torch.no_grad():
        reference = base(input_ids=IDS).logits
    model = get_peft_model(
        _load_4bit(base_dir, torch.float32),
        InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"])),
    )
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, reference)
