"""One meaning of lambda under every loss a trainer builds (docs/guides/trl-sft.md, "What lambda means").

With the trainer integration (``InfoSteerCallback.attach(trainer)``, which ``InfoSteerSFTTrainer`` does), the
regularizer's gradient is lambda times the gradient of ``sum_l mean_t H_l`` over the tokens of the task loss, normalised
across accumulation steps and processes like the task loss, whatever weights the loss gives its tokens (DFT
probabilities, label smoothing, preference weights, advantages). Each test runs one SGD step (learning rate 1, no
clipping) with lambda and without: the difference of the two updates is the regularizer's gradient alone, compared
with plain autograd on the micro-batches the trainer really ran (``reference.forward_with_plain_entropy``).
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from reference import counted_tokens, forward_with_plain_entropy, relative_error
from tiny_models import tiny_model, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

import peft_infosteer
from peft_infosteer import InfoSteerCallback, InfoSteerConfig, InfoSteerSFTTrainer

LAMBDA = 0.5  # the paper's lambda; large enough on the tiny model that its share of the update is clear
TOLERANCE = 2e-4  # float32 sums in a different order (the regularizer's share is checked separately)


def _model():
    return tiny_model("llama", vocab_size=len(tiny_tokenizer()))


def _peft_model(weight: float):
    torch.manual_seed(0)
    config = InfoSteerConfig(
        task_type="CAUSAL_LM",
        intervention="gain",
        entropy_weight=weight,
        lora=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    return get_peft_model(_model(), config)


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and ".default" in n}


def _step_args(tmp_path, cls=SFTConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        activation_checkpointing=False,
    )
    defaults.update(kwargs)
    return cls(**defaults)


def _prompt_completion(n: int = 4) -> Dataset:
    """Prompt-completion rows: the loss counts the completion only, so its tokens differ from the attention mask."""
    return Dataset.from_list(
        [{"prompt": f"What is {i} plus {i}?", "completion": f" It is {2 * i}." + " ok" * (i % 3)} for i in range(n)]
    )


class _Recorder:
    """Wraps a data collator and keeps every batch it builds (in the order the trainer runs them)."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({k: v.clone() for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
        return batch


def _record_grad_forwards(model) -> list[dict]:
    """Keep the inputs of every grad-enabled forward of ``model`` (a TRL trainer's policy forwards)."""
    seen: list[dict] = []

    def hook(_module, _args, kwargs):
        if torch.is_grad_enabled():
            seen.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels") if k in kwargs})

    model.get_base_model().register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _update(model, run) -> dict[str, torch.Tensor]:
    before = _trained(model)
    run()
    return {k: v - before[k] for k, v in _trained(model).items()}


def _expected(batches: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """``lambda * grad of sum_b w_b * sum_l mean_t H_l(b)`` at the initial parameters: what the regularizer adds to
    one SGD step of learning rate 1 (the objective is ``L - lambda * term``)."""
    model = _peft_model(0.0).train()
    term = sum(w * forward_with_plain_entropy(model, batch)[1] for batch, w in zip(batches, weights, strict=True))
    (LAMBDA * term).backward()
    names = _trained(model)
    # the last layer's output projection (and LoRA there) reaches no key: no gradient, zero update
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.detach() for n, p in model.named_parameters() if n in names
    }


def _regularizer_update(make_trainer, tmp_path) -> tuple[dict, dict, object]:
    """The update with lambda minus the one without, and the trainer that ran with lambda."""
    updates, trainers = {}, {}
    for weight in (0.0, LAMBDA):
        model = _peft_model(weight)
        trainer = make_trainer(model, tmp_path / str(weight))
        updates[weight] = _update(model, trainer.train)
        trainers[weight] = trainer
    diff = {k: updates[LAMBDA][k] - updates[0.0][k] for k in updates[0.0]}
    return diff, updates[0.0], trainers[LAMBDA]


def _token_weights(batches: list[dict]) -> list[float]:
    """A loss normalised by ``num_items_in_batch``: each micro-batch's mean weighs its share of the window's tokens."""
    counts = [float(counted_tokens(b).sum()) for b in batches]
    return [c / sum(counts) for c in counts]


# ---- SFT ------------------------------------------------------------------------------------------------------------


