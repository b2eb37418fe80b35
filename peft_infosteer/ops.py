"""The InfoSteer math (docs/design.md, section 1): usage distribution, information flux, interventions.

Everything is computed in float32 whatever the input dtype. ``information_flux`` is the plain-autograd reference;
``fused_information_flux`` is the memory-lean version used during training: it keeps only ``k`` (which the output
projection holds anyway) and two float32 scalars per token for backward, and uses the closed-form gradients.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "USAGE_MODES",
    "Usage",
    "flatten_keys",
    "fused_information_flux",
    "gain_keys",
    "information_flux",
    "usage_distribution",
]

Usage = Literal["abs", "softmax"]
USAGE_MODES: tuple[str, ...] = ("abs", "softmax")

# Rows are processed in chunks of about this many elements so the float32 temporaries stay small.
_CHUNK_ELEMENTS = 1 << 22
# the smallest positive float32: clamping |k| to it before a log changes no nonzero value
_SMALLEST_SUBNORMAL = 2.0**-149
# Per-row gradient coefficients are clamped into this range so that pathological inputs (a key vector whose total
# magnitude is denormal) give a huge but finite gradient instead of inf.
_COEF_LIMIT = 1e30


def _check_usage(usage: str, temperature: float) -> None:
    if usage not in USAGE_MODES:
        raise ValueError(f"usage must be one of {USAGE_MODES}, got {usage!r}")
    if usage == "softmax" and not temperature > 0:
        raise ValueError(f"usage_temperature must be > 0, got {temperature!r}")


def usage_distribution(k: torch.Tensor, usage: str = "abs", temperature: float = 1.0) -> torch.Tensor:
    """Return the usage distribution ``p`` over the last dimension of ``k``, in float32.

    For ``usage="abs"`` a row of zeros has no distribution and gives a row of zeros.

    >>> usage_distribution(torch.tensor([1.0, -3.0]))
    tensor([0.2500, 0.7500])
    """
    _check_usage(usage, temperature)
    k32 = k.float()
    if usage == "softmax":
        return torch.softmax(k32 / temperature, dim=-1)
    a = k32.abs()
    # divide by the row max first so that sums of huge values do not overflow
    a = a / a.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def information_flux(k: torch.Tensor, usage: str = "abs", temperature: float = 1.0) -> torch.Tensor:
    """Plain-autograd reference of the information flux ``F = H(p) / log(d_ff)`` per row, in float32.

    Rows whose usage distribution is undefined (all zeros in ``abs`` mode) give ``0``. Use
    :func:`fused_information_flux` in training; this one exists for clarity and for tests.

    >>> information_flux(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    tensor([1., 0.])
    """
    p = usage_distribution(k, usage, temperature)
    d = k.shape[-1]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)), torch.zeros_like(p))
    return (0.0 - plogp.sum(dim=-1)) / math.log(d)  # 0 - x, not -x: a one-hot row gives +0, not -0


def _rows_per_chunk(d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(d, 1))


class _FusedFlux(torch.autograd.Function):
    """Flux per row with closed-form backward; saves ``k`` plus per-row float32 statistics only."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, softmax: bool, temperature: float):
        d = k.shape[-1]
        rows = k.reshape(-1, d)
        n = rows.shape[0]
        flux = torch.empty(n, dtype=torch.float32, device=k.device)
        entropy = torch.empty(n, dtype=torch.float32, device=k.device)
        # abs: the row normaliser S = sum |k|, as (max, sum / max) so that neither overflows nor underflows
        scale = torch.ones(n, dtype=torch.float32, device=k.device)
        norm = torch.ones(n, dtype=torch.float32, device=k.device)
        log_d = math.log(d) if d > 1 else 1.0
        step = _rows_per_chunk(d)
        for start in range(0, n, step):
            x = rows[start : start + step].float()
            if softmax:
                logp = torch.log_softmax(x / temperature, dim=-1)
                p = logp.exp()
                h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
            else:
                a = x.abs()  # never in place: .float() of a float32 k is k itself
                amax = a.amax(dim=-1, keepdim=True)
                a = a.div_(amax.clamp_min(torch.finfo(torch.float32).tiny))
                s = a.sum(dim=-1)
                # H = log S - sum_i a_i log a_i / S: one fused xlogy pass (0 log 0 = 0) instead of normalising first.
                # With max a = 1 both terms are >= 0 and nothing cancels; a subnormal row is divided by the clamped
                # max instead, so a < 1 there and the two terms can cancel to a few ulps below 0 (clamped below)
                safe_s = s.clamp_min(torch.finfo(torch.float32).tiny)
                h = torch.log(safe_s) - torch.xlogy(a, a).sum(-1) / safe_s
                # rounding can leave H a few ulps outside [0, log d] (e.g. one subnormal key); the true H never is
                h = torch.where(s > 0, h, torch.zeros_like(h)).clamp_(0.0, math.log(d))
                scale[start : start + step] = amax.squeeze(-1)
                norm[start : start + step] = s
            entropy[start : start + step] = h
            flux[start : start + step] = h / log_d
        valid = torch.ones(n, dtype=torch.bool, device=k.device) if softmax else scale > 0
        flux = torch.where(valid, flux, torch.zeros_like(flux))
        ctx.save_for_backward(k, entropy, scale, norm)
        ctx.softmax = softmax
        ctx.temperature = temperature
        ctx.log_d = log_d
        ctx.mark_non_differentiable(valid)
        return flux.reshape(k.shape[:-1]), valid.reshape(k.shape[:-1])

    @staticmethod
    def backward(ctx, grad_flux: torch.Tensor, _grad_valid: torch.Tensor | None):
        k, entropy, scale, norm = ctx.saved_tensors
        d = k.shape[-1]
        rows = k.reshape(-1, d)
        g = grad_flux.reshape(-1).to(torch.float64)
        grad = torch.empty_like(rows)
        out_max = torch.finfo(k.dtype).max if k.dtype.is_floating_point else None
        step = _rows_per_chunk(d)
        for start in range(0, rows.shape[0], step):
            sl = slice(start, start + step)
            x = rows[sl].float()
            h = entropy[sl].unsqueeze(-1)
            if ctx.softmax:
                logp = torch.log_softmax(x / ctx.temperature, dim=-1)
                p = logp.exp()
                coef = (g[sl] / (ctx.temperature * ctx.log_d)).clamp(-_COEF_LIMIT, _COEF_LIMIT).float().unsqueeze(-1)
                # dF/dk_i = -p_i (log p_i + H) / (tau log d)
                gx = torch.where(p > 0, -p * (logp + h), torch.zeros_like(p)) * coef
            else:
                # S = sum_j |k_j|, undoing the forward's normalisation exactly (it divided by the clamped max)
                total = scale[sl].clamp_min(torch.finfo(torch.float32).tiny).double() * norm[sl].double()
                defined = (total > 0) & torch.isfinite(total)  # an all-zero row, or one with inf (half precision)
                coef = torch.where(defined, g[sl] / (total * ctx.log_d), torch.zeros_like(total))
                coef = coef.clamp(-_COEF_LIMIT, _COEF_LIMIT).unsqueeze(-1)
                log_total = torch.where(defined, total, torch.ones_like(total)).log().unsqueeze(-1)
                # dF/dk_i = sign(k_i) (-log p_i - H) / (S log d) = coef sign(k_i) (log S - H - log|k_i|), 0 at k_i = 0;
                # per row only coef and coef (log S - H) are needed, so no p of size rows x d_ff is formed.
                # Clamping |k| to [smallest subnormal, max] changes no finite nonzero value and keeps the log finite.
                offset = (coef * (log_total - h.double())).float()
                log_abs = x.abs().clamp_(_SMALLEST_SUBNORMAL, torch.finfo(torch.float32).max).log_()
                gx = torch.sign(x).mul_(torch.addcmul(offset, log_abs, coef.float(), value=-1.0))
            if out_max is not None:
                gx = gx.clamp_(-out_max, out_max)
            grad[sl] = gx.to(k.dtype)
        return grad.reshape(k.shape), None, None


def fused_information_flux(
    k: torch.Tensor, usage: str = "abs", temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Information flux per row of ``k`` (float32) and a mask of the rows where it is defined.

    The gradient is the closed form of docs/design.md, section 1; it equals the gradient of :func:`information_flux`.
    For backward it keeps ``k`` and three float32 numbers per row, nothing of size ``rows x d_ff``.

    >>> flux, valid = fused_information_flux(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    >>> flux, valid
    (tensor([1., 0.]), tensor([ True, False]))
    """
    _check_usage(usage, temperature)
    if k.shape[-1] == 0:
        raise ValueError("the key vector k must have at least one coefficient (d_ff > 0)")
    return _FusedFlux.apply(k, usage == "softmax", float(temperature))


class _Gain(torch.autograd.Function):
    """``k * g`` computed in float32 and rounded once, so small gain updates are not lost in bf16/fp16."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, gain: torch.Tensor):
        ctx.save_for_backward(k, gain)
        return (k.float() * gain.float()).to(k.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        k, gain = ctx.saved_tensors
        grad_k = grad_gain = None
        if ctx.needs_input_grad[0]:
            grad_k = (grad_out.float() * gain.float()).to(k.dtype)
        if ctx.needs_input_grad[1]:
            d = k.shape[-1]
            grad_gain = torch.zeros(d, dtype=torch.float32, device=k.device)
            go, kk = grad_out.reshape(-1, d), k.reshape(-1, d)
            step = _rows_per_chunk(d)
            for start in range(0, go.shape[0], step):
                grad_gain += (go[start : start + step].float() * kk[start : start + step].float()).sum(0)
            grad_gain = grad_gain.to(gain.dtype)
        return grad_k, grad_gain


def gain_keys(k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The ``gain`` intervention ``k' = g * k`` (per-coefficient gain, broadcast over rows).

    In float32 this is a plain multiply; in lower precision the product is taken in float32 and rounded once.

    >>> gain_keys(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.5]))
    tensor([[1., 1.]])
    """
    if k.dtype == torch.float32 and gain.dtype == torch.float32:
        return k * gain
    return _Gain.apply(k, gain)


def flatten_keys(k: torch.Tensor, strength: float) -> torch.Tensor:
    """The ``flatten`` intervention: mix the usage distribution with the uniform one, keeping signs and total mass.

    ``k'_i = sign(k_i) * ((1 - a) |k_i| + a * mean_j |k_j|)`` with ``a = strength``; ``strength = 0`` is the identity.

    >>> flatten_keys(torch.tensor([[4.0, 0.0, -2.0, 2.0]]), 0.5)
    tensor([[ 3.,  0., -2.,  2.]])
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"flatten_strength must be in [0, 1], got {strength!r}")
    if strength == 0.0:
        return k
    return _Flatten.apply(k, float(strength))


class _Flatten(torch.autograd.Function):
    """``flatten_keys`` with a closed-form backward that saves nothing beyond what the projection holds anyway.

    ``dk'_i / dk_j = (1 - a) [i = j] + (a / d) sign(k_i) sign(k_j)``, so backward needs only ``sign(k)``. That equals
    ``sign(k')`` wherever ``a * mean_j |k_j|`` is nonzero in ``k``'s dtype (``k'_i`` is then a same-signed sum with a
    nonzero term), so the output ``k'`` is saved: the output projection keeps it for its own backward, and plain
    autograd would keep ``k`` and ``sign(k)`` on top. A row where that shift underflows while ``k`` is not all zero
    (a degenerate half-precision case) makes the function save ``k`` instead, so the gradient is always exact.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, strength: float):
        mean_abs32 = k.abs().mean(dim=-1, keepdim=True, dtype=torch.float32)
        shift = strength * mean_abs32.to(k.dtype)
        # same operations and rounding as k * (1 - a) + sign(k) * shift
        out = k * (1.0 - strength)
        out.add_(torch.sign(k).mul_(shift))
        underflow = bool(((shift == 0) & (mean_abs32 > 0)).any())
        ctx.save_for_backward(k if underflow else out)
        ctx.strength = strength
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (saved,) = ctx.saved_tensors
        a = ctx.strength
        sign = torch.sign(saved)
        # (a / d) * sum_j g_j sign(k_j), accumulated in float32
        proj = (grad_out * sign).sum(dim=-1, keepdim=True, dtype=torch.float32) * (a / saved.shape[-1])
        grad = grad_out * (1.0 - a)
        grad.add_(sign.mul_(proj.to(grad_out.dtype)))
        return grad, None
