"""``InfoSteerModel``: the PEFT tuner that injects InfoSteer (and an optional stacked LoRA) into a model."""

from __future__ import annotations

import dataclasses
import math
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

from ._compat import (
    check_adapters_not_merged,
    peft_config_hidden,
    peft_would_target,
    replace_module,
    transformers_is_loading_an_adapter,
)
from ._registration import PREFIX
from .architectures import default_target_modules
from .config import InfoSteerConfig
from .hub import install_model_card_hooks
from .layer import _ELEVATE_NOT_MERGEABLE, InfoSteerLayer, Linear
from .regularizer import FluxTracker
from .state import FluxState
from .target import FluxTarget
from .validation import check_adapter_state_dict, explain_unmatched_targets
from .version import __version__

__all__ = ["InfoSteerModel"]


_TRANSFORMERS_CANNOT_LOAD_STACKED_LORA = (
    "This InfoSteer adapter stacks LoRA, which transformers' own adapter loading (pipeline(model=<adapter dir>), "
    "model.load_adapter(<dir>), AutoModelForCausalLM.from_pretrained(<adapter dir>)) cannot load: it renames only the "
    "weight keys that carry the method's prefix ('infosteer_'), so the stacked LoRA would silently keep its initial "
    "weights. Load it with peft.PeftModel.from_pretrained(base_model, path) or "
    "peft.AutoPeftModelForCausalLM.from_pretrained(path) (then pipeline('text-generation', model=peft_model, "
    "tokenizer=tokenizer)). InfoSteer adapters without `lora` load either way."
)


def _infosteer(config: PeftConfig | None) -> InfoSteerConfig:
    if not isinstance(config, InfoSteerConfig):
        raise TypeError(f"InfoSteerModel needs an InfoSteerConfig, got {type(config).__name__}")
    return config


def _shown(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)


