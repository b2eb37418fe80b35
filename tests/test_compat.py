"""One test per private upstream API in ``peft_infosteer._compat``: each fails by name when upstream changes it."""

from __future__ import annotations

import enum
import inspect
import re

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


def test_peft_model_card_methods_are_where_saving_and_pushing_call_them():
    # save_pretrained writes README.md through this method; push_to_hub (transformers) uploads through the other one
    card = getattr(PeftModel.create_or_update_model_card, "__wrapped__", PeftModel.create_or_update_model_card)
    assert list(inspect.signature(card).parameters) == ["self", "output_dir"]
    assert "self.create_or_update_model_card(" in inspect.getsource(PeftModel.save_pretrained)
    upload = getattr(PeftModel, "_upload_modified_files", None)
    assert upload is not None and "working_dir" in inspect.signature(upload).parameters


@pytest.mark.parametrize("name", ["create_or_update_model_card", "_upload_modified_files"])
def test_wrap_peft_model_method(monkeypatch, name):
    method = getattr(PeftModel, name)
    original = getattr(method, "__wrapped__", method)  # as PEFT ships it, even after an InfoSteer model was built
    monkeypatch.setattr(PeftModel, name, original)  # restored after the test
    seen = []

    def factory(wrapped_original):
        seen.append(wrapped_original)
        return lambda self, *args, **kwargs: ("wrapped", wrapped_original(self, *args, **kwargs))

    assert _compat.wrap_peft_model_method(name, factory)
    wrapper = getattr(PeftModel, name)
    assert seen == [original] and wrapper._infosteer_hook
    assert _compat.wrap_peft_model_method(name, factory) and getattr(PeftModel, name) is wrapper  # idempotent
    assert seen == [original]
    assert not _compat.wrap_peft_model_method("_no_such_method_in_peft", factory)


def test_replace_peft_method_writes_what_peft_reads():
    import peft.mapping as mapping
    import peft.peft_model as peft_model
    import peft.tuners.tuners_utils as tuners_utils
    from peft.utils import register_peft_method

    # every registry dict that register_peft_method writes, and no other
    written = set(re.findall(r"PEFT_TYPE_TO_\w+_MAPPING\[", inspect.getsource(register_peft_method)))
    assert written == {f"PEFT_TYPE_TO_{kind}_MAPPING[" for kind in ("CONFIG", "TUNER", "PREFIX", "MIXED_MODEL")}
    # ... the very objects that PeftModel, get_peft_model and the tuners read
    assert peft_model.PEFT_TYPE_TO_TUNER_MAPPING is mapping.PEFT_TYPE_TO_TUNER_MAPPING
    assert peft_model.PEFT_TYPE_TO_CONFIG_MAPPING is mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    assert tuners_utils.PEFT_TYPE_TO_PREFIX_MAPPING is mapping.PEFT_TYPE_TO_PREFIX_MAPPING

    key = "INFOSTEER_COMPAT_TEST"
    registries = (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
        mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    )
    try:
        for registry, value in zip(registries, (LoraConfig, PeftModel, "other_", PeftModel)):
            registry[key] = value  # another implementation owns the type, mixed-compatible
        _compat.replace_peft_method(key, InfoSteerConfig, InfoSteerModel, "infosteer_")
        assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] is InfoSteerConfig
        assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] is InfoSteerModel
        assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] == "infosteer_"
        assert key not in mapping.PEFT_TYPE_TO_MIXED_MODEL_MAPPING
    finally:
        for registry in registries:
            registry.pop(key, None)


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


# ---- the tuner-author contract of PEFT (model.py, layer.py) ----------------------------------------------------------


