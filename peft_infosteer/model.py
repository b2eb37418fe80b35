"""``InfoSteerModel``: the PEFT tuner that injects InfoSteer (and an optional stacked LoRA) into a model."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, onload_layer, set_adapter
from peft.tuners.tuners_utils import delete_adapter as _delete_adapter
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from ._compat import check_adapters_not_merged
from ._registration import PREFIX
from .architectures import default_target_modules
from .config import InfoSteerConfig
from .layer import InfoSteerLayer, Linear
from .regularizer import FluxTracker
from .validation import check_adapter_state_dict, explain_unmatched_targets

__all__ = ["InfoSteerModel"]


def _infosteer(config: PeftConfig | None) -> InfoSteerConfig:
    if not isinstance(config, InfoSteerConfig):
        raise TypeError(f"InfoSteerModel needs an InfoSteerConfig, got {type(config).__name__}")
    return config


@contextmanager
def _peft_config_hidden(model: nn.Module) -> Iterator[None]:
    """Hide ``model.peft_config`` while a nested ``LoraModel`` is built on ``model``.

    ``BaseTuner.__init__`` writes its config into an existing ``model.peft_config`` (the InfoSteer adapters' dict)
    and finally replaces it with its own; both would corrupt the InfoSteer model.
    """
    saved = model.__dict__.pop("peft_config", None)
    try:
        yield
    finally:
        model.__dict__.pop("peft_config", None)
        if saved is not None:
            model.__dict__["peft_config"] = saved


class _LoraInjector(LoraModel):
    """PEFT's own ``LoraModel``, used only to inject the LoRA layers of one InfoSteer adapter.

    It puts LoRA *inside* an existing InfoSteer wrapper, so that InfoSteer stays the outermost layer on the output
    projection when a second adapter is added.
    """

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, InfoSteerLayer):
            parent, target, target_name = target, target.base_layer, "base_layer"
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)


class InfoSteerModel(BaseTuner):
    """Creates an InfoSteer model: FFN memory steering on the output projections, optionally stacked with LoRA.

    Use it through ``peft.get_peft_model`` after ``import peft_infosteer``; it is registered as ``PeftType.INFOSTEER``.
    The regularizer trains in the ordinary backward of any loss (see :mod:`peft_infosteer.regularizer`).

    Example:

    >>> import peft_infosteer
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> config = peft_infosteer.InfoSteerConfig(intervention="gain", lora=LoraConfig(r=4, target_modules="all-linear"))
    >>> model = get_peft_model(base, config)
    >>> type(model.base_model).__name__
    'InfoSteerModel'
    """

    prefix: str = PREFIX
    tuner_layer_cls = InfoSteerLayer

    # ---- the tracker shared with the steering layers ----------------------------------------------------------

    @property
    def flux_tracker(self) -> FluxTracker:
        """The per-forward flux state shared by this model's steering layers (see ``peft_infosteer.regularizer``)."""
        tracker = self.__dict__.get("_flux_tracker")
        if tracker is None:
            tracker = FluxTracker()
            self.__dict__["_flux_tracker"] = tracker
        return tracker

    def _steering_layers(self) -> list[InfoSteerLayer]:
        layers = self.__dict__.get("_steering_layers_cache")
        if layers is None:
            layers = [m for m in self.model.modules() if isinstance(m, InfoSteerLayer)]
            self.__dict__["_steering_layers_cache"] = layers
        return layers

    def _sync_tracker(self) -> None:
        """Point the tracker at the active adapter's regularizer weight (after injection, activation, deletion)."""
        self.__dict__.pop("_steering_layers_cache", None)
        config = self.peft_config.get(self.active_adapters[0]) if self.active_adapters else None
        weight = float(config.entropy_weight) if isinstance(config, InfoSteerConfig) else 0.0
        self.flux_tracker.set_weight(weight, regularizing=weight > 0)

    # ---- injection -------------------------------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        config = _infosteer(peft_config)
        if config.target_modules is None:
            targets = default_target_modules(model_config.get("model_type"))
            config.target_modules = set(targets) if isinstance(targets, list) else targets
        return config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject the adapter's LoRA layers first, then the InfoSteer wrappers (outermost on the output projection).

        Like PEFT's own, it leaves the ``requires_grad`` of adapters that already exist as it found them.
        """
        config = _infosteer(self.peft_config[adapter_name])
        # resolve the default targets first: an unknown architecture must fail before LoRA touches the model
        self._prepare_adapter_config(config, self.get_model_config(model))
        part = "The LoRA stacked in this InfoSteer adapter"
        try:  # PEFT's bare "target modules not found" becomes an error that says what went wrong
            if isinstance(config.lora, LoraConfig):  # InfoSteerConfig turns the dict form into a LoraConfig
                config.lora.inference_mode = config.inference_mode
                lora_state = None if state_dict is None else {k: v for k, v in state_dict.items() if ".lora_" in k}
                with _peft_config_hidden(model):
                    _LoraInjector(model, config.lora, adapter_name, low_cpu_mem_usage, state_dict=lora_state)
            part = "InfoSteer"
            steer_state = None if state_dict is None else {k: v for k, v in state_dict.items() if self.prefix in k}
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, steer_state or None)
        except NoMatchingPeftModuleError as exc:
            raise explain_unmatched_targets(exc, model, config, part) from exc
        self._sync_tracker()
        if "_infosteer_hook_handles" not in self.__dict__:
            self.__dict__["_infosteer_hook_handles"] = (
                model.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
                model.register_forward_hook(self._finish_forward),
            )
        if not config.inference_mode and not self._has_trainable_parameters(adapter_name):
            warnings.warn(
                f"InfoSteer adapter {adapter_name!r} has nothing to train (intervention={config.intervention!r} and "
                "no `lora`): it steers at inference time only, and training it changes nothing. To train, use "
                "intervention='gain' or stack LoRA with lora=LoraConfig(...).",
                UserWarning,
                stacklevel=2,
            )

    def _has_trainable_parameters(self, adapter_name: str) -> bool:
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                for layer_name in module.adapter_layer_names:
                    if adapter_name in getattr(module, layer_name):
                        return True
        config = _infosteer(self.peft_config[adapter_name])
        return bool(config.modules_to_save or config.trainable_token_indices)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # PEFT calls this while loading adapter weights; it only warns about missing keys and ignores unexpected
        # ones, so check the weights here and raise one clear error instead (see peft_infosteer.validation)
        state_dict = super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )
        check_adapter_state_dict(model, config, adapter_name, state_dict)
        return state_dict

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("InfoSteer wraps FFN output projection modules; it has no `target_parameters`")
        config = _infosteer(peft_config)
        if isinstance(target, InfoSteerLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = Linear(target, adapter_name, config, tracker=self.flux_tracker)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---- forward ---------------------------------------------------------------------------------------------

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # A pre-hook on the wrapped model, not InfoSteerModel.forward: a PeftModel without task_type calls the wrapped
        # model directly, and so does generate(); every forward must start its own bookkeeping.
        with_grad = torch.is_grad_enabled()
        tracker = self.flux_tracker
        if not (with_grad or tracker.measure):
            tracker.begin(kwargs, with_grad=False, regularizing_layers=0)
            return
        layers = sum(1 for layer in self._steering_layers() if layer.steering)
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        tracker.begin(kwargs, with_grad=with_grad, regularizing_layers=layers, device=device)

    def _finish_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.flux_tracker.finish(output)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> Any:
        model: Any = super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        for handle in self.__dict__.pop("_infosteer_hook_handles", ()):
            handle.remove()  # the plain model that is handed back must not call into this tuner
        self.__dict__.pop("_steering_layers_cache", None)
        return model

    def active_infosteer_config(self) -> InfoSteerConfig:
        """The config of the (first) active adapter."""
        if not self.active_adapters:
            raise ValueError("No active InfoSteer adapter; call set_adapter(name) first")
        return _infosteer(self.peft_config[self.active_adapters[0]])

    # ---- adapters: reach the nested LoRA layers too ----------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s) on the InfoSteer layers and on the LoRA layers they carry."""
        set_adapter(self.model, adapter_name=adapter_name, inference_mode=inference_mode, layer_cls=BaseTunerLayer)
        self.active_adapter = adapter_name
        self._sync_tracker()

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from the InfoSteer layers and the LoRA layers it injected (refused while merged)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        check_adapters_not_merged(self.model, adapter_name)
        del self.peft_config[adapter_name]
        new_adapter = _delete_adapter(
            self.model, adapter_name=adapter_name, prefix=self.prefix, layer_cls=BaseTunerLayer
        )
        self.active_adapter = new_adapter or []
        self._sync_tracker()

    # ---- merging ---------------------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        if getattr(self.model, "is_loaded_in_4bit", False) or getattr(self.model, "is_loaded_in_8bit", False):
            raise ValueError(
                "Cannot merge InfoSteer layers when the base model is loaded in 4-bit or 8-bit. Load the base model in "
                "float precision (e.g. torch_dtype=torch.bfloat16), attach the adapter with PeftModel.from_pretrained, "
                "then merge_and_unload()."
            )
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if isinstance(config, InfoSteerConfig) and not config.is_mergeable:
                raise ValueError(
                    f"Cannot merge InfoSteer adapter {name!r}: intervention={config.intervention!r} is not a linear "
                    "map of the key coefficients. Serve it unmerged, or use intervention 'gain' or 'none'."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the adapters into the weights; each InfoSteer layer merges its nested LoRA before its gain."""
        self._check_merge_allowed()
        for module in self._top_level_tuner_layers():
            with onload_layer(module):
                module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`."""
        for module in self._top_level_tuner_layers():
            with onload_layer(module):
                module.unmerge()

    def _top_level_tuner_layers(self) -> list[BaseTunerLayer]:
        """Tuner layers that are not nested inside another tuner layer (nested ones are handled by their parent)."""
        nested: set[int] = set()
        layers = []
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer) or id(module) in nested:
                continue
            layers.append(module)
            nested.update(id(m) for m in module.modules() if m is not module)  # type: ignore[attr-defined]
        return layers
