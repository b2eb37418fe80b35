"""The paper's intervention ``intervention="elevate"``: its math against the paper's equation written out here, its
closed-form gradient against plain autograd, and the adapter in a model: train vs eval, merging, LoRA,
``layers_to_transform``, gradient checkpointing, the regularizer on the elevated keys, and a fresh-process reload."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from reference import build, forward_with_plain_entropy, relative_error, steering_layers, trainable_grads
from tiny_models import tiny_model

from peft_infosteer import InfoSteerConfig, InfoSteerLayer
from peft_infosteer._elevate import Elevate, elevate_count, elevate_reference
from peft_infosteer.ops import elevate_keys

TESTS_DIR = Path(__file__).parent
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 11, 30], [9, 9, 31, 77, 4, 100, 56, 23, 7, 81]])


# ---- the formula, written out independently ------------------------------------------------------------------------


def paper_elevate(k: torch.Tensor, fraction: float, alpha: float) -> torch.Tensor:
    """The paper's equation for non-negative keys, row by row in float64: ``k_s <- alpha * (1/d) * sum_i k_i`` for the
    ``ceil(p * d)`` smallest ``k_s`` (keys with distinct values: no ties to break)."""
    d = k.shape[-1]
    m = math.ceil(round(fraction * d, 9))
    rows = k.detach().double().reshape(-1, d).tolist()
    out = []
    for row in rows:
        mean = alpha * sum(row) / d
        bottom = sorted(range(d), key=lambda i: row[i])[:m]
        out.append([mean if i in bottom else v for i, v in enumerate(row)])
    return torch.tensor(out, dtype=torch.float64).reshape(k.shape)


def signed_elevate(k: torch.Tensor, fraction: float, alpha: float, rank: str) -> torch.Tensor:
    """Both readings for signed keys, row by row in float64 (docs/concepts.md): 'magnitude' replaces the smallest |k_i|
    by ``alpha * mean |k|`` with their own sign (0 counts as +); 'value' the smallest k_i by ``alpha * mean k``."""
    d = k.shape[-1]
    m = math.ceil(round(fraction * d, 9))
    out = []
    for row in k.detach().double().reshape(-1, d).tolist():
        if rank == "value":
            new, bottom = alpha * sum(row) / d, sorted(range(d), key=lambda i: row[i])[:m]
            out.append([new if i in bottom else v for i, v in enumerate(row)])
        else:
            new, bottom = alpha * sum(abs(v) for v in row) / d, sorted(range(d), key=lambda i: abs(row[i]))[:m]
            out.append([(new if v >= 0 else -new) if i in bottom else v for i, v in enumerate(row)])
    return torch.tensor(out, dtype=torch.float64).reshape(k.shape)


def autograd_elevate(k: torch.Tensor, fraction: float, alpha: float, rank: str) -> torch.Tensor:
    """An independent plain-autograd version: the selection as a 0/1 mask from a full sort, the mean as a product."""
    d = k.shape[-1]
    m = math.ceil(round(fraction * d, 9))
    by = k.detach() if rank == "value" else k.detach().abs()
    order = torch.sort(by, dim=-1, stable=True).indices
    mask = torch.zeros_like(k).scatter(-1, order[..., :m], 1.0)
    if rank == "value":
        new = alpha * k.sum(-1, keepdim=True) / d
    else:
        sign = torch.where(k.detach() >= 0, 1.0, -1.0).to(k.dtype)
        new = alpha * k.abs().sum(-1, keepdim=True) / d * sign
    return k * (1 - mask) + mask * new


def _distinct(*shape: int, signed: bool = True, seed: int = 0) -> torch.Tensor:
    """Keys with distinct values and distinct magnitudes (a random permutation of a spread grid), no zeros."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    rows = []
    for _ in range(math.prod(shape[:-1])):
        values = (torch.randperm(n, generator=g).double() + 1.0) * 0.37 + torch.rand(1, generator=g).double()
        if signed:
            values = values * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
        rows.append(values)
    return torch.stack(rows).reshape(shape).float()