def _filled_call(signature: inspect.Signature) -> tuple[list[str], dict[str, str]]:
    args = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwargs = {p.name: p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
    return args, kwargs


def test_overrides_take_every_argument_peft_passes():
    # PEFT calls the overridden private methods with its own parameters, positionally or by keyword
    # (`_create_and_replace(peft_config, ..., current_key=key)`, `parameter_name=...` for target_parameters)
    from peft_infosteer.model import _LoraInjector

    for cls in (InfoSteerModel, _LoraInjector):
        for name in (n for names in _compat.OVERRIDDEN_PRIVATE_METHODS.values() for n in names if n in vars(cls)):
            upstream = next(getattr(c, name) for c in cls.__mro__[1:] if name in vars(c))
            ours = inspect.signature(getattr(cls, name))
            args, kwargs = _filled_call(inspect.signature(upstream))
            ours.bind(*args, **kwargs)  # TypeError: the override no longer takes what PEFT passes
            ours.bind(*args[:1], **{a: a for a in args[1:]}, **kwargs)


def test_peft_would_target_what_peft_injects(tiny):
    for config in (
        InfoSteerConfig(intervention="gain", target_modules=["down_proj"], layers_to_transform=[1]),
        InfoSteerConfig(intervention="gain", target_modules=r".*layers\.0\.mlp\.down_proj"),
    ):
        base = tiny("llama")
        predicted = {name for name, _ in base.named_modules() if _compat.peft_would_target(config, name)}
        model = get_peft_model(base, config)
        injected = {n for n, m in model.get_base_model().named_modules() if isinstance(m, InfoSteerLayer)}
        assert predicted == injected and injected, (predicted, injected)


def test_replace_module_puts_adapter_weights_on_the_base_layers_device(tiny):
    tuner = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain")).base_model
    parent = torch.nn.Module()
    parent.proj = child = torch.nn.Linear(4, 3, device="meta")  # stands for a base layer on an accelerator

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base_layer = child
            self.infosteer_gain = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.ones(4))})
            self.unrelated = torch.nn.Linear(2, 2)

    new = Wrapper()
    _compat.replace_module(tuner, parent, "proj", new, child)
    assert parent.proj is new
    assert new.infosteer_gain["default"].device.type == "meta"  # the adapter weights (tuner.prefix) follow
    assert new.unrelated.weight.device.type == "cpu"


def test_peft_config_hidden_keeps_a_second_tuner_off_the_first_ones_configs(tiny):
    from peft.tuners.lora import LoraModel

    lora = LoraConfig(r=2, target_modules=["down_proj"])
    # what BaseTuner.__init__ does to a peft_config it finds on the model: adds its own config to it
    model, ours = tiny("llama"), {"steer": InfoSteerConfig()}
    model.peft_config = ours
    with pytest.warns(UserWarning, match="Already found a `peft_config`"):
        LoraModel(model, lora, "lora")
    assert list(ours) == ["steer", "lora"], "BaseTuner.__init__ no longer adds to an existing peft_config"
    # hidden, the second tuner builds its own dict (and sets it on the model); on exit the model has ours again
    model, ours = tiny("llama"), {"steer": InfoSteerConfig()}
    model.peft_config = ours
    with _compat.peft_config_hidden(model):
        tuner = LoraModel(model, lora, "lora")
        assert model.peft_config is tuner.peft_config, "BaseTuner.__init__ no longer sets model.peft_config"
    assert model.peft_config is ours and list(ours) == ["steer"] and list(tuner.peft_config) == ["lora"]


def test_init_tuner_layer_state_is_what_peft_layers_read():
    from peft.tuners import lora

    # PEFT's own layers set the same private attributes in their __init__
    assert "self._disable_adapters = False" in inspect.getsource(lora.LoraLayer.__init__)
    assert "self._active_adapter = adapter_name" in inspect.getsource(lora.Linear.__init__)

    class Layer(torch.nn.Module, BaseTunerLayer):
        adapter_layer_names = ("weights",)

        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.ones(1)) for n in ("a", "b")})

    layer = Layer()
    _compat.init_tuner_layer_state(layer, active_adapter="a")
    assert layer.active_adapter == "a" and layer.active_adapters == ["a"] and not layer.disable_adapters
    layer.enable_adapters(False)  # PEFT's public setters write what the wrapper wrote
    assert layer.disable_adapters and layer._disable_adapters
    layer.enable_adapters(True)
    layer.set_adapter("b")
    assert layer._active_adapter == ["b"] and layer.active_adapters == ["b"] and not layer.disable_adapters


# ---- transformers' Trainer and TRL's trainers (trainer.py, checkpoints.py) -------------------------------------------


def _tiny_trainer(output_dir, callbacks=(), **args):
    from tiny_models import tiny_model
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(output_dir), report_to=[], use_cpu=True, **args)
    return Trainer(model=tiny_model("llama"), args=args, callbacks=list(callbacks))


