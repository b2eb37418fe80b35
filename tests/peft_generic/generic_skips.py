"""Where PEFT's generic tests do not apply to InfoSteer: each skip with its reason, the way PEFT skips its methods.

Two places, both in PEFT's own style:
- PEFT's skip helper ``_skip_if_merging_not_supported`` (called by PEFT's tests, sometimes halfway through a test,
  after the unmerged forward was already checked) is extended with InfoSteer's one non-mergeable case;
- ``precheck_*`` run before an adopted test, like the ``if config_cls == ...: pytest.skip(...)`` lines at the top of
  PEFT's tests.
"""

from __future__ import annotations

import pytest
from peft_generic import import_peft_test_module

from peft_infosteer import InfoSteerConfig


def _kwargs(args: dict) -> dict:
    return args.get("config_kwargs") or {}


def _is_infosteer(args: dict) -> bool:
    return args.get("config_cls") is InfoSteerConfig


def _intervention(kw: dict) -> str:
    return kw.get("intervention", InfoSteerConfig().intervention)


def _changes_output_at_init(kw: dict) -> bool:
    """'flatten' and 'elevate' (in eval mode unless it acts in training only) change the forward from the start."""
    if _intervention(kw) == "elevate":
        return kw.get("elevate_at_inference", True)
    return _intervention(kw) == "flatten"


def _not_mergeable(kw: dict) -> bool:
    return _intervention(kw) == "flatten" or (_intervention(kw) == "elevate" and kw.get("elevate_at_inference", True))


def _parameter_free(kw: dict) -> bool:
    """No tuner-layer parameter at all: 'flatten'/'elevate'/'none' without a stacked LoRA ('none' may train
    modules_to_save)."""
    return _intervention(kw) in ("none", "flatten", "elevate") and kw.get("lora") is None


def _steers_without_weights(kw: dict) -> bool:
    """An intervention with no weights of its own that changes the forward ('flatten', 'elevate')."""
    return _intervention(kw) in ("flatten", "elevate")


# ---- PEFT's helper, extended ---------------------------------------------------------------------------------------


def _skip_if_merging_not_supported_infosteer(model_id, config_cls, config_kwargs):
    if config_cls is InfoSteerConfig and _not_mergeable(config_kwargs or {}):
        pytest.skip(NOT_MERGEABLE)


def _extend_peft_skip_helpers() -> None:
    for module_name in ("testing_common", "test_custom_models", "test_decoder_models"):
        module = import_peft_test_module(module_name)
        original = getattr(module, "_skip_if_merging_not_supported", None)
        if original is None or getattr(original, "_infosteer", False):
            continue

        def helper(model_id, config_cls, config_kwargs, _original=original):
            _skip_if_merging_not_supported_infosteer(model_id, config_cls, config_kwargs)
            return _original(model_id, config_cls, config_kwargs)

        helper._infosteer = True
        module._skip_if_merging_not_supported = helper


_extend_peft_skip_helpers()

# ---- reasons ---------------------------------------------------------------------------------------------------

NOT_MERGEABLE = (
    "InfoSteer intervention='flatten', and 'elevate' acting at inference (elevate_at_inference=True), are not linear "
    "maps of the keys: they cannot be merged (merge raises)"
)
NO_PARAMETERS = (
    "this InfoSteer adapter has no parameters in its tuner layers (intervention='flatten'/'elevate'/'none' without "
    "LoRA): nothing to train, name, put on the meta device or cast"
)
NOT_IDENTITY_AT_INIT = (
    "intervention='flatten' and 'elevate' (acting at inference) change the output from the start; PEFT's test starts "
    "from an identity adapter"
)
IDENTITY_ALWAYS = (
    "intervention='none' is the identity in the forward (it only shapes the gradient through the regularizer), so "
    "init_weights=False cannot make the outputs differ from the base model as the test requires"
)
LORA_PARAM_NAMES = (
    "PEFT's test finds adapter parameters by `model.prefix in name` ('infosteer_'); the LoRA stacked in an InfoSteer "
    "adapter keeps LoRA's own parameter names (lora_A/lora_B), which the test takes for base-model parameters. PEFT "
    "itself finds adapter parameters structurally (_get_tuner_state_dict_key_prefixes), which the project's own "
    "stacked-LoRA training/checkpointing test must use instead"
)

# ---- custom models (TestPeftCustomModel) -------------------------------------------------------------------------

_TRAINS = {
    "test_training_custom_models",
    "test_inference_safetensors",
    "test_only_params_are_updated",
    "test_parameters_after_loading_model",
    "test_disable_adapters_with_merging",
}


def precheck_custom(test: str, args: dict) -> None:
    if not _is_infosteer(args):
        return
    kw = _kwargs(args)
    if _parameter_free(kw):
        if _steers_without_weights(kw) and (test in _TRAINS or test == "test_adapter_name"):
            pytest.skip(NO_PARAMETERS)
        if test == "test_load_model_low_cpu_mem_usage":
            pytest.skip(NO_PARAMETERS)  # PEFT exempts LN tuning from this check for the same reason
    if _changes_output_at_init(kw) and test == "test_disable_adapters":
        pytest.skip(NOT_IDENTITY_AT_INIT)
    if kw.get("intervention") == "none" and kw.get("lora") is None and test == "test_safe_merge":
        pytest.skip(IDENTITY_ALWAYS)
    if kw.get("lora") is not None and test in ("test_training_custom_models", "test_only_params_are_updated"):
        pytest.skip(LORA_PARAM_NAMES)


# ---- decoder models (TestDecoderModels) --------------------------------------------------------------------------

_DECODER_TRAINS = {
    "test_training_decoders",
    "test_training_decoders_layer_indexing",
    "test_training_decoders_gradient_checkpointing",
    "test_inference_safetensors",
}


def precheck_decoder(test: str, args: dict) -> None:
    if not _is_infosteer(args):
        return
    kw = _kwargs(args)
    if _parameter_free(kw) and (test in _DECODER_TRAINS or test == "test_adapter_name"):
        pytest.skip(NO_PARAMETERS)
    if test == "test_add_adapter_no_autocast_adapter_dtype" and kw.get("intervention") != "gain":
        # it reads the adapter dtype from parameters named with `model.prefix`: flatten has none, none+LoRA only lora_*
        pytest.skip(NO_PARAMETERS if _parameter_free(kw) else LORA_PARAM_NAMES)
    if kw.get("lora") is not None and test in _DECODER_TRAINS - {"test_inference_safetensors"}:
        pytest.skip(LORA_PARAM_NAMES)
    if kw.get("lora") is not None and kw.get("intervention") != "gain" and test == "test_merge_layers_nan":
        pytest.skip(LORA_PARAM_NAMES + " (it only writes NaNs into parameters named with the prefix)")
