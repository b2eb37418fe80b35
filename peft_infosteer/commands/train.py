"""``peft-infosteer train``: TRL's SFT script with InfoSteer.

Every flag of TRL's ``sft`` script works (``ScriptArguments``, ``SFTConfig``, ``ModelConfig``, dataset mixtures), plus
the InfoSteer flags of :class:`InfoSteerArguments`. ``--use_peft --lora_r 16`` stacks LoRA inside the InfoSteer
adapter and ``--load_in_4bit`` loads a 4-bit base, exactly as with TRL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..config import ElevateRank, InfoSteerConfig, Intervention
from ..ops import Usage

__all__ = [
    "InfoSteerArguments",
    "build_infosteer_config",
    "cpu_friendly",
    "load_sft_dataset",
    "make_parser",
    "run",
    "train",
]


def _default(name: str) -> Any:
    """``InfoSteerConfig``'s default for ``name``: the command line and the TRL-style script use the same ones."""
    return InfoSteerConfig.__dataclass_fields__[name].default


@dataclass
class InfoSteerArguments:
    """InfoSteer settings for the SFT script (see ``InfoSteerConfig`` for their meaning; same defaults)."""

    entropy_weight: float = field(
        default=_default("entropy_weight"),
        metadata={"help": "The paper's lambda >= 0 of the entropy regularizer (0 = off; the paper used 0.01, 0.05)."},
    )
    intervention: str = field(
        default=_default("intervention"),
        metadata={"help": "Forward intervention: 'elevate' (the paper's), 'none', 'gain' or 'flatten'."},
    )
    elevate_fraction: float = field(
        default=_default("elevate_fraction"),
        metadata={"help": "The paper's p: fraction in (0, 1) of d_ff that 'elevate' replaces in each token."},
    )
    elevate_scale: float = field(
        default=_default("elevate_scale"),
        metadata={"help": "The paper's alpha >= 0: 'elevate' sets the bottom p to alpha times the mean."},
    )
    elevate_rank: str = field(
        default=_default("elevate_rank"),
        metadata={"help": "'magnitude' (smallest |k|, signed keys) or 'value' (the literal reading)."},
    )
    elevate_at_inference: bool = field(
        default=_default("elevate_at_inference"),
        metadata={"help": "Whether 'elevate' also acts at inference (False: training only, and the adapter merges)."},
    )
    flatten_strength: float = field(
        default=_default("flatten_strength"), metadata={"help": "Strength in [0, 1] of 'flatten'."}
    )
    flux_target_rise: float | None = field(
        default=_default("flux_target_rise"),
        metadata={
            "help": "Follow a mean-flux target this far above the starting flux (lambda starts at entropy_weight)."
        },
    )
    flux_target: float | None = field(
        default=_default("flux_target"), metadata={"help": "An absolute mean-flux target in (0, 1)."}
    )
    flux_target_rate: float = field(
        default=_default("flux_target_rate"), metadata={"help": "Largest change of log(lambda) per optimizer step."}
    )
    max_entropy_weight: float = field(
        default=_default("max_entropy_weight"), metadata={"help": "Cap of lambda when following a flux target."}
    )
    usage: str = field(default=_default("usage"), metadata={"help": "Usage distribution: 'abs' or 'softmax'."})
    usage_temperature: float = field(
        default=_default("usage_temperature"), metadata={"help": "Temperature of the softmax usage."}
    )
    infosteer_target_modules: list[str] | None = field(
        default=None, metadata={"help": "FFN output projections to steer (default: per architecture)."}
    )
    infosteer_layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Decoder layer indices to steer (default: all)."}
    )


def build_infosteer_config(model_args: Any, infosteer_args: InfoSteerArguments):
    """The ``InfoSteerConfig`` for TRL's ``ModelConfig`` (its LoRA flags) and the InfoSteer flags."""
    from peft import LoraConfig
    from trl import get_peft_config

    from ..config import InfoSteerConfig

    lora = get_peft_config(model_args)  # None without --use_peft
    if lora is not None and not isinstance(lora, LoraConfig):
        raise ValueError(f"InfoSteer stacks a LoRA adapter; TRL's flags built a {type(lora).__name__}")
    return InfoSteerConfig(
        entropy_weight=infosteer_args.entropy_weight,
        intervention=cast(Intervention, infosteer_args.intervention),  # InfoSteerConfig validates both
        flatten_strength=infosteer_args.flatten_strength,
        elevate_fraction=infosteer_args.elevate_fraction,
        elevate_scale=infosteer_args.elevate_scale,
        elevate_rank=cast(ElevateRank, infosteer_args.elevate_rank),
        elevate_at_inference=infosteer_args.elevate_at_inference,
        flux_target_rise=infosteer_args.flux_target_rise,
        flux_target=infosteer_args.flux_target,
        flux_target_rate=infosteer_args.flux_target_rate,
        max_entropy_weight=infosteer_args.max_entropy_weight,
        usage=cast(Usage, infosteer_args.usage),
        usage_temperature=infosteer_args.usage_temperature,
        target_modules=infosteer_args.infosteer_target_modules,
        layers_to_transform=infosteer_args.infosteer_layers_to_transform,
        lora=lora,
        task_type="CAUSAL_LM",
    )


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
    if hasattr(trainer, "end"):
        trainer.end()
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
