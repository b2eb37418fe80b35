"""The InfoSteer math (docs/design.md, section 1): usage distribution, information flux, interventions.

Everything is computed in float32 whatever the input dtype. ``information_flux`` is the plain-autograd reference. What
training uses, ``fused_information_flux``, ``gain_keys`` and ``flatten_keys``, runs by default as a
``torch.compile``-d plain formula: the compiler fuses the forward into one read of ``k`` and derives a fused backward
(on CPU about 3x faster than the hand-written closed form); ``flatten`` compiles its forward and its closed-form
backward separately, so that it saves only its output, as the closed form does. Where ``torch.compile`` is unavailable
or fails, and when it is switched off (``PEFT_INFOSTEER_COMPILE=0`` or :func:`set_compiled_math`), the eager autograd
functions with closed-form backward of ``peft_infosteer._closed_form`` are used; both give the same values and
gradients (tested). Inside a model that the user compiles, the plain formula is traced into the user's graph. Nothing
here reads a tensor's value on the host.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from ._closed_form import Flatten, FusedFlux, Gain, flatten_backward

__all__ = [
    "USAGE_MODES",
    "Usage",
    "compiled_math_enabled",
    "flatten_keys",
    "fused_information_flux",
    "gain_keys",
    "information_flux",
    "set_compiled_math",
    "usage_distribution",
]

Usage = Literal["abs", "softmax"]
USAGE_MODES: tuple[str, ...] = ("abs", "softmax")
_TINY = torch.finfo(torch.float32).tiny
_OFF = ("0", "false", "no", "off")
_compile_state: dict[str, Any] = {
    "enabled": os.environ.get("PEFT_INFOSTEER_COMPILE", "1").strip().lower() not in _OFF,
    "compiled": {},
}


def set_compiled_math(enabled: bool) -> None:
    """Run the flux and the interventions compiled (the default) or with the eager closed-form functions.

    >>> set_compiled_math(False); compiled_math_enabled()
    False
    >>> set_compiled_math(True)
    """
    _compile_state["enabled"] = bool(enabled)


def compiled_math_enabled() -> bool:
    """Whether the next call of the training math goes through ``torch.compile`` (see :func:`set_compiled_math`)."""
    return bool(_compile_state["enabled"])


def _dispatch(
    name: str,
    formula: Callable[..., Any],
    eager: Callable[..., Any],
    *args: Any,
    compiled_entry: Callable[..., Any] | None = None,
) -> Any:
    """``formula`` compiled (or ``compiled_entry``, which compiles its own parts), else ``eager``."""
    if torch.compiler.is_compiling():
        return formula(*args)  # the user's torch.compile traces the formula into its own graph
    if _compile_state["enabled"]:
        try:
            return compiled_entry(*args) if compiled_entry is not None else _compiled(name, formula)(*args)
        except Exception as exc:  # no C++ compiler, an unsupported backend, ...: fall back for good, once
            _compile_failed(exc)
    return eager(*args)


def _compiled(name: str, formula: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _compile_state["compiled"].get(name)
    if compiled is None:
        compiled = _compile_state["compiled"][name] = torch.compile(formula, dynamic=True)
    return compiled


def _compile_failed(exc: Exception) -> None:
    _compile_state["enabled"] = False
    warnings.warn(
        f"peft_infosteer: torch.compile of the InfoSteer math failed ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager closed-form functions instead "
        "(same results, slower). Set PEFT_INFOSTEER_COMPILE=0 to skip the attempt.",
        RuntimeWarning,
        stacklevel=4,
    )


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
    softmax = usage == "softmax"
    return _dispatch(f"flux-{usage}", _flux_formula, FusedFlux.apply, k, softmax, float(temperature))


def _flux_formula(k: torch.Tensor, softmax: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The flux as a plain formula, for the compiler (which derives the backward); same results as ``FusedFlux``."""
    d = k.shape[-1]
    log_d = math.log(d) if d > 1 else 1.0
    k32 = k.float()
    if softmax:
        logp = torch.log_softmax(k32 / temperature, dim=-1)
        h = -(logp.exp() * logp).sum(-1)
        valid = torch.ones_like(h, dtype=torch.bool)
    else:
        a = k32.abs()
        # F is scale-invariant, so dividing by the detached row max (against overflow) leaves the gradient exact
        a = a / a.amax(dim=-1, keepdim=True).detach().clamp_min(_TINY)
        s = a.sum(-1)
        safe_s = s.clamp_min(_TINY)
        # a log a with 0 log 0 = 0, and a gradient of 0 (not nan) where a = 0
        log_a = torch.where(a > 0, a, torch.ones_like(a)).log()
        h = safe_s.log() - (a * log_a).sum(-1) / safe_s
        valid = s > 0
        h = torch.where(valid, h, torch.zeros_like(h)).clamp(0.0, math.log(d) if d > 1 else 0.0)
    return h / log_d, valid


def gain_keys(k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The ``gain`` intervention ``k' = g * k`` (per-coefficient gain, broadcast over rows).

    In float32 this is a plain multiply; in lower precision the product is taken in float32 and rounded once.

    >>> gain_keys(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.5]))
    tensor([[1., 1.]])
    """
    if k.dtype == torch.float32 and gain.dtype == torch.float32:
        return k * gain
    return _dispatch("gain", _gain_formula, Gain.apply, k, gain)


def _gain_formula(k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return (k.float() * gain.float()).to(k.dtype)


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
    return _dispatch(
        "flatten", _flatten_formula, Flatten.apply, k, float(strength), compiled_entry=_CompiledFlatten.apply
    )


def _flatten_formula(k: torch.Tensor, strength: float) -> torch.Tensor:
    shift = strength * k.abs().mean(dim=-1, keepdim=True, dtype=torch.float32).to(k.dtype)
    return k * (1.0 - strength) + torch.sign(k) * shift


class _CompiledFlatten(torch.autograd.Function):
    """``flatten_keys`` as compiled kernels that save what the closed form saves: only ``k'`` (``k`` in float16).

    Compiling the plain formula whole would let the compiler keep ``k`` for backward beside the ``k'`` the output
    projection holds anyway (+1 key tensor per layer); why ``k'`` suffices is in ``_closed_form.Flatten``.
    """

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, strength: float) -> torch.Tensor:
        out = _compiled("flatten-forward", _flatten_formula)(k, strength)
        ctx.save_for_backward(k if k.dtype == torch.float16 else out)
        ctx.strength = strength
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (saved,) = ctx.saved_tensors
        return _dispatch("flatten-backward", flatten_backward, flatten_backward, grad_out, saved, ctx.strength), None