def _check_encoder_not_targeted(model: nn.Module, config: InfoSteerConfig) -> None:
    """Refuse steering modules in the encoder of an encoder-decoder model, before anything is injected.

    The tokens that count are those of the task loss: the decoder's labels (unshifted). They do not line up with the
    encoder's positions, so an encoder layer cannot be regularized or measured by them.
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    get_encoder = getattr(model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if not isinstance(encoder, nn.Module):
        return
    in_encoder = {id(m) for m in encoder.modules()}
    hits = [
        name for name, module in model.named_modules() if id(module) in in_encoder and peft_would_target(config, name)
    ]
    if not hits:
        return
    leaf = hits[0].rsplit(".", 1)[-1]
    shown = ", ".join(hits[:3]) + (f" (and {len(hits) - 3} more)" if len(hits) > 3 else "")
    raise ValueError(
        f"InfoSteer steers only the decoder of an encoder-decoder model ({type(model).__name__}), but "
        f"target_modules={_shown(config.target_modules)} matches encoder modules: {shown}. The tokens that count are "
        "those of the task loss, the decoder's labels, which do not line up with the encoder's positions. Restrict "
        f'target_modules to the decoder, e.g. target_modules=r".*decoder\\..*\\.{leaf}".'
    )


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

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig | dict[str, PeftConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # transformers' own adapter support (pipeline(model=<adapter dir>), load_adapter, from_pretrained of an adapter
        # directory) injects through peft.inject_adapter_in_model and then loads the weights with its own key mapping,
        # which renames only keys with the method's prefix: a stacked LoRA would keep its initial weights
        lora = peft_config.lora if isinstance(peft_config, InfoSteerConfig) else None
        if lora is not None and transformers_is_loading_an_adapter():
            raise ValueError(_TRANSFORMERS_CANNOT_LOAD_STACKED_LORA)
        install_model_card_hooks()  # PeftModel's card wrappers, from the first InfoSteer model on (peft_infosteer.hub)
        # Set before BaseTuner.__init__, which injects the steering layers that share its tracker. A plain attribute
        # (FluxState is no nn.Module: not a submodule, never in a state dict), read directly: BaseTuner.__getattr__
        # would look for a missing attribute on the wrapped model instead.
        self._flux_state = FluxState(model)
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled in a fresh process, no __init__ runs: its saved adapters still get InfoSteer's model card
        super().__setstate__(state)
        install_model_card_hooks()

    # ---- the flux state (peft_infosteer.state) ----------------------------------------------------------------

    @property
    def flux_state(self) -> FluxState:
        """This model's flux state: tracker, flux targets, what steps them, compiled-math setting (``FluxState``)."""
        return self._flux_state

    @property
    def flux_tracker(self) -> FluxTracker:
        """The per-forward flux state shared by this model's steering layers (see ``peft_infosteer.regularizer``)."""
        return self._flux_state.tracker

    def _steering_layers(self) -> list[InfoSteerLayer]:
        return self._flux_state.steering_layers()

    @property
    def flux_target(self) -> FluxTarget | None:
        """The lambda controller of the active adapter when it has a flux target (``None`` for a fixed lambda)."""
        return self._flux_state.active_target

    def _sync_tracker(self) -> None:
        """Point the tracker at the active adapter's regularizer weight (after injection, activation, deletion)."""
        self._flux_state.sync(self.peft_config, list(self.active_adapters), self._label_layout())

    def _label_layout(self) -> str:
        """How this model's ``labels`` line up with the positions of the steered layers (``regularizer.token_mask``)."""
        model_config = getattr(self.model, "config", None)
        if getattr(model_config, "is_encoder_decoder", False):
            return "seq2seq"  # only decoder layers are steered (_check_encoder_not_targeted)
        config = self.peft_config.get(self.active_adapters[0]) if self.active_adapters else None
        token_cls = type(self.model).__name__.endswith("ForTokenClassification")
        if token_cls or getattr(config, "task_type", None) == "TOKEN_CLS":
            return "token"  # one label per position, unshifted
        return "causal"

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
        _check_encoder_not_targeted(model, config)
        part = "The LoRA stacked in this InfoSteer adapter"
        try:  # PEFT's bare "target modules not found" becomes an error that says what went wrong
            if isinstance(config.lora, LoraConfig):  # InfoSteerConfig turns the dict form into a LoraConfig
                config.lora.inference_mode = config.inference_mode
                lora = config.lora if config.init_weights else dataclasses.replace(config.lora, init_lora_weights=False)
                lora_state = None if state_dict is None else {k: v for k, v in state_dict.items() if ".lora_" in k}
                with peft_config_hidden(model):  # BaseTuner.__init__ would write into the InfoSteer configs
                    _LoraInjector(model, lora, adapter_name, low_cpu_mem_usage, state_dict=lora_state)
            part = "InfoSteer"
            steer_state = None if state_dict is None else {k: v for k, v in state_dict.items() if self.prefix in k}
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, steer_state or None)
        except NoMatchingPeftModuleError as exc:
            raise explain_unmatched_targets(exc, model, config, part) from exc
        self._convert_legacy_lambda(adapter_name, config)
        self._sync_tracker()
        self._flux_state.install_forward_hooks(self._begin_forward, self._finish_forward)
        if not config.inference_mode:
            self._warn_unsteered_layers(adapter_name, config)
        if not config.inference_mode and not self._has_trainable_parameters(adapter_name):
            warnings.warn(
                f"InfoSteer adapter {adapter_name!r} has nothing to train (intervention={config.intervention!r} and "
                "no `lora`): it steers at inference time only, and training it changes nothing. To train, stack LoRA "
                "with lora=LoraConfig(...) (the paper's setting: the intervention acts while LoRA trains) or use "
                "intervention='gain'.",
                UserWarning,
                stacklevel=2,
            )

    def _warn_unsteered_layers(self, adapter_name: str, config: InfoSteerConfig) -> None:
        """Warn when a layer stack is steered in some layers while its mixture-of-experts layers are left out.

        The case in mind: a MoE model with dense layers (Qwen3-MoE's ``mlp_only_layers``), where ``mlp.down_proj``
        exists in the dense layers only; the experts are fused parameters InfoSteer cannot wrap. A deliberate choice of
        layers (``layers_to_transform``) silences it.
        """
        if config.layers_to_transform is not None:
            return
        steered = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, InfoSteerLayer) and adapter_name in module.infosteer_settings
        ]
        for list_name, layers in self.model.named_modules():
            if not isinstance(layers, nn.ModuleList) or len({type(layer) for layer in layers}) != 1:
                continue  # only a stack of identical decoder layers, not e.g. T5's [attention, cross, FFN]
            hit = {i for i in range(len(layers)) if any(n.startswith(f"{list_name}.{i}.") for n in steered)}
            if not hit:
                continue
            experts = [
                f"{list_name}.{i}.{name} ({type(module).__name__})"
                for i in range(len(layers))
                if i not in hit
                for name, module in layers[i].named_modules()
                if name.rsplit(".", 1)[-1] == "experts"
            ]
            if not experts:
                continue
            missed = sorted({int(e[len(list_name) + 1 :].split(".", 1)[0]) for e in experts})
            shown = ", ".join(experts[:3]) + (f" (and {len(experts) - 3} more)" if len(experts) > 3 else "")
            warnings.warn(
                f"InfoSteer adapter {adapter_name!r} steers {len(hit)} of the {len(layers)} layers of {list_name}; "
                f"the mixture-of-experts layers {missed} stay unsteered: their experts ({shown}) are fused "
                f"parameters, which target_modules={_shown(config.target_modules)} does not reach and InfoSteer cannot "
                f"wrap. If that is intended, say so with layers_to_transform={sorted(hit)}, which silences this "
                "warning.",
                UserWarning,
                stacklevel=3,
            )

    def _convert_legacy_lambda(self, adapter_name: str, config: InfoSteerConfig) -> None:
        """Give a config written before 0.2.0 its lambda in the paper's units (``docs/concepts.md``).

        Before 0.2.0 the regularizer was ``-lambda_old * mean over layers of H / log d_ff``; now it is ``-lambda *
        sum over layers of H``, so ``lambda = lambda_old / (number of steered layers * log d_ff)`` trains the same.
        The flux target's start and cap are converted alike; the config then carries the current version.
        """
        if config.lambda_in_paper_units:
            return
        factor = self._flux_state.log_d_sum(adapter_name)
        if factor > 0:
            config.entropy_weight = float(config.entropy_weight) / factor
            config.max_entropy_weight = float(config.max_entropy_weight) / factor
        config.infosteer_version = __version__
        # PEFT's injection activates the adapter, which may have started its flux target from the old values
        self._flux_state.drop_target(adapter_name)

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
        replace_module(self, parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's cast (float32 unless ``autocast_adapter_dtype=False``); then remember each gain's dtype, which the
        layer restores if something casts the gain later (TRL on quantized bases, ``model.to(...)``)."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        low_precision = False
        for layer in self._steering_layers():
            gain = layer.infosteer_gain[adapter_name] if adapter_name in layer.infosteer_gain else None
            if gain is not None:
                layer.gain_dtypes[adapter_name] = gain.dtype
                low_precision = low_precision or gain.dtype in (torch.bfloat16, torch.float16)
        if low_precision and not _infosteer(self.peft_config[adapter_name]).inference_mode:
            warnings.warn(
                f"InfoSteer adapter {adapter_name!r}: autocast_adapter_dtype=False keeps its gains in the base model's "
                "half precision, where a gain near 1 cannot take small updates. Keep autocast_adapter_dtype=True "
                "(the default) to train them in float32.",
                UserWarning,
                stacklevel=2,
            )

    # ---- forward ---------------------------------------------------------------------------------------------

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # PeftModel.forward / generate enter this (when defined) before dropping `adapter_names` from the kwargs
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "InfoSteer does not support mixed adapter batches (adapter_names=...): every row would get the active "
                "adapter. Run each adapter's rows in their own forward, after model.set_adapter(name)."
            )
        yield

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # A pre-hook on the wrapped model, not InfoSteerModel.forward: a PeftModel without task_type calls the wrapped
        # model directly, and so does generate(); every forward must start its own bookkeeping.
        with_grad = torch.is_grad_enabled()
        tracker = self.flux_tracker
        if not (with_grad or tracker.measure):
            tracker.begin(kwargs, with_grad=False, regularizing_layers=0)
            return
        steering = [layer for layer in self._steering_layers() if layer.steering]
        layers = len(steering)
        tracker.flux_scale = sum(math.log(layer.in_features) if layer.in_features > 1 else 1.0 for layer in steering)
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        layout = self._flux_state.label_layout
        tracker.begin(kwargs, with_grad=with_grad, regularizing_layers=layers, device=device, layout=layout)

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
        self._flux_state.close()  # the plain model that is handed back must not call into this tuner
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

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: PEFT's ``add_weighted_adapter`` combines LoRA adapters, not InfoSteer ones."""
        raise NotImplementedError(
            "add_weighted_adapter is not supported for InfoSteer adapters: it combines LoRA weight updates, and an "
            "InfoSteer adapter's intervention (gains, elevate, flatten) is not a weighted sum of such updates. To "
            "combine adapters, merge a mergeable one into the weights (merge_and_unload()) and load the next onto "
            "the merged model, or train one adapter on the combined data."
        )

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
            if isinstance(config, InfoSteerConfig) and config.intervention == "elevate" and not config.is_mergeable:
                raise ValueError(_ELEVATE_NOT_MERGEABLE.format(name=name))
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
