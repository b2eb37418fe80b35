"""``FluxState``: the flux state of one InfoSteer model, in one object owned by its ``InfoSteerModel``.

It is created with the tuner (before PEFT injects the steering layers, which share its tracker) and closed when the
tuner is unloaded (``merge_and_unload``, ``unload``). It holds:

- ``tracker``: the per-forward bookkeeping the steering layers share, with the train and eval windows and whether the
  layers run the compiled math (:class:`~peft_infosteer.regularizer.FluxTracker`);
- ``targets``: the flux target of each adapter that has one (:class:`~peft_infosteer.target.FluxTarget`); only the
  active adapter's observes forwards and steps;
- how the model's labels line up with its positions (``label_layout``), the cached list of its steering layers, and
  the handles of the model's forward hooks;
- what steps the active flux target: the optimizer bound with :meth:`FluxState.bind_optimizer` (the trainer integration
  binds the trainer's), or, while none is bound, any ``torch.optim`` optimizer that holds the model's parameters.
  Another optimizer in the process does not step it.

It is a plain attribute of the tuner, not an ``nn.Module``: nothing in it is a submodule or a parameter, and nothing is
saved with the adapter. The optimizer hooks hold it weakly (an optimizer does not keep a model alive) and are left out
of copies (``copy.deepcopy`` of the model, pickling): a copy follows no optimizer of the original.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft import PeftConfig
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .config import InfoSteerConfig
from .layer import InfoSteerLayer
from .regularizer import LABEL_LAYOUTS, FluxTracker
from .target import FluxTarget

__all__ = ["FluxState", "torch_optimizer"]


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer that ``optimizer`` steps: itself, or the one inside accelerate's and DeepSpeed's
    wrappers (kept in ``.optimizer``), whose ``step()`` is the parameter update."""
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"InfoSteer's flux target follows the steps of a torch.optim optimizer, and {type(optimizer).__name__} "
            "has none inside. Call peft_infosteer.step_flux_target(model) after each parameter update instead."
        )
    return optimizer


def _weak_hook(state: FluxState, method: Callable[[FluxState, torch.optim.Optimizer], None]) -> Callable[..., None]:
    """An optimizer step hook that calls ``method`` of ``state`` while ``state`` lives."""
    ref = weakref.ref(state)

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        owner = ref()
        if owner is not None:
            method(owner, optimizer)

    return hook


