"""How the flux of each forward pass is measured, attached to the gradient, and read back.

The regularizer ``-entropy_weight * sum_l mean_t H_l`` is never added to a loss value. Each steering layer attaches
its share to the key coefficients ``k'`` it passes to the output projection, with a small autograd function whose
forward is the identity and whose backward adds the gradient of the share (the pattern of Megatron-LM's
``MoEAuxLossAutoScaler``). Whatever loss the caller builds, its ordinary backward trains the regularizer.

Normalisation. ``entropy_weight`` is the paper's lambda: the regularizer is ``-lambda * sum_l mean_t H_l`` with the
entropy ``H = F * log d_ff`` in nats. The share of layer ``l`` is ``-lambda * log(d_ff) * sum_t w_t F_t`` with
``w_t = m_t / sum(m)`` over the tokens ``m`` that count (next-token labels in the loss, else the attention mask, else
all). The backward scales it by ``s``, the weight the caller's loss gives this forward relative to a per-forward mean,
never the weights it gives single tokens (DFT probabilities, advantages, preference weights: lambda means the same
under every loss, like PPO's entropy bonus). ``s`` arrives during the backward itself, from a probe:

- a trainer's loss plan (:class:`LossPlan`, set by the trainer integration around ``compute_loss``): a probe on the
  loss ``compute_loss`` returns gives ``c`` (what the trainer does to that loss afterwards: accumulation, loss
  scaling) and the plan the normalisation inside it, from counts: ``s = c * sum(m) / D`` for a loss over a fixed
  token count ``D`` (``num_items_in_batch`` per averaging process), ``s = c * sum(m) / (k * sum of sum(m) over the
  call's forwards)`` for a per-micro-batch mean divided by ``k`` inside ``compute_loss``. The plan also supplies the
  batch's labels to forwards that get none (label smoothing, ``compute_loss_func``). No output probe runs then;
- else the model's own ``loss`` (transformers' causal-LM loss): ``s = c * sum(m) / D``, with ``c`` the gradient of
  the final objective with respect to that loss (gradient accumulation, multi-process averaging, loss scaling) and
  ``D`` the loss's own denominator (``num_items_in_batch`` when the forward received it, else ``sum(m)``);
- else TRL's fused per-token ``log_probs``: ``s = sum_t m_t |d objective / d log_probs_t|``, exact for TRL's NLL
  (``c * sum(m) / num_items_in_batch``); the first backwards check that the loss weighs its tokens alike, and warn
  once (and stop the ``infosteer/loss`` metric) when it does not;
- neither (a loss computed from ``logits`` outside the model): ``s = 1``, the mean over this forward's tokens.

The probes hand ``s`` to the layers through autograd: a two-element ``carrier`` tensor runs through every attach
node of the forward in order; its forward value accumulates ``[sum of flux, count]`` for logging, and its gradient,
produced by the probes, is ``[s, 1]`` (``[0, 0]`` when no probe ran). Nothing is read from Python state in a
backward, so the same graph works eagerly, under ``torch.compile`` and under non-reentrant checkpointing.

Protocol of :class:`FluxTracker` (one per ``InfoSteerModel``, shared by its steering layers):

- ``begin`` (the model's forward pre-hook) starts a :class:`ForwardFlux` for a forward that a backward can follow
  (grad enabled) or that someone asked to measure (``measure``), and ``None`` otherwise: the only place a forward's
  state is replaced.
- ``track`` (each steering layer) computes the flux of the keys it passes on and returns them, with the layer's
  share attached when a backward can follow.
- ``finish`` (the model's forward hook) freezes the forward's totals into ``last`` and the running windows, and puts
  the probes on the outputs.
- readers: ``last_flux`` / ``infosteer_loss`` (``peft_infosteer.loss``), the trainer callback and the flux-target
  controller read ``last`` and take the windows (``take_window``).

Reentrant gradient checkpointing runs the layers without autograd during the forward and again, with autograd,
inside the backward. The first run does no flux work; the second attaches the share with the scale that the probe
has by then recorded on the forward's state, and adds its flux to the totals. The recomputation reads the latest
forward's state, so a training loop must call backward before the next grad-enabled forward (every trainer does);
``begin`` warns when that order is broken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ._closed_form import log_d
from .ops import fused_information_flux

__all__ = ["LABEL_LAYOUTS", "ForwardFlux", "FluxTracker", "LossPlan", "token_mask"]

# the tracker's two windows (FluxTracker.take_window): forwards with and without gradient; the trainer uses them too
_TRAIN, _EVAL = "train", "eval"
# backwards in which the per-token log-probability probe checks that the loss weighs its tokens alike (a sync each)
_TOKEN_CHECKS = 4


#: how a model's ``labels`` line up with the positions its layers see (``InfoSteerModel`` picks one per model):
#: ``"causal"``: position ``t`` predicts label ``t + 1`` (causal LMs); ``"token"``: position ``t`` is scored against
#: label ``t`` (token classification); ``"seq2seq"``: the labels are the decoder's, unshifted (the decoder input is
#: the labels shifted right), and the encoder's attention mask says nothing about decoder positions
LABEL_LAYOUTS: tuple[str, ...] = ("causal", "token", "seq2seq")


def token_mask(kwargs: dict[str, Any], layout: str = "causal") -> torch.Tensor | None:
    """The positions whose prediction is in the task loss; else the attention mask; else ``None`` (all).

    ``kwargs`` are the keyword arguments of a model forward; ``layout`` is one of :data:`LABEL_LAYOUTS`.

    >>> token_mask({"labels": torch.tensor([[-100, 5, 6, -100]])})
    tensor([[ True,  True, False, False]])
    >>> token_mask({"labels": torch.tensor([[-100, 5, 6, -100]])}, layout="token")
    tensor([[False,  True,  True, False]])
    """
    if layout not in LABEL_LAYOUTS:
        raise ValueError(f"layout must be one of {LABEL_LAYOUTS}, got {layout!r}")
    shift_labels = kwargs.get("shift_labels")
    if layout == "causal" and isinstance(shift_labels, torch.Tensor):
        return shift_labels != -100
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and not labels.is_floating_point():
        if layout != "causal":
            return labels != -100
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    attention_mask = kwargs.get("decoder_attention_mask" if layout == "seq2seq" else "attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return None


@dataclass(eq=False)
class ForwardFlux:
    """The flux bookkeeping of one forward pass (see the module docstring for who writes and reads what)."""

    with_grad: bool
    # float32 (batch, seq) 0/1 mask of the tokens that count, and the same divided by their number
    mask: torch.Tensor | None
    token_weights: torch.Tensor | None
    # sum(m), a float32 scalar tensor (set by the first regularizing layer when no mask is known)
    count: torch.Tensor | None
    # sum(m) / D for the model-loss probe (1 unless the forward received num_items_in_batch)
    loss_ratio: torch.Tensor | None
    # -lambda, a float32 scalar tensor (each layer's share is this times log d_ff); None when the regularizer is off
    coefficient: torch.Tensor | None
    carrier: torch.Tensor
    # the trainer's loss plan this forward runs under (its probe sits on the trainer's loss, not on the outputs)
    plan: LossPlan | None = None
    measured: bool = False
    finished: bool = False
    # a layer ran without autograd inside a grad-enabled forward: reentrant gradient checkpointing
    reentrant: bool = False
    recomputed: bool = False
    # reentrant mode: [s, fired] recorded by the probes during backward, for the recomputed layers
    scale: torch.Tensor | None = None
    totals: torch.Tensor | None = None

    def weights_for(self, flux: torch.Tensor, with_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mask and per-token weights aligned with ``flux`` (shape ``k.shape[:-1]``), or ``None`` for all tokens."""
        if self.mask is None or self.token_weights is None:
            return None, None
        if self.mask.numel() == flux.numel():
            return self.mask.reshape(flux.shape), self.token_weights.reshape(flux.shape)
        if with_grad:
            raise ValueError(
                f"InfoSteer cannot align the key coefficients of shape {tuple(flux.shape)} with the token mask of "
                f"shape {tuple(self.mask.shape)} derived from labels / attention_mask. Pass labels (or an "
                "attention_mask) of shape (batch, sequence) matching the input, or report the model type."
            )
        return None, None  # e.g. generate() with a KV cache: one new token against the whole attention mask

    def add_scale(self, scale: torch.Tensor) -> None:
        self.scale = scale if self.scale is None else self.scale + scale


