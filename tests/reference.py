"""Plain-autograd references for the InfoSteer regularizer, written from the definition (docs/concepts.md).

The regularized objective of one forward is the paper's ``L_task - lambda * sum_l mean_t H_l``: the sum over steered
layers ``l`` of the mean over the tokens ``t`` that count (next-token labels in the loss, else the attention mask, else
all positions) of the entropy ``H = F * log(d_ff)`` (nats) of the usage distribution of the keys that reach each
output projection, with the flux ``F`` computed here with :func:`peft_infosteer.information_flux` and ordinary
autograd. :func:`legacy_lambda` converts a lambda of the units before 0.2.0 (``L_task - lambda_old * mean over layers
and tokens of F``) into these.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model

from peft_infosteer import InfoSteerConfig, InfoSteerLayer, information_flux


def steering_layers(model) -> list[InfoSteerLayer]:
    return [m for m in model.modules() if isinstance(m, InfoSteerLayer)]


def build(entropy_weight: float, checkpointing: bool | None = None, num_layers: int = 3, seed: int = 0, **config):
    """A tiny Llama with gain + LoRA (both away from their identity init), in train mode.

    ``intervention`` defaults to ``"gain"`` here (its weights make the gradients worth comparing).
    ``checkpointing``: ``None`` (off), ``False`` (non-reentrant) or ``True`` (reentrant).
    """
    config.setdefault("lora", LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    config.setdefault("intervention", "gain")
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_model("llama", num_layers=num_layers, seed=seed), InfoSteerConfig(entropy_weight=entropy_weight, **config)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in steering_layers(model):
            for gain in layer.infosteer_gain.values():
                gain.copy_(0.5 + torch.rand(gain.shape, generator=g))
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
        model.enable_input_require_grads()
    return model.train()


def legacy_lambda(lambda_old: float, d_ffs: list[int]) -> float:
    """The lambda (paper's units) that trains like ``lambda_old`` of peft-infosteer < 0.2.0 on layers of ``d_ffs``."""
    return lambda_old / sum(math.log(d) for d in d_ffs)


def counted_tokens(batch: dict) -> torch.Tensor:
    """The float mask of the positions whose flux counts (docs/concepts.md)."""
    labels = batch.get("labels")
    if labels is not None:
        mask = torch.zeros_like(labels, dtype=torch.float32)
        mask[:, :-1] = (labels[:, 1:] != -100).float()
        return mask
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].float()
    return torch.ones_like(batch["input_ids"], dtype=torch.float32)


def forward_with_plain_fluxes(model, batch: dict) -> tuple[object, list[torch.Tensor], list[int]]:
    """Run ``model`` (whose own regularizer must be off); return its output, each steered layer's mean flux over the
    counted tokens (with grad, in layer order) and the keys' ``d_ff`` of each layer."""
    keys: list[torch.Tensor] = []
    handles = [
        layer.base_layer.register_forward_pre_hook(lambda _m, args: keys.append(args[0]))
        for layer in steering_layers(model)
    ]
    try:
        out = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = counted_tokens(batch)
    means = [(information_flux(k) * mask).sum() / mask.sum().clamp_min(1.0) for k in keys]
    return out, means, [k.shape[-1] for k in keys]


def forward_with_plain_entropy(model, batch: dict) -> tuple[object, torch.Tensor]:
    """Run ``model`` (whose own regularizer must be off); return its output and ``sum_l mean_t H_l`` in nats (with
    grad): the term the paper's lambda weighs, ``objective = L_task - lambda * term``."""
    out, means, d_ffs = forward_with_plain_fluxes(model, batch)
    return out, sum(mean * math.log(d) for mean, d in zip(means, d_ffs, strict=True))


def forward_with_plain_flux(model, batch: dict) -> tuple[object, torch.Tensor]:
    """Run ``model`` and return its output and the plain mean flux over layers and counted tokens (what is logged)."""
    out, means, _ = forward_with_plain_fluxes(model, batch)
    return out, torch.stack(means).mean()


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` over all gradients together."""
    assert got.keys() == want.keys()
    diff = torch.cat([(got[n] - want[n]).flatten() for n in want])
    ref = torch.cat([want[n].flatten() for n in want])
    return float(diff.norm() / ref.norm())
