"""Every private API of torch, PEFT, transformers and TRL that peft-infosteer touches, in one place.

Upstream may change any of these without notice. ``tests/test_compat.py`` checks each entry against the installed
versions, so that an upstream change fails one named test instead of misbehaving somewhere deep in a training run.
Modules of this package reach private upstream APIs only through this one.
"""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

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
    "tuner_state_dict_key_prefixes",
    "wrap_peft_model_upload",
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


def wrap_peft_model_upload(wrapper_factory: Any) -> bool:
    """Wrap ``PeftModel._upload_modified_files`` (what ``push_to_hub`` calls after it rewrote ``README.md``).

    ``wrapper_factory(original)`` returns the replacement. Returns ``False`` if this PEFT has no such method.
    """
    from peft import PeftModel

    original = getattr(PeftModel, "_upload_modified_files", None)
    if original is None:
        return False
    if not getattr(original, "_infosteer_hook", False):
        wrapped = wrapper_factory(original)
        wrapped._infosteer_hook = True
        setattr(PeftModel, "_upload_modified_files", wrapped)  # noqa: B010 (mypy: no assignment to a method)
    return True


def set_trainer_tags(trainer_cls: type, tags: list[str]) -> None:
    """The tags TRL writes into the model cards of a trainer class (TRL's ``_tag_names`` class attribute)."""
    trainer_cls._tag_names = tags  # type: ignore[attr-defined]


def add_callback_first(trainer: Any, callback: Any) -> None:
    """Put ``callback`` first in a transformers ``Trainer``'s callback list.

    ``Trainer`` calls its reporting integrations (TensorBoard, W&B, ...) before the callbacks passed by the user; a
    callback that adds metrics to ``logs`` in ``on_log`` must run before them for them to see the metrics.
    """
    trainer.callback_handler.callbacks.insert(0, callback)
