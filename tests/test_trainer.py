"""InfoSteerSFTTrainer / InfoSteerTrainerMixin: the regularizer inside TRL and transformers trainers."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer, InfoSteerTrainerMixin
from peft_infosteer.layer import InfoSteerLayer


def _dataset(n: int = 16) -> Dataset:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}." + " ok" * (i % 3)},
            ]
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def _config(**kwargs) -> InfoSteerConfig:
    kwargs.setdefault("intervention", "gain")
    kwargs.setdefault("entropy_weight", 0.5)
    kwargs.setdefault("lora", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return InfoSteerConfig(task_type="CAUSAL_LM", **kwargs)


def _sft_args(tmp_path, **kwargs) -> SFTConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=48,
        gradient_checkpointing=False,
        bf16=False,  # TRL defaults to bf16 autocast, even on CPU; exact comparisons need float32
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return SFTConfig(**defaults)


def _model():
    return tiny_model("llama", vocab_size=len(tiny_tokenizer()))


def _short_run(tmp_path) -> dict:
    """Arguments of a 2-step CPU run shared by the plain-Trainer and DPO tests."""
    return dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
    )


def _gains(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "infosteer_gain" in n}


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sft_trainer_logs_flux_and_loss_in_train_and_eval(tmp_path):
    tok = tiny_tokenizer()
    trainer = InfoSteerSFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=_dataset(),
        eval_dataset=_dataset(8),
        processing_class=tok,
        peft_config=_config(),
    )
    assert isinstance(trainer.model.base_model, peft_infosteer.InfoSteerModel)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "infosteer/flux" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_infosteer/flux" in h]
    assert train_logs and eval_logs
    for h in train_logs:
        assert 0.0 < h["infosteer/flux"] <= 1.0
        assert h["infosteer/loss"] == pytest.approx(-0.5 * h["infosteer/flux"], rel=1e-5)
        assert "entropy" in h  # TRL's own metric is still there, under its own name
    assert 0.0 < eval_logs[-1]["eval_infosteer/flux"] <= 1.0
    # no regularizer terms leak out of a step: the records are freed once the loss is built
    assert trainer.model.base_model.flux_recorder.records == []


def test_regularizer_changes_the_update_and_raises_flux(tmp_path):
    tok = tiny_tokenizer()
    results = {}
    for weight in (0.0, 5.0):
        trainer = InfoSteerSFTTrainer(
            model=_model(),
            args=_sft_args(tmp_path / str(weight), max_steps=6, learning_rate=5e-2),
            train_dataset=_dataset(),
            processing_class=tok,
            peft_config=_config(entropy_weight=weight),
        )
        trainer.train()
        results[weight] = (
            _gains(trainer.model),
            [h["infosteer/flux"] for h in trainer.state.log_history if "loss" in h],
        )
    g0, g1 = results[0.0][0], results[5.0][0]
    assert any(not torch.allclose(g0[k], g1[k]) for k in g0)
    assert results[5.0][1][-1] > results[0.0][1][-1]


def _one_step_update(tmp_path, batch, accum, weight=0.5):
    torch.manual_seed(0)
    model = get_peft_model(_model(), _config(entropy_weight=weight))
    before = _adapter_params(model)
    trainer = InfoSteerSFTTrainer(
        model=model,
        args=_sft_args(
            tmp_path / f"{batch}x{accum}",
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        ),
        train_dataset=_dataset(4),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    after = _adapter_params(trainer.model)
    return {k: after[k] - before[k] for k in before}


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    full = _one_step_update(tmp_path, batch=4, accum=1)
    accumulated = _one_step_update(tmp_path, batch=2, accum=2)
    without_reg = _one_step_update(tmp_path, batch=4, accum=1, weight=0.0)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)
    # the regularizer's share of the update is far larger than the tolerance, so the check above means something
    reg_share = max((full[k] - without_reg[k]).abs().max().item() for k in full if "infosteer_gain" in k)
    assert reg_share > 1000 * 1e-6


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_ready_peft_model_and_gradient_checkpointing(tmp_path, gradient_checkpointing):
    model = get_peft_model(_model(), _config())
    before = _gains(model)
    trainer = InfoSteerSFTTrainer(
        model=model,
        args=_sft_args(tmp_path, gradient_checkpointing=gradient_checkpointing),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    after = _gains(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_matches_no_checkpointing(tmp_path):
    updates = {}
    for gc in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(_model(), _config(entropy_weight=2.0))
        before = _gains(model)
        trainer = InfoSteerSFTTrainer(
            model=model,
            args=_sft_args(tmp_path / str(gc), max_steps=1, gradient_checkpointing=gc, optim="sgd", learning_rate=1.0),
            train_dataset=_dataset(4),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        updates[gc] = {k: v - before[k] for k, v in _gains(trainer.model).items()}
    for k in updates[False]:
        torch.testing.assert_close(updates[True][k], updates[False][k], rtol=1e-4, atol=1e-7)


def test_reentrant_checkpointing_is_refused_before_training(tmp_path):
    args = _sft_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        InfoSteerSFTTrainer(
            model=_model(),
            args=args,
            train_dataset=_dataset(),
            processing_class=tiny_tokenizer(),
            peft_config=_config(),
        )


def test_4bit_base_trains_and_gains_stay_float32(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / "tiny"
    _model().save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    trainer = InfoSteerSFTTrainer(
        model=model,
        args=_sft_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )
    gains = [p for n, p in trainer.model.named_parameters() if "infosteer_gain" in n]
    assert gains and all(p.dtype == torch.float32 for p in gains)
    lora = [p for n, p in trainer.model.named_parameters() if "lora_A" in n]
    assert lora[0].dtype == torch.bfloat16  # TRL's QLoRA cast still applies to LoRA
    before = [p.detach().clone() for p in gains]
    trainer.train()
    assert any(not torch.equal(b, p) for b, p in zip(before, gains))
    assert all(p.dtype == torch.float32 for p in gains)


def test_plain_sft_trainer_warns_that_the_regularizer_is_dropped(tmp_path):
    trainer = SFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )
    with pytest.warns(UserWarning, match="InfoSteerSFTTrainer"):
        trainer.train()


def test_dft_loss_keeps_the_regularizer(tmp_path):
    trainer = InfoSteerSFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path, loss_type="dft"),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert any("infosteer/flux" in h for h in trainer.state.log_history)


def test_evaluate_and_predict_do_not_leak(tmp_path):
    trainer = InfoSteerSFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path),
        train_dataset=_dataset(),
        eval_dataset=_dataset(8),
        processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert first["eval_infosteer/flux"] == pytest.approx(second["eval_infosteer/flux"])
    prediction = trainer.predict(trainer.eval_dataset)
    assert math.isfinite(prediction.metrics["test_loss"])
    assert trainer.model.base_model.flux_recorder.records == []


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    tok = tiny_tokenizer()

    def make(out, callbacks=()):
        torch.manual_seed(0)
        return InfoSteerSFTTrainer(
            model=get_peft_model(_model(), _config()),
            args=_sft_args(out, max_steps=4, save_strategy="steps", save_steps=100, per_device_train_batch_size=2),
            train_dataset=_dataset(16),
            processing_class=tok,
            callbacks=list(callbacks),
        )

    full = make(tmp_path / "full")
    full.train()
    interrupted = make(tmp_path / "part", [_StopAt(2)])
    interrupted.train()
    checkpoint = tmp_path / "part" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    # a later save that was killed half-way: resume_from_checkpoint=True must skip it
    broken = tmp_path / "part" / "out" / "checkpoint-3"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes((checkpoint / "adapter_model.safetensors").read_bytes()[:100])
    resumed = make(tmp_path / "part")
    with pytest.warns(UserWarning, match="checkpoint-3"):
        resumed.train(resume_from_checkpoint=True)
    expected, got = _adapter_params(full.model), _adapter_params(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)

    # a checkpoint is a loadable adapter
    loaded = PeftModel.from_pretrained(_model(), str(checkpoint))
    assert isinstance(loaded.base_model, peft_infosteer.InfoSteerModel)


def test_mixin_with_plain_transformers_trainer(tmp_path):
    class InfoSteerTrainer(InfoSteerTrainerMixin, Trainer):
        pass

    tok = tiny_tokenizer()
    model = get_peft_model(_model(), _config())
    texts = [f"What is {i} plus {i}? It is {2 * i}." for i in range(8)]
    enc = tok(texts, padding="max_length", max_length=24, truncation=True)
    rows = [
        {"input_ids": ids, "attention_mask": am, "labels": [t if m else -100 for t, m in zip(ids, am)]}
        for ids, am in zip(enc["input_ids"], enc["attention_mask"])
    ]
    before = _gains(model)
    trainer = InfoSteerTrainer(
        model=model,
        args=TrainingArguments(**_short_run(tmp_path)),
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    assert any("infosteer/flux" in h for h in trainer.state.log_history)
    assert any(not torch.equal(before[k], v) for k, v in _gains(trainer.model).items())


def test_mixin_with_dpo_trainer(tmp_path):
    from trl import DPOConfig, DPOTrainer

    class InfoSteerDPOTrainer(InfoSteerTrainerMixin, DPOTrainer):
        pass

    tok = tiny_tokenizer()
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}."}],
        }
        for i in range(8)
    ]
    model = get_peft_model(_model(), _config())
    before = _gains(model)
    trainer = InfoSteerDPOTrainer(
        model=model,
        args=DPOConfig(**_short_run(tmp_path), gradient_checkpointing=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the regularizer must be consumed, not dropped
        trainer.train()
    logs = [h for h in trainer.state.log_history if "infosteer/flux" in h]
    assert logs and 0 < logs[0]["infosteer/flux"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in _gains(trainer.model).items())


def test_mixin_passes_through_models_without_infosteer(tmp_path):
    trainer = InfoSteerSFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    assert not any(isinstance(m, InfoSteerLayer) for m in trainer.model.modules())
    assert not any("infosteer/flux" in h for h in trainer.state.log_history)


def test_custom_compute_loss_func_keeps_the_regularizer(tmp_path):
    """TRL runs the model twice on this path (loss forward without labels, then a metrics forward)."""
    calls = []

    def nll(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())

    model = get_peft_model(_model(), _config(entropy_weight=2.0))
    before = _gains(model)
    with pytest.warns(FutureWarning, match="compute_loss_func"):
        trainer = InfoSteerSFTTrainer(
            model=model,
            args=_sft_args(tmp_path),
            train_dataset=_dataset(),
            processing_class=tiny_tokenizer(),
            compute_loss_func=nll,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the regularizer is consumed, not dropped
        trainer.train()
    assert calls
    logs = [h for h in trainer.state.log_history if "infosteer/flux" in h]
    assert logs and all(0 < h["infosteer/flux"] <= 1 for h in logs)
    assert any(not torch.equal(before[k], v) for k, v in _gains(trainer.model).items())


def test_trainer_model_card_keeps_the_loading_note(tmp_path):
    trainer = InfoSteerSFTTrainer(
        model=_model(),
        args=_sft_args(tmp_path, max_steps=1),
        train_dataset=_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-infosteer")  # what trainer.push_to_hub writes before uploading
    card = (tmp_path / "out" / "README.md").read_text()
    assert "pip install peft-infosteer" in card and "import peft_infosteer" in card
    assert "infosteer" in card and "trl" in card  # both TRL's and InfoSteer's tags