def _sft(cls=InfoSteerSFTTrainer, batches=None, trainer_kwargs=None, **config):
    def make(model, out):
        trainer = cls(
            model=model,
            args=_step_args(out, max_length=48, **config),
            train_dataset=_prompt_completion(4),
            processing_class=tiny_tokenizer(),
            **(trainer_kwargs or {}),
        )
        if cls is not InfoSteerSFTTrainer:
            InfoSteerCallback.attach(trainer)
        if batches is not None:
            batches.clear()
            trainer.data_collator = _Recorder(trainer.data_collator)
            trainer._infosteer_batches = trainer.data_collator.batches
        return trainer

    return make


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_losses_give_lambda_times_the_mean_over_the_loss_tokens(tmp_path, loss_type):
    diff, _, trainer = _regularizer_update(_sft(batches=[], loss_type=loss_type), tmp_path)
    batches = trainer._infosteer_batches
    assert len(batches) == 1
    # the loss counts the completion tokens only: fewer than the attention mask
    assert counted_tokens(batches[0]).sum() < batches[0]["attention_mask"].sum() - len(batches[0]["input_ids"])
    assert relative_error(diff, _expected(batches, _token_weights(batches))) < TOLERANCE
    logs = [h for h in trainer.state.log_history if "infosteer/loss" in h]
    assert logs and logs[0]["infosteer/loss"] < 0


def _nll(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func``: the summed NLL over ``num_items_in_batch`` (transformers' convention)."""
    logits, target = outputs.logits[:, :-1].float(), labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())


@pytest.mark.parametrize("path", ["label_smoothing", "compute_loss_func"])
def test_sft_paths_whose_forward_gets_no_labels_count_the_loss_tokens(tmp_path, path):
    """TRL runs these losses on a forward without labels: the tokens come from the batch the trainer holds."""
    if path == "label_smoothing":
        make, warning = _sft(batches=[], label_smoothing_factor=0.1), "label_smoothing_factor"
    else:
        make, warning = _sft(batches=[], trainer_kwargs={"compute_loss_func": _nll}), "compute_loss_func"
    with pytest.warns(FutureWarning, match=warning):  # TRL deprecates both
        diff, _, trainer = _regularizer_update(make, tmp_path)
    batches = trainer._infosteer_batches
    assert relative_error(diff, _expected(batches, _token_weights(batches))) < TOLERANCE
    # the attention mask (prompt tokens included), what a forward without labels counts by itself, is far off
    attended = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    assert relative_error(diff, _expected(attended, [1.0])) > 0.05


def test_gradient_accumulation_of_a_weighted_loss(tmp_path):
    """DFT over 2 micro-batches of 2: each micro-batch's mean weighs its share of the window's tokens."""
    make = _sft(batches=[], loss_type="dft", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    diff, _, trainer = _regularizer_update(make, tmp_path)
    batches = trainer._infosteer_batches
    assert len(batches) == 2 and _token_weights(batches)[0] != 0.5  # micro-batches of different token counts
    assert relative_error(diff, _expected(batches, _token_weights(batches))) < TOLERANCE
    full, _, _ = _regularizer_update(_sft(loss_type="dft"), tmp_path / "full")
    assert relative_error(diff, full) < TOLERANCE


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_under_a_weighted_loss(tmp_path, reentrant):
    """The recomputed layers get the loss plan's scale too (reentrant: recorded during the backward)."""
    kwargs = {"use_reentrant": reentrant}
    make = _sft(batches=[], loss_type="dft", activation_checkpointing=True, activation_checkpointing_kwargs=kwargs)
    diff, _, trainer = _regularizer_update(make, tmp_path)
    state = peft_infosteer.find_infosteer_model(trainer.model).flux_tracker._training
    assert state.reentrant == reentrant and state.recomputed == reentrant  # the checkpointing really ran
    batches = trainer._infosteer_batches
    assert relative_error(diff, _expected(batches, _token_weights(batches))) < TOLERANCE


def test_weighted_loss_without_the_integration_warns_and_logs_no_regularizer(tmp_path):
    """A plain SFTTrainer cannot tell the tracker how it normalises DFT: it says so, and logs no infosteer/loss."""
    model = _peft_model(LAMBDA)
    trainer = SFTTrainer(
        model=model,
        args=_step_args(tmp_path, max_length=48, loss_type="dft"),
        train_dataset=_prompt_completion(4),
        processing_class=tiny_tokenizer(),
        callbacks=[InfoSteerCallback()],
    )
    with pytest.warns(UserWarning, match="weighs its tokens unequally.*InfoSteerCallback.attach"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "infosteer/flux" in h]
    assert logs and not any("infosteer/loss" in h for h in logs)
    assert peft_infosteer.find_infosteer_model(model).flux_tracker.scale_unknown is not None


# ---- preference and RL trainers -------------------------------------------------------------------------------------


def test_dpo_gives_lambda_times_the_mean_over_the_completion_tokens(tmp_path):
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f" It is {2 * i}.", "rejected": f" It is {i}."} for i in range(4)
    ]
    seen: dict[float, list] = {}

    def make(model, out):
        trainer = DPOTrainer(
            model=model,
            args=_step_args(out, cls=DPOConfig, max_length=48),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
        )
        InfoSteerCallback.attach(trainer)
        seen[float(out.name)] = _record_grad_forwards(trainer.model)
        return trainer

    diff, _, _ = _regularizer_update(make, tmp_path)
    batches = seen[LAMBDA]
    assert len(batches) == 1  # chosen and rejected in one forward
    # a mean over the micro-batch's pairs: its regularizer is the mean over its completion tokens
    assert relative_error(diff, _expected(batches, [1.0])) < TOLERANCE


