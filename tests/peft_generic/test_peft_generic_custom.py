"""PEFT's ``TestPeftCustomModel`` (tests/test_custom_models.py) with InfoSteer rows on PEFT's toy models."""

from __future__ import annotations

import pytest
import torch
from generic_skips import precheck_custom
from peft import LoraConfig
from peft_generic import adopt_peft_tests, import_peft_test_module

from peft_infosteer import InfoSteerConfig

peft_custom = import_peft_test_module("test_custom_models")  # the module, never its classes: pytest would collect them

# PEFT's TEST_CASES style: (test name, model id of peft_custom.MockTransformerWrapper, config class, config kwargs).
# MLP is lin0 (10->20) -> ReLU -> dropout -> lin1 (20->2): lin1's input is the "key" vector, lin1 the output projection.
# EmbConv1D has a transformers Conv1D (GPT-2's layer type) as `conv1d`.
TEST_CASES = [
    ("Vanilla MLP 1 InfoSteer gain", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0}),
    ("Vanilla MLP 2 InfoSteer gain entropy", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 100.0}),
    ("Vanilla MLP 3 InfoSteer gain softmax usage", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 10.0, "usage": "softmax"}),
    ("Vanilla MLP 4 InfoSteer none modules_to_save", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "none", "entropy_weight": 10.0, "modules_to_save": ["lin0"]}),
    ("Vanilla MLP 5 InfoSteer flatten", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "flatten", "entropy_weight": 0.0}),
    # LoRA nested inside the InfoSteer wrapper of lin1 (LoRA on lin0 *and* lin1 under the gain overflows to NaN in
    # PEFT's lr=0.5 training tests, as plain LoRA nearly does: -3.6e28 after 3 steps)
    ("Vanilla MLP 6 InfoSteer gain + LoRA", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 10.0,
      "lora": LoraConfig(r=4, target_modules=["lin1"])}),
    ("Vanilla MLP 7 InfoSteer none + LoRA", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "none", "entropy_weight": 10.0,
      "lora": LoraConfig(r=4, target_modules=["lin0"])}),
    ("Vanilla MLP 8 InfoSteer flatten + LoRA", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "flatten", "entropy_weight": 10.0,
      "lora": LoraConfig(r=4, target_modules=["lin0", "lin1"])}),
    ("Conv1D InfoSteer gain", "EmbConv1D", InfoSteerConfig,
     {"target_modules": ["conv1d"], "intervention": "gain", "entropy_weight": 0.0}),
    # the paper's intervention: lin1's keys are ReLU outputs (non-negative), d_ff = 20, p = 10% replaces 2 per row
    ("Vanilla MLP 9 InfoSteer elevate", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "elevate", "elevate_fraction": 0.1, "entropy_weight": 0.0}),
    ("Vanilla MLP 10 InfoSteer elevate + LoRA", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "elevate", "elevate_fraction": 0.1, "elevate_scale": 2.0,
      "entropy_weight": 0.01, "lora": LoraConfig(r=4, target_modules=["lin0"])}),
    ("Vanilla MLP 11 InfoSteer elevate training-only + LoRA", "MLP", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "elevate", "elevate_fraction": 0.1, "elevate_at_inference": False,
      "entropy_weight": 0.0, "lora": LoraConfig(r=4, target_modules=["lin1"])}),
    ("Conv1D InfoSteer elevate value + LoRA", "EmbConv1D", InfoSteerConfig,
     {"target_modules": ["conv1d"], "intervention": "elevate", "elevate_fraction": 0.05, "elevate_rank": "value",
      "entropy_weight": 0.0, "lora": LoraConfig(r=4, target_modules=["conv1d"])}),
]  # fmt: skip


@adopt_peft_tests(
    cases={
        "test_name, model_id, config_cls, config_kwargs": (TEST_CASES, [row[0] for row in TEST_CASES]),
        # tests PEFT parametrizes over ALL_PEFT_CONFIG_CLASSES: they call config_cls(target_modules=[...]) with defaults
        "config_cls": ([InfoSteerConfig], ["InfoSteerConfig"]),
    },
    generic=[peft_custom.TEST_CASES, peft_custom.ALL_PEFT_CONFIG_CLASSES],
    opt_in=[
        "test_multiple_adapters_mixed_modules_to_save",
        "test_multiple_adapters_mixed_modules_to_save_order_switched",
    ],
    precheck=precheck_custom,
)
class TestInfoSteerCustomModels(peft_custom.TestPeftCustomModel):
    pass


@adopt_peft_tests(
    cases={"config_cls": ([InfoSteerConfig], ["InfoSteerConfig"])},
    generic=[peft_custom.ALL_PEFT_CONFIG_CLASSES],
)
class TestInfoSteerRequiresGrad(peft_custom.TestRequiresGrad):
    pass


# PEFT's MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES style: (name, tuner method, config class, kwargs 1, kwargs 2) on MLP
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    ("InfoSteer gain Same", "infosteer", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False},
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False}),
    ("InfoSteer gain Different", "infosteer", InfoSteerConfig,
     {"target_modules": ["lin0"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False},
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False}),
    ("InfoSteer gain + LoRA Same", "infosteer", InfoSteerConfig,
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False,
      "lora": {"r": 4, "target_modules": ["lin1"], "init_lora_weights": False}},
     {"target_modules": ["lin1"], "intervention": "gain", "entropy_weight": 0.0, "init_weights": False,
      "lora": {"r": 4, "target_modules": ["lin1"], "init_lora_weights": False}}),
]  # fmt: skip


@adopt_peft_tests(
    cases={
        "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2": (
            MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
            [row[0] for row in MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES],
        )
    },
    generic=[peft_custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES],
)
class TestInfoSteerMultipleActiveAdapters(peft_custom.TestMultipleActiveAdapters):
    pass


@adopt_peft_tests(cases={}, generic=[])  # none of PEFT's mixed-batch tests: they are for methods that support them
class TestInfoSteerMixedAdapterBatches(peft_custom.TestMixedAdapterBatches):
    # Not one of PEFT's tests: PEFT only tests mixed batches for methods that support them (and its decoder tests skip
    # the others). A method that does not must refuse `adapter_names` rather than apply the active adapter to all rows.
    def test_mixed_adapter_batches_raises(self):
        config = InfoSteerConfig(target_modules=["lin1"], intervention="gain", entropy_weight=0.0)
        model = self.get_mlp_peft(config, config)
        X = torch.arange(90).view(-1, 10).to(self.torch_device)
        with pytest.raises((TypeError, ValueError), match=r"adapter_names|mixed adapter batch"):
            model(X, adapter_names=["__base__", "adapter0", "adapter1"] * 3)
