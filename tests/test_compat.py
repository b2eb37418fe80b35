"""One test per private upstream API in ``peft_infosteer._compat``: each fails by name when upstream changes it."""

from __future__ import annotations

import enum
import inspect

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from peft_infosteer import InfoSteerConfig, InfoSteerModel, _compat
from peft_infosteer.layer import InfoSteerLayer


@pytest.mark.parametrize(
    ("owner", "name"), [(owner, name) for owner, names in _compat.OVERRIDDEN_PRIVATE_METHODS.items() for name in names]
)
def test_overridden_private_methods_still_exist_upstream(owner, name):
    assert callable(getattr(owner, name, None)), f"{owner.__name__}.{name} is gone: the override would be bypassed"


def test_every_override_of_a_private_peft_method_is_listed():
    from peft_infosteer.model import _LoraInjector

    for cls, base in ((InfoSteerModel, _compat.BaseTuner), (_LoraInjector, _compat.LoraModel)):
        overrides = {
            n
            for n, v in vars(cls).items()
            if n.startswith("_") and n[1] != "_" and (callable(v) or isinstance(v, classmethod))
        }
        overrides = {n for n in overrides if hasattr(base, n)}
        listed = {n for owner, names in _compat.OVERRIDDEN_PRIVATE_METHODS.items() if issubclass(cls, owner)
                  for n in names}  # fmt: skip
        assert overrides == {n for n in listed if n in vars(cls)}, cls.__name__
        assert all(n in vars(cls) for n in _compat.OVERRIDDEN_PRIVATE_METHODS.get(base, ())), cls.__name__


def test_add_enum_member():
    class Color(str, enum.Enum):
        RED = "RED"

    member = _compat.add_enum_member(Color, "BLUE")
    assert Color.BLUE is member and Color("BLUE") is member and Color["BLUE"] is member
    assert list(Color) == [Color.RED, Color.BLUE] and member == "BLUE" and isinstance(member, Color)
    assert _compat.add_enum_member(Color, "BLUE") is member


def test_move_adapter_to_base_layer(tiny):
    model = get_peft_model(
        tiny("llama").to(torch.bfloat16), InfoSteerConfig(intervention="gain"), autocast_adapter_dtype=False
    )
    layer = next(m for m in model.modules() if isinstance(m, InfoSteerLayer))
    layer.infosteer_gain["default"].data = layer.infosteer_gain["default"].data.float()
    _compat.move_adapter_to_base_layer(layer, "default")
    assert layer.infosteer_gain["default"].dtype == torch.bfloat16  # the base layer's dtype


def test_transformers_is_loading_an_adapter():
    assert not _compat.transformers_is_loading_an_adapter()
    import transformers.integrations.peft as integration

    namespace = {"__name__": integration.__name__, "probe": _compat.transformers_is_loading_an_adapter}
    exec("def load_adapter():\n    return probe()", namespace)  # a frame that looks like transformers' own
    assert namespace["load_adapter"]()


def test_called_on_the_tuner_by_peft():
    source = inspect.getsource(PeftModel)
    assert all(f"base_model.{name}" in source for name in _compat.CALLED_ON_THE_TUNER_BY_PEFT)


def test_check_adapters_not_merged(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    _compat.check_adapters_not_merged(model, "default")
    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        _compat.check_adapters_not_merged(model, ["default"])


def test_tuner_state_dict_key_prefixes_cover_nested_lora(tiny):
    model = get_peft_model(
        tiny("llama"), InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"]))
    )
    prefixes = _compat.tuner_state_dict_key_prefixes(model, adapter_name="default")
    state = _compat.filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    assert any("infosteer_gain" in k for k in state) and any("lora_A" in k for k in state)
    assert not any(k.endswith("base_layer.base_layer.weight") for k in state)


def test_peft_model_upload_method_exists():
    method = getattr(PeftModel, "_upload_modified_files", None)
    assert method is not None and "working_dir" in inspect.signature(method).parameters
    assert getattr(method, "_infosteer_hook", False)  # wrapped by peft_infosteer.hub


def test_trainer_tags():
    from trl import SFTTrainer

    assert isinstance(SFTTrainer._tag_names, list)  # TRL's class attribute for model-card tags

    class Tagged(SFTTrainer):
        pass

    _compat.set_trainer_tags(Tagged, ["a", "b"])
    assert Tagged._tag_names == ["a", "b"] and SFTTrainer._tag_names != ["a", "b"]


def test_add_callback_first(tmp_path):
    from tiny_models import tiny_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    trainer = Trainer(model=tiny_model("llama"), args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True))
    callback = TrainerCallback()
    _compat.add_callback_first(trainer, callback)
    assert trainer.callback_handler.callbacks[0] is callback


def test_base_tuner_layer_is_what_peft_walks():
    # set_adapter / delete_adapter / merge reach nested LoRA layers because both are BaseTunerLayer subclasses
    assert issubclass(InfoSteerLayer, BaseTunerLayer)
