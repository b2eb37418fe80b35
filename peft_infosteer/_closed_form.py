"""The closed-form flux math, and eager autograd functions built on it: the fallback of ``peft_infosteer.ops``.

``entropy_terms``, ``flux_backward`` and ``flatten_backward`` are the formulas; the compiled path of ``ops`` compiles
them into kernels, and the functions here run them eagerly in chunks of rows where ``torch.compile`` is unavailable
or switched off (``PEFT_INFOSTEER_COMPILE=0``). They keep little for backward (``k`` and a few float32 numbers per
row, nothing of size ``rows x d_ff`` in float32) and never read a tensor's value on the host.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FusedFlux", "Flatten", "Gain", "entropy_terms", "flatten_backward", "flux_backward", "log_d"]

# Rows are processed in chunks of about this many elements so the float32 temporaries stay small.
_CHUNK_ELEMENTS = 1 << 22
# the smallest positive float32: clamping |k| to it before a log changes no nonzero value
_SMALLEST_SUBNORMAL = 2.0**-149
# Per-row gradient coefficients are clamped into this range so that pathological inputs (a key vector whose total
# magnitude is denormal) give a huge but finite gradient instead of inf.
_COEF_LIMIT = 1e30
TINY = torch.finfo(torch.float32).tiny


def entropy_terms(
    k: torch.Tensor, softmax: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy ``H`` per row, the valid mask, the row max of ``|k|`` and ``sum |k| / max`` (softmax: ``H`` again)."""
    d = k.shape[-1]
    k32 = k.float()
    if softmax:
        logp = torch.log_softmax(k32 / temperature, dim=-1)
        p = logp.exp()
        # p log p = 0 where p is 0 or undefined (an inf key in half precision)
        h = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        return h, torch.ones_like(h, dtype=torch.bool), h, h
    a = k32.abs()
    # dividing by the row max keeps sums of huge values finite (F is scale-invariant)
    amax = a.amax(dim=-1, keepdim=True)
    a = a / amax.clamp_min(TINY)
    s = a.sum(-1)
    safe_s = s.clamp_min(TINY)
    # a log a with 0 log 0 = 0, and a gradient of 0 (not nan) where a = 0
    log_a = torch.where(a > 0, a, torch.ones_like(a)).log()
    h = safe_s.log() - (a * log_a).sum(-1) / safe_s
    valid = s > 0
    h = torch.where(valid, h, torch.zeros_like(h)).clamp(0.0, math.log(d) if d > 1 else 0.0)
    return h, valid, amax.squeeze(-1), s


def log_d(k: torch.Tensor) -> float:
    return math.log(k.shape[-1]) if k.shape[-1] > 1 else 1.0


def flux_backward(
    grad_flux: torch.Tensor,
    k: torch.Tensor,
    h: torch.Tensor,
    amax: torch.Tensor,
    s: torch.Tensor,
    softmax: bool,
    temperature: float,
) -> torch.Tensor:
    """``FusedFlux``'s closed-form gradient (docs/design.md, section 1) from ``k`` and the forward's row terms."""
    x = k.float()
    coef = (grad_flux.float() / log_d(k)).unsqueeze(-1)
    if softmax:
        logp = torch.log_softmax(x / temperature, dim=-1)
        p = logp.exp()
        # dF/dk_i = -p_i (log p_i + H) / (tau log d)
        grad = torch.where(p > 0, -p * (logp + h.unsqueeze(-1)), torch.zeros_like(p)) * (coef / temperature)
    else:
        # dF/dk_i = sign(k_i) (log S - H - log|k_i|) / (S log d), S = max * s; 0 at k_i = 0 and for rows with no
        # distribution. Dividing by max and s in turn keeps S from overflowing; the clamps as in FusedFlux.
        defined = (s > 0) & torch.isfinite(amax)
        # the forward divided by the clamped max, so S is the clamped max times s
        safe_max = torch.where(defined, amax.clamp_min(TINY), torch.ones_like(amax))
        safe_s = torch.where(defined, s, torch.ones_like(s))
        coef = torch.where(defined.unsqueeze(-1), coef / safe_max.unsqueeze(-1) / safe_s.unsqueeze(-1), 0.0)
        coef = coef.clamp(-_COEF_LIMIT, _COEF_LIMIT)
        log_total = (safe_max.log() + safe_s.log()).unsqueeze(-1)
        log_abs = x.abs().clamp(_SMALLEST_SUBNORMAL, torch.finfo(torch.float32).max).log()
        grad = torch.sign(x) * (coef * (log_total - h.unsqueeze(-1) - log_abs))
    if k.dtype.is_floating_point:
        limit = torch.finfo(k.dtype).max
        grad = grad.clamp(-limit, limit)
    return grad.to(k.dtype)


def _rows_per_chunk(d: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(d, 1))


class FusedFlux(torch.autograd.Function):
    """Flux per row with closed-form backward, in chunks of rows; saves ``k`` plus per-row float32 statistics only."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, softmax: bool, temperature: float):
        d = k.shape[-1]
        rows = k.reshape(-1, d)
        n = rows.shape[0]
        stats = [torch.empty(n, dtype=dtype, device=k.device) for dtype in (torch.float32, torch.bool)]
        entropy, valid = stats
        scale, norm = torch.empty_like(entropy), torch.empty_like(entropy)
        step = _rows_per_chunk(d)
        for start in range(0, n, step):
            sl = slice(start, start + step)
            entropy[sl], valid[sl], scale[sl], norm[sl] = entropy_terms(rows[sl], softmax, temperature)
        ctx.save_for_backward(k, entropy, scale, norm)
        ctx.softmax = softmax
        ctx.temperature = temperature
        ctx.mark_non_differentiable(valid)
        return (entropy / log_d(k)).reshape(k.shape[:-1]), valid.reshape(k.shape[:-1])

    @staticmethod
    def backward(ctx, grad_flux: torch.Tensor, _grad_valid: torch.Tensor | None):
        k, entropy, scale, norm = ctx.saved_tensors
        d = k.shape[-1]
        rows = k.reshape(-1, d)
        g = grad_flux.reshape(-1)
        grad = torch.empty_like(rows)
        step = _rows_per_chunk(d)
        for start in range(0, rows.shape[0], step):
            sl = slice(start, start + step)
            grad[sl] = flux_backward(g[sl], rows[sl], entropy[sl], scale[sl], norm[sl], ctx.softmax, ctx.temperature)
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
