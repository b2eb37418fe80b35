"""``InfoSteerModel``: the PEFT tuner that injects InfoSteer (and an optional stacked LoRA) into a model."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, set_adapter
from peft.tuners.tuners_utils import delete_adapter as _delete_adapter
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from .architectures import FFN_OUTPUT_PROJECTIONS, default_target_modules
from .config import InfoSteerConfig
from .layer import InfoSteerLayer, Linear
from .regularizer import FluxRecorder
from .validation import check_adapter_state_dict, explain_unmatched_targets

__all__ = ["InfoSteerModel", "token_mask"]


class _LoraInjector(LoraModel):
    """Injects PEFT's LoRA layers for one InfoSteer adapter.

    It never touches ``model.peft_config`` (a plain ``LoraModel`` would overwrite the InfoSteer entry there), and it
    puts LoRA *inside* an existing InfoSteer wrapper, so that InfoSteer stays the outermost layer on the output
    projection when a second adapter is added.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig,
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        self.peft_config = {adapter_name: config}
        self.active_adapter = adapter_name
        self.inject_adapter(model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, InfoSteerLayer):
            parent, target, target_name = target, target.base_layer, "base_layer"
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)


def token_mask(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Positions whose next-token prediction is in the task loss; else the attention mask; else ``None`` (all)."""
    shift_labels = kwargs.get("shift_labels")
    if isinstance(shift_labels, torch.Tensor):
        return shift_labels != -100
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.is_floating_point() is False:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return None


class InfoSteerModel(BaseTuner):
    """Creates an InfoSteer model: FFN memory steering on the output projections, optionally stacked with LoRA.

    Use it through ``peft.get_peft_model`` after ``import peft_infosteer``; it is registered as ``PeftType.INFOSTEER``.

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

    prefix: str = "infosteer_"
    tuner_layer_cls = InfoSteerLayer
    target_module_mapping = FFN_OUTPUT_PROJECTIONS

    # ---- injection -------------------------------------------------------------------------------------------

    @property
    def flux_recorder(self) -> FluxRecorder:
        """The per-forward flux store shared by this model's steering layers."""
        recorder = self.__dict__.get("_flux_recorder")
        if recorder is None:
            recorder = FluxRecorder()
            self.__dict__["_flux_recorder"] = recorder
        return recorder

    def _prepare_adapter_config(self, peft_config: InfoSteerConfig, model_config: dict) -> InfoSteerConfig:
        if peft_config.target_modules is None:
            targets = default_target_modules(model_config.get("model_type"))
            peft_config.target_modules = set(targets) if isinstance(targets, list) else targets
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject the adapter's LoRA layers first, then the InfoSteer wrappers (outermost on the output projection)."""
        config = self.peft_config[adapter_name]
        if not isinstance(config, InfoSteerConfig):
            raise TypeError(f"InfoSteerModel needs an InfoSteerConfig, got {type(config).__name__}")
        if not config.inference_mode:
            self._check_keys_can_move(adapter_name, config)
        part = "The LoRA stacked in this InfoSteer adapter"
        try:  # PEFT's bare "target modules not found" becomes an error that says what went wrong
            if config.lora is not None:
                config.lora.inference_mode = config.inference_mode
                lora_state = None if state_dict is None else {k: v for k, v in state_dict.items() if ".lora_" in k}
                _LoraInjector(model, config.lora, adapter_name, low_cpu_mem_usage, state_dict=lora_state)
            part = "InfoSteer"
            steer_state = None if state_dict is None else {k: v for k, v in state_dict.items() if self.prefix in k}
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, steer_state or None)
        except NoMatchingPeftModuleError as exc:
            raise explain_unmatched_targets(exc, model, config, part) from exc
        # LoRA's own housekeeping activated `adapter_name` on the LoRA layers; re-align everything with ours
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if "_start_hook" not in self.__dict__:
            self.__dict__["_start_hook"] = model.register_forward_pre_hook(self._start_forward, with_kwargs=True)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: InfoSteerConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
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
        peft_config: InfoSteerConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, InfoSteerLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = Linear(target, adapter_name, peft_config, recorder=self.flux_recorder, name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _check_keys_can_move(adapter_name: str, config: InfoSteerConfig) -> None:
        """Refuse a regularizer that nothing trainable can act on (it would only add a constant to the loss).

        PEFT freezes the whole base model, so only the adapter's own parameters can move the key coefficients.
        """
        if config.entropy_weight == 0 or config.intervention == "gain":
            return
        if config.lora is not None or config.modules_to_save or config.trainable_token_indices:
            return
        raise ValueError(
            f"InfoSteer adapter {adapter_name!r} has entropy_weight={config.entropy_weight} but nothing trainable can "
            "change the key coefficients, so the regularizer would have no effect. Enable intervention='gain', or "
            "stack LoRA with lora=LoraConfig(...), or set entropy_weight=0 for a pure forward intervention."
        )

    # ---- forward ---------------------------------------------------------------------------------------------

    def _start_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # A forward pre-hook on the wrapped model, not InfoSteerModel.forward: a PeftModel without task_type calls
        # the wrapped model directly, and so does generate(); every forward must start a fresh record.
        recorder = self.flux_recorder
        if self.active_adapters and not recorder.hold:
            recorder.warn_if_unread(self.active_infosteer_config().entropy_weight)
        recorder.start(token_mask(kwargs), grad_expected=torch.is_grad_enabled() and module.training)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        handle = self.__dict__.pop("_start_hook", None)
        if handle is not None:
            handle.remove()  # the plain model that is handed back must not call into this tuner
        return model

    def active_infosteer_config(self) -> InfoSteerConfig:
        """The config of the (first) active adapter."""
        if not self.active_adapters:
            raise ValueError("No active InfoSteer adapter; call set_adapter(name) first")
        return self.peft_config[self.active_adapters[0]]

    # ---- adapters: reach the nested LoRA layers too ----------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s) on the InfoSteer layers and on the LoRA layers they carry."""
        set_adapter(self.model, adapter_name=adapter_name, inference_mode=inference_mode, layer_cls=BaseTunerLayer)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter from the InfoSteer layers and the LoRA layers it injected."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        del self.peft_config[adapter_name]
        new_adapter = _delete_adapter(
            self.model, adapter_name=adapter_name, prefix=self.prefix, layer_cls=BaseTunerLayer
        )
        self.active_adapter = new_adapter or []

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
            if config is not None and not config.is_mergeable:
                raise ValueError(
                    f"Cannot merge InfoSteer adapter {name!r}: intervention={config.intervention!r} is not a linear "
                    "map of the key coefficients. Serve it unmerged, or use intervention 'gain' or 'none'."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge the adapters into the weights; each InfoSteer layer merges its nested LoRA before its gain."""
        self._check_merge_allowed()
        for module in self._top_level_tuner_layers():
            module.merge(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """Undo :meth:`merge_adapter`."""
        for module in self._top_level_tuner_layers():
            if module.merged:
                module.unmerge()

    def _top_level_tuner_layers(self) -> list[BaseTunerLayer]:
        """Tuner layers that are not nested inside another tuner layer (nested ones are handled by their parent)."""
        nested: set[int] = set()
        layers = []
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer) or id(module) in nested:
                continue
            layers.append(module)
            nested.update(id(m) for m in module.modules() if m is not module)
        return layers
