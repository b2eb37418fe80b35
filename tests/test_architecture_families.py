"""Every family in the architectures table, on a tiny random model of it (tests/tiny_families.py, no download).

For each ``model_type`` in :data:`peft_infosteer.FFN_OUTPUT_PROJECTIONS`: identity at init, exactly the FFN output
projection of every decoder layer steered (its input recomputed from the layer's own weights is the key vector), a
training step with the regularizer against a plain-autograd reference, the default config with a stacked LoRA, and a
save/load round trip.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_families import ALL_FAMILIES, D_FF, config_d_ff, family_model
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from peft_infosteer import FFN_OUTPUT_PROJECTIONS, InfoSteerConfig, InfoSteerLayer, information_flux

FAMILIES = sorted(FFN_OUTPUT_PROJECTIONS)

LAYERS = 2
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])
# labels with positions left out of the loss, so that the counted tokens are not simply all of them
LABELS = IDS.masked_fill(torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]).bool(), -100)

# the decoder layer list of each family: the wrapped modules must be exactly f"{list}.{i}.{suffix}" for every layer
_LAYER_LISTS = {"gpt2": "transformer.h", "gpt_bigcode": "transformer.h", "falcon": "transformer.h"}
_LAYER_LISTS |= {"bloom": "transformer.h", "gptj": "transformer.h", "gpt_neox": "gpt_neox.layers"}
_LAYER_LISTS |= {"opt": "model.decoder.layers", "gemma3": "model.language_model.layers"}

# how each family computes the key vector k from the MLP input x, with the modules of the projection's parent:
# ("gated", gate, up, act): act(gate(x)) * up(x); ("fused", gate_up, act): gate, up = gate_up(x).chunk(2),
# act(gate) * up; ("plain", fc_in, act): act(fc_in(x))
_PLAIN = {"gpt2": "c_fc", "gpt_bigcode": "c_fc", "starcoder2": "c_fc", "gpt_neox": "dense_h_to_4h"}
_PLAIN |= {"falcon": "dense_h_to_4h", "bloom": "dense_h_to_4h", "gptj": "fc_in", "opt": "fc1", "phi": "fc1"}
_PLAIN_ACT = {"bloom": "gelu_impl", "opt": "activation_fn", "phi": "activation_fn"}


def _key_spec(model_type: str) -> tuple[str, ...]:
    if model_type in _PLAIN:
        return ("plain", _PLAIN[model_type], _PLAIN_ACT.get(model_type, "act"))
    if model_type == "phi3":
        return ("fused", "gate_up_proj", "activation_fn")
    return ("gated", "gate_proj", "up_proj", "act_fn")


def _expected_targets(model_type: str) -> list[str]:
    suffix = ALL_FAMILIES[model_type][1]
    layer_list = _LAYER_LISTS.get(model_type, "model.layers")
    return [f"{layer_list}.{i}.{suffix}" for i in range(LAYERS)]


def _with_lora(model_type: str, config: InfoSteerConfig):
    """``get_peft_model`` on a fresh tiny model, without PEFT's notice when "all-linear" LoRA meets GPT-2's Conv1D
    (PEFT then sets fan_in_fan_out itself)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False", UserWarning)
        return get_peft_model(family_model(model_type, num_layers=LAYERS), config)


