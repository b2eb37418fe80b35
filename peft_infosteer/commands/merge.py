"""``peft-infosteer merge``: fold an InfoSteer adapter (gain + stacked LoRA) into its base model for serving."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_arguments", "merge", "run"]

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="directory of the saved InfoSteer adapter")
    parser.add_argument(
        "--base", help="base model directory (default: base_model_name_or_path from the adapter config)"
    )
    parser.add_argument("--out", required=True, help="directory for the merged plain transformers model")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype to merge and save in")


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "float32") -> Path:
    """Load ``base`` + ``adapter``, merge, and save a plain model (and the tokenizer, if found) to ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {adapter}")
    if base is None:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{config_file} does not name its base model; pass --base")
    if not Path(base).is_dir():
        raise FileNotFoundError(f"base model directory {base} does not exist; pass --base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    model.save_pretrained(out)
    for source in (adapter, Path(base)):
        if (source / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(source).save_pretrained(out)
            break
    return out


def run(args: argparse.Namespace) -> int:
    out = merge(args.adapter, args.out, args.base, args.dtype)
    print(f"merged model saved to {out.resolve()}; load it with AutoModelForCausalLM.from_pretrained('{out}')")
    return 0