def check_is_an_elevation(
    k: torch.Tensor, out: torch.Tensor, fraction: float, alpha: float, rank: str, tol: float = 1e-5
) -> None:
    """Tie-proof check of one elevation: ``m`` coefficients of lowest rank hold the new value, all others are kept
    (``tol``: relative tolerance of the new value, which is rounded to the keys' dtype)."""
    d = k.shape[-1]
    m = elevate_count(fraction, d)
    k64, out64 = k.double().reshape(-1, d), out.double().reshape(-1, d)
    for row, got in zip(k64, out64):
        key = row if rank == "value" else row.abs()
        new = alpha * key.mean()
        target = torch.full_like(row, float(new)) if rank == "value" else torch.where(row >= 0, new, -new)
        changed = got != row
        assert torch.allclose(got[changed], target[changed], rtol=tol, atol=1e-6)
        already = (~changed) & torch.isclose(row, target, rtol=tol, atol=1e-6)  # may be a bottom one that had it
        kept = ~changed & ~already
        ceiling = key[kept].min() if kept.any() else math.inf
        if changed.any():
            assert key[changed].max() <= ceiling  # only the bottom was replaced (ties: any of them)
        assert changed.sum() <= m <= changed.sum() + (already & (key <= ceiling)).sum(), (row, got)


# ---- math ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "alpha"), [(0.01, 1.0), (0.05, 2.0), (0.02, 5.0), (0.3, 0.5)])
def test_non_negative_keys_follow_the_papers_equation(fraction, alpha):
    k = _distinct(4, 3, 200, signed=False)
    want = paper_elevate(k, fraction, alpha)
    for rank in ("magnitude", "value"):  # both readings are the paper's for non-negative keys
        got = elevate_keys(k, fraction, alpha, rank)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        assert (got != k).sum() == k.numel() // 200 * math.ceil(round(fraction * 200, 9))


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_signed_keys_follow_the_written_out_readings(rank):
    k = _distinct(3, 5, 96, seed=1)
    got = elevate_keys(k, 0.05, 1.5, rank)
    torch.testing.assert_close(got.double(), signed_elevate(k, 0.05, 1.5, rank), rtol=1e-6, atol=1e-6)
    assert got.dtype == k.dtype and got.shape == k.shape


