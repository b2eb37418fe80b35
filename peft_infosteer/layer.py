"""``InfoSteerLayer``: the steering module that wraps one FFN output projection.

Its input is the key vector ``k``. It applies the active adapters' forward intervention, reports the flux of what it
passes on to the recorder of the model, and delegates to whatever base layer is there (``nn.Linear``, ``Conv1D``,
bitsandbytes ``Linear4bit``, or a PEFT LoRA layer wrapping one of them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import InfoSteerConfig
from .ops import flatten_keys, gain_keys
from .regularizer import FluxRecorder

__all__ = ["InfoSteerLayer", "Linear", "SteerSettings"]


@dataclass(frozen=True)
class SteerSettings:
    """What one adapter does in one layer (copied from its config so the forward never reads configs)."""

    intervention: str
    flatten_strength: float
    usage: str
    usage_temperature: float
    entropy_weight: float

    @classmethod
    def from_config(cls, config: InfoSteerConfig) -> SteerSettings:
        return cls(
            config.intervention,
            float(config.flatten_strength),
            config.usage,
            float(config.usage_temperature),
            float(config.entropy_weight),
        )


def _input_features(layer: nn.Module) -> int:
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0])  # Conv1D stores (in, out)
    in_features = getattr(layer, "in_features", None)
    if in_features is None:
        raise TypeError(
            f"InfoSteer can only wrap linear FFN output projections (nn.Linear, Conv1D, bitsandbytes Linear4bit/8bit "
            f"or a LoRA layer around one), got {type(layer).__name__}. Check `target_modules`."
        )
    return int(in_features)


class InfoSteerLayer(BaseTunerLayer):
    """Mixin with the InfoSteer state of one wrapped output projection (PEFT tuner-layer conventions)."""

    adapter_layer_names = ("infosteer_gain",)
    other_param_names = ("infosteer_settings",)

    def __init__(self, base_layer: nn.Module, recorder: FluxRecorder | None = None, name: str = "") -> None:
        self.base_layer = base_layer
        self.infosteer_gain = nn.ParameterDict({})
        self.infosteer_settings: dict[str, SteerSettings] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.layer_name = name
        # plain attribute, not a submodule: shared by all layers of one model and never saved
        self.flux_recorder = recorder
        self.in_features = _input_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: InfoSteerConfig, **kwargs: Any) -> None:
        """Add (or replace) ``adapter_name`` on this layer; a gain starts at 1 so the layer is the identity."""
        self.infosteer_settings[adapter_name] = SteerSettings.from_config(config)
        if config.intervention == "gain":
            device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
            self.infosteer_gain[adapter_name] = nn.Parameter(
                torch.ones(self.in_features, dtype=torch.float32, device=device)
            )
        elif adapter_name in self.infosteer_gain:
            del self.infosteer_gain[adapter_name]
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.infosteer_settings)

    def _get_available_adapters(self) -> set[str]:
        return set(self.infosteer_settings)

    # ---- merging ---------------------------------------------------------------------------------------------

    def _scale_input_columns(self, gain: torch.Tensor, inverse: bool, safe_merge: bool, adapter: str) -> None:
        base = self.get_base_layer()
        weight = base.weight
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

    def _record(self, k: torch.Tensor) -> None:
        recorder = self.flux_recorder
        if recorder is None or not recorder.enabled or not self.active_adapters:
            return
        settings = self.infosteer_settings.get(self.active_adapters[0])
        if settings is None:
            return
        recorder.record(
            self.layer_name,
            k,
            settings.usage,
            settings.usage_temperature,
            with_grad=settings.entropy_weight > 0,
            # non-reentrant checkpointing re-runs this layer during backward: that is not a new forward
            store=torch._C._current_graph_task_id() == -1,
        )

    def steer(self, k: torch.Tensor) -> torch.Tensor:
        """Apply the active adapters' interventions to the key coefficients ``k``."""
        for name in self.active_adapters:
            settings = self.infosteer_settings.get(name)
            if settings is None:
                continue
            if settings.intervention == "gain":
                k = gain_keys(k, self.infosteer_gain[name])
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
        recorder: FluxRecorder | None = None,
        name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        InfoSteerLayer.__init__(self, base_layer, recorder=recorder, name=name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not self.merged:
            x = self.steer(x)
        self._record(x)
        return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "infosteer." + super().__repr__()
