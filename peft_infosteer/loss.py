"""Public helpers to read the InfoSteer regularizer of a model: for logging, never for the loss.

The regularizer already reaches the gradient inside the backward of whatever loss you compute (see
:mod:`peft_infosteer.regularizer`); nothing here needs to be added to a loss. These helpers read what the last
forward measured. A training forward (grad enabled) measures when the regularizer is on; other forwards measure
inside :func:`track_flux`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._compat import MODEL_WRAPPER_ATTRIBUTES
from .model import InfoSteerModel

__all__ = ["bind_flux_target", "find_infosteer_model", "infosteer_loss", "last_flux", "step_flux_target", "track_flux"]


def _unwrap(model: Any) -> Any:
    # accelerate / DDP / FSDP / DeepSpeed / torch.compile wrappers keep the real model in `.module` or `._orig_mod`
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in MODEL_WRAPPER_ATTRIBUTES:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            break
    return model


def find_infosteer_model(model: Any) -> InfoSteerModel:
    """Return the ``InfoSteerModel`` inside ``model`` (a ``PeftModel``, possibly wrapped by accelerate or DDP).

    >>> import peft_infosteer
    >>> # find_infosteer_model(trainer.model).flux_tracker.measure
    """
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


def _last_mean_flux(model: Any) -> torch.Tensor | None:
    totals = find_infosteer_model(model).flux_tracker.last
    if totals is None:
        return None
    return torch.where(totals[1] > 0, totals[0] / totals[1].clamp_min(1.0), torch.full_like(totals[0], float("nan")))


def last_flux(model: Any) -> float | None:
    """Mean information flux of the last forward that measured it (over steered layers and counted tokens).

    Returns ``None`` when no forward has measured yet. Forwards without grad measure only inside
    :func:`track_flux`. This reads a value from the device (a synchronisation): call it for logging, not in a hot
    loop.

    >>> import peft_infosteer
    >>> # out = peft_model(**batch, labels=labels); peft_infosteer.last_flux(peft_model) -> 0.83
    """
    mean = _last_mean_flux(model)
    if mean is None:
        return None
    value = float(mean)
    return None if value != value else value


def infosteer_loss(model: Any) -> torch.Tensor:
    """The value of the regularizer ``-entropy_weight * sum_l mean_t H_l`` of the last measured forward, detached.

    ``H_l = F_l * log d_ff`` is a steered layer's entropy in nats; the sum over layers is read as the number of steered
    layers times their mean (exact when every steered layer has the same ``d_ff``).

    For logging: it carries no gradient, so adding it to a loss changes the reported value and nothing else (the
    regularizer's gradient is already in the backward of any loss). Zero when nothing was measured.

    >>> import peft_infosteer
    >>> # print("regularizer:", peft_infosteer.infosteer_loss(peft_model).item())
    """
    tracker = find_infosteer_model(model).flux_tracker
    mean = _last_mean_flux(model)
    if mean is None:
        return torch.zeros((), dtype=torch.float32, device=tracker.weight.device)
    return (-tracker.weight.to(mean.device) * tracker.flux_scale * torch.nan_to_num(mean, nan=0.0)).detach()


def step_flux_target(model: Any) -> None:
    """Update lambda of a flux-target adapter from the optimizer step that just ended (once per parameter update).

    The ``torch.optim`` optimizer that trains the model does this by itself after ``optimizer.step()`` (see
    :func:`bind_flux_target`); call it only in a loop that updates the parameters some other way. A no-op for adapters
    with a fixed ``entropy_weight``.

    >>> import peft_infosteer
    >>> # loss.backward(); my_update(params); peft_infosteer.step_flux_target(peft_model)
    """
    find_infosteer_model(model).flux_state.step_target()


def bind_flux_target(model: Any, optimizer: Any | None) -> None:
    """Update lambda of the model's flux target after each ``optimizer.step()``, and after no other optimizer's.

    Unbound, the target follows every ``torch.optim`` optimizer that holds the model's parameters, which is what a
    loop with one optimizer needs. Bind when that is not the one to follow: several optimizers over the model's
    parameters, or one that steps copies of them (DeepSpeed ZeRO). ``optimizer`` may be accelerate's or DeepSpeed's
    wrapper (the torch optimizer inside is bound); ``None`` unbinds. The trainer integration
    (:class:`~peft_infosteer.InfoSteerCallback`) binds the trainer's optimizer while it trains.

    >>> import peft_infosteer
    >>> # optimizer = torch.optim.AdamW(peft_model.parameters()); peft_infosteer.bind_flux_target(peft_model, optimizer)
    """
    find_infosteer_model(model).flux_state.bind_optimizer(optimizer)


@contextmanager
def track_flux(model: Any) -> Iterator[None]:
    """Within this block, forwards without grad (evaluation, ``generate``) measure the flux too.

    >>> import peft_infosteer
    >>> # with torch.no_grad(), peft_infosteer.track_flux(peft_model):
    >>> #     peft_model(**batch); print(peft_infosteer.last_flux(peft_model))
    """
    tracker = find_infosteer_model(model).flux_tracker
    before = tracker.measure
    tracker.measure = True
    try:
        yield
    finally:
        tracker.measure = before
