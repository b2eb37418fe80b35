"""Parity and robustness of the InfoSteer math in ``peft_infosteer.ops`` (docs/design.md, section 1), on the eager
closed-form path and on the compiled path alike."""

from __future__ import annotations

import math

import pytest
import torch

from peft_infosteer import _closed_form, ops
from peft_infosteer.ops import (
    flatten_keys,
    fused_information_flux,
    gain_keys,
    information_flux,
    usage_distribution,
)

MODES = [("abs", 1.0), ("softmax", 1.0), ("softmax", 0.25), ("softmax", 4.0)]


@pytest.fixture(autouse=True, params=["eager", "compiled"])
def math_path(request):
    """Every test runs on both paths: the eager closed form and the compiled math users get by default."""
    previous = ops.compiled_math_enabled()
    ops.set_compiled_math(request.param == "compiled")
    yield request.param
    ops.set_compiled_math(previous)


def _keys(rows: int = 6, d: int = 24, seed: int = 0) -> torch.Tensor:
    """Random keys with the awkward cases inside: zeros within a row, an all-zero row, a one-hot row, ties."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, d, generator=g)
    k[1, 3:11] = 0.0  # zeros inside a row
    k[2] = 0.0  # all-zero row (undefined usage in abs mode)
    k[3] = 0.0
    k[3, 5] = -2.5  # one-hot row
    k[4] = 0.7  # uniform row
    return k


def _fused_grad(k: torch.Tensor, usage: str, temperature: float, weights: torch.Tensor):
    x = k.detach().clone().requires_grad_(True)
    flux, valid = fused_information_flux(x, usage, temperature)
    (grad,) = torch.autograd.grad((flux * weights).sum(), x)
    return flux, valid, grad


def _reference_grad(k: torch.Tensor, usage: str, temperature: float, weights: torch.Tensor):
    x = k.detach().float().clone().requires_grad_(True)
    flux = information_flux(x, usage, temperature)
    (grad,) = torch.autograd.grad((flux * weights).sum(), x)
    return flux, grad


@pytest.mark.parametrize(("usage", "temperature"), MODES)
def test_fused_gradient_matches_plain_autograd(usage, temperature):
    k = _keys()
    weights = torch.linspace(-1.0, 2.0, k.shape[0])
    flux, valid, grad = _fused_grad(k, usage, temperature, weights)
    ref_flux, ref_grad = _reference_grad(k, usage, temperature, weights)
    torch.testing.assert_close(flux, ref_flux, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    assert grad.abs().sum() > 0
    if usage == "abs":
        assert valid.tolist() == [True, True, False, True, True, True]
        # no gradient flows into coefficients that are exactly zero, nor into an all-zero row
        assert torch.all(grad[1, 3:11] == 0)
        assert torch.all(grad[2] == 0)
    else:
        assert valid.all()


@pytest.mark.parametrize(("usage", "temperature"), MODES)
def test_fused_matches_reference_across_chunks(monkeypatch, usage, temperature):
    """Rows are processed in chunks; force several chunks, with a ragged last one, and check nothing shifts."""
    monkeypatch.setattr(_closed_form, "_CHUNK_ELEMENTS", 3 * 24)
    k = torch.randn(2, 5, 24)
    k[0, 2] = 0.0
    weights = torch.randn(2, 5)
    flux, _, grad = _fused_grad(k, usage, temperature, weights)
    ref_flux, ref_grad = _reference_grad(k, usage, temperature, weights)
    assert flux.shape == (2, 5)
    torch.testing.assert_close(flux, ref_flux, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("usage", "temperature"), MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_float32_reference(usage, temperature, dtype):
    k = _keys().to(dtype)
    weights = torch.ones(k.shape[0])
    flux, _, grad = _fused_grad(k, usage, temperature, weights)
    assert flux.dtype == torch.float32  # computed in float32 whatever the input dtype
    assert grad.dtype == dtype
    ref_flux, ref_grad = _reference_grad(k.float(), usage, temperature, weights)
    torch.testing.assert_close(flux, ref_flux, atol=1e-6, rtol=1e-5)
    # only the final rounding of the gradient to the input dtype differs
    scale = ref_grad.abs().max()
    assert (grad.float() - ref_grad).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize(("usage", "temperature"), MODES)
@pytest.mark.parametrize("magnitude", [1e30, -1e30, 1e-30, 1e-40, 1e-45])
def test_extreme_magnitudes_stay_finite(usage, temperature, magnitude):
    k = _keys()
    scaled = k * magnitude
    ones = torch.ones(k.shape[0])
    flux, valid, grad = _fused_grad(scaled, usage, temperature, ones)
    assert torch.isfinite(flux).all() and torch.isfinite(grad).all()
    assert (flux >= 0).all() and (flux <= 1).all()
    if usage != "abs":
        return
    # abs usage is scale-invariant: F(s k) = F(k) and dF/dk(s k) = dF/dk(k) / s. Compare with the reference on the
    # values that s k actually holds (denormals keep only a few bits), brought back to a normal range.
    unscaled = (scaled.double() / magnitude).float()
    ref_flux, ref_grad = _reference_grad(unscaled, usage, temperature, ones)
    torch.testing.assert_close(flux, ref_flux, atol=1e-5, rtol=1e-5)
    assert valid.tolist() == (unscaled != 0).any(-1).tolist()
    if abs(magnitude) >= 1e-30:
        # representable: exact scaling of the gradient
        torch.testing.assert_close(grad.double() * magnitude, ref_grad.double(), atol=1e-6, rtol=1e-4)
    else:
        # the true gradient overflows float32: it is clamped per row, but still points the same way
        sign = math.copysign(1.0, magnitude)
        for row in range(k.shape[0]):
            if ref_grad[row].abs().sum() > 0:
                a, b = grad[row].double() * sign, ref_grad[row].double()
                a, b = a / a.abs().max(), b / b.abs().max()  # cosine_similarity's eps would swamp tiny norms
                cos = (a @ b) / (a.norm() * b.norm())
                assert cos > 0.999, (row, cos)


def test_huge_values_in_bf16_and_fp16_stay_finite():
    for dtype, big in [(torch.bfloat16, 1e30), (torch.float16, 6e4)]:
        for usage in ("abs", "softmax"):
            k = (_keys() * big).to(dtype)
            flux, _, grad = _fused_grad(k, usage, 1.0, torch.ones(k.shape[0]))
            assert torch.isfinite(flux).all() and torch.isfinite(grad.float()).all(), (dtype, usage)


@pytest.mark.parametrize("usage", ["abs", "softmax"])
def test_closed_form_values(usage):
    d = 32
    uniform = torch.full((3, d), 0.3)
    flux, valid = fused_information_flux(uniform, usage)
    torch.testing.assert_close(flux, torch.ones(3))
    torch.testing.assert_close(information_flux(uniform, usage), torch.ones(3))
    assert valid.all()
    if usage == "abs":
        one_hot = torch.zeros(2, d)
        one_hot[0, 7] = 5.0
        one_hot[1, 0] = -1e-3
        flux, valid = fused_information_flux(one_hot, usage)
        assert flux.tolist() == [0.0, 0.0] and valid.all()
        # half the mass on each of two memories: H = log 2
        two = torch.zeros(1, d)
        two[0, :2] = torch.tensor([1.0, -1.0])
        torch.testing.assert_close(fused_information_flux(two, usage)[0], torch.tensor([math.log(2) / math.log(d)]))
    else:
        # a very peaked softmax is one-hot: flux 0
        peaked = torch.zeros(1, d)
        peaked[0, 3] = 1e4
        assert fused_information_flux(peaked, usage)[0].item() == 0.0


def test_flux_is_in_unit_interval_and_all_zero_rows_are_invalid():
    k = torch.randn(50, 40) * torch.logspace(-20, 20, 40)
    k[::7] = 0.0
    for usage, temperature in MODES:
        flux, valid = fused_information_flux(k, usage, temperature)
        assert ((flux >= 0) & (flux <= 1 + 1e-6)).all()
        if usage == "abs":
            assert valid.tolist() == [bool(i % 7) for i in range(50)]
            assert (flux[~valid] == 0).all()


def test_usage_distribution_sums_to_one_and_is_float32():
    k = _keys().to(torch.bfloat16)
    for usage, temperature in MODES:
        p = usage_distribution(k, usage, temperature)
        assert p.dtype == torch.float32 and (p >= 0).all()
        sums = p.sum(-1)
        if usage == "abs":
            torch.testing.assert_close(sums[[0, 1, 3, 4, 5]], torch.ones(5))
            assert sums[2] == 0  # all-zero row has no distribution
        else:
            torch.testing.assert_close(sums, torch.ones(k.shape[0]))
    torch.testing.assert_close(usage_distribution(torch.tensor([1.0, -3.0])), torch.tensor([0.25, 0.75]))


def test_fused_keeps_only_k_and_per_row_statistics_for_backward():
    """Nothing of size rows x d_ff other than k itself may be held between forward and backward."""
    for dtype in (torch.float32, torch.bfloat16):
        for usage, temperature in MODES:
            k = torch.randn(4, 5, 64, dtype=dtype, requires_grad=True)
            saved: list[torch.Tensor] = []

            def pack(t, saved=saved):
                saved.append(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                flux, _ = fused_information_flux(k, usage, temperature)
            rows = k.numel() // k.shape[-1]
            assert saved, "the fused function saved nothing?"
            big = [t for t in saved if t.numel() > rows]
            assert len(big) == 1, [tuple(t.shape) for t in saved]
            assert big[0].data_ptr() == k.data_ptr() and big[0].numel() == k.numel() and big[0].dtype == dtype
            assert all(t.numel() <= rows for t in saved if t is not big[0])
            flux.sum().backward()
            assert torch.isfinite(k.grad.float()).all()


def test_fused_rejects_bad_arguments():
    with pytest.raises(ValueError, match="usage"):
        fused_information_flux(torch.ones(2, 3), "entropy")
    with pytest.raises(ValueError, match="usage_temperature"):
        fused_information_flux(torch.ones(2, 3), "softmax", 0.0)
    with pytest.raises(ValueError, match="d_ff"):
        fused_information_flux(torch.ones(2, 0))


def test_gain_keys_math_and_gradients():
    k = torch.randn(3, 4, 8)
    g = torch.rand(8) + 0.5
    torch.testing.assert_close(gain_keys(k, g), k * g)
    assert torch.equal(gain_keys(k, torch.ones(8)), k)
    # low precision: product in float32, rounded once; gradients match float32 ones up to rounding
    kb = k.to(torch.bfloat16).requires_grad_(True)
    gb = g.clone().requires_grad_(True)
    out = gain_keys(kb, gb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (kb.detach().float() * g).to(torch.bfloat16))
    out.float().sum().backward()
    kf = kb.detach().float().requires_grad_(True)
    gf = g.clone().requires_grad_(True)
    (kf * gf).sum().backward()
    torch.testing.assert_close(gb.grad, gf.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kb.grad.float(), gf.detach().expand_as(kf), atol=1e-2, rtol=1e-2)


def test_flatten_keys_identity_signs_and_mass():
    k = torch.randn(5, 16)
    k[0, :4] = 0.0
    assert flatten_keys(k, 0.0) is k
    for alpha in (0.1, 0.5, 1.0):
        out = flatten_keys(k, alpha)
        # signs kept (zeros stay zero), total magnitude kept
        assert torch.equal(torch.sign(out), torch.sign(k))
        nonzero = k != 0
        torch.testing.assert_close(
            out.abs().sum(-1), k.abs().sum(-1) * (1 - alpha) + alpha * k.abs().mean(-1) * nonzero.sum(-1)
        )
    torch.testing.assert_close(
        flatten_keys(torch.tensor([[4.0, 0.0, -2.0, 2.0]]), 0.5), torch.tensor([[3.0, 0.0, -2.0, 2.0]])
    )
    with pytest.raises(ValueError, match="flatten_strength"):
        flatten_keys(k, 1.5)


def test_flatten_mixes_usage_with_uniform_and_raises_flux():
    """For dense k: p' = (1 - a) p + a / d, so flux rises for every non-uniform p."""
    k = torch.randn(8, 32) * torch.logspace(-2, 1, 32)
    p = usage_distribution(k)
    base_flux = information_flux(k)
    previous = base_flux
    for alpha in (0.05, 0.3, 0.7, 1.0):
        out = flatten_keys(k, alpha)
        torch.testing.assert_close(usage_distribution(out), (1 - alpha) * p + alpha / k.shape[-1], atol=1e-6, rtol=1e-5)
        flux = information_flux(out)
        assert (flux > previous).all()
        previous = flux
    torch.testing.assert_close(previous, torch.ones(8))


def test_single_subnormal_key_has_zero_flux_not_a_rounding_negative():
    # found by the property tests: one subnormal coefficient is a one-hot usage distribution, so F = 0 exactly; the
    # forward normalises by the clamped max there, and rounding must not push F below 0
    for k in (torch.tensor([[7.0830e-39, 0.0]]), torch.tensor([[0.0, -3e-41, 0.0, 0.0]])):
        flux, valid = fused_information_flux(k)
        assert flux.tolist() == [0.0] and valid.all()