def test_trainer_checkpoint_layout(tmp_path):
    import os

    from transformers import trainer as trainer_module
    from transformers.trainer_callback import ExportableState, TrainerCallback, TrainerState

    assert trainer_module.TRAINER_STATE_NAME == _compat.TRAINER_STATE_NAME

    class Saving(TrainerCallback, ExportableState):
        value = 0

        def state(self):
            return {"args": {}, "attributes": {"value": self.value}}

    callback = Saving()
    trainer = _tiny_trainer(tmp_path, [callback])
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    found_at_state_save = []
    save_to_json = trainer.state.save_to_json

    def recording_save_to_json(path):
        found_at_state_save.append(set(os.listdir(os.path.dirname(path))))
        save_to_json(path)

    trainer.state.save_to_json = recording_save_to_json
    for step in (1, 2):
        trainer.state.global_step, callback.value = step, 10 * step
        trainer._save_checkpoint(trainer.model, trial=None)
    # trainer_state.json is written last, after the weights, optimizer, scheduler and RNG state
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= found_at_state_save[0]
    assert _compat.TRAINER_STATE_NAME not in found_at_state_save[0]
    checkpoint = tmp_path / "checkpoint-2"
    assert _compat.checkpoint_save_finished(checkpoint) and not _compat.checkpoint_save_finished(tmp_path)
    # a callback's saved state comes back from the checkpoint, the newest one
    state = TrainerState.load_from_json(str(checkpoint / _compat.TRAINER_STATE_NAME))
    assert _compat.saved_callback_attributes(state, "Saving") == {"value": 20}
    assert _compat.saved_callback_attributes(state, "NoSuchCallback") == {}
    # two callbacks of one class: a list, newest last
    first, second = Saving(), Saving()
    second.value = 30
    assert _compat.saved_callback_attributes(TrainerState(stateful_callbacks=[first, second]), "Saving") == {
        "value": 30
    }


def test_add_to_logged_entry(tmp_path):
    from transformers import TrainerCallback

    class Adding(TrainerCallback):
        through_compat = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs["extra"] = 1.0
            if self.through_compat:
                _compat.add_to_logged_entry(state, {"extra": 1.0})

    callback = Adding()
    trainer = _tiny_trainer(tmp_path, [callback])
    trainer.log({"loss": 1.0})
    assert "extra" not in trainer.state.log_history[-1], "Trainer.log no longer stores a copy before on_log"
    callback.through_compat = True
    trainer.log({"loss": 2.0})
    assert trainer.state.log_history[-1]["loss"] == 2.0 and trainer.state.log_history[-1]["extra"] == 1.0
    assert "extra" not in trainer.state.log_history[-2]


def test_wrap_trainer_method(tmp_path):
    from transformers import Trainer

    # training and evaluating reach these methods through `self`, where an instance attribute overrides the class's
    assert "self.evaluation_loop(" in inspect.getsource(Trainer.evaluate)
    assert "self.evaluation_loop(" in inspect.getsource(Trainer.predict)
    assert "self.compute_loss(" in inspect.getsource(Trainer.training_step)

    trainer, other = _tiny_trainer(tmp_path / "a"), _tiny_trainer(tmp_path / "b")
    calls = []

    def counting(original):
        def wrapper(*args, **kwargs):
            calls.append(original)
            return original(*args, **kwargs)

        return wrapper

    _compat.wrap_trainer_method(trainer, "evaluation_loop", counting)
    wrapped = trainer.evaluation_loop
    _compat.wrap_trainer_method(trainer, "evaluation_loop", counting)
    assert trainer.evaluation_loop is wrapped and wrapped.__name__ == "evaluation_loop"  # idempotent, wraps
    assert "evaluation_loop" not in vars(other) and other.evaluation_loop.__func__ is Trainer.evaluation_loop
    metrics = trainer.evaluate(eval_dataset=[{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}])
    assert len(calls) == 1 and "eval_loss" in metrics


@pytest.mark.parametrize(("qualname", "kind"), sorted(_compat.KNOWN_COMPUTE_LOSSES.items()))
def test_known_compute_losses_are_defined_where_listed(qualname, kind):
    import importlib

    module_name, _, class_name = qualname.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    assert cls is not None, f"{qualname} is gone: peft_infosteer.trainer mirrors its compute_loss"
    assert "compute_loss" in vars(cls), f"{qualname} no longer defines compute_loss, whose normalisation is mirrored"
    params = list(inspect.signature(cls.compute_loss).parameters)
    assert params[:5] == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    # training reaches it through Trainer.training_step
    training_step = next(c.training_step for c in cls.__mro__ if "training_step" in vars(c))
    step_source = inspect.getsource(training_step)
    assert "self.compute_loss(" in step_source or "super().training_step(" in step_source
    # a subclass that only inherits it runs it; one that overrides it does not
    inheriting = type("Inheriting", (cls,), {})
    overriding = type("Overriding", (cls,), {"compute_loss": lambda self, *args, **kwargs: None})
    assert _compat.compute_loss_kind(object.__new__(inheriting)) == kind
    assert _compat.compute_loss_kind(object.__new__(overriding)) is None


