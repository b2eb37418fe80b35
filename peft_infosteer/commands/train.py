"""``peft-infosteer train``: TRL's SFT script with InfoSteer.

Every flag of TRL's ``sft`` script works (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, dataset mixtures), plus
the InfoSteer flags of :class:`InfoSteerArguments`. ``--use_peft --lora_r 16`` stacks LoRA inside the InfoSteer
adapter and ``--load_in_4bit`` loads a 4-bit base, exactly as with TRL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import InfoSteerConfig

__all__ = [
    "InfoSteerArguments",
    "build_infosteer_config",
    "cpu_friendly",
    "load_sft_dataset",
    "make_parser",
    "run",
    "train",
]


def _flag(name: str) -> Any:
    """A field with ``InfoSteerConfig``'s default and help for its field ``name``: the command line, the TRL-style
    script and the Python API share one default and one description of each setting."""
    source = InfoSteerConfig.__dataclass_fields__[name]
    # argparse formats help texts with %-placeholders: a literal "1%" must reach it as "1%%"
    return field(default=source.default, metadata={"help": source.metadata["help"].replace("%", "%%")})


@dataclass
class InfoSteerArguments:
    """InfoSteer settings for the SFT script: the fields of ``InfoSteerConfig`` (same meaning and defaults), the
    target modules and layers prefixed with ``infosteer_`` so that they do not clash with TRL's LoRA flags."""

    entropy_weight: float = _flag("entropy_weight")
    intervention: str = _flag("intervention")
    elevate_fraction: float = _flag("elevate_fraction")
    elevate_scale: float = _flag("elevate_scale")
    elevate_rank: str = _flag("elevate_rank")
    elevate_at_inference: bool = _flag("elevate_at_inference")
    flatten_strength: float = _flag("flatten_strength")
    flux_target_rise: float | None = _flag("flux_target_rise")
    flux_target: float | None = _flag("flux_target")
    flux_target_rate: float = _flag("flux_target_rate")
    max_entropy_weight: float = _flag("max_entropy_weight")
    usage: str = _flag("usage")
    usage_temperature: float = _flag("usage_temperature")
    infosteer_target_modules: list[str] | None = _flag("target_modules")  # noqa: RUF009 (a field)
    infosteer_layers_to_transform: list[int] | None = _flag("layers_to_transform")  # noqa: RUF009 (a field)


def build_infosteer_config(model_args: Any, infosteer_args: InfoSteerArguments):
    """The ``InfoSteerConfig`` for TRL's ``ModelConfig`` (its LoRA flags) and the InfoSteer flags."""
    from peft import LoraConfig
    from trl import get_peft_config

    lora = get_peft_config(model_args)  # None without --use_peft
    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"InfoSteer stacks a LoRA adapter; TRL's flags built a {type(lora).__name__}")
    # InfoSteerConfig validates the values (an unknown intervention, usage or elevate_rank included)
    settings = {f.name.removeprefix("infosteer_"): getattr(infosteer_args, f.name) for f in fields(infosteer_args)}
    return InfoSteerConfig(**settings, lora=lora, task_type="CAUSAL_LM")


def load_sft_dataset(name_or_path: str, config_name: str | None = None, streaming: bool = False):
    """Load ``--dataset_name``: a JSON/JSONL file, a local dataset directory, or a Hub dataset id."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(name_or_path):
        if not name_or_path.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")):
            raise ValueError(f"--dataset_name {name_or_path!r}: a file must be JSON or JSONL")
        return load_dataset("json", data_files=name_or_path, streaming=streaming)
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "dataset_dict.json")) or os.path.isfile(
            os.path.join(name_or_path, "dataset_info.json")
        ):
            data = load_from_disk(name_or_path)
            return data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
        return load_dataset(name_or_path, name=config_name, streaming=streaming)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith((".json", ".jsonl")):
        raise FileNotFoundError(f"--dataset_name {name_or_path!r} does not exist")
    return load_dataset(name_or_path, name=config_name, streaming=streaming)


def make_parser(prog: str | None = "peft-infosteer train"):
    """TRL's SFT parser with the InfoSteer arguments added."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    dataclasses: Any = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, InfoSteerArguments)
    return TrlParser(dataclasses, prog=prog)


def train(script_args, training_args, model_args, dataset_args, infosteer_args) -> str:
    """Run InfoSteer SFT like TRL's ``sft`` script; returns the output directory."""
    from trl import get_dataset, get_quantization_config

    from ..trainer import InfoSteerSFTTrainer

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required")
    peft_config = build_infosteer_config(model_args, infosteer_args)  # validate the flags before loading anything
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_sft_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    else:
        raise ValueError("pass --dataset_name (a JSON/JSONL file, a dataset directory or a Hub id) or --datasets")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"the dataset has no split {script_args.dataset_train_split!r}: {list(dataset)}")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"--eval_strategy {training_args.eval_strategy} needs a split {script_args.dataset_test_split!r}; "
                f"the dataset has {list(dataset)} (set --dataset_test_split)"
            )
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = InfoSteerSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"InfoSteer adapter saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # finish the trackers and destroy the process group (a rank left with it can abort at exit)
    return training_args.output_dir


def cpu_friendly(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--bf16 False`` added where bf16 cannot run and the user did not ask for it.

    TRL's ``SFTConfig`` turns bf16 on by default, and transformers refuses bf16 without a supporting GPU ("Your setup
    doesn't support bf16/gpu"), so TRL's own script fails as written on a CPU machine. An explicit ``--bf16`` is left
    as given.

    >>> cpu_friendly(["--bf16", "True"])
    ['--bf16', 'True']
    """
    argv = list(argv)
    if any(a == "--bf16" or a.startswith("--bf16=") for a in argv):
        return argv
    from transformers.utils import is_torch_bf16_gpu_available

    if not is_torch_bf16_gpu_available():
        print("peft-infosteer train: no GPU with bf16 here, training in float32 (pass --bf16 to choose)", flush=True)
        argv += ["--bf16", "False"]
    return argv


def run(argv: Sequence[str]) -> int:
    """Entry point of ``peft-infosteer train``; ``argv`` are the flags after ``train``."""
    train(*make_parser().parse_args_and_config(args=cpu_friendly(argv)))
    return 0
