"""Eager autograd functions with closed-form backward: the fallback of the compiled path in ``peft_infosteer.ops``.

Used where ``torch.compile`` is unavailable or switched off (``PEFT_INFOSTEER_COMPILE=0``). They keep little for
backward (``k`` and a few float32 numbers per row, nothing of size ``rows x d_ff`` in float32), process rows in
chunks, and never read a tensor's value on the host.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FusedFlux", "Flatten", "Gain", "flatten_backward"]

# Rows are processed in chunks of about this many elements so the float32 temporaries stay small.
_CHUNK_ELEMENTS = 1 << 22
# the smallest positive float32: clamping |k| to it before a log changes no nonzero value
SMALLEST_SUBNORMAL = 2.0**-149
# Per-row gradient coefficients are clamped into this range so that pathological inputs (a key vector whose total
# magnitude is denormal) give a huge but finite gradient instead of inf.
COEF_LIMIT = 1e30


def _rows_per_chunk(d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(d, 1))


class FusedFlux(torch.autograd.Function):
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
                coef = (g[sl] / (ctx.temperature * ctx.log_d)).clamp(-COEF_LIMIT, COEF_LIMIT).float().unsqueeze(-1)
                # dF/dk_i = -p_i (log p_i + H) / (tau log d)
                gx = torch.where(p > 0, -p * (logp + h), torch.zeros_like(p)) * coef
            else:
                # S = sum_j |k_j|, undoing the forward's normalisation exactly (it divided by the clamped max)
                total = scale[sl].clamp_min(torch.finfo(torch.float32).tiny).double() * norm[sl].double()
                defined = (total > 0) & torch.isfinite(total)  # an all-zero row, or one with inf (half precision)
                coef = torch.where(defined, g[sl] / (total * ctx.log_d), torch.zeros_like(total))
                coef = coef.clamp(-COEF_LIMIT, COEF_LIMIT).unsqueeze(-1)
                log_total = torch.where(defined, total, torch.ones_like(total)).log().unsqueeze(-1)
                # dF/dk_i = sign(k_i) (-log p_i - H) / (S log d) = coef sign(k_i) (log S - H - log|k_i|), 0 at k_i = 0;
                # per row only coef and coef (log S - H) are needed, so no p of size rows x d_ff is formed.
                # Clamping |k| to [smallest subnormal, max] changes no finite nonzero value and keeps the log finite.
                offset = (coef * (log_total - h.double())).float()
                log_abs = x.abs().clamp_(SMALLEST_SUBNORMAL, torch.finfo(torch.float32).max).log_()
                gx = torch.sign(x).mul_(torch.addcmul(offset, log_abs, coef.float(), value=-1.0))
            if out_max is not None:
                gx = gx.clamp_(-out_max, out_max)
            grad[sl] = gx.to(k.dtype)
        return grad.reshape(k.shape), None, None


class Gain(torch.autograd.Function):
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


class Flatten(torch.autograd.Function):
    """``flatten_keys`` with a closed-form backward that saves nothing beyond what the projection holds anyway.

    ``dk'_i / dk_j = (1 - a) [i = j] + (a / d) sign(k_i) sign(k_j)``, so backward needs only ``sign(k)``. That equals
    ``sign(k')`` wherever ``a * mean_j |k_j|`` is nonzero in ``k``'s dtype (``k'_i`` is then a same-signed sum with a
    nonzero term), so the output ``k'`` is saved: the output projection keeps it for its own backward, and plain
    autograd would keep ``k`` and ``sign(k)`` on top. In float16 that shift can underflow for a row of tiny keys
    (its smallest subnormal is 6e-8), so there ``k`` is saved instead; in float32 and bfloat16 it underflows only
    where ``mean |k|`` is itself below the smallest normal number, i.e. the row is zero in all but name. Choosing by
    dtype, not by looking at the values, keeps the forward free of host synchronisation.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, strength: float):
        mean_abs32 = k.abs().mean(dim=-1, keepdim=True, dtype=torch.float32)
        shift = strength * mean_abs32.to(k.dtype)
        # same operations and rounding as k * (1 - a) + sign(k) * shift
        out = k * (1.0 - strength)
        out.add_(torch.sign(k).mul_(shift))
        ctx.save_for_backward(k if k.dtype == torch.float16 else out)
        ctx.strength = strength
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (saved,) = ctx.saved_tensors
        return flatten_backward(grad_out, saved, ctx.strength), None


def flatten_backward(grad_out: torch.Tensor, saved: torch.Tensor, strength: float) -> torch.Tensor:
    """The gradient of ``flatten`` from ``sign(k)`` alone (``saved`` is ``k'`` or ``k``, see :class:`Flatten`)."""
    sign = torch.sign(saved)
    # (a / d) * sum_j g_j sign(k_j), accumulated in float32
    proj = (grad_out * sign).sum(dim=-1, keepdim=True, dtype=torch.float32) * (strength / saved.shape[-1])
    grad = grad_out * (1.0 - strength)
    grad.add_(sign.mul_(proj.to(grad_out.dtype)))
    return grad