def _wrapped(peft_model) -> list[str]:
    return [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, InfoSteerLayer)]


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` written out from its weights (``Conv1D`` stores its weight as (in, out))."""
    if isinstance(module, Conv1D):
        return x @ module.weight + module.bias
    assert isinstance(module, nn.Linear), type(module)
    return F.linear(x, module.weight, module.bias)


def _manual_keys(parent: nn.Module, spec: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    kind, *names = spec
    if kind == "gated":
        gate, up, act = (getattr(parent, n) for n in names)
        return act(_linear(gate, x)) * _linear(up, x)
    if kind == "fused":
        gate_up, act = (getattr(parent, n) for n in names)
        gate, up = _linear(gate_up, x).chunk(2, dim=-1)
        return act(gate) * up
    fc_in, act = (getattr(parent, n) for n in names)
    return act(_linear(fc_in, x))


def _capture_inputs(modules: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        return lambda _module, args: seen.__setitem__(name, args[0].detach().clone())

    return seen, [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]


def test_every_listed_family_has_a_tiny_model():
    assert sorted(ALL_FAMILIES) == FAMILIES
    assert len(FAMILIES) == 24
    for model_type in FAMILIES:
        assert FFN_OUTPUT_PROJECTIONS[model_type][0].endswith(ALL_FAMILIES[model_type][1])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_identity_and_exactly_the_ffn_output_projections(model_type):
    base = family_model(model_type, num_layers=LAYERS)
    assert base.config.model_type == model_type
    assert config_d_ff(base.config) == D_FF
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_peft_model(family_model(model_type, num_layers=LAYERS), InfoSteerConfig(intervention="gain"))
    inner = model.base_model.model
    expected = _expected_targets(model_type)
    assert _wrapped(model) == expected
    # nothing else is touched: no other tuner layer, and the only trainable weights are those layers' gains
    assert [n for n, m in inner.named_modules() if isinstance(m, BaseTunerLayer)] == expected
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"base_model.model.{n}.infosteer_gain.default" for n in expected)
    for name in expected:
        layer = inner.get_submodule(name)
        assert layer.in_features == D_FF
        assert torch.equal(layer.infosteer_gain["default"], torch.ones(D_FF))

    # the wrapped projection's input is the FFN key vector, recomputed from the same layer's weights
    spec = _key_spec(model_type)
    parents = {name: inner.get_submodule(name.rsplit(".", 1)[0]) for name in expected}
    first = {f"x{i}": getattr(parents[name], spec[1]) for i, name in enumerate(expected)}
    wrappers = {f"k{i}": inner.get_submodule(name) for i, name in enumerate(expected)}
    seen, handles = _capture_inputs({**first, **wrappers})
    try:
        with torch.no_grad():
            logits = model(IDS).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(logits, reference)  # identity at init
    for i, name in enumerate(expected):
        keys = seen[f"k{i}"]
        assert keys.shape[-1] == D_FF and keys.numel() == IDS.numel() * D_FF  # OPT flattens (batch, seq) into rows
        with torch.no_grad():
            manual = _manual_keys(parents[name], spec, seen[f"x{i}"])
        torch.testing.assert_close(keys, manual, rtol=1e-5, atol=1e-6)


def _counted(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose flux counts when labels are given: those whose next token is in the loss."""
    mask = torch.zeros_like(labels, dtype=torch.float32)
    mask[:, :-1] = (labels[:, 1:] != -100).float()
    return mask


def _gain_model(model_type: str, entropy_weight: float):
    model = get_peft_model(
        family_model(model_type, num_layers=LAYERS), InfoSteerConfig(intervention="gain", entropy_weight=entropy_weight)
    )
    return model.train()


def _gain_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "infosteer_gain" in n}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_step_with_the_regularizer(model_type):
    lam = 0.5
    regularized = _gain_model(model_type, lam)
    torch.manual_seed(1)  # the same dropout masks in both forwards
    loss = regularized(input_ids=IDS, labels=LABELS).loss
    assert torch.isfinite(loss)
    loss.backward()
    got = _gain_grads(regularized)
    assert len(got) == LAYERS

    # plain autograd: L_task - lambda * sum over layers of the mean entropy (nats) of |k| / sum |k| over counted tokens
    plain = _gain_model(model_type, 0.0)
    keys: list[torch.Tensor] = []
    handles = [
        m.base_layer.register_forward_pre_hook(lambda _m, args: keys.append(args[0]))
        for m in plain.modules()
        if isinstance(m, InfoSteerLayer)
    ]
    torch.manual_seed(1)
    try:
        task = plain(input_ids=IDS, labels=LABELS).loss
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(task, loss)
    mask = _counted(LABELS)
    fluxes = [information_flux(k).reshape(IDS.shape) for k in keys]  # OPT's MLP sees (batch * seq, d) rows
    entropy = sum((flux * mask).sum() / mask.sum() * math.log(D_FF) for flux in fluxes)
    assert len(fluxes) == LAYERS
    task.backward(retain_graph=True)
    task_only = _gain_grads(plain)
    plain.zero_grad()
    (task - lam * entropy).backward()
    want = _gain_grads(plain)

    for name, grad in got.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
        assert not torch.allclose(grad, task_only[name]), name  # the regularizer moved the gradient
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-7)

    # the step itself
    optimizer = torch.optim.SGD([p for p in regularized.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in regularized.named_parameters() if p.requires_grad}
    optimizer.step()
    after = dict(regularized.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in before)
    assert torch.isfinite(regularized(input_ids=IDS, labels=LABELS).loss)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_default_config_with_stacked_lora_trains(model_type):
    base = family_model(model_type, num_layers=LAYERS)
    with torch.no_grad():
        reference = base(IDS).logits
    config = InfoSteerConfig(lora=LoraConfig(r=2, target_modules="all-linear"))
    assert (config.intervention, config.elevate_fraction, config.entropy_weight) == ("elevate", 0.01, 0.0)
    model = _with_lora(model_type, config)
    inner = model.base_model.model
    expected = _expected_targets(model_type)
    assert _wrapped(model) == expected
    for name in expected:  # InfoSteer outermost, the LoRA of the same adapter inside it
        assert isinstance(inner.get_submodule(name).base_layer, LoraLayer)

    # elevate replaces ceil(1% of 64) = 1 key coefficient per token, in every steered layer
    wrappers = {name: inner.get_submodule(name) for name in expected}
    raw, handles = _capture_inputs(wrappers)
    steered, more = _capture_inputs({name: w.base_layer for name, w in wrappers.items()})
    model.train()
    try:
        out = model(input_ids=IDS, labels=LABELS)
    finally:
        for handle in handles + more:
            handle.remove()
    for name in expected:
        changed = (raw[name] != steered[name]).sum(-1)
        assert torch.equal(changed, torch.ones_like(changed)), name
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # Gemma 3's vision tower (LoRA on all linear layers reaches it) takes no part in a text-only forward
    assert all(g is not None for n, g in grads.items() if ".vision_tower." not in n)
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    for name in expected:  # the LoRA under each steered projection trains
        assert inner.get_submodule(name).base_layer.lora_B["default"].weight.grad.abs().max() > 0, name
    model.eval()
    with torch.no_grad():  # the paper's elevate acts at inference too (elevate_at_inference=True)
        assert not torch.allclose(model(IDS).logits, reference)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_load_round_trip(model_type, tmp_path):
    config = InfoSteerConfig(intervention="gain", init_weights=False, lora=LoraConfig(r=2, target_modules="all-linear"))
    torch.manual_seed(3)
    model = _with_lora(model_type, config).eval()
    with torch.no_grad():
        want = model(IDS).logits
        base = family_model(model_type, num_layers=LAYERS)
        assert not torch.allclose(want, base(IDS).logits)  # the adapter is away from the identity
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False", UserWarning)
        loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert _wrapped(loaded) == _expected_targets(model_type)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, want, rtol=0, atol=0)
