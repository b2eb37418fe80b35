"""Tiny random models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 128

# model_type -> (config overrides, expected wrapped-module suffix)
TINY_CONFIGS: dict[str, tuple[dict, str]] = {
    "llama": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
        "mlp.down_proj",
    ),
    "mistral": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
        "mlp.down_proj",
    ),
    "qwen2": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
        "mlp.down_proj",
    ),
    "qwen3": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "mlp.down_proj",
    ),
    "gemma": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "mlp.down_proj",
    ),
    "gemma2": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "mlp.down_proj",
    ),
    "gemma3_text": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "mlp.down_proj",
    ),
    "phi3": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2), "mlp.down_proj"),
    "olmo2": (
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
        "mlp.down_proj",
    ),
    "gpt2": (dict(n_embd=32, n_head=4, n_inner=64, n_positions=64), "mlp.c_proj"),
    "gpt_neox": (dict(hidden_size=32, intermediate_size=64, num_attention_heads=4), "mlp.dense_4h_to_h"),
    "opt": (
        dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
        "fc2",
    ),
}


def tiny_model(model_type: str = "llama", num_layers: int = 2, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised causal LM of ``model_type`` with ``num_layers`` layers, in eval mode."""
    kwargs, _ = TINY_CONFIGS[model_type]
    layer_key = {"gpt2": "n_layer"}.get(model_type, "num_hidden_layers")
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(
        model_type, **{layer_key: num_layers}, **{"vocab_size": VOCAB, **ids, **kwargs, **overrides}
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def expected_targets(model: PreTrainedModel) -> list[str]:
    """Names of the modules InfoSteer should wrap by default."""
    suffix = TINY_CONFIGS[model.config.model_type][1]
    return [n for n, _ in model.named_modules() if n.endswith("." + suffix)]
