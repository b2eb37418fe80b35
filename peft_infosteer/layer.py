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

from ._compat import init_tuner_layer_state, move_adapter_to_base_layer
from .config import InfoSteerConfig
from .ops import elevate_checked, flatten_keys, gain_keys
from .regularizer import FluxTracker

__all__ = ["InfoSteerLayer", "Linear", "SteerSettings"]


@dataclass(frozen=True)
class SteerSettings:
    """What one adapter does in one layer (copied from its config so the forward never reads configs)."""

    intervention: str
    flatten_strength: float
    usage: str
    usage_temperature: float
    elevate_fraction: float = 0.01
    elevate_scale: float = 1.0
    elevate_rank: str = "magnitude"
    elevate_at_inference: bool = True

    @classmethod
    def from_config(cls, config: InfoSteerConfig) -> SteerSettings:
        return cls(
            config.intervention,
            float(config.flatten_strength),
            config.usage,
            float(config.usage_temperature),
            float(config.elevate_fraction),
            float(config.elevate_scale),
            config.elevate_rank,
            bool(config.elevate_at_inference),
        )


_ELEVATE_NOT_MERGEABLE = (
    "Cannot merge InfoSteer adapter {name!r}: intervention='elevate' with elevate_at_inference=True acts on the key "
    "coefficients at inference, which no weight can express. Serve it with the adapter loaded, or train with "
    "elevate_at_inference=False (the intervention then acts in training only and the adapter merges exactly)."
)


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


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _restore_dtype(layer: InfoSteerLayer, adapter_name: str, gain: nn.Parameter) -> None:
    """Put a trainable gain back into the dtype it was given (same Parameter object: optimizers keep their reference).

    TRL casts every trainable parameter to bfloat16 on quantized bases, and ``model.to(torch.bfloat16)`` casts the
    gains too; in bfloat16 a gain near 1 cannot take small updates, so training would silently freeze it.
    """
    wanted = layer.gain_dtypes.setdefault(adapter_name, gain.dtype)
    if gain.dtype == wanted:
        return
    warnings.warn(
        f"InfoSteer gain of adapter {adapter_name!r} was cast to {_name(gain.dtype)}; training it in {_name(wanted)} "
        "instead "
        "(bfloat16 cannot represent small updates of a gain near 1).",
        UserWarning,
        stacklevel=4,
    )
    gain.data = gain.data.to(wanted)


class InfoSteerLayer(BaseTunerLayer):
    """Mixin with the InfoSteer state of one wrapped output projection (PEFT tuner-layer conventions)."""

    adapter_layer_names = ("infosteer_gain",)
    other_param_names = ("infosteer_settings", "gain_dtypes")

    def __init__(self, base_layer: nn.Module, tracker: FluxTracker | None = None) -> None:
        self.base_layer = base_layer
        self.infosteer_gain = nn.ParameterDict({})
        self.infosteer_settings: dict[str, SteerSettings] = {}
        init_tuner_layer_state(self)  # adapters enabled (PEFT's private flag)
        self.merged_adapters: list[str] = []
        # the dtype each gain was given (float32 unless autocast_adapter_dtype=False): restored if something casts it
        self.gain_dtypes: dict[str, torch.dtype] = {}
        # plain attribute, not a submodule: shared by all layers of one model and never saved
        self.flux_tracker = tracker
        self.in_features, self.out_features = _features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: InfoSteerConfig, **kwargs: Any) -> None:
        """Add (or replace) ``adapter_name`` on this layer; a gain starts at 1 so the layer is the identity.

        Like every PEFT adapter weight, the gain takes the base layer's device and dtype here and PEFT upcasts it to
        float32 unless ``autocast_adapter_dtype=False`` (which keeps a bfloat16 base's gains in bfloat16, where a gain
        near 1 cannot take small updates: a warning says so).
        """
        self.infosteer_settings[adapter_name] = SteerSettings.from_config(config)
        if config.intervention == "gain":
            gain = torch.ones(self.in_features, dtype=torch.float32)
            if not config.init_weights:  # PEFT's testing convention: a non-identity start
                gain = torch.empty_like(gain).uniform_(0.5, 1.5)
            self.infosteer_gain[adapter_name] = nn.Parameter(gain)
            move_adapter_to_base_layer(self, adapter_name)
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
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        weight.data = merged

    def _scale_merged_gains(self, inverse: bool) -> None:
        names = [n for n in self.merged_adapters if n in self.infosteer_gain]
        for name in reversed(names) if inverse else names:
            self._scale_input_columns(self.infosteer_gain[name], inverse, False, name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the gain (and a nested LoRA) into the output projection's weight.

        The nested LoRA is merged first because the gain scales its input too: ``(W + BA) diag(g)``. Gains merged
        earlier are divided out while a later adapter's LoRA is merged, so that sequential merges equal one merge of
        all: ``(W + B1 A1 + B2 A2) diag(g1 g2)``.
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
            if settings is not None and settings.intervention == "elevate" and settings.elevate_at_inference:
                raise ValueError(_ELEVATE_NOT_MERGEABLE.format(name=name))
        if isinstance(self.base_layer, BaseTunerLayer):
            self._scale_merged_gains(inverse=True)
            self.base_layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            self._scale_merged_gains(inverse=False)
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

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.infosteer_settings and n not in self.merged_adapters]

    @property
    def steering(self) -> bool:
        """Whether this layer steers in the next forward: an active, unmerged InfoSteer adapter, adapters enabled."""
        return not self.disable_adapters and bool(self._unmerged_active())

    def _in_training_mode(self) -> bool:
        """The module's training flag (``model.train()`` / ``model.eval()``): where a training-only 'elevate' acts."""
        return bool(getattr(self, "training", False))

    def steer(self, k: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """Apply the interventions of the active adapters that are not merged (or of ``adapter_names``) to ``k``."""
        compiled = None if self.flux_tracker is None else self.flux_tracker.compiled_math  # the model's setting
        for name in self._unmerged_active() if adapter_names is None else adapter_names:
            settings = self.infosteer_settings[name]
            if settings.intervention == "gain":
                gain = self.infosteer_gain[name]
                if gain.requires_grad and torch.is_grad_enabled():
                    _restore_dtype(self, name, gain)
                k = gain_keys(k, gain, compiled=compiled)
            elif settings.intervention == "flatten":
                k = flatten_keys(k, settings.flatten_strength, compiled=compiled)
            elif settings.intervention == "elevate" and (settings.elevate_at_inference or self._in_training_mode()):
                by_value = settings.elevate_rank == "value"  # the settings were validated with their config
                k = elevate_checked(k, settings.elevate_fraction, settings.elevate_scale, by_value)
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
        init_tuner_layer_state(self, active_adapter=adapter_name)
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        unmerged = self._unmerged_active()
        if not unmerged:  # nothing to steer, or merged gains: the keys seen here are not what the weights see
            return self.base_layer(x, *args, **kwargs)
        x = self.steer(x, unmerged)
        settings = self.infosteer_settings[unmerged[0]]
        if self.flux_tracker is not None and not self.merged:
            x = self.flux_tracker.track(x, settings.usage, settings.usage_temperature)
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "infosteer." + super().__repr__()