@dataclass(eq=False)
class LossPlan:
    """How a trainer normalises the task loss of one ``compute_loss`` call, told to the tracker by the trainer
    integration (:class:`~peft_infosteer.InfoSteerCallback`) so that nothing is read from the loss's per-token weights.

    The regularizer of each grad-enabled forward ``i`` in the call is its mean over its counted tokens ``n_i``, with
    the backward scale ``c * n_i / denominator`` (a loss normalised by a fixed token count, such as
    ``num_items_in_batch``) or ``c * n_i / (divisor * sum_j n_j)`` (a per-micro-batch mean, divided by ``divisor``
    inside ``compute_loss``), ``c`` being the gradient of the final objective with respect to the loss ``compute_loss``
    returns (what the trainer does to it afterwards: accumulation, loss scaling).
    """

    #: the loss, for messages: e.g. "SFTTrainer(loss_type='dft')"
    name: str
    #: the labels of the batch, for the forwards that get none (label smoothing, ``compute_loss_func``), or with
    #: ``override`` for every forward (the loss uses fewer tokens than the forward's labels say)
    labels: torch.Tensor | None = None
    override: bool = False
    #: the loss's fixed token count (``num_items_in_batch`` over the processes that average); None: a per-batch mean
    denominator: torch.Tensor | None = None
    divisor: float = 1.0
    #: the grad-enabled forwards of the call, in order
    states: list[ForwardFlux] = field(default_factory=list)


