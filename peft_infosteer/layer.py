"""``InfoSteerLayer``: the steering module that wraps one FFN output projection.

Its input is the key vector ``k``. It applies the active adapters' forward intervention, hands what it passes on to
the model's :class:`~peft_infosteer.regularizer.FluxTracker` (which attaches the layer's share of the regularizer
when a backward can follow), and delegates to whatever base layer is there (``nn.Linear``, ``Conv1D``, bitsandbytes
``Linear4bit``, or a PEFT LoRA layer wrapping one of them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._compat import base_layer_device
from .config import InfoSteerConfig
from .ops import flatten_keys, gain_keys
from .regularizer import FluxTracker

__all__ = ["InfoSteerLayer", "Linear", "SteerSettings"]


@dataclass(frozen=True)
class SteerSettings:
    """What one adapter does in one layer (copied from its config so the forward never reads configs)."""

    intervention: str
    flatten_strength: float
    usage: str
    usage_temperature: float

    @classmethod
    def from_config(cls, config: InfoSteerConfig) -> SteerSettings:
        return cls(config.intervention, float(config.flatten_strength), config.usage, float(config.usage_temperature))


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear output projection."""
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])  # Conv1D stores (in, out)
    in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
    if in_features is None or out_features is None:
        raise TypeError(
            f"InfoSteer can only wrap linear FFN output projections (nn.Linear, Conv1D, bitsandbytes Linear4bit/8bit "
            f"or a LoRA layer around one), got {type(layer).__name__}. Check `target_modules`."
        )
    return int(in_features), int(out_features)


def _restore_float32(adapter_name: str, gain: nn.Parameter) -> None:
    """Put a trainable gain back into float32 (same Parameter object, so optimizers keep their reference).

    TRL casts every trainable parameter to bfloat16 on quantized bases, and ``model.to(torch.bfloat16)`` casts the
    gains too; in bfloat16 a gain near 1 cannot take small updates, so training would silently freeze it.
    """
    warnings.warn(
        f"InfoSteer gain of adapter {adapter_name!r} was cast to {gain.dtype}; training it in float32 instead "
        "(bfloat16 cannot represent small updates of a gain near 1).",
        UserWarning,
        stacklevel=4,
    )
    gain.data = gain.data.float()


class InfoSteerLayer(BaseTunerLayer):
    """Mixin with the InfoSteer state of one wrapped output projection (PEFT tuner-layer conventions)."""

    adapter_layer_names = ("infosteer_gain",)
    other_param_names = ("infosteer_settings",)

    def __init__(self, base_layer: nn.Module, tracker: FluxTracker | None = None) -> None:
        self.base_layer = base_layer
        self.infosteer_gain = nn.ParameterDict({})
        self.infosteer_settings: dict[str, SteerSettings] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # plain attribute, not a submodule: shared by all layers of one model and never saved
        self.flux_tracker = tracker
        self.in_features, self.out_features = _features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: InfoSteerConfig, **kwargs: Any) -> None:
        """Add (or replace) ``adapter_name`` on this layer; a gain starts at 1 so the layer is the identity.

        Gains are float32 whatever the base dtype and ``autocast_adapter_dtype``: they are one number per key
        coefficient and sit close to 1, where bfloat16 (spacing 2**-7) cannot represent the updates of training.
        """
        self.infosteer_settings[adapter_name] = SteerSettings.from_config(config)
        if config.intervention == "gain":
            device = base_layer_device(self, self.get_base_layer())
            self.infosteer_gain[adapter_name] = nn.Parameter(
                torch.ones(self.in_features, dtype=torch.float32, device=device)
            )
        elif adapter_name in self.infosteer_gain:
            del self.infosteer_gain[adapter_name]
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _get_available_adapters(self) -> set[str]:
        return set(self.infosteer_settings)

    # ---- merging ---------------------------------------------------------------------------------------------

    def _scale_input_columns(self, gain: torch.Tensor, inverse: bool, safe_merge: bool, adapter: str) -> None:
        base = self.get_base_layer()
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        if not weight.dtype.is_floating_point:
            raise ValueError(
                f"Cannot merge InfoSteer adapter {adapter!r} into a quantized weight ({type(base).__name__}, dtype "
                f"{weight.dtype}). Load the base model in float precision to merge."
            )
        g = gain.detach().to(torch.float32)
        if inverse:
            g = 1.0 / g
        shape = (-1, 1) if isinstance(base, Conv1D) else (1, -1)
        merged = (weight.data.float() * g.to(weight.device).reshape(shape)).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs or infs in the merged weights; adapter {adapter!r} seems to be broken")
        weight.data = merged

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the gain (and a nested LoRA) into the output projection's weight.

        The nested LoRA is merged first because the gain scales its input too: ``(W + BA) diag(g)``.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            settings = self.infosteer_settings.get(name)
            if settings is not None and settings.intervention == "flatten":
                raise ValueError(
                    f"Cannot merge InfoSteer adapter {name!r}: intervention='flatten' is not a linear map of k, so "
                    "it cannot be folded into the weights. Serve it with the adapter loaded, or train with "
                    "intervention='gain' or 'none' if you need a mergeable adapter."
                )
        if isinstance(self.base_layer, BaseTunerLayer):
            self.base_layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in adapter_names:
            if name not in self.infosteer_settings:
                continue
            if name in self.infosteer_gain:
                self._scale_input_columns(self.infosteer_gain[name], False, safe_merge, name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (gain first, then the nested LoRA)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.infosteer_gain:
                self._scale_input_columns(self.infosteer_gain[name], True, False, name)
        if isinstance(self.base_layer, BaseTunerLayer) and self.base_layer.merged:
            self.base_layer.unmerge()

    # ---- forward ---------------------------------------------------------------------------------------------

    @property
    def steering(self) -> bool:
        """Whether this layer steers in the next forward: an active InfoSteer adapter, not merged, not disabled."""
        return (
            not self.disable_adapters
            and not self.merged
            and any(name in self.infosteer_settings for name in self.active_adapters)
        )

    def steer(self, k: torch.Tensor) -> torch.Tensor:
        """Apply the active adapters' interventions to the key coefficients ``k``."""
        for name in self.active_adapters:
            settings = self.infosteer_settings.get(name)
            if settings is None:
                continue
            if settings.intervention == "gain":
                gain = self.infosteer_gain[name]
                if gain.dtype != torch.float32 and gain.requires_grad and torch.is_grad_enabled():
                    _restore_float32(name, gain)
                k = gain_keys(k, gain)
            elif settings.intervention == "flatten":
                k = flatten_keys(k, settings.flatten_strength)
        return k


class Linear(nn.Module, InfoSteerLayer):
    """InfoSteer around a linear FFN output projection (``nn.Linear``, ``Conv1D``, bnb 4/8-bit, or LoRA on those).

    The class name follows PEFT's convention (``lora.Linear``, ``ia3.Linear``), which also lets LoRA's
    ``target_modules="all-linear"`` recognise the wrapped projection when a second adapter is added.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: InfoSteerConfig,
        tracker: FluxTracker | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        InfoSteerLayer.__init__(self, base_layer, tracker=tracker)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:  # the gain is folded into the weights; the keys seen here are not what the weights see
            return self.base_layer(x, *args, **kwargs)
        x = self.steer(x)
        settings = self.infosteer_settings.get(self.active_adapters[0]) if self.active_adapters else None
        if settings is not None and self.flux_tracker is not None:
            x = self.flux_tracker.track(x, settings.usage, settings.usage_temperature)
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "infosteer." + super().__repr__()