def test_relu_ffn_keys_in_a_tiny_opt_are_elevated_as_the_paper_says():
    """OPT's FFN is ReLU: the keys entering ``fc2`` are non-negative (with many exact zeros: ties) in a real model."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("opt", num_layers=2), InfoSteerConfig(elevate_fraction=0.05, elevate_scale=2.0))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer in steering_layers(model):
        layer.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), None)))
        layer.base_layer.register_forward_pre_hook(lambda _m, args: seen.append((seen.pop()[0], args[0].detach())))
    with torch.no_grad():
        model(IDS)
    assert len(seen) == 2
    for k, elevated in seen:
        assert k.min() >= 0 and (k == 0).any() and k.shape[-1] == 64
        check_is_an_elevation(k, elevated, 0.05, 2.0, "magnitude")
        # and row by row against the equation: the bottom m are zeros here, replaced by alpha * mean k
        new = 2.0 * k.double().mean(-1, keepdim=True)
        replaced = elevated != k
        assert torch.equal(replaced.sum(-1), torch.full(k.shape[:-1], 4))  # ceil(0.05 * 64) = 4, all were zeros
        assert torch.all(k[replaced] == 0)
        torch.testing.assert_close(elevated.double()[replaced], new.expand_as(k)[replaced], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rank", ["magnitude", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_equals_plain_autograd_of_the_formula(rank, dtype):
    k = _distinct(3, 4, 128, seed=2).to(dtype)
    weight = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(3))
    grads = []
    for fn in (
        lambda x: Elevate.apply(x, elevate_count(0.03, 128), 2.0, rank == "value"),
        lambda x: autograd_elevate(x, 0.03, 2.0, rank),
        lambda x: elevate_reference(x, 0.03, 2.0, rank),
    ):
        x = k.clone().requires_grad_(True)
        out = fn(x)
        (out.float() * weight).sum().backward()
        assert out.dtype == dtype and x.grad.dtype == dtype
        grads.append((out.detach(), x.grad))
    (out, grad), (want_out, want_grad), (ref_out, ref_grad) = grads
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
    # the same selection and values up to the rounding of the mean (the CPU kernel sums in double)
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=0)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_gradcheck_in_double_precision(rank):
    k = _distinct(2, 3, 40, seed=4).double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Elevate.apply(x, 3, 1.7, rank == "value"), (k,))


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_a_replaced_coefficient_has_no_gradient_of_its_own(rank):
    k = torch.tensor([[4.0, -0.5, 2.0, -1.5, 3.0, -6.0, 0.7, 5.0]], requires_grad=True)
    out = elevate_keys(k, 0.25, 2.0, rank)  # m = 2
    replaced = (out != k).squeeze(0)
    assert replaced.sum() == 2
    s = int(replaced.nonzero()[0])
    grad = torch.zeros_like(out)
    grad[0, s] = 1.0  # all of the upstream gradient on one replaced coefficient
    out.backward(grad)
    sign = torch.sign(k.detach()) if rank == "magnitude" else torch.ones_like(k)
    # it reaches every coefficient through the mean only: (alpha / d) * d(mean term)/dk_j, nothing of its own at s
    want = 2.0 / 8 * sign * (sign[0, s] if rank == "magnitude" else 1.0)
    torch.testing.assert_close(k.grad, want)
    k.grad = None
    kept = int((~replaced).nonzero()[0])
    grad = torch.zeros_like(out)
    grad[0, kept] = 1.0
    elevate_keys(k, 0.25, 2.0, rank).backward(grad)
    assert torch.equal(k.grad, grad)  # a kept coefficient: exactly its own gradient


def test_zero_counts_as_positive_and_gets_no_gradient_through_the_mean():
    k = torch.tensor([[0.0, 3.0, -4.0, 5.0]], requires_grad=True)
    out = elevate_keys(k, 0.25, 1.0)
    assert out.tolist() == [[3.0, 3.0, -4.0, 5.0]]  # |0| is the smallest: set to +mean|k| = 3
    out.backward(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    # d(mean|k|)/dk_j = sign(k_j) / 4: 0 at the zero itself (|k|'s subgradient in torch), +-1/4 elsewhere
    assert k.grad.tolist() == [[0.0, 0.25, -0.25, 0.25]]
    assert elevate_keys(k.detach(), 0.25, 1.0, "value").tolist() == [[0.0, 3.0, 1.0, 5.0]]  # smallest value: -4
    assert elevate_keys(torch.zeros(2, 8), 0.5, 3.0).tolist() == torch.zeros(2, 8).tolist()  # mean 0: stays 0


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_ties_replace_exactly_m_of_the_tied_coefficients(rank):
    k = torch.tensor([[1.0, 1.0, 7.0, 1.0, 8.0, 9.0, 6.0, 5.0], [-2.0, 2.0, 2.0, -2.0, 4.0, 3.0, -3.0, 5.0]])
    out = elevate_keys(k, 0.25, 1.0, rank)  # m = 2 of three (first row) or four (second row, by |k|) tied
    check_is_an_elevation(k, out, 0.25, 1.0, rank)
    assert torch.equal((out != k).sum(-1), torch.tensor([2, 2]))
    for fn in (elevate_reference, autograd_elevate):  # every implementation gives a valid elevation
        check_is_an_elevation(k, fn(k, 0.25, 1.0, rank).detach(), 0.25, 1.0, rank)


def test_the_count_is_ceil_of_p_d_after_rounding():
    assert elevate_count(0.01, 100) == 1  # 0.01 * 100 is 1.0000000000000002 in floating point: not 2
    assert elevate_count(0.07, 100) == 7  # 7.000000000000001
    assert elevate_count(0.01, 1536) == 16 and elevate_count(0.01, 64) == 1 and elevate_count(0.02, 8192) == 164
    assert elevate_count(1e-9, 64) == 1  # p so small that ceil gives 1: still one coefficient
    assert elevate_count(0.99, 10) == 10 and elevate_count(0.5, 1) == 1
    k = _distinct(2, 64, seed=5)
    assert torch.equal((elevate_keys(k, 1e-9, 1.0) != k).sum(-1), torch.tensor([1, 1]))
    assert torch.equal((elevate_keys(k, 0.999, 1.0) != k).sum(-1), torch.tensor([64, 64]))


def test_scale_zero_prunes_the_bottom_and_passes_no_gradient_there():
    k = _distinct(1, 10, seed=6).requires_grad_(True)
    out = elevate_keys(k, 0.2, 0.0)
    replaced = out != k
    assert replaced.sum() == 2 and torch.all(out[replaced] == 0)
    out.sum().backward()
    assert torch.equal(k.grad, (~replaced).float())


@pytest.mark.parametrize("rank", ["magnitude", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_gradients_the_forward_is_the_same_and_builds_no_node(rank, dtype):
    k = torch.cat([_distinct(3, 64, seed=9), torch.tensor([[0.0, -0.0] + [1.0] * 62])]).to(dtype)
    with_node = elevate_keys(k.clone().requires_grad_(True), 0.05, 2.0, rank)
    assert with_node.grad_fn is not None
    with torch.no_grad():
        generated = elevate_keys(k.clone().requires_grad_(True), 0.05, 2.0, rank)
    plain = elevate_keys(k, 0.05, 2.0, rank)  # no input that needs a gradient
    assert generated.grad_fn is None and plain.grad_fn is None
    assert torch.equal(generated, with_node.detach()) and torch.equal(plain, with_node.detach())
    if rank == "magnitude":  # -0.0 and 0.0 are both set to +alpha * mean|k|
        assert torch.all(plain[3, :2] > 0)


def test_any_leading_shape_and_an_empty_batch():
    for shape in ((64,), (0, 5, 64), (2, 3, 4, 64)):
        k = torch.randn(shape, requires_grad=True)
        out = elevate_keys(k, 0.05, 2.0)
        out.sum().backward()
        assert out.shape == k.grad.shape == k.shape
        assert torch.equal((out != k).sum(-1), torch.full(shape[:-1], 4))
    k = torch.randn(64, 6).t()  # not contiguous
    torch.testing.assert_close(elevate_keys(k, 0.05, 2.0), elevate_keys(k.contiguous(), 0.05, 2.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, "elevate_fraction"),
        ({"fraction": 1.0}, "elevate_fraction"),
        ({"fraction": float("nan")}, "elevate_fraction"),
        ({"rank": "abs"}, "elevate_rank"),
    ],
)
def test_elevate_keys_rejects_bad_arguments(kwargs, match):
    args = {"fraction": 0.01, "scale": 1.0, "rank": "magnitude", **kwargs}
    with pytest.raises(ValueError, match=match):
        elevate_keys(torch.randn(2, 8), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with an accelerator")
@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_no_host_sync_on_cuda(rank):
    k = torch.randn(8, 16, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    elevate_keys(k, 0.01, 2.0, rank).float().sum().backward()  # warm up (allocations, kernel loading)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        elevate_keys(k, 0.01, 2.0, rank).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- in a model ----------------------------------------------------------------------------------------------------


def _keys_in_and_out(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record, per forward of each steering layer, the keys it received and what reached its base layer."""
    pairs: list[list[torch.Tensor]] = []
    for layer in steering_layers(model):
        layer.register_forward_pre_hook(lambda _m, args: pairs.append([args[0].detach()]))
        layer.base_layer.register_forward_pre_hook(lambda _m, args: pairs[-1].append(args[0].detach()))
    return pairs  # type: ignore[return-value]


