"""A tiny, download-free SFT setup on disk: a real fast tokenizer with a chat template, a tiny Llama, chat data.

Used by the tests that run training scripts in other processes (``accelerate launch``, ``torchrun``), which need a
model directory and a data file rather than Python objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 120 tokens) trained on the fly, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [f"What is {i} plus {i}? It is {2 * i}. user assistant" for i in range(200)]
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_rows(n: int = 16) -> list[dict]:
    """``n`` chat examples of different lengths (so that padding differs between batch sizes)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}." + " ok" * (i % 3)},
            ]
        }
        for i in range(n)
    ]


def write_sft_assets(root: Path, n_rows: int = 16, seed: int = 0) -> tuple[Path, Path]:
    """Write ``root/model`` (tiny Llama + tokenizer) and ``root/data.jsonl``; return both paths."""
    tok = chat_tokenizer()
    model_dir = root / "model"
    tok.save_pretrained(model_dir)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(n_rows)))
    return model_dir, data
