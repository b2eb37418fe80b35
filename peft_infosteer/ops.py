"""The InfoSteer math (docs/design.md, section 1): usage distribution, information flux, interventions.

Everything is computed in float32 whatever the input dtype. ``information_flux`` is the plain-autograd reference. What
training uses, ``fused_information_flux``, ``gain_keys`` and ``flatten_keys``, runs compiled by default: the flux and
``flatten`` as autograd functions whose forward and closed-form backward are each one ``torch.compile``-d kernel
(one read of ``k`` forward; backward keeps only ``k`` and row statistics, resp. the output), the low-precision gain as a
compiled formula, and a float32 gain on CPU as a plain product that keeps only its output (``_GainSavingOutput``).
Where ``torch.compile`` is unavailable or fails, and when it is switched off (``PEFT_INFOSTEER_COMPILE=0`` or
:func:`set_compiled_math` for the process, ``FluxState.compiled_math`` for one model), the eager autograd functions
with closed-form backward of ``peft_infosteer._closed_form`` are used; both give the same values and gradients
(tested). The compiled functions are shared by the process (``_ProcessCompile``); the choice is each model's.
Inside a model that the user compiles, the same functions and formulas are traced into the user's graph (the gain on
CPU as ``_GainInCompiledGraph``). Nothing here reads a device tensor's value on the host; a float32 gain on CPU looks
at its own values to choose what backward keeps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch

from ._closed_form import Flatten, FusedFlux, Gain, entropy_terms, flatten_backward, flux_backward, log_d
from ._elevate import Elevate, elevate_count, elevate_forward, elevate_in_compiled_graph
from ._env import env_flag, fallback_reason

__all__ = [
    "USAGE_MODES",
    "Usage",
    "compiled_math_enabled",
    "elevate_keys",
    "flatten_keys",
    "fused_information_flux",
    "gain_keys",
    "information_flux",
    "set_compiled_math",
    "usage_distribution",
]

Usage = Literal["abs", "softmax"]
USAGE_MODES: tuple[str, ...] = ("abs", "softmax")


class _ProcessCompile:
    """What the whole process shares about the compiled math: the default setting, the compiled functions, a failure.

    Process-wide on purpose: the ``torch.compile``-d formulas are code, the same for every model, and a failing
    ``torch.compile`` (no C++ compiler, an unsupported backend) is a fact about the process's toolchain. Whether one
    model runs compiled is that model's setting (``FluxState.compiled_math``), which its layers pass to the functions
    below as ``compiled``; ``default`` applies to models without a setting of their own and to direct calls.
    """

    def __init__(self) -> None:
        #: ``PEFT_INFOSTEER_COMPILE``, changed by :func:`set_compiled_math`
        self.default = env_flag("PEFT_INFOSTEER_COMPILE")
        #: the ``torch.compile``-d formulas, by name
        self.functions: dict[str, Callable[..., Any]] = {}
        #: why ``torch.compile`` failed in this process (every call runs eager from then on); ``None`` while it works
        self.failure: str | None = None

    def use(self, compiled: bool | None) -> bool:
        """Whether a call asking for ``compiled`` (``None``: the default) runs compiled."""
        return (self.default if compiled is None else bool(compiled)) and self.failure is None


_PROCESS = _ProcessCompile()


def set_compiled_math(enabled: bool) -> None:
    """Run the flux and the interventions compiled (the default) or with the eager closed-form functions.

    The process's default: every model without a setting of its own follows it (a model's own:
    ``find_infosteer_model(model).flux_state.compiled_math``). It also allows a new attempt after ``torch.compile``
    failed.

    >>> set_compiled_math(False); compiled_math_enabled()
    False
    >>> set_compiled_math(True)
    """
    _PROCESS.default = bool(enabled)
    _PROCESS.failure = None


def compiled_math_enabled() -> bool:
    """Whether the process's default runs the training math through ``torch.compile`` (see :func:`set_compiled_math`);
    ``False`` after ``torch.compile`` failed in this process."""
    return _PROCESS.use(None)


def _dispatch(
    name: str,
    formula: Callable[..., Any],
    eager: Callable[..., Any],
    *args: Any,
    compiled_entry: Callable[..., Any] | None = None,
    compiled: bool | None = None,
) -> Any:
    """``formula`` compiled (or ``compiled_entry``, which compiles its own parts) if ``compiled`` asks for it (``None``:
    the process's default), else ``eager``."""
    if torch.compiler.is_compiling():
        return formula(*args)  # the user's torch.compile traces the formula into its own graph
    if _PROCESS.use(compiled):
        try:
            return compiled_entry(*args) if compiled_entry is not None else _compiled(name, formula)(*args)
        except Exception as exc:  # no C++ compiler, an unsupported backend, ...: fall back for good, once
            _compile_failed(exc)
    return eager(*args)


def _compiled(name: str, formula: Callable[..., Any]) -> Callable[..., Any]:
    compiled = _PROCESS.functions.get(name)
    if compiled is None:
        compiled = _PROCESS.functions[name] = torch.compile(formula, dynamic=True)
    return compiled


def _compile_failed(exc: Exception) -> None:
    _PROCESS.failure = fallback_reason(exc)
    warnings.warn(
        f"peft_infosteer: torch.compile of the InfoSteer math failed ({_PROCESS.failure}); using the eager "
        "closed-form functions instead, in every model of this process (same results, slower). Set "
        "PEFT_INFOSTEER_COMPILE=0 to skip the attempt.",
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
    k: torch.Tensor, usage: str = "abs", temperature: float = 1.0, *, compiled: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Information flux per row of ``k`` (float32) and a mask of the rows where it is defined.

    The gradient is the closed form of docs/design.md, section 1; it equals the gradient of :func:`information_flux`.
    For backward it keeps ``k`` and three float32 numbers per row, nothing of size ``rows x d_ff``. ``compiled``
    chooses the compiled or the eager path (``None``: the process's default, :func:`set_compiled_math`).

    >>> flux, valid = fused_information_flux(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    >>> flux, valid
    (tensor([1., 0.]), tensor([ True, False]))
    """
    _check_usage(usage, temperature)
    if k.shape[-1] == 0:
        raise ValueError("the key vector k must have at least one coefficient (d_ff > 0)")
    softmax = usage == "softmax"
    return _dispatch(
        f"flux-{usage}",
        _traced_flux,
        FusedFlux.apply,
        k,
        softmax,
        float(temperature),
        compiled_entry=_compiled_flux,
        compiled=compiled,
    )


def _compiled_flux(k: torch.Tensor, softmax: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _FluxFunction.apply(k, softmax, temperature, True)


def _traced_flux(k: torch.Tensor, softmax: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _FluxFunction.apply(k, softmax, temperature, False)


class _FluxFunction(torch.autograd.Function):
    """The flux with ``FusedFlux``'s closed-form backward, unchunked, as two formulas the compiler fuses.

    With ``compiled=True`` (the package's compiled path) forward and backward each run as one compiled kernel; with
    ``False`` (inside a user's ``torch.compile``) both are traced into the user's graph. Either way backward keeps
    ``k`` (held by the output projection anyway) and three numbers per row. Traced as a plain formula instead, the
    compiler's partitioner kept a float32 ``|k| / max |k|`` for backward, one more key-sized tensor per layer (its
    cost: docs/benchmarks.md, "What does it cost?"), and the derived backward of a row of subnormal keys overflowed to
    inf, where the closed form clamps.
    """

    @staticmethod
    def forward(
        ctx: Any, k: torch.Tensor, softmax: bool, temperature: float, compiled: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        forward = _compiled(f"flux-forward-{softmax}", _flux_forward) if compiled else _flux_forward
        flux, valid, h, amax, s = forward(k, softmax, temperature)
        ctx.save_for_backward(k, h, amax, s)
        ctx.softmax, ctx.temperature, ctx.compiled = softmax, temperature, compiled
        ctx.mark_non_differentiable(valid)
        return flux, valid

    @staticmethod
    def backward(ctx: Any, grad_flux: torch.Tensor, _grad_valid: Any) -> tuple[torch.Tensor, None, None, None]:
        k, h, amax, s = ctx.saved_tensors
        args = (grad_flux, k, h, amax, s, ctx.softmax, ctx.temperature)
        if not ctx.compiled:
            return flux_backward(*args), None, None, None
        # compiled like the forward was (the model's setting is not at hand here)
        backward = _dispatch(f"flux-backward-{ctx.softmax}", flux_backward, flux_backward, *args, compiled=True)
        return backward, None, None, None


def _flux_forward(
    k: torch.Tensor, softmax: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, valid, amax, s = entropy_terms(k, softmax, temperature)
    return h / log_d(k), valid, h, amax, s


def gain_keys(k: torch.Tensor, gain: torch.Tensor, *, compiled: bool | None = None) -> torch.Tensor:
    """The ``gain`` intervention ``k' = g * k`` (per-coefficient gain, broadcast over rows).

    In float32 this is a plain multiply; in lower precision the product is taken in float32 and rounded once, by a
    compiled formula or the eager function as ``compiled`` says (``None``: the process's default).

    >>> gain_keys(torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 0.5]))
    tensor([[1., 1.]])
    """
    if torch.compiler.is_compiling() and k.device.type == "cpu":
        return _GainInCompiledGraph.apply(k, gain)
    if k.dtype == torch.float32 and gain.dtype == torch.float32:
        if _saves_output(k, gain):
            return _GainSavingOutput.apply(k, gain)
        return k * gain
    return _dispatch("gain", _gain_formula, Gain.apply, k, gain, compiled=compiled)


class _GainInCompiledGraph(torch.autograd.Function):
    """``gain_keys`` traced into a user's compiled graph on CPU: the gain's gradient as a matrix-vector product.

    The gain's gradient sums ``dL/dk' * k`` over all rows. Derived by the compiler, that column sum became a second
    loop that re-read every input of ``dL/dk'`` (the projection's gradients and, with the regularizer, the flux's
    gradient, which the compiler then wrote out to read it again): extra passes over a key-sized tensor per layer.
    Written as ``ones @ (dL/dk' * k)``, the product is one more output of the loop that computes ``dL/dk``, and one
    BLAS matrix-vector product reads it. The kernel profile before and after is in docs/benchmarks.md ("What does it
    cost?"). GPUs keep the derived reduction, which inductor splits across blocks.
    """

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(k, gain)
        return _gain_formula(k, gain)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, gain = ctx.saved_tensors
        grad32 = grad_out.float()
        grad_k = (grad32 * gain.float()).to(k.dtype) if ctx.needs_input_grad[0] else None
        grad_gain = None
        if ctx.needs_input_grad[1]:
            d = k.shape[-1]
            product = (grad32 * k.float()).reshape(-1, d)
            ones = torch.ones(1, product.shape[0], dtype=torch.float32, device=product.device)
            grad_gain = (ones @ product).reshape(d).to(gain.dtype)
        return grad_k, grad_gain


def _gain_formula(k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return (k.float() * gain.float()).to(k.dtype)


def _saves_output(k: torch.Tensor, gain: torch.Tensor) -> bool:
    """Whether a float32 gain can keep ``k' = g * k`` for backward instead of ``k`` (see ``_GainSavingOutput``).

    Only on CPU, where looking at the gain is no host-device synchronisation, and only if no gain is exactly 0 (``k``
    cannot be recovered from ``k'`` there). Never asked under the user's ``torch.compile``: ``_GainInCompiledGraph`` is
    traced there, and the compiler chooses what to keep.
    """
    return (
        k.device.type == "cpu"
        and gain.device.type == "cpu"
        and gain.requires_grad
        and torch.is_grad_enabled()
        and not bool((gain == 0).any())
    )


def _gain_backward(
    grad_out: torch.Tensor, out: torch.Tensor, gain: torch.Tensor, needs_k: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``k' = g * k`` from ``k'``: ``dL/dg = sum_rows(dL/dk' * k) = sum_rows(dL/dk' * k') / g``."""
    grad_gain = (grad_out * out).reshape(-1, out.shape[-1]).sum(0) / gain
    return (grad_out * gain if needs_k else None), grad_gain


class _GainSavingOutput(torch.autograd.Function):
    """The float32 ``gain`` that keeps only ``k'`` (which the output projection keeps anyway) for backward.

    Plain autograd of ``k * g`` keeps ``k`` for the gain's gradient beside the ``k'`` a stacked LoRA holds: one more
    key tensor per layer, and the time to fill it (measured: docs/benchmarks.md). Dividing the row sum by ``g``
    recovers the same gradient (to float32 rounding).
    """

    @staticmethod
    def forward(ctx: Any, k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        out = k * gain
        ctx.save_for_backward(out, gain)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        out, gain = ctx.saved_tensors
        # eager on purpose: compiled, this small backward made the eager gain step slower, not faster
        # (docs/benchmarks.md, "What does it cost?")
        return _gain_backward(grad_out, out, gain, bool(ctx.needs_input_grad[0]))


def elevate_keys(k: torch.Tensor, fraction: float, scale: float, rank: str = "magnitude") -> torch.Tensor:
    """The paper's ``elevate`` intervention: the bottom ``fraction`` of each row of ``k`` set to ``scale`` x its mean.

    ``rank="magnitude"`` ranks by ``|k_i|`` and sets ``scale * mean |k|`` with each coefficient's own sign (the paper's
    formula for non-negative keys, read for signed gated ones); ``rank="value"`` ranks by ``k_i`` and sets
    ``scale * mean k``. The gradient is the formula's (``peft_infosteer._elevate``); ``ceil(fraction * d_ff)``
    coefficients per row are replaced.

    >>> elevate_keys(torch.tensor([[4.0, -0.5, 2.0, -1.5]]), fraction=0.25, scale=1.0)
    tensor([[ 4.0000, -2.0000,  2.0000, -1.5000]])
    >>> elevate_keys(torch.tensor([[4.0, -0.5, 2.0, -1.5]]), fraction=0.25, scale=1.0, rank="value")
    tensor([[ 4.0000, -0.5000,  2.0000,  1.0000]])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"elevate_fraction must be in (0, 1), got {fraction!r}")
    if rank not in ("magnitude", "value"):
        raise ValueError(f"elevate_rank must be 'magnitude' or 'value', got {rank!r}")
    if k.shape[-1] == 0:
        raise ValueError("the key vector k must have at least one coefficient (d_ff > 0)")
    return elevate_checked(k, fraction, float(scale), rank == "value")


def elevate_checked(k: torch.Tensor, fraction: float, scale: float, by_value: bool) -> torch.Tensor:
    """:func:`elevate_keys` for arguments validated already (a layer's settings, validated with its config).

    The steering layer calls this once per layer and token in generation, where the checks would be a measurable
    part of the cost.
    """
    m = elevate_count(fraction, k.shape[-1])
    if torch.compiler.is_compiling():  # inside a user's compiled graph: two opaque operators, not traced
        return elevate_in_compiled_graph(k, m, scale, by_value)
    if not (k.requires_grad and torch.is_grad_enabled()):  # generation: no autograd node to build
        return elevate_forward(k, m, scale, by_value)[0]
    return Elevate.apply(k, m, scale, by_value)


def flatten_keys(k: torch.Tensor, strength: float, *, compiled: bool | None = None) -> torch.Tensor:
    """The ``flatten`` intervention: mix the usage distribution with the uniform one, keeping signs and total mass.

    ``k'_i = sign(k_i) * ((1 - a) |k_i| + a * mean_j |k_j|)`` with ``a = strength``; ``strength = 0`` is the identity.
    ``compiled`` chooses the compiled or the eager path (``None``: the process's default).

    >>> flatten_keys(torch.tensor([[4.0, 0.0, -2.0, 2.0]]), 0.5)
    tensor([[ 3.,  0., -2.,  2.]])
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"flatten_strength must be in [0, 1], got {strength!r}")
    if strength == 0.0:
        return k
    return _dispatch(
        "flatten",
        _flatten_formula,
        Flatten.apply,
        k,
        float(strength),
        compiled_entry=_CompiledFlatten.apply,
        compiled=compiled,
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
        args = (grad_out, saved, ctx.strength)
        return _dispatch("flatten-backward", flatten_backward, flatten_backward, *args, compiled=True), None