def _lora_model(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(tiny_model("llama", num_layers=2, seed=seed), InfoSteerConfig(lora=lora, **config))


@pytest.mark.parametrize("at_inference", [True, False])
def test_acts_in_training_mode_and_at_inference_unless_told_not_to(at_inference):
    model = _lora_model(elevate_at_inference=at_inference, elevate_fraction=0.05)
    pairs = _keys_in_and_out(model)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        pairs.clear()
        with torch.no_grad():
            model(IDS)
        assert len(pairs) == 2
        for k, reached in pairs:
            if mode == "train" or at_inference:
                check_is_an_elevation(k, reached, 0.05, 1.0, "magnitude")
                assert not torch.equal(k, reached)
            else:
                assert torch.equal(k, reached)
    model.eval()
    pairs.clear()
    model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert pairs and all(torch.equal(k, reached) != at_inference for k, reached in pairs)


def test_the_default_changes_the_forward_and_disabling_restores_the_base(tiny):
    base = tiny("llama")
    with torch.no_grad():
        reference = base(IDS).logits
    with pytest.warns(UserWarning, match="nothing to train.*elevate"):
        model = get_peft_model(tiny("llama"), InfoSteerConfig())  # the paper's defaults: p = 1%, alpha = 1
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            assert not torch.allclose(model(IDS).logits, reference)  # by design: no identity at init
            with model.disable_adapter():
                assert torch.equal(model(IDS).logits, reference)


def test_training_only_elevate_merges_exactly():
    model = _lora_model(elevate_at_inference=False, elevate_fraction=0.05, elevate_scale=2.0)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()  # elevate shaped this LoRA gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        want = model(IDS).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, InfoSteerLayer) or "lora" in n for n, m in merged.named_modules())
        torch.testing.assert_close(merged(IDS).logits, want, atol=1e-5, rtol=0)


def test_merging_an_elevate_that_acts_at_inference_raises_naming_the_field():
    model = _lora_model()
    with pytest.raises(ValueError, match="elevate_at_inference") as info:
        model.merge_and_unload()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="elevate_at_inference"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="elevate_at_inference"):
        steering_layers(model)[0].merge()
    assert not any(layer.merged for layer in steering_layers(model))  # nothing half-merged
    with torch.no_grad():
        unloaded = model.unload()  # unloading (dropping the adapter) is still possible
    assert not any(isinstance(m, InfoSteerLayer) for m in unloaded.modules())