def _flux_stats(flux: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[sum of flux, number of tokens]`` over the counted tokens whose usage distribution is defined."""
    weight = valid.to(torch.float32)
    if mask is not None:
        weight = weight * mask
    return torch.stack([(flux.detach() * weight).sum(), weight.sum()])


class _AttachFlux(torch.autograd.Function):
    """Identity on ``k``; backward adds ``coefficient * log_d * s * token_weights`` as the per-token flux's gradient.

    ``s`` is the carrier's gradient ``[s, fired]`` (``s = 1`` where no probe fired) or, during a reentrant
    recomputation, the scale the probes recorded. The carrier's value accumulates ``stats`` for logging.
    """

    @staticmethod
    def forward(ctx, k, flux, stats, carrier, token_weights, coefficient, fixed_scale, log_d):
        # plain attributes, not save_for_backward: a non-reentrant checkpoint recomputation must not replace them
        ctx.token_weights = token_weights
        ctx.coefficient = coefficient * log_d  # flux F = H / log d_ff: lambda weighs H
        ctx.fixed_scale = fixed_scale
        return k.view_as(k), carrier + stats

    @staticmethod
    def backward(ctx, grad_k, grad_carrier):
        scale = grad_carrier if ctx.fixed_scale is None else ctx.fixed_scale
        s = torch.where(scale[1] > 0, scale[0], torch.ones_like(scale[0]))
        grad_flux = (ctx.coefficient * s) * ctx.token_weights
        return grad_k, grad_flux, None, grad_carrier, None, None, None, None


class _LossProbe(torch.autograd.Function):
    """Identity on the model's loss; backward sends ``[c * ratio, 1]`` to the carrier (``c``: the loss's gradient)."""

    @staticmethod
    def forward(ctx, loss, carrier, ratio, state):
        ctx.ratio = ratio
        ctx.state = state
        return loss.clone()  # not a view: trainers scale the loss in place (``loss *= num_processes``)

    @staticmethod
    def backward(ctx, grad):
        c = grad.to(torch.float32).sum()
        scale = torch.stack([c * ctx.ratio, torch.ones_like(c)])
        if ctx.state is not None:
            ctx.state.add_scale(scale)  # reentrant mode only: the recomputed layers read it later in this backward
        return grad, scale, None, None


class _TokenProbe(torch.autograd.Function):
    """Identity on per-token log-probabilities; backward sends ``[sum_t m_t |g_t|, 1]`` to the carrier.

    Exact for a loss that weighs its tokens alike (TRL's NLL); ``monitor`` (a tracker, for its first backwards)
    checks that, since any other weighting (DFT, preference, RL losses) would carry over to the regularizer.
    """

    @staticmethod
    def forward(ctx, log_probs, carrier, mask, state, monitor):
        ctx.mask = mask
        ctx.state = state
        ctx.monitor = monitor
        return log_probs.clone()  # not a view, so that in-place edits downstream stay legal

    @staticmethod
    def backward(ctx, grad):
        g = grad.to(torch.float32)
        s = (g.abs() * ctx.mask).sum()
        if ctx.monitor is not None:
            ctx.monitor._check_token_gradient(g, ctx.mask)
        scale = torch.stack([s, torch.ones_like(s)])
        if ctx.state is not None:
            ctx.state.add_scale(scale)
        return grad, scale, None, None, None


class _PlanProbe(torch.autograd.Function):
    """Identity on the loss a trainer's ``compute_loss`` returns; backward sends ``[c * ratio_i, 1]`` to the carrier
    of each forward ``i`` of the call (``c``: the loss's gradient; ``ratios``: see :class:`LossPlan`)."""

    @staticmethod
    def forward(ctx, loss, ratios, sides, *carriers):
        ctx.ratios = ratios
        ctx.sides = sides
        return loss.clone()  # not a view: trainers scale the loss in place

    @staticmethod
    def backward(ctx, grad):
        c = grad.to(torch.float32).sum()
        scales = []
        for ratio, side in zip(ctx.ratios.unbind(), ctx.sides, strict=True):
            scale = torch.stack([c * ratio, torch.ones_like(c)])
            if side is not None:
                side.add_scale(scale)  # reentrant mode: the recomputed layers read it later in this backward
            scales.append(scale)
        return (grad, None, None, *scales)


class FluxTracker:
    """Per-forward flux state shared by the steering layers of one ``InfoSteerModel`` (protocol: module docstring).

    >>> tracker = FluxTracker()
    >>> tracker.begin({}, with_grad=False, regularizing_layers=0) is None  # no backward can follow, nothing asked
    True
    """

    def __init__(self) -> None:
        #: measure the flux of forwards that no backward follows (evaluation, analysis); grad-enabled forwards
        #: measure whenever the regularizer is on
        self.measure = False
        #: the totals ``[sum of flux, count]`` of the last forward that measured anything
        self.last: torch.Tensor | None = None
        # lambda as a float32 scalar tensor, so that a changing multiplier (flux target) recompiles nothing
        self.weight = torch.zeros((), dtype=torch.float32)
        self.regularizing = False
        #: sum of log(d_ff) over the layers that steered the last forward: the regularizer's value is
        #: ``-weight * flux_scale * mean flux`` (the paper's ``-lambda * sum_l mean_t H_l``)
        self.flux_scale = 0.0
        # the forward between begin and finish, and the last grad-enabled one (its backward may recompute layers)
        self._active: ForwardFlux | None = None
        self._training: ForwardFlux | None = None
        self._window: dict[str, torch.Tensor] = {}
        #: called with the totals of every training forward (the flux target's step window)
        self.observers: list[Callable[[torch.Tensor], None]] = []
        self._warned_order = False
        self._warned_no_labels = False
        # the trainer's loss plan of the compute_loss call in progress (see LossPlan)
        self._plan: LossPlan | None = None
        #: why the regularizer's strength is not lambda's (a loss that weighs its tokens, with no loss plan), or None;
        #: the trainer callback then logs no ``infosteer/loss``
        self.scale_unknown: str | None = None
        self._token_checks = _TOKEN_CHECKS
        #: whether this model's layers run the compiled math (``ops``, ``compiled``); ``None``: the process's default
        self.compiled_math: bool | None = None

    # ---- configuration (the model) ---------------------------------------------------------------------------

    def set_weight(self, value: float, regularizing: bool) -> None:
        """Set lambda; ``regularizing`` says whether grad-enabled forwards attach the regularizer at all."""
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"the regularizer weight must be a finite number >= 0, got {value!r}")
        self.weight = torch.full((), float(value), dtype=torch.float32, device=self.weight.device)
        self.regularizing = regularizing

    # ---- one forward ----------------------------------------------------------------------------------------

    def begin(
        self,
        kwargs: dict[str, Any],
        with_grad: bool,
        regularizing_layers: int,
        device: torch.device | None = None,
        layout: str = "causal",
    ) -> ForwardFlux | None:
        """Start the bookkeeping of a forward with keyword arguments ``kwargs``; ``None`` when there is none to do.

        ``layout`` says how the forward's labels line up with its positions (:func:`token_mask`).
        """
        self._active = None
        if not with_grad and not self.measure:
            return None
        previous = self._training
        if with_grad and previous is not None and previous.reentrant and not previous.recomputed:
            self._warn_order()
        plan = self._plan if with_grad else None
        if plan is not None and plan.labels is not None and (plan.override or not _has_labels(kwargs)):
            kwargs = _with_plan_labels(kwargs, plan)  # the loss's tokens, which this forward was not given
        mask = token_mask(kwargs, layout)
        if device is None:
            device = mask.device if mask is not None else self.weight.device
        token_weights = loss_ratio = count = None
        if mask is not None:
            mask = mask.to(device=device, dtype=torch.float32)
            count = mask.sum()
            token_weights = mask / count.clamp_min(1.0)
            loss_ratio = torch.ones((), dtype=torch.float32, device=device)
            items = kwargs.get("num_items_in_batch")
            if items is not None:
                loss_ratio = count / torch.as_tensor(items, dtype=torch.float32, device=device).clamp_min(1.0)
        coefficient = None
        if with_grad and self.regularizing and regularizing_layers > 0:
            if self.weight.device != device:
                self.weight = self.weight.to(device)
            coefficient = -self.weight
            if plan is None and not _has_labels(kwargs):
                self._warn_no_labels(mask is not None)
        state = ForwardFlux(
            with_grad=with_grad,
            mask=mask,
            token_weights=token_weights,
            count=count,
            loss_ratio=loss_ratio,
            coefficient=coefficient,
            carrier=torch.zeros(2, dtype=torch.float32, device=device),
            plan=plan,
        )
        if plan is not None:
            plan.states.append(state)
        self._active = state
        if with_grad:
            self._training = state
        return state

    def track(self, k: torch.Tensor, usage: str, temperature: float) -> torch.Tensor:
        """Measure the flux of the keys ``k`` a steering layer passes on; return ``k`` (with its share attached)."""
        grad_now = torch.is_grad_enabled()
        state = self._active
        if state is None:
            # after the forward: a gradient-checkpointing recomputation inside backward, or nothing to do
            state = self._training if grad_now else None
            if state is None or not state.finished:
                return k
        if state.with_grad and not grad_now and state.coefficient is not None:
            if not state.finished:
                state.reentrant = True  # reentrant checkpointing: this layer runs again, with grad, in backward
            return k
        # without the regularizer, a reentrant checkpoint's first (grad-less) run is where a measured forward measures
        regularize = state.coefficient is not None and grad_now and k.requires_grad
        if not regularize:
            if not (self.measure or state.coefficient is not None) or state.finished:
                return k
            with torch.no_grad():
                flux, valid = fused_information_flux(k, usage, temperature, compiled=self.compiled_math)
                mask, _ = state.weights_for(flux, with_grad=False)
                state.carrier = state.carrier + _flux_stats(flux, valid, mask)
            state.measured = True
            return k
        flux, valid = fused_information_flux(k, usage, temperature, compiled=self.compiled_math)
        mask, token_weights = state.weights_for(flux, with_grad=True)
        if token_weights is None:  # no labels and no attention mask: every position counts
            token_weights = torch.full_like(flux, 1.0 / max(flux.numel(), 1))
            if state.count is None:
                state.count = torch.full((), float(flux.numel()), dtype=torch.float32, device=flux.device)
        stats = _flux_stats(flux, valid, mask)
        if not state.finished:
            k, state.carrier = _AttachFlux.apply(
                k, flux, stats, state.carrier, token_weights, state.coefficient, None, log_d(k)
            )
            state.measured = True
        elif state.reentrant:
            # the recomputation of a reentrant checkpoint: the probes have recorded the scale by now
            state.recomputed = True
            fixed_scale = state.scale if state.scale is not None else torch.zeros_like(state.carrier)
            k, _ = _AttachFlux.apply(
                k, flux, stats, state.carrier, token_weights, state.coefficient, fixed_scale, log_d(k)
            )
            self._add_totals(state, stats)
        else:
            # a non-reentrant recomputation: it must save what the original forward saved; its attach node is unused
            k, _ = _AttachFlux.apply(k, flux, stats, state.carrier, token_weights, state.coefficient, None, log_d(k))
        return k

    def finish(self, outputs: Any) -> Any:
        """Freeze the totals of the current forward and put the loss-scale probes on ``outputs``."""
        state = self._active
        self._active = None
        if state is None or state.finished:
            return outputs
        state.finished = True
        if state.measured:
            self._add_totals(state, state.carrier.detach())
        if not state.with_grad or state.coefficient is None or not (state.carrier.requires_grad or state.reentrant):
            return outputs
        if state.plan is not None:
            return outputs  # the trainer's loss plan probes the loss compute_loss returns (plan_probe)
        side = state if state.reentrant else None
        loss = _get(outputs, "loss")
        if isinstance(loss, torch.Tensor) and loss.requires_grad and state.loss_ratio is not None:
            _set(outputs, "loss", _LossProbe.apply(loss, state.carrier, state.loss_ratio, side))
        log_probs = _get(outputs, "log_probs")
        label_mask = _get(outputs, "label_mask")
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad and isinstance(label_mask, torch.Tensor):
            mask = label_mask.to(device=log_probs.device, dtype=torch.float32)
            monitor = self if self._token_checks > 0 else None
            _set(outputs, "log_probs", _TokenProbe.apply(log_probs, state.carrier, mask, side, monitor))
        return outputs

    # ---- the trainer's loss plan (trainer integration) ----------------------------------------------------------

    @contextmanager
    def planned(self, plan: LossPlan) -> Iterator[LossPlan]:
        """The grad-enabled forwards within this block run under ``plan`` (a trainer's ``compute_loss`` call)."""
        previous, self._plan = self._plan, plan
        try:
            yield plan
        finally:
            self._plan = previous

    def plan_probe(self, plan: LossPlan, loss: Any) -> Any:
        """``loss`` (what ``compute_loss`` returned under ``plan``) with the probe that scales the regularizer of the
        plan's forwards in the backward (:class:`LossPlan`); ``loss`` itself when no backward can reach them."""
        states = [s for s in plan.states if s.coefficient is not None and (s.carrier.requires_grad or s.reentrant)]
        if not states or not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return loss
        device = states[0].carrier.device
        counts = torch.stack([torch.ones((), device=device) if s.count is None else s.count.to(device) for s in states])
        if plan.denominator is not None:
            ratios = counts / plan.denominator.to(device=device, dtype=torch.float32).clamp_min(1.0)
        else:
            ratios = counts / (counts.sum().clamp_min(1.0) * plan.divisor)
        sides = tuple(s if s.reentrant else None for s in states)
        return _PlanProbe.apply(loss, ratios, sides, *(s.carrier for s in states))

    def _check_token_gradient(self, grad: torch.Tensor, mask: torch.Tensor) -> None:
        """Called in the backward of the per-token log-probability probe: warn once when the loss does not weigh its
        counted tokens alike, since the regularizer's strength would then follow those weights (a host sync)."""
        if torch.compiler.is_compiling():
            return
        self._token_checks -= 1
        counted = grad[mask > 0]
        if counted.numel() == 0:
            return
        top = counted.abs().max()
        if bool(top > 0) and bool(counted.max() - counted.min() <= 1e-5 * top):
            return  # every counted token has the same weight: a (scaled) mean NLL
        self._token_checks = 0
        self.scale_unknown = (
            "the loss built from TRL's per-token log-probabilities weighs its tokens unequally, or gives them no "
            "gradient at all (DFT, DPO and other preference losses, GRPO and other RL losses, e.g. with all advantages "
            "0), so the regularizer's normalisation cannot be read from it and its strength follows those weights "
            "instead of entropy_weight"
        )
        warnings.warn(
            f"InfoSteer: {self.scale_unknown}. Attach the trainer integration, which takes the normalisation from the "
            "trainer: InfoSteerCallback.attach(trainer) (InfoSteerSFTTrainer does it). Until then infosteer/loss is "
            "not logged.",
            UserWarning,
            stacklevel=2,
        )

    def _add_totals(self, state: ForwardFlux, stats: torch.Tensor) -> None:
        state.totals = stats if state.totals is None else state.totals + stats
        self.last = state.totals
        mode = _TRAIN if state.with_grad else _EVAL
        self._window[mode] = stats if mode not in self._window else self._window[mode] + stats
        if state.with_grad:
            for observe in self.observers:
                observe(stats)

    def _warn_no_labels(self, masked: bool) -> None:
        # the loss may count fewer tokens than the forward attends to: say which tokens the regularizer counts
        if self._warned_no_labels:
            return
        self._warned_no_labels = True
        counted = "every token of the attention mask" if masked else "every position"
        warnings.warn(
            f"InfoSteer: a training forward got no labels, so the regularizer counts {counted}. If the loss counts "
            "fewer tokens (prompt-completion or assistant-only masks, label smoothing, a compute_loss_func), pass "
            "labels to the forward, or attach the trainer integration (InfoSteerCallback.attach(trainer) or "
            "InfoSteerSFTTrainer), which takes the loss's tokens from the batch.",
            UserWarning,
            stacklevel=4,
        )

    def _warn_order(self) -> None:
        if self._warned_order:
            return
        self._warned_order = True
        warnings.warn(
            "InfoSteer: a grad-enabled forward started before the backward of the previous one, under reentrant "
            "gradient checkpointing. The recomputation during backward reads the latest forward's token mask, so call "
            "backward() after each forward, or use non-reentrant checkpointing.",
            UserWarning,
            stacklevel=4,
        )

    # ---- readers --------------------------------------------------------------------------------------------

    def take_window(self, mode: str) -> torch.Tensor | None:
        """``[sum of flux, count]`` over the forwards of ``mode`` ("train" or "eval") since the last take."""
        return self._window.pop(mode, None)


def _has_labels(kwargs: dict[str, Any]) -> bool:
    return any(isinstance(kwargs.get(name), torch.Tensor) for name in ("labels", "shift_labels"))


def _with_plan_labels(kwargs: dict[str, Any], plan: LossPlan) -> dict[str, Any]:
    """``kwargs`` with the plan's labels in place of the forward's own; refuses labels that cannot be the forward's."""
    labels = plan.labels
    assert labels is not None
    inputs = next((kwargs[n] for n in ("input_ids", "attention_mask") if isinstance(kwargs.get(n), torch.Tensor)), None)
    if inputs is not None and tuple(inputs.shape[:2]) != tuple(labels.shape[:2]):
        raise ValueError(
            f"InfoSteer: {plan.name} computes its loss on the batch's labels of shape {tuple(labels.shape)}, but a "
            f"training forward it ran got inputs of shape {tuple(inputs.shape)} and no labels, so the tokens that "
            "count cannot be told. Pass the labels to that forward (or report the trainer)."
        )
    return {**{k: v for k, v in kwargs.items() if k != "shift_labels"}, "labels": labels}


def _get(outputs: Any, name: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _set(outputs: Any, name: str, value: torch.Tensor) -> None:
    if isinstance(outputs, dict):
        outputs[name] = value  # a transformers ModelOutput is a dict that keeps its attributes in sync
    else:
        setattr(outputs, name, value)
