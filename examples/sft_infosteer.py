# Copyright the peft-infosteer developers. Licensed under the Apache License, Version 2.0.
"""InfoSteer SFT with TRL: TRL's `sft.py`, plus one dataclass of InfoSteer flags.

Every TRL SFT flag works. Examples (the local model and data paths are what `peft-infosteer demo` prepares offline;
any Hub id works too when you are online):

    # the paper's InfoSteer (elevate, p = 1%, alpha = 1, and its regularizer with lambda = 0.01) while LoRA trains
    python examples/sft_infosteer.py \
        --model_name_or_path ~/.cache/peft-infosteer/SmolLM2-135M-Instruct \
        --dataset_name data.jsonl --output_dir out/infosteer \
        --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear \
        --intervention elevate --elevate_fraction 0.01 --elevate_scale 1.0 --entropy_weight 0.01 --max_steps 100

    # elevate in training only, so that the adapter merges (peft-infosteer merge)
    python examples/sft_infosteer.py ... --use_peft --elevate_at_inference False

    # an extension: a flux target instead of a fixed lambda; lambda (the paper's units) follows it from
    # --entropy_weight, once per optimizer step
    python examples/sft_infosteer.py ... --use_peft --flux_target_rise 0.01 --entropy_weight 0.01

    # QLoRA-style: 4-bit base
    python examples/sft_infosteer.py ... --use_peft --lora_r 16 --load_in_4bit

    # several processes: GPUs
    accelerate launch --num_processes 8 examples/sft_infosteer.py ...
    # several processes on CPU (DDP over gloo; `accelerate launch --cpu` would start only one process)
    accelerate launch --multi_gpu --num_processes 2 examples/sft_infosteer.py ... --use_cpu True --bf16 False
"""

import sys

from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    SFTConfig,
    TrlParser,
    get_dataset,
    get_quantization_config,
)

from peft_infosteer import InfoSteerSFTTrainer  # importing peft_infosteer registers PeftType.INFOSTEER
from peft_infosteer.commands.train import InfoSteerArguments, build_infosteer_config, cpu_friendly, load_sft_dataset


def main(script_args, training_args, model_args, dataset_args, infosteer_args):
    training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    else:  # a Hub id, a local dataset directory, or a JSON/JSONL file
        dataset = load_sft_dataset(script_args.dataset_name, script_args.dataset_config)

    trainer = InfoSteerSFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),  # --load_in_4bit / --load_in_8bit
        peft_config=build_infosteer_config(model_args, infosteer_args),  # --use_peft stacks LoRA inside
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"InfoSteer adapter saved to {training_args.output_dir}")
    trainer.end()  # finish the trackers and destroy the process group, as TRL's own scripts do


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, InfoSteerArguments))
    main(*parser.parse_args_and_config(args=cpu_friendly(sys.argv[1:])))  # --bf16 False where bf16 cannot run