def test_stacked_lora_trains_while_elevate_acts():
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules="all-linear")
    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(lora=lora, elevate_fraction=0.05)).train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items() if "lora_B" in n)
    assert losses[-1] < losses[0]


def test_layers_to_transform_steers_only_the_chosen_layers():
    base = tiny_model("llama", num_layers=3)
    with torch.no_grad():
        want = base(IDS, output_hidden_states=True).hidden_states
    config = InfoSteerConfig(layers_to_transform=[1], layers_pattern="layers", elevate_fraction=0.1)
    with pytest.warns(UserWarning, match="nothing to train"):
        model = get_peft_model(tiny_model("llama", num_layers=3), config)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, InfoSteerLayer)]
    assert len(wrapped) == 1 and ".layers.1.mlp.down_proj" in wrapped[0]
    with torch.no_grad():
        got = model(IDS, output_hidden_states=True).hidden_states
    assert torch.equal(got[1], want[1])  # layer 0 is untouched
    assert not torch.allclose(got[2], want[2]) and not torch.allclose(got[3], want[3])


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_regularized_gradient_through_elevate_equals_plain_autograd(rank):
    """The regularizer sees the elevated keys (what reaches the output projection): the whole gradient is that of the
    paper's objective with the elevated model's keys, computed here with plain autograd."""
    lam = 0.5
    settings = dict(intervention="elevate", elevate_fraction=0.05, elevate_scale=2.0, elevate_rank=rank)
    reference = build(0.0, **settings)
    out, entropy = forward_with_plain_entropy(reference, {"input_ids": IDS, "labels": IDS})
    (out.loss - lam * entropy).backward()
    model = build(lam, **settings)
    model(input_ids=IDS, labels=IDS).loss.backward()
    want = trainable_grads(reference)
    assert relative_error(trainable_grads(model), want) < 1e-5
    unregularized = build(0.0, **settings)
    unregularized(input_ids=IDS, labels=IDS).loss.backward()
    assert relative_error(trainable_grads(unregularized), want) > 1e-3  # the regularizer's share is far above that


