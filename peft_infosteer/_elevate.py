"""The paper's ``elevate`` intervention as an autograd function with its closed-form backward.

For each row ``k`` (one token's key coefficients, ``d = d_ff`` of them) the ``m = ceil(p * d)`` coefficients ranked
lowest are replaced by ``alpha`` times the row's mean (docs/concepts.md):

- ``rank="magnitude"``: the ``m`` smallest ``|k_i|``, each set to ``alpha * mean_j |k_j|`` with its own sign (the sign
  of 0 counts as +). For non-negative keys this is the paper's ``k_s <- alpha * mean_j k_j``.
- ``rank="value"``: the literal reading, the ``m`` smallest ``k_i``, each set to ``alpha * mean_j k_j``.

The gradient is that of the formula: a replaced coefficient gets none of its own, and every coefficient gets its share
through the mean, ``dL/dk_j = [j not replaced] g_j + (alpha / d) * sign(k_j) * sum_(s replaced) g_s * sign(k_s)``
(``rank="value"``: without the signs). On CPU the forward and the backward each run as one pass per row in the native
kernel (``peft_infosteer._native``); elsewhere, or where that kernel is off or could not be built, as the ATen code
below, whose selection is ``torch.topk`` of ``m`` (about 1% of ``d``). Backward keeps the output ``k'`` (which the
output projection keeps anyway), the selected indices and the original values there (``rows x m``): ``sign(k)`` is
``sign(k')`` outside the selection. Nothing is read on the host.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from ._native import native_elevate

__all__ = [
    "Elevate",
    "elevate_backward",
    "elevate_count",
    "elevate_forward",
    "elevate_in_compiled_graph",
    "elevate_reference",
]


@functools.lru_cache(maxsize=256)  # called per layer and token: a few (fraction, d_ff) pairs per process
def elevate_count(fraction: float, d: int) -> int:
    """``ceil(fraction * d)``, at least 1 and at most ``d`` (rounded first, so 0.01 * 100 counts 1, not 2).

    >>> elevate_count(0.01, 1536), elevate_count(0.01, 100), elevate_count(0.5, 3)
    (16, 1, 2)
    """
    return min(d, max(1, math.ceil(round(fraction * d, 9))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision keys, the keys' own dtype when wider (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


# |k| ranked as integers: a float with its sign bit cleared, read as a signed integer of its width, orders like the
# float (NaN above +inf, as topk ranks it), and topk compares integers faster than floats, which it checks for NaN.
# The masks are 0-dim tensors of the integer dtype (usable with keys on any device): a Python int would be wrapped
# and converted on every call, which at one token per call costs as much as the masking itself.
_MAGNITUDE_BITS = {
    dtype: (bits, torch.tensor(mask, dtype=bits))
    for dtype, bits, mask in (
        (torch.float32, torch.int32, 0x7FFFFFFF),
        (torch.float64, torch.int64, 0x7FFFFFFFFFFFFFFF),
        (torch.float16, torch.int16, 0x7FFF),
        (torch.bfloat16, torch.int16, 0x7FFF),
    )
}


def _select(k: torch.Tensor, m: int, by_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``m`` lowest-ranked coefficients of each row, and the row mean (at least float32, kept dim)."""
    bits = None if by_value else _MAGNITUDE_BITS.get(k.dtype)
    if bits is not None:
        rank_key = k.view(bits[0]).bitwise_and(bits[1])
        key = rank_key.view(k.dtype)  # exactly k.abs(), from the same pass
    else:
        rank_key = key = k if by_value else k.abs()
    index = torch.topk(rank_key, m, dim=-1, largest=False, sorted=False).indices
    wide = _compute_dtype(k.dtype)  # asking for the dtype the keys already have would copy them
    mean = key.mean(dim=-1, keepdim=True) if wide == k.dtype else key.mean(dim=-1, keepdim=True, dtype=wide)
    return index, mean


def _signs(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with the sign of 0 counted as +, in float32."""
    return torch.where(x >= 0, 1.0, -1.0).to(torch.float32)


def elevate_forward(
    k: torch.Tensor, m: int, scale: float, by_value: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The elevated keys, the selected indices and the original values there (what the backward keeps).

    Also the whole computation when no gradient is needed (generation), with no autograd node: on CPU one call of the
    native kernel; elsewhere a handful of ATen kernels, since at one token per call their count, not their
    arithmetic, is the cost (each one dispatched with the caches cold from the layer's matmuls), so no kernel runs
    that the formula does not need.
    """
    if k.device.type == "cpu" and (native := native_elevate()) is not None:
        return tuple(native.elevate_forward(k, m, scale, by_value))
    index, mean = _select(k, m, by_value)
    picked = k.gather(-1, index)
    new = mean if scale == 1.0 else mean * scale
    if new.dtype != k.dtype:
        new = new.to(k.dtype)
    if by_value:
        return k.scatter(-1, index, new.expand_as(picked)), index, picked
    # each replaced coefficient keeps its own sign, the sign of 0 counting as +: -0.0 + 0.0 is +0.0 (the backward
    # reads only sign(picked), which is 0 for either zero)
    return k.scatter(-1, index, torch.copysign(new, picked.add_(0.0))), index, picked


class Elevate(torch.autograd.Function):
    """``elevate`` forward and closed-form backward (see the module docstring); ``apply(k, m, scale, by_value)``."""

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, m: int, scale: float, by_value: bool) -> torch.Tensor:
        out, index, picked = elevate_forward(k, m, scale, by_value)
        ctx.save_for_backward(out, index, picked)
        ctx.scale, ctx.by_value = scale, by_value
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out, index, picked = ctx.saved_tensors
        return elevate_backward(grad_out, out, index, picked, ctx.scale, ctx.by_value), None, None, None


