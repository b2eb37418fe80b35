"""Every private API of torch, PEFT, transformers and TRL that peft-infosteer touches, in one place.

Upstream may change any of these without notice. ``tests/test_compat.py`` checks each entry against the installed
versions, so that an upstream change fails one named test instead of misbehaving somewhere deep in a training run.
Modules of this package reach private upstream APIs only through this one.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

__all__ = [
    "CALLED_ON_THE_TUNER_BY_PEFT",
    "OVERRIDDEN_PRIVATE_METHODS",
    "add_enum_member",
    "add_callback_first",
    "move_adapter_to_base_layer",
    "check_adapters_not_merged",
    "filter_state_dict_by_key_prefixes",
    "set_trainer_tags",
    "transformers_is_loading_an_adapter",
    "replace_peft_method",
    "tuner_state_dict_key_prefixes",
    "wrap_peft_model_method",
    # the tuner-author contract (model.py, layer.py)
    "init_tuner_layer_state",
    "peft_config_hidden",
    "peft_would_target",
    "replace_module",
    # transformers' Trainer and TRL's trainers (trainer.py, checkpoints.py)
    "GRPO_TOKEN_LOSS_TYPES",
    "KNOWN_COMPUTE_LOSSES",
    "TRAINER_STATE_NAME",
    "add_to_logged_entry",
    "checkpoint_save_finished",
    "compute_loss_kind",
    "saved_callback_attributes",
    "wrap_trainer_method",
    # model wrappers and DeepSpeed (loss.py, validation.py)
    "MODEL_WRAPPER_ATTRIBUTES",
    "full_parameter_shape",
    # transformers' model forward across versions (commands/demo.py, benchmarks)
    "cache_argument",
]

# Private methods of PEFT base classes that this package overrides (the tuner-author interface of PEFT 0.21). PEFT
# calls them by these names; a rename upstream would silently bypass the override.
OVERRIDDEN_PRIVATE_METHODS: dict[type, tuple[str, ...]] = {
    BaseTuner: (
        "_create_and_replace",
        "_prepare_adapter_config",
        "_remap_adapter_state_dict_for_load",
        "_unload_and_optionally_merge",
        "_check_merge_allowed",
        "_cast_adapter_dtype",
    ),
    LoraModel: ("_create_and_replace",),
}

# Methods that PEFT's PeftModel looks up on its tuner by name (``hasattr``), without a base-class definition
CALLED_ON_THE_TUNER_BY_PEFT: tuple[str, ...] = ("_enable_peft_forward_hooks",)


def add_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add the member ``name`` (value ``name``) to a closed ``str`` enum in place; return it.

    PEFT 0.21 has no public way to extend ``PeftType``; this writes the member into the enum's own tables exactly as
    the ``enum`` module does when it builds the class (checked on Python 3.10 to 3.13).
    """
    if name in enum_cls.__members__:
        return enum_cls[name]
    cls: Any = enum_cls  # the enum's private tables
    member: Any = str.__new__(cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = cls
    member._sort_order_ = len(cls._member_names_)
    cls._member_names_.append(name)
    cls._member_map_[name] = member
    cls._value2member_map_[name] = member
    # EnumType.__setattr__ only forbids re-assigning an existing member, so go through type
    type.__setattr__(cls, name, member)
    return member


def transformers_is_loading_an_adapter() -> bool:
    """Whether the current call runs inside transformers' own adapter loading (``PeftAdapterMixin.load_adapter``).

    That path (``pipeline(model=<adapter dir>)``, ``model.load_adapter``, ``from_pretrained(<adapter dir>)``) injects
    the adapter with ``peft.inject_adapter_in_model`` and then loads the weights with its own key mapping, which a
    tuner cannot see; the only trace it leaves is the call stack.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "load_adapter"
            and frame.f_globals.get("__name__") == "transformers.integrations.peft"
        ):
            return True
        frame = frame.f_back
    return False


def move_adapter_to_base_layer(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Put an adapter's weights of ``layer`` on the base layer's device and float dtype, as PEFT does for its own.

    PEFT then upcasts them to float32 unless ``autocast_adapter_dtype=False``.
    """
    layer._move_adapter_to_device_of_base_layer(adapter_name)


def check_adapters_not_merged(model: torch.nn.Module, adapter_names: str | Iterable[str]) -> None:
    """PEFT's refusal to delete adapters that are merged into the base weights."""
    names = adapter_names if isinstance(adapter_names, str) else list(adapter_names)
    tuners_utils._check_adapters_not_merged(model, names)


def tuner_state_dict_key_prefixes(model: torch.nn.Module, adapter_name: str | None = None) -> set[str]:
    """The state-dict key prefixes under which PEFT saves the tuner layers of ``model`` (all of them, structurally)."""
    return tuners_utils._get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)


