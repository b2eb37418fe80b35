"""A flux target with an automatic lambda: the regularizer's weight as a dual variable.

Instead of a fixed ``entropy_weight``, the user asks for a mean flux: a rise over the flux the model starts from
(``flux_target_rise``) or an absolute value (``flux_target``). Lambda, in the units of ``entropy_weight`` (the paper's
lambda, weighing the entropy in nats summed over the steered layers), then becomes a non-negative multiplier, updated
once per optimizer step from the mean flux of that step (all micro-batches of the accumulation window, all ranks),
like the temperature of soft actor-critic (Haarnoja et al., 2018) or GECO's multipliers (Rezende & Viola, 2018):

    lambda <- clip(lambda * exp(rate * clip((target - mean flux) / 0.01, -1, 1)), 0, max_entropy_weight)

The step is multiplicative (in log lambda), as in both of those: the lambda a model needs differs by orders of magnitude
between models (the entropy's gradient scales like ``1 / sum |k|``), and a multiplicative step reaches any of
them in a number of steps that depends on the ratio, not on the scale. It is bounded: at most a factor ``exp(rate)``
per step, reached when the gap is 0.01 flux or more. ``entropy_weight`` is where lambda starts. Lambda stops at
``max_entropy_weight`` when the target is out of reach, with one warning, instead of growing until training collapses.

The starting flux is the mean flux of the first optimizer step (measured before the first update). Lambda and the
starting flux are training state (:meth:`FluxTarget.state_dict`): the trainer callback saves them in checkpoints and
restores them on resume; they are not part of the adapter.

The optimizer of the loop that trains the model triggers the update, no other: the model's
:class:`~peft_infosteer.state.FluxState` calls :meth:`FluxTarget.step` after each ``step()`` of the optimizer bound to
it (``peft_infosteer.bind_flux_target(model, optimizer)``; the trainer integration binds the trainer's) or, while none
is bound, of any ``torch.optim`` optimizer that holds the model's parameters. A loop that updates the parameters
without a torch optimizer calls ``peft_infosteer.step_flux_target(model)`` once per update.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .regularizer import FluxTracker

__all__ = ["FLUX_GAP_SCALE", "FluxTarget"]

#: a gap between target and measured flux of this size (or more) moves lambda by the full step
FLUX_GAP_SCALE = 0.01
# lambda cannot reach 0 multiplicatively; below this fraction of its start it is as good as off
_FLOOR_FRACTION = 1e-4


class FluxTarget:
    """Drives ``tracker.weight`` (lambda) towards a mean-flux target; one per adapter with a target (``FluxState``).

    ``start_weight`` and ``max_weight`` are lambdas in the units of ``entropy_weight`` (the paper's lambda); the target
    and the measured flux are normalised flux ``F = H / log d_ff`` in ``[0, 1]``.

    >>> from peft_infosteer.regularizer import FluxTracker
    >>> tracker = FluxTracker()
    >>> target = FluxTarget(tracker, rise=0.01, absolute=None, start_weight=0.01, rate=0.2, max_weight=100.0)
    >>> target.observe(torch.tensor([80.0, 100.0]))  # step 1: flux 0.8, the start
    >>> target.step(); round(target.target, 4), round(target.weight, 5)  # the gap is a full 0.01: lambda * exp(0.2)
    (0.81, 0.01221)
    """

    def __init__(
        self,
        tracker: FluxTracker,
        rise: float | None,
        absolute: float | None,
        start_weight: float,
        rate: float,
        max_weight: float,
        legacy_factor: float = 1.0,
    ) -> None:
        self.tracker = tracker
        # lambda of the units before 0.2.0 / lambda: how a checkpoint written then is read (load_state_dict)
        self.legacy_factor = legacy_factor
        self.rise = rise
        self.absolute = absolute
        self.rate = rate
        self.max_weight = max_weight
        self.start_weight = start_weight
        self.weight = start_weight
        self.flux_start: float | None = None
        self.last_flux: float | None = None
        self.steps = 0
        self._window: torch.Tensor | None = None
        self._warned_cap = False
        tracker.set_weight(start_weight, regularizing=True)
        tracker.observers.append(self.observe)

    @property
    def target(self) -> float | None:
        """The mean flux asked for (``None`` until the starting flux is known, for a rise)."""
        if self.absolute is not None:
            return self.absolute
        return None if self.flux_start is None else self.flux_start + (self.rise or 0.0)

    def observe(self, totals: torch.Tensor) -> None:
        """Add the ``[sum of flux, count]`` of one training forward to the current optimizer step's window."""
        totals = totals.detach()
        self._window = totals if self._window is None else self._window + totals.to(self._window.device)

    def step(self) -> None:
        """Update lambda from the window of the optimizer step that just ended (a no-op if it measured nothing).

        The window is summed over ranks first (a collective: every rank calls this at the same step).
        """
        window, self._window = self._window, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank joins, even one that measured nothing: a collective needs all of them
            window = torch.zeros(2, dtype=torch.float32) if window is None else window.float()
            window = window.to(_collective_device())
            torch.distributed.all_reduce(window)
        if window is None:
            return
        flux_sum, count = (float(v) for v in window.cpu())  # once per optimizer step, after it: not in a graph
        if count <= 0:
            return
        flux = flux_sum / count
        self.last_flux = flux
        self.steps += 1
        if self.flux_start is None:
            self.flux_start = flux
        target = self.target
        assert target is not None
        gap = max(-1.0, min(1.0, (target - flux) / FLUX_GAP_SCALE))
        weight = self.weight * math.exp(self.rate * gap)
        if weight >= self.max_weight:
            weight = self.max_weight
            if not self._warned_cap and gap > 0:
                self._warned_cap = True
                warnings.warn(
                    f"InfoSteer flux target {target:.4f} is out of reach: lambda stopped at max_entropy_weight="
                    f"{self.max_weight:g} with a mean flux of {flux:.4f}. Lower the target, or raise "
                    "max_entropy_weight if the task loss still falls.",
                    UserWarning,
                    stacklevel=2,
                )
        self.weight = max(weight, self.start_weight * _FLOOR_FRACTION)
        self.tracker.set_weight(self.weight, regularizing=True)

    # ---- training state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Lambda, the starting flux and the step count: what a resumed run needs to continue exactly."""
        return {
            "weight": self.weight,
            "flux_start": self.flux_start,
            "steps": self.steps,
            "last_flux": self.last_flux,
            "lambda_units": "paper",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; a state without ``lambda_units`` (written before 0.2.0) is converted."""
        weight = float(state["weight"])
        self.weight = weight if state.get("lambda_units") == "paper" else weight / self.legacy_factor
        self.flux_start = None if state.get("flux_start") is None else float(state["flux_start"])
        self.steps = int(state.get("steps", 0))
        self.last_flux = state.get("last_flux")
        self._window = None
        self.tracker.set_weight(self.weight, regularizing=True)

    def close(self) -> None:
        """Stop observing training forwards (the adapter was deactivated, deleted or unloaded)."""
        if self.observe in self.tracker.observers:
            self.tracker.observers.remove(self.observe)

    def resume(self) -> None:
        """Observe training forwards again, from the state it had (the adapter was activated again)."""
        if self.observe not in self.tracker.observers:
            self.tracker.observers.append(self.observe)
        self.tracker.set_weight(self.weight, regularizing=True)

    @property
    def pending(self) -> bool:
        """Whether training forwards were observed since the last :meth:`step`."""
        return self._window is not None


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
