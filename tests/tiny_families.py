"""Tiny random models of every family in ``peft_infosteer.architectures`` (built from configs, no download).

:data:`tiny_models.TINY_CONFIGS` covers the families most tests use; :data:`TINY_FAMILIES` adds the rest of the
architectures table, and :func:`family_model` builds any of them. Every model has ``d_ff`` = :data:`D_FF`.
"""

from __future__ import annotations

import torch
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["ALL_FAMILIES", "D_FF", "TINY_FAMILIES", "config_d_ff", "family_model"]

D_FF = 64
_GATED = dict(hidden_size=32, intermediate_size=D_FF, num_attention_heads=4, num_key_value_heads=2)

# model_type -> (config overrides, expected wrapped-module suffix); the families TINY_CONFIGS does not cover
TINY_FAMILIES: dict[str, tuple[dict, str]] = {
    "olmo": (dict(_GATED), "mlp.down_proj"),
    "granite": (dict(_GATED), "mlp.down_proj"),
    "cohere": (dict(_GATED), "mlp.down_proj"),
    "smollm3": (dict(_GATED), "mlp.down_proj"),
    "stablelm": (dict(_GATED), "mlp.down_proj"),
    # AutoModelForCausalLM builds Gemma3ForConditionalGeneration (vision tower + language model) for "gemma3"
    "gemma3": (
        dict(
            text_config=dict(_GATED, head_dim=8),
            vision_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16
            ),
            mm_tokens_per_image=4,
        ),
        "mlp.down_proj",
    ),
    "gpt_bigcode": (dict(n_embd=32, n_head=4, n_inner=D_FF, n_positions=64), "mlp.c_proj"),
    "starcoder2": (dict(_GATED), "mlp.c_proj"),
    "falcon": (dict(hidden_size=32, num_attention_heads=4, ffn_hidden_size=D_FF), "mlp.dense_4h_to_h"),
    # BLOOM's d_ff is fixed at 4 * hidden_size
    "bloom": (dict(hidden_size=D_FF // 4, n_head=4), "mlp.dense_4h_to_h"),
    "gptj": (dict(n_embd=32, n_head=4, n_inner=D_FF, n_positions=64, rotary_dim=4), "mlp.fc_out"),
    "phi": (dict(hidden_size=32, intermediate_size=D_FF, num_attention_heads=4), "mlp.fc2"),
}

ALL_FAMILIES: dict[str, tuple[dict, str]] = {**TINY_CONFIGS, **TINY_FAMILIES}


def family_model(model_type: str, num_layers: int = 2, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM of any family in :data:`ALL_FAMILIES`, in eval mode."""
    if model_type in TINY_CONFIGS:
        return tiny_model(model_type, num_layers=num_layers, seed=seed)
    kwargs, _ = TINY_FAMILIES[model_type]
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gemma3":
        text = {**kwargs["text_config"], "num_hidden_layers": num_layers, "vocab_size": VOCAB, **ids}
        config = AutoConfig.for_model(model_type, **{**kwargs, "text_config": text})
    else:
        config = AutoConfig.for_model(model_type, num_hidden_layers=num_layers, vocab_size=VOCAB, **ids, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def config_d_ff(config: PretrainedConfig) -> int:
    """The FFN width ``d_ff`` that ``config`` asks for, read from the field its family uses."""
    config = config.get_text_config()
    if config.model_type == "bloom":
        return 4 * config.hidden_size
    for name in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"no d_ff field in the {config.model_type} config")