class FluxState:
    """Everything an ``InfoSteerModel`` keeps about the flux of ``model`` (the module it wraps); see the module
    docstring for what and why."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tracker = FluxTracker()
        self.targets: dict[str, FluxTarget] = {}
        #: the adapter whose flux target observes forwards and follows optimizer steps (``None``: no target is active)
        self.active: str | None = None
        #: how this model's ``labels`` line up with the positions of its steered layers (``regularizer.token_mask``)
        self.label_layout = "causal"
        self._layers: list[InfoSteerLayer] | None = None
        self._forward_hooks: tuple[Any, ...] = ()
        self._reset_stepping()

    def _reset_stepping(self) -> None:
        # the bound torch optimizer (a weak reference), and the removal of the step hook in use: on the bound optimizer,
        # or the process-wide one that looks for an optimizer holding the model's parameters while none is bound
        self._optimizer: weakref.ref[torch.optim.Optimizer] | None = None
        self._step_hook: weakref.finalize | None = None
        self._warned_unowned = False

    # ---- copies: the optimizer hooks stay with the original ------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_optimizer", "_step_hook", "_warned_unowned"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_stepping()
        self._arm()

    # ---- the model's adapters --------------------------------------------------------------------------------

    @property
    def active_target(self) -> FluxTarget | None:
        """The flux target of the active adapter (``None`` for a fixed lambda)."""
        return None if self.active is None else self.targets.get(self.active)

    @property
    def compiled_math(self) -> bool | None:
        """Whether this model's steering layers run the compiled math (``None``, the default: the process's setting,
        ``peft_infosteer.ops.set_compiled_math``). Another model's setting does not change this one's."""
        return self.tracker.compiled_math

    @compiled_math.setter
    def compiled_math(self, enabled: bool | None) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"compiled_math must be True, False or None (the process's setting), got {enabled!r}")
        self.tracker.compiled_math = enabled

    def steering_layers(self) -> list[InfoSteerLayer]:
        """The model's steering layers (cached until the adapters change)."""
        if self._layers is None:
            self._layers = [m for m in self.model.modules() if isinstance(m, InfoSteerLayer)]
        return self._layers

    def log_d_sum(self, adapter_name: str) -> float:
        """Sum of log d_ff over the layers that steer with ``adapter_name``: lambda before 0.2.0 / lambda now."""
        # not the cached list: it may predate the layers this adapter's injection just created
        layers = [
            m for m in self.model.modules() if isinstance(m, InfoSteerLayer) and adapter_name in m.infosteer_settings
        ]
        return sum(math.log(layer.in_features) if layer.in_features > 1 else 1.0 for layer in layers)

    def sync(self, configs: Mapping[str, PeftConfig], active_adapters: list[str], label_layout: str) -> None:
        """Follow the model's adapters after injection, activation or deletion: the active adapter's lambda (fixed, or
        its flux target's), the label layout, the steering layers."""
        if label_layout not in LABEL_LAYOUTS:
            raise ValueError(f"label_layout must be one of {LABEL_LAYOUTS}, got {label_layout!r}")
        self._layers = None
        self.label_layout = label_layout
        for deleted in [n for n in self.targets if n not in configs]:
            self.targets.pop(deleted).close()
        for target in self.targets.values():  # only the active adapter's target observes forwards
            target.close()
        self.active = None
        name = active_adapters[0] if active_adapters else None
        config = configs.get(name) if name is not None else None
        if name is not None and isinstance(config, InfoSteerConfig) and config.has_flux_target:
            if name in self.targets:
                self.targets[name].resume()
            else:
                self.targets[name] = FluxTarget(
                    self.tracker,
                    rise=config.flux_target_rise,
                    absolute=config.flux_target,
                    start_weight=float(config.entropy_weight),
                    rate=float(config.flux_target_rate),
                    max_weight=float(config.max_entropy_weight),
                    legacy_factor=self.log_d_sum(name),
                )
            self.active = name
        else:
            weight = float(config.entropy_weight) if isinstance(config, InfoSteerConfig) else 0.0
            self.tracker.set_weight(weight, regularizing=weight > 0)
        self._arm()

    def drop_target(self, adapter_name: str) -> None:
        """Forget the flux target of ``adapter_name`` (its config changed: the next :meth:`sync` makes a new one)."""
        target = self.targets.pop(adapter_name, None)
        if target is not None:
            target.close()

    def install_forward_hooks(self, begin: Callable[..., Any], finish: Callable[..., Any]) -> None:
        """Put the tuner's forward pre-hook ``begin`` (with kwargs) and forward hook ``finish`` on the model, once."""
        if not self._forward_hooks:
            self._forward_hooks = (
                self.model.register_forward_pre_hook(begin, with_kwargs=True),
                self.model.register_forward_hook(finish),
            )

    def close(self) -> None:
        """Let go of the model (it is unloaded): its forward hooks, the flux targets, the optimizer hooks."""
        for handle in self._forward_hooks:
            handle.remove()  # the plain model that is handed back must not call into the tuner
        self._forward_hooks = ()
        for target in self.targets.values():
            target.close()
        self.targets.clear()
        self.active = None
        self._layers = None
        self._remove_step_hook()
        self._optimizer = None

    # ---- what steps the flux target ------------------------------------------------------------------------------

    @property
    def bound_optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer bound with :meth:`bind_optimizer` (``None``: any that holds the model's parameters)."""
        return None if self._optimizer is None else self._optimizer()

    def bind_optimizer(self, optimizer: Any | None) -> torch.optim.Optimizer | None:
        """Step the active flux target after each ``step()`` of ``optimizer`` (or of the torch optimizer inside its
        accelerate or DeepSpeed wrapper) and of no other; ``None`` goes back to any optimizer that holds the model's
        parameters. Returns the optimizer bound before (``None`` if none was)."""
        inner = None if optimizer is None else torch_optimizer(optimizer)
        previous = self.bound_optimizer
        self._remove_step_hook()
        self._optimizer = None
        if inner is not None:
            state = weakref.ref(self)

            def unbound(_: Any) -> None:  # the optimizer is gone: back to looking for one
                owner = state()
                if owner is not None and not sys.is_finalizing():  # not while the interpreter shuts down
                    owner._optimizer = None
                    owner._step_hook = None
                    owner._arm()

            self._optimizer = weakref.ref(inner, unbound)
            handle = inner.register_step_post_hook(_weak_hook(self, FluxState._after_bound_step))
            self._step_hook = weakref.finalize(self, handle.remove)
        self._arm()
        return previous

    def step_target(self) -> None:
        """Update the active flux target's lambda from the optimizer step that just ended (no target: a no-op)."""
        target = self.active_target
        if target is not None:
            target.step()

    def _arm(self) -> None:
        """While no optimizer is bound, look at every optimizer step of the process, as long as a target is active."""
        if self._optimizer is not None:
            return
        if self.active_target is None:
            self._remove_step_hook()
        elif self._step_hook is None or not self._step_hook.alive:
            handle = register_optimizer_step_post_hook(_weak_hook(self, FluxState._after_any_step))
            self._step_hook = weakref.finalize(self, handle.remove)

    def _remove_step_hook(self) -> None:
        if self._step_hook is not None:
            self._step_hook()  # removes the hook (once)
            self._step_hook = None

    def _after_bound_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.step_target()

    def _after_any_step(self, optimizer: torch.optim.Optimizer) -> None:
        target = self.active_target
        if target is None:
            return
        if self._holds_parameters(optimizer):
            target.step()
        elif target.pending and not self._warned_unowned:
            self._warned_unowned = True
            warnings.warn(
                f"InfoSteer: an optimizer ({type(optimizer).__name__}) stepped after training forwards of this model "
                "but holds none of its parameters, so the flux target's lambda did not move. If that optimizer trains "
                "this model (DeepSpeed's ZeRO steps flattened copies of the parameters), bind it: "
                "peft_infosteer.bind_flux_target(model, optimizer); binding the model's own optimizer also silences "
                "this warning.",
                UserWarning,
                stacklevel=3,
            )

    def _holds_parameters(self, optimizer: torch.optim.Optimizer) -> bool:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return any(id(p) in held for p in self.model.parameters())