def _grpo(tied: bool, attach: bool, seen: dict, loss_type: str = "dapo"):
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs):
        return [1.0] * len(completions) if tied else [float(i) for i in range(len(completions))]

    def make(model, out):
        args = _step_args(
            out, cls=GRPOConfig, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
            loss_type=loss_type,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": f"What is {i} plus {i}?"} for i in range(2)]),
            processing_class=tiny_tokenizer(),
            callbacks=[] if attach else [InfoSteerCallback()],
        )
        if attach:
            InfoSteerCallback.attach(trainer)
        seen[float(out.name)] = _record_grad_forwards(trainer.model)
        return trainer

    return make


@pytest.mark.parametrize(
    "tied, loss_type", [(True, "dapo"), (False, "dapo"), (False, "grpo")], ids=["tied", "untied", "untied-grpo"]
)
def test_grpo_regularizer_acts_whatever_the_advantages(tmp_path, tied, loss_type):
    """Like an entropy bonus: lambda times the mean over the completion tokens, with all advantages 0 too."""
    seen: dict[float, list] = {}
    diff, task_update, trainer = _regularizer_update(_grpo(tied, True, seen, loss_type), tmp_path)
    assert (max(v.abs().max().item() for v in task_update.values()) == 0.0) == tied  # tied rewards: no task gradient
    batches = seen[LAMBDA]
    assert len(batches) == 1
    assert relative_error(diff, _expected(batches, [1.0])) < TOLERANCE
    logs = [h for h in trainer.state.log_history if "infosteer/loss" in h]
    assert logs and logs[0]["infosteer/loss"] < 0


def test_grpo_with_tied_rewards_without_the_integration_logs_no_regularizer(tmp_path):
    """Without the trainer integration nothing reaches TRL's log-probabilities: warned, and no infosteer/loss."""
    with pytest.warns(UserWarning, match="no gradient at all.*InfoSteerCallback.attach"):
        _, _, trainer = _regularizer_update(_grpo(True, False, {}), tmp_path)
    logs = [h for h in trainer.state.log_history if "infosteer/flux" in h]
    assert logs and not any("infosteer/loss" in h for h in logs)


# ---- several processes ----------------------------------------------------------------------------------------------

_DDP_DFT_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig

    import peft_infosteer
    from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer


    def main(model_dir, data, out, batch, weight):
        args = SFTConfig(
            output_dir=out, max_steps=1, per_device_train_batch_size=batch, optim="sgd", learning_rate=1.0,
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
            bf16=False, max_length=48, seed=0, dataloader_num_workers=0, activation_checkpointing=False,
            loss_type="dft",
        )
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        trainer = InfoSteerSFTTrainer(
            model=model_dir, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            peft_config=InfoSteerConfig(intervention="gain", entropy_weight=weight, lora=lora),
        )
        trainer.train()
        trainer.save_model(out)


    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_ddp_two_processes_of_a_weighted_loss_match_one_process(tmp_path):
    """DFT under DDP (2 processes x batch 2, gloo) gives the update of 1 process x batch 4, regularizer included."""
    from safetensors.torch import load_file
    from test_distributed import _free_port, _run
    from tiny_sft import write_sft_assets

    model_dir, data = write_sft_assets(tmp_path)
    script = tmp_path / "ddp_dft.py"
    script.write_text(_DDP_DFT_SCRIPT)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), str(script)]
    _run([*launch, str(model_dir), str(data), str(tmp_path / "ddp"), "2", str(LAMBDA)])
    namespace: dict = {"__name__": "ddp_dft"}
    exec(compile(_DDP_DFT_SCRIPT, str(script), "exec"), namespace)
    for out, weight in (("single", LAMBDA), ("no_reg", 0.0)):
        namespace["main"](str(model_dir), str(data), str(tmp_path / out), 4, weight)
    got, want, no_reg = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("ddp", "single", "no_reg"))
    assert sorted(got) == sorted(want) and any("infosteer_gain" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
    # the regularizer moves the gains by far more than that tolerance, so the match above tests its scaling
    assert max((want[k] - no_reg[k]).abs().max().item() for k in want if "infosteer_gain" in k) > 100 * 1e-6
