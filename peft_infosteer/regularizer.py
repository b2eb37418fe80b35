"""Collect the flux of each forward pass and turn it into the InfoSteer regularizer.

Each steering layer reports, per forward, the sum of the flux over the tokens that count and how many tokens
counted. The model clears the record at the start of every forward, so what is read afterwards always belongs to the
last forward. Recomputation during backward (non-reentrant gradient checkpointing) is not recorded.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .ops import fused_information_flux

__all__ = ["FluxRecord", "FluxRecorder", "find_infosteer_model", "infosteer_loss", "last_flux"]


@dataclass
class FluxRecord:
    """The flux of one steered layer in one forward: per token, and where it is defined (``valid``)."""

    layer: str
    flux: torch.Tensor
    valid: torch.Tensor


@dataclass
class FluxRecorder:
    """Per-forward store shared by the steering layers of one ``InfoSteerModel``."""

    enabled: bool = True
    token_mask: torch.Tensor | None = None
    records: list[FluxRecord] = field(default_factory=list)
    # set when a layer ran without grad inside a forward that expected grad: reentrant gradient checkpointing
    lost_grad: bool = False
    grad_expected: bool = False
    # a training forward whose regularizer nobody has read yet (see `warn_if_unread`)
    unread: bool = False
    warned_unread: bool = False
    # set by trainers: keep the first forward that records something and ignore later ones (metric-only forwards)
    hold: bool = False
    forced_mask: torch.Tensor | None = None
    _discard: bool = False

    def start(self, token_mask: torch.Tensor | None, grad_expected: bool) -> None:
        """Forget the previous forward and remember which tokens count in this one."""
        if self.hold and self.records:
            self._discard = True
            return
        self._discard = False
        self.records = []
        self.token_mask = self.forced_mask if self.forced_mask is not None else token_mask
        self.lost_grad = False
        self.grad_expected = grad_expected
        self.unread = False

    def clear(self) -> None:
        """Drop the records (and the autograd graph they hold)."""
        self.records = []
        self.token_mask = None
        self.unread = False

    @contextmanager
    def holding(self, token_mask: torch.Tensor | None = None) -> Iterator[FluxRecorder]:
        """Within this block, keep the records of the first forward that records anything.

        Trainers run extra forwards for metrics (TRL's ``compute_loss_func`` path, DPO's reference model); the first
        steered forward is the one the loss is built from. ``token_mask`` overrides the mask derived from the inputs.
        """
        self.clear()
        self.hold, self.forced_mask = True, token_mask
        try:
            yield self
        finally:
            self.hold, self.forced_mask, self._discard = False, None, False

    def warn_if_unread(self, entropy_weight: float) -> None:
        """Warn once when a training forward's regularizer was never read before the next forward."""
        if self.unread and entropy_weight > 0 and not self.warned_unread:
            self.warned_unread = True
            warnings.warn(
                f"InfoSteer: entropy_weight={entropy_weight} but the regularizer of the last training forward was "
                "never added to the loss, so it has no effect. Train with peft_infosteer.InfoSteerSFTTrainer (or "
                "InfoSteerTrainerMixin for other trainers), or add peft_infosteer.infosteer_loss(model) to your loss.",
                UserWarning,
                stacklevel=3,
            )

    def record(
        self, layer: str, k: torch.Tensor, usage: str, temperature: float, with_grad: bool, store: bool = True
    ) -> None:
        """Compute the flux of key vectors ``k`` (shape ``(..., d_ff)``) seen by ``layer`` and store it.

        With ``store=False`` (a layer re-run by non-reentrant checkpointing during backward) the differentiable
        computation still runs, because the recomputation must save the same tensors as the original forward, but
        nothing is stored.
        """
        store = store and not self._discard
        if store and self.grad_expected and with_grad and not torch.is_grad_enabled():
            self.lost_grad = True
        with_grad = with_grad and torch.is_grad_enabled()
        if not (store or with_grad):
            return
        with torch.set_grad_enabled(with_grad):
            flux, valid = fused_information_flux(k if with_grad else k.detach(), usage, temperature)
        if store:
            # the token mask is applied when the records are read, outside any checkpointed region: a recomputation
            # must not depend on state that may have changed by the time backward runs
            self.records.append(FluxRecord(layer, flux, valid))
            self.unread = self.unread or (with_grad and self.grad_expected)

    def totals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Sum of flux and number of counted tokens over all layers of the last forward, or ``None`` if none ran.

        A token counts where the token mask of the forward is set and its usage distribution is defined.
        """
        if not self.records:
            return None
        device = self.records[0].flux.device
        flux_sum = torch.zeros((), dtype=torch.float32, device=device)
        count = torch.zeros((), dtype=torch.float32, device=device)
        for record in self.records:
            weight = record.valid
            mask = self.token_mask
            if mask is not None and mask.numel() == weight.numel():
                weight = weight & mask.to(weight.device).reshape(weight.shape)
            weight = weight.to(torch.float32)
            flux_sum = flux_sum + (record.flux * weight).sum().to(device)
            count = count + weight.sum().to(device)
        return flux_sum, count


def _unwrap(model: Any) -> Any:
    # accelerate / DDP / FSDP / torch.compile wrappers all keep the real model in `.module` or `._orig_mod`
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            break
    return model


def find_infosteer_model(model: Any):
    """Return the ``InfoSteerModel`` inside ``model`` (a ``PeftModel``, possibly wrapped by accelerate or DDP)."""
    from .model import InfoSteerModel

    model = _unwrap(model)
    if isinstance(model, InfoSteerModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, InfoSteerModel):
        return base
    raise TypeError(
        f"expected a PeftModel with an InfoSteer adapter, got {type(model).__name__}. Create it with "
        "peft.get_peft_model(model, InfoSteerConfig(...)) after `import peft_infosteer`."
    )


def last_flux(model: Any) -> float | None:
    """Mean information flux of ``model``'s last forward (over steered layers and counted tokens), as a float.

    Returns ``None`` if the last forward steered nothing or counted no token.

    >>> import peft_infosteer
    >>> # after `outputs = peft_model(**batch)`: peft_infosteer.last_flux(peft_model) -> 0.83
    """
    totals = find_infosteer_model(model).flux_recorder.totals()
    if totals is None or float(totals[1]) == 0.0:
        return None
    return float(totals[0].detach() / totals[1])


def infosteer_loss(model: Any, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """The regularizer ``-entropy_weight * mean flux`` of ``model``'s last forward, with grad.

    Add it to the task loss in a custom training loop. It is zero (still a tensor) when ``entropy_weight`` is 0 or no
    token counted. ``num_items`` is for gradient accumulation: pass the number of loss tokens of the whole
    accumulation window (what transformers calls ``num_items_in_batch``) and the term is normalised by it, so that
    the sum over micro-batches equals the regularizer of the full batch.

    >>> import peft_infosteer
    >>> # loss = outputs.loss + peft_infosteer.infosteer_loss(peft_model); loss.backward()
    """
    tuner = find_infosteer_model(model)
    config = tuner.active_infosteer_config()
    recorder = tuner.flux_recorder
    totals = recorder.totals()
    device = next((p.device for p in tuner.parameters()), torch.device("cpu"))
    if config.entropy_weight == 0 or totals is None:
        return torch.zeros((), device=device)
    if recorder.lost_grad:
        raise RuntimeError(
            "InfoSteer's regularizer has no gradient: the steered layers ran without autograd inside a training "
            "forward. This is what reentrant gradient checkpointing does. Use "
            "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
        )
    recorder.unread = False
    flux_sum, count = totals
    if num_items is not None:
        layers = len(recorder.records)
        denom = torch.as_tensor(num_items, dtype=torch.float32, device=flux_sum.device) * layers
    else:
        denom = count
    mean_flux = flux_sum / denom.clamp_min(1.0)
    return -config.entropy_weight * mean_flux
