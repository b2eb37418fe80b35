"""PEFT's ``TestDecoderModels`` (tests/test_decoder_models.py) with InfoSteer rows on tiny Llama / Qwen2 / GPT-2."""

from __future__ import annotations

from generic_skips import precheck_decoder
from peft_generic import TINY_DECODERS, adopt_peft_tests, import_peft_test_module, mark_offline, tiny_decoder_dir

from peft_infosteer import InfoSteerConfig

peft_decoder = import_peft_test_module("test_decoder_models")

# PEFT_DECODER_MODELS_TO_TEST: Hub ids there, local directories of models built from configs here.
MODEL_IDS = [tiny_decoder_dir(key) for key in TINY_DECODERS]
mark_offline(MODEL_IDS)

# PEFT's ALL_CONFIGS style: (config class, kwargs); target_modules=None means the architecture's FFN output projection.
# The nested LoRA is given in its dict form: a LoraConfig("all-linear") object shared by all rows would be resolved
# (mutated) to one architecture's module names by the first model it is injected into.
ALL_CONFIGS = [
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "gain", "entropy_weight": 0.0}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "gain", "entropy_weight": 100.0}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "gain", "entropy_weight": 10.0, "usage": "softmax"}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "none", "entropy_weight": 10.0,
                       "lora": {"r": 4, "target_modules": "all-linear"}}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "flatten", "entropy_weight": 0.0}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "gain", "entropy_weight": 0.0,
                       "lora": {"r": 4, "target_modules": "all-linear"}}),
    # the paper's method (the default): elevate on its own, with LoRA and the regularizer, and training-only
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "elevate", "elevate_fraction": 0.05}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "elevate", "elevate_scale": 2.0,
                       "entropy_weight": 0.01, "lora": {"r": 4, "target_modules": "all-linear"}}),
    (InfoSteerConfig, {"task_type": "CAUSAL_LM", "intervention": "elevate", "elevate_at_inference": False,
                       "lora": {"r": 4, "target_modules": "all-linear"}}),
]  # fmt: skip
CONFIG_IDS = [
    "gain", "gain-entropy", "gain-softmax", "none-lora", "flatten", "gain-lora", "elevate", "elevate-lora",
    "elevate-train-only-lora",
]  # fmt: skip


@adopt_peft_tests(
    cases={
        "model_id": (MODEL_IDS, list(TINY_DECODERS)),
        "config_cls,config_kwargs": (ALL_CONFIGS, CONFIG_IDS),
    },
    generic=[peft_decoder.ALL_CONFIGS, peft_decoder.PEFT_DECODER_MODELS_TO_TEST],
    precheck=precheck_decoder,
)
class TestInfoSteerDecoderModels(peft_decoder.TestDecoderModels):
    pass