def test_scaling_of_summed_losses_by_the_process_count():
    # the loss plan multiplies a loss normalised by num_items_in_batch by num_processes // tp_size, as these do
    from transformers import Trainer
    from trl import SFTTrainer

    for cls in (Trainer, SFTTrainer):
        source = inspect.getsource(cls.compute_loss)
        assert "self.args.average_tokens_across_devices" in source, cls.__name__
        assert "self.accelerator.num_processes // self.get_tp_size()" in source, cls.__name__


def _loss_types(test):
    import ast

    if not (isinstance(test, ast.Compare) and isinstance(test.left, ast.Attribute) and test.left.attr == "loss_type"):
        return set()
    right = test.comparators[0]
    if isinstance(test.ops[0], ast.Eq) and isinstance(right, ast.Constant):
        return {right.value}
    if isinstance(test.ops[0], ast.In) and isinstance(right, (ast.List, ast.Tuple)):
        return {e.value for e in right.elts if isinstance(e, ast.Constant)}
    return set()


def test_grpo_loss_types_normalised_by_the_token_count():
    import ast
    import textwrap

    from trl.trainer.grpo_trainer import GRPOTrainer

    source = textwrap.dedent(inspect.getsource(GRPOTrainer._compute_loss))
    # the batch keys that the loss plan reads are the loss's own
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask"):
        assert f'"{key}"' in source, key
    # the if/elif chain over self.loss_type that normalises the loss (`normalizer`; it ends in "Unknown loss type")
    chains = []
    nodes = list(ast.walk(ast.parse(source)))
    elifs = {id(n.orelse[0]) for n in nodes if isinstance(n, ast.If) and len(n.orelse) == 1}
    for node in (n for n in nodes if isinstance(n, ast.If) and id(n) not in elifs):
        branches = []
        while isinstance(node, ast.If) and _loss_types(node.test):
            branches.append((_loss_types(node.test), "\n".join(ast.unparse(s) for s in node.body)))
            node = node.orelse[0] if len(node.orelse) == 1 else None
        if branches and isinstance(node, ast.Raise) and "Unknown loss type" in ast.unparse(node):
            if any("normalizer" in body for _, body in branches):
                chains.append(branches)
    assert len(chains) == 1, "GRPOTrainer._compute_loss normalises its loss types differently"
    token = {t for types, body in chains[0] if "num_items_in_batch" in body for t in types}
    assert token == set(_compat.GRPO_TOKEN_LOSS_TYPES)
    for types, body in chains[0]:
        if "num_items_in_batch" in body:  # the denominator that the loss plan mirrors
            assert "self.accelerator.num_processes" in body and "self.args.steps_per_generation" in body
        else:  # a per-micro-batch mean divided by the accumulation steps
            assert "self.current_gradient_accumulation_steps" in body, types


# ---- model wrappers and DeepSpeed (loss.py, validation.py) -----------------------------------------------------------


def test_model_wrapper_attributes(tiny):
    from peft_infosteer.loss import find_infosteer_model

    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))
    compiled = torch.compile(model)  # nothing compiles before its first call
    assert compiled._orig_mod is model and "_orig_mod" in _compat.MODEL_WRAPPER_ATTRIBUTES
    assert "self.module = module" in inspect.getsource(torch.nn.parallel.DistributedDataParallel.__init__)
    assert find_infosteer_model(compiled) is model.base_model


def test_full_parameter_shape():
    import importlib.util
    from pathlib import Path

    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = torch.Size([3, 4])
    assert _compat.full_parameter_shape(partitioned) == (3, 4)
    assert _compat.full_parameter_shape(torch.zeros(2, 5)) == (2, 5)
    spec = importlib.util.find_spec("deepspeed")  # without importing it (slow)
    if spec is None or spec.origin is None:
        pytest.skip("DeepSpeed is not installed")
    source = (Path(spec.origin).parent / "runtime" / "zero" / "partition_parameters.py").read_text()
    assert "param.ds_shape = param.shape" in source, "DeepSpeed ZeRO-3 no longer keeps the full shape in ds_shape"


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_cache_argument_is_what_the_forward_takes_and_returns_without_a_warning(tiny, model_type):
    import warnings

    model = get_peft_model(tiny(model_type), LoraConfig(target_modules=["q_proj"]))
    name = _compat.cache_argument(model)
    assert name == _compat.cache_argument(model.get_base_model())
    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=ids, use_cache=True)
        cache = getattr(out, name)
        assert cache is not None
        step = model(input_ids=torch.tensor([[4]]), use_cache=True, **{name: cache}).logits
        full = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