def elevate_backward(
    grad_out: torch.Tensor, out: torch.Tensor, index: torch.Tensor, picked: torch.Tensor, scale: float, by_value: bool
) -> torch.Tensor:
    """``dL/dk`` from ``dL/dk'`` and what :func:`elevate_forward` returned (the formula: module docstring)."""
    if grad_out.device.type == "cpu" and (native := native_elevate()) is not None:
        return native.elevate_backward(grad_out, out, index, picked, scale, by_value)
    d = out.shape[-1]
    wide = _compute_dtype(grad_out.dtype)
    grad_picked = grad_out.gather(-1, index).to(wide)
    # one fresh key-sized buffer in the gradient's dtype; the selected entries are overwritten in place
    if by_value:
        share = ((scale / d) * grad_picked.sum(-1, keepdim=True)).to(grad_out.dtype)
        return (grad_out + share).scatter_(-1, index, share.expand_as(picked))
    share = (scale / d) * (grad_picked * _signs(picked)).sum(-1, keepdim=True)
    # sign(k) = sign(k') outside the selection; a replaced entry gets only its share, signed by its original
    # (0 stays 0, as |k|'s gradient)
    grad = torch.addcmul(grad_out, torch.sign(out).to(grad_out.dtype), share.to(grad_out.dtype))
    return grad.scatter_(-1, index, (share * torch.sign(picked.to(wide))).to(grad.dtype))


# Inside a graph the user compiles, ``elevate`` runs as two opaque operators (forward, backward), not traced: the
# selection (``topk``) is an ATen call either way, and as operators the gather/scatter around it stay the few ATen
# kernels the eager path runs instead of being fused into the neighbouring loops (docs/benchmarks.md, cost of elevate).
@torch.library.custom_op("peft_infosteer::elevate", mutates_args=())
def _elevate_op(
    k: torch.Tensor, m: int, scale: float, by_value: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return elevate_forward(k, m, scale, by_value)


@_elevate_op.register_fake
def _(k: torch.Tensor, m: int, scale: float, by_value: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    selected = (*k.shape[:-1], m)
    return torch.empty_like(k), k.new_empty(selected, dtype=torch.long), k.new_empty(selected)


@torch.library.custom_op("peft_infosteer::elevate_backward", mutates_args=())
def _elevate_backward_op(
    grad_out: torch.Tensor, out: torch.Tensor, index: torch.Tensor, picked: torch.Tensor, scale: float, by_value: bool
) -> torch.Tensor:
    return elevate_backward(grad_out, out, index, picked, scale, by_value)


@_elevate_backward_op.register_fake
def _(
    grad_out: torch.Tensor, out: torch.Tensor, index: torch.Tensor, picked: torch.Tensor, scale: float, by_value: bool
) -> torch.Tensor:
    return torch.empty_like(grad_out)


def _op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, _, scale, by_value = inputs
    out, index, picked = output
    ctx.save_for_backward(out, index, picked)
    ctx.scale, ctx.by_value = scale, by_value
    ctx.mark_non_differentiable(index, picked)


def _op_backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[torch.Tensor, None, None, None]:
    out, index, picked = ctx.saved_tensors
    return _elevate_backward_op(grad_out, out, index, picked, ctx.scale, ctx.by_value), None, None, None


_elevate_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def elevate_in_compiled_graph(k: torch.Tensor, m: int, scale: float, by_value: bool) -> torch.Tensor:
    """``elevate`` as the opaque operator ``peft_infosteer::elevate`` (for a graph being compiled)."""
    return _elevate_op(k, m, scale, by_value)[0]


def elevate_reference(k: torch.Tensor, fraction: float, scale: float, rank: str = "magnitude") -> torch.Tensor:
    """Plain-autograd ``elevate`` (the formula written out), for tests and for clarity."""
    m = elevate_count(fraction, k.shape[-1])
    by_value = rank == "value"
    key = k if by_value else k.abs()
    index = torch.topk(key, m, dim=-1, largest=False, sorted=False).indices
    mean = key.to(_compute_dtype(k.dtype)).mean(dim=-1, keepdim=True)
    picked = k.gather(-1, index)
    sign = torch.ones_like(picked, dtype=torch.float32) if by_value else _signs(picked.detach())
    return k.scatter(-1, index, (scale * mean * sign).to(k.dtype))
