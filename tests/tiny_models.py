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


_TOKENIZER = None


def tiny_tokenizer():
    """A real fast BPE tokenizer (trained on the fly, 120 tokens) with a ChatML template; no download."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        corpus = [f"What is {i} plus {i}? It is {2 * i}. user assistant" for i in range(200)]
        trainer = trainers.BpeTrainer(
            vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
        )
        backend.train_from_iterator(corpus, trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
        )
        tok.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
            "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        _TOKENIZER = tok
    return _TOKENIZER


def save_tiny_model_with_tokenizer(path, model_type: str = "llama", **overrides):
    """Save a tiny random model and :func:`tiny_tokenizer` to ``path`` (a model directory the CLI can load)."""
    tok = tiny_tokenizer()
    tiny_model(model_type, vocab_size=len(tok), **overrides).save_pretrained(path)
    tok.save_pretrained(path)
    return path