def filter_state_dict_by_key_prefixes(state_dict: Mapping[str, Any], prefixes: set[str]) -> dict[str, Any]:
    """The entries of ``state_dict`` under any of ``prefixes`` (PEFT's own selection of adapter keys)."""
    return dict(tuners_utils._filter_state_dict_by_key_prefixes(dict(state_dict), prefixes))


def wrap_peft_model_method(name: str, wrapper_factory: Any) -> bool:
    """Replace the method ``name`` of ``PeftModel`` (every PEFT model in the process) by ``wrapper_factory(original)``.

    Idempotent: the replacement is marked, and a method that is already one is left as it is. Returns ``False`` if
    this PEFT has no such method. Used for the model card (:mod:`peft_infosteer.hub`): ``create_or_update_model_card``
    (what ``save_pretrained`` calls to write ``README.md``) and the private ``_upload_modified_files`` (what
    ``push_to_hub`` calls after it rewrote ``README.md``); the wrappers must leave models without an InfoSteer adapter
    exactly as PEFT handles them.
    """
    from peft import PeftModel

    original = getattr(PeftModel, name, None)
    if original is None:
        return False
    if not getattr(original, "_infosteer_hook", False):
        wrapped = wrapper_factory(original)
        wrapped._infosteer_hook = True
        setattr(PeftModel, name, wrapped)
    return True