@pytest.mark.parametrize("checkpointing", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(checkpointing):
    settings = dict(intervention="elevate", elevate_fraction=0.05, elevate_scale=2.0)
    plain = build(0.3, **settings)
    plain(input_ids=IDS, labels=IDS).loss.backward()
    model = build(0.3, checkpointing, **settings)
    model(input_ids=IDS, labels=IDS).loss.backward()
    want = trainable_grads(plain)
    assert want and relative_error(trainable_grads(model), want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_its_dtype(dtype):
    model = get_peft_model(
        tiny_model("llama").to(dtype), InfoSteerConfig(lora=LoraConfig(r=2, target_modules=["down_proj"]))
    )
    pairs = _keys_in_and_out(model)
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.isfinite(logits).all()
    for k, reached in pairs:
        assert reached.dtype == dtype
        check_is_an_elevation(k.float(), reached.float(), 0.01, 1.0, "magnitude", tol=1e-2)


# ---- save, load in a fresh process ---------------------------------------------------------------------------------


def test_save_and_reload_in_a_fresh_process(tmp_path):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    configs = {
        "elevate": dict(elevate_fraction=0.05, elevate_scale=2.0, elevate_rank="value", entropy_weight=0.01),
        "train_only": dict(elevate_fraction=0.1, elevate_at_inference=False),
    }
    expected = {}
    for name, settings in configs.items():
        torch.manual_seed(1)
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(tiny_model("llama"), InfoSteerConfig(lora=lora, task_type="CAUSAL_LM", **settings))
        with torch.no_grad():
            expected[name] = model.eval()(IDS).logits.tolist()
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert saved["intervention"] == "elevate" and all(saved[k] == v for k, v in settings.items())
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = f"""
        import json
        import peft_infosteer
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        root = {str(tmp_path)!r}
        ids = torch.tensor({IDS.tolist()!r})
        expected = json.loads(open(root + "/expected.json").read())
        for name in ("elevate", "train_only"):
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/" + name)
            config = model.peft_config["default"]
            print(name, config.intervention, config.elevate_fraction, config.elevate_scale, config.elevate_rank,
                  config.elevate_at_inference)
            with torch.no_grad():
                got = model.eval()(ids).logits
            want = torch.tensor(expected[name])
            assert torch.equal(got, want), (name, (got - want).abs().max())
            if name == "train_only":
                with torch.no_grad():
                    merged = model.merge_and_unload()(ids).logits
                assert torch.allclose(merged, got, atol=1e-5, rtol=0)
            print("OK", name)
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert "elevate elevate 0.05 2.0 value True" in lines and "train_only elevate 0.1 1.0 magnitude False" in lines
    assert lines.count("OK elevate") == 1 and lines.count("OK train_only") == 1


@pytest.mark.parametrize("rank", ["magnitude", "value"])
def test_the_compiled_graph_operators_pass_opcheck(rank):
    from peft_infosteer._elevate import _elevate_backward_op, _elevate_op

    k = _distinct(4, 64, seed=11).requires_grad_(True)
    torch.library.opcheck(_elevate_op, (k, 3, 2.0, rank == "value"))
    out, index, picked = _elevate_op(k.detach(), 3, 2.0, rank == "value")
    torch.library.opcheck(_elevate_backward_op, (torch.randn_like(out), out, index, picked, 2.0, rank == "value"))


@pytest.mark.parametrize("rank", ["magnitude", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inside_a_compiled_graph_values_and_gradients_are_the_eager_ones(rank, dtype):
    torch._dynamo.reset()
    k = _distinct(2, 3, 64, seed=12).to(dtype)
    grad = torch.randn(k.shape, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run(fn):
        x = k.clone().requires_grad_(True)
        out = fn(x)
        out.backward(grad)
        return out.detach(), x.grad

    eager = run(lambda x: elevate_keys(x, 0.05, 2.0, rank))
    compiled = run(torch.compile(lambda x: elevate_keys(x, 0.05, 2.0, rank) * 1.0, fullgraph=True))
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_magnitudes_ranked_as_integers_select_what_float_ranking_selects(dtype):
    """``|k|`` is ranked through its bits as integers: the same selection and values as ranking ``k.abs()`` as floats,
    with NaN (ranked above +inf), infinities, -0.0 and subnormals in the rows."""
    from peft_infosteer._elevate import _select

    torch.manual_seed(0)
    k = (torch.randn(6, 200, dtype=torch.float64) * torch.logspace(-3, 3, 200, dtype=torch.float64)).to(dtype)
    k[0, 5] = float("nan")
    k[1, 7], k[1, 8] = float("inf"), float("-inf")
    k[2, 11] = -0.0
    k[3, 13] = torch.finfo(dtype).tiny / 4  # subnormal
    k[4, 17] = -torch.finfo(dtype).tiny / 4
    index, mean = _select(k, 3, by_value=False)
    expected = torch.topk(k.abs(), 3, dim=-1, largest=False).indices
    assert torch.equal(index.sort(-1).values, expected.sort(-1).values)
    wide = torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(mean, k.abs().to(wide).mean(-1, keepdim=True), rtol=0, atol=0, equal_nan=True)
    # the same selection; the values up to the rounding of the mean (the CPU kernel sums in double)
    torch.testing.assert_close(elevate_keys(k, 0.015, 1.5), elevate_reference(k, 0.015, 1.5), equal_nan=True)