def replace_peft_method(peft_type: Any, config_cls: type, model_cls: type, prefix: str) -> None:
    """Make PEFT resolve ``peft_type`` to ``config_cls`` / ``model_cls`` with ``prefix``, over an existing registration.

    ``register_peft_method`` refuses a type that is already registered; this writes the same registry dicts of
    ``peft.mapping`` that it writes (which ``PeftConfig``, ``PeftModel`` and ``get_peft_model`` read), and drops the
    type from the mixed-model registry, since ``model_cls`` is not registered as mixed-compatible.
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)


def set_trainer_tags(trainer_cls: type, tags: list[str]) -> None:
    """The tags TRL writes into the model cards of a trainer class (TRL's ``_tag_names`` class attribute)."""
    trainer_cls._tag_names = tags  # type: ignore[attr-defined]


def add_callback_first(trainer: Any, callback: Any) -> None:
    """Put ``callback`` first in a transformers ``Trainer``'s callback list.

    ``Trainer`` calls its reporting integrations (TensorBoard, W&B, ...) before the callbacks passed by the user; a
    callback that adds metrics to ``logs`` in ``on_log`` must run before them for them to see the metrics.
    """
    trainer.callback_handler.callbacks.insert(0, callback)


# ---- the tuner-author contract of PEFT (model.py, layer.py) ----------------------------------------------------------


def peft_would_target(config: Any, module_name: str) -> bool:
    """Whether PEFT's injection wraps the module named ``module_name`` for ``config`` (its ``target_modules`` etc.).

    PEFT 0.21's ``BaseTuner.inject_adapter`` wraps exactly the modules for which the static
    ``BaseTuner._check_target_module_exists(config, key)`` is truthy. ``InfoSteerModel`` asks it before injecting, to
    refuse encoder modules of an encoder-decoder model with a clear error; if the two disagreed, that check would miss
    steered encoder modules or refuse modules PEFT would leave alone.
    """
    return bool(BaseTuner._check_target_module_exists(config, module_name))


def replace_module(
    tuner: BaseTuner, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
) -> None:
    """Put the tuner layer ``new_module`` in place of ``parent.<child_name>`` (which is ``child``), as PEFT does.

    PEFT 0.21's ``BaseTuner._replace_module`` sets the attribute, carries a bitsandbytes 8-bit ``state`` over, and moves
    the submodules of ``new_module`` whose name holds ``tuner.prefix`` (the adapter weights) to the device of the
    child's weight, unless they are on the meta device (``low_cpu_mem_usage``). Without that move, the steering gains
    would stay on the CPU under a base layer on the GPU.
    """
    tuner._replace_module(parent, child_name, new_module, child)


@contextlib.contextmanager
def peft_config_hidden(model: nn.Module) -> Iterator[None]:
    """Hide ``model.peft_config`` while a second tuner (the stacked ``LoraModel``) is built on ``model``.

    PEFT 0.21's ``BaseTuner.__init__`` adds its config to a ``peft_config`` it finds (on the wrapped model, through
    ``BaseTuner.__getattr__``) and finally sets ``model.peft_config`` to its own dict: the InfoSteer adapters' dict
    would get a LoRA entry and then be replaced. On exit the model has that dict again (the same object), or none.
    """
    saved = model.__dict__.pop("peft_config", None)
    try:
        yield
    finally:
        model.__dict__.pop("peft_config", None)
        if saved is not None:
            model.__dict__["peft_config"] = saved


def init_tuner_layer_state(layer: BaseTunerLayer, active_adapter: str | None = None) -> None:
    """Give a new tuner layer the private state that PEFT's own layers (``LoraLayer``) set in their ``__init__``.

    PEFT 0.21's ``BaseTunerLayer`` keeps "adapters disabled" in ``_disable_adapters`` and the active adapter(s) in
    ``_active_adapter``: the read-only properties ``disable_adapters`` / ``active_adapter`` read them, and
    ``enable_adapters`` / ``set_adapter`` write them. Under other names the layer would report the class defaults
    (``"default"`` active) whatever adapter it was built with.
    """
    layer._disable_adapters = False
    if active_adapter is not None:
        layer._active_adapter = active_adapter


# ---- transformers' Trainer and TRL's trainers (trainer.py, checkpoints.py) -------------------------------------------

# transformers.trainer.TRAINER_STATE_NAME, without importing transformers.trainer (slow) for one string
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_save_finished(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the Trainer finished saving ``checkpoint_dir`` (a ``checkpoint-N`` directory).

    transformers 5.x's ``Trainer._save_checkpoint`` writes the model, optimizer, scheduler and RNG states first and
    ``trainer_state.json`` last, in place, so a run killed while saving leaves a directory without it. If that order
    changed, resuming could pick a checkpoint with missing files.
    """
    return os.path.isfile(os.path.join(checkpoint_dir, TRAINER_STATE_NAME))


def saved_callback_attributes(state: Any, callback_name: str) -> dict[str, Any]:
    """The ``attributes`` of the newest state that a callback class named ``callback_name`` saved in ``state``.

    transformers 5.x keeps the ``state()`` of ``ExportableState`` callbacks (``{"args": ..., "attributes": ...}``) in
    ``TrainerState.stateful_callbacks``: a dict by class name whose value is one state, or a list with the newest last
    once ``Trainer._save_checkpoint`` appended to it; ``trainer_state.json`` gives it back on resuming. Under another
    layout a resumed run would silently lose what the callback saved (``{}`` here).
    """
    saved = (getattr(state, "stateful_callbacks", None) or {}).get(callback_name)
    saved = saved[-1] if isinstance(saved, list) and saved else saved
    attributes = saved.get("attributes") if isinstance(saved, dict) else None
    return attributes if isinstance(attributes, dict) else {}


def add_to_logged_entry(state: Any, metrics: Mapping[str, Any]) -> None:
    """Add ``metrics`` to the entry that ``Trainer.log`` just stored in ``state.log_history`` (call it from ``on_log``).

    transformers 5.x's ``Trainer.log`` appends a copy of ``logs`` (with ``"step"``) to ``log_history`` before it calls
    the callbacks' ``on_log``: metrics that a callback adds to ``logs`` reach the reporters, but not the history
    (``trainer.state.log_history``, ``trainer_state.json``) without this. The entry is the last one, of this step.
    """
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


def wrap_trainer_method(trainer: Any, name: str, wrapper_factory: Callable[[Any], Any]) -> None:
    """Replace the method ``name`` of this one trainer object (not its class) by ``wrapper_factory(original)``.

    Idempotent: the replacement is marked, and a method that is already one is left as it is. Used for
    ``evaluation_loop`` (transformers 5.x's ``evaluate`` and ``predict`` call ``self.evaluation_loop``) and
    ``compute_loss`` (``Trainer.training_step`` calls ``self.compute_loss(model, inputs,
    num_items_in_batch=...)``): if upstream stopped calling them through ``self``, the wrappers would silently not run.
    """
    original = getattr(trainer, name)
    if getattr(original, "_infosteer_wrapper", False):
        return
    wrapped: Any = functools.wraps(original)(wrapper_factory(original))
    wrapped._infosteer_wrapper = True
    setattr(trainer, name, wrapped)


# The compute_loss implementations whose normalisation of the task loss peft_infosteer.trainer mirrors (transformers
# 5.x, TRL 1.x), by the qualified name of the class that defines them. A trainer whose compute_loss is defined by
# another class keeps the regularizer's model-output probes.
KNOWN_COMPUTE_LOSSES: dict[str, str] = {
    "transformers.trainer.Trainer": "trainer",
    "trl.trainer.sft_trainer.SFTTrainer": "sft",
    "trl.trainer.dpo_trainer.DPOTrainer": "dpo",
    "trl.trainer.grpo_trainer.GRPOTrainer": "grpo",
}
# GRPO loss types that TRL's GRPOTrainer._compute_loss normalises by the generation batch's token count
# (num_items_in_batch); it computes the others as per-micro-batch means divided by the accumulation steps.
GRPO_TOKEN_LOSS_TYPES: tuple[str, ...] = ("dapo", "cispo", "vespo")


def compute_loss_kind(trainer: Any) -> str | None:
    """Which known ``compute_loss`` ``trainer`` runs (a value of :data:`KNOWN_COMPUTE_LOSSES`), or ``None``.

    The first class in the trainer's MRO that defines ``compute_loss`` decides: a subclass that overrides it is
    unknown, one that only inherits it is known.
    """
    for cls in type(trainer).__mro__:
        if "compute_loss" in vars(cls):
            return KNOWN_COMPUTE_LOSSES.get(f"{cls.__module__}.{cls.__qualname__}")
    return None


# ---- model wrappers and DeepSpeed (loss.py, validation.py) -----------------------------------------------------------

# Where model wrappers keep the model they wrap: ``module`` (DDP, FSDP, DeepSpeed's engine) and ``_orig_mod`` (the
# private attribute of torch 2.x ``torch.compile``'s ``OptimizedModule``); were it renamed, the InfoSteer model of a
# compiled model could not be found.
MODEL_WRAPPER_ATTRIBUTES: tuple[str, ...] = ("module", "_orig_mod")


def full_parameter_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of a parameter as the model defines it, also when DeepSpeed ZeRO-3 partitioned it.

    ZeRO-3 (DeepSpeed 0.19, ``deepspeed.runtime.zero.partition_parameters``) empties each partitioned parameter and
    keeps its full shape in the attribute ``ds_shape``; without it, the shape check of a loaded adapter would compare
    the file's weights with empty placeholders.
    """
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes its key-value cache and its output returns it.

    ``cache`` in transformers versions that renamed it (5.25 deprecates ``past_key_values`` with a FutureWarning on
    every call), ``past_key_values`` before. A PEFT model is asked about its base model.
    """
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
