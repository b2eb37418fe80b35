"""The regularizer inside TRL and transformers trainers, with no subclass; ``InfoSteerCallback`` and
``InfoSteerSFTTrainer`` for metrics, the model card and resuming."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_infosteer
from peft_infosteer import InfoSteerCallback, InfoSteerConfig, InfoSteerSFTTrainer
from peft_infosteer.layer import InfoSteerLayer

# the paper's lambda; 0.06 is about 0.5 in the units before 0.2.0 on the tiny model's 2 layers of d_ff 64
WEIGHT = 0.06
# sum over the steered layers of log d_ff: the logged regularizer is -lambda * this * mean flux (nats over layers)
LOG_D_SUM = 2 * math.log(64)


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
    kwargs.setdefault("entropy_weight", WEIGHT)
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
    """The gains of the adapter being trained (DPO adds a frozen copy named "ref")."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "infosteer_gain.default" in n}


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _trainer(cls, tmp_path, weight=WEIGHT, model=None, **kwargs):
    """A 2-step SFT run on the tiny model; ``cls`` is ``SFTTrainer`` or ``InfoSteerSFTTrainer``."""
    torch.manual_seed(0)
    args = kwargs.pop("args", None) or _sft_args(tmp_path)
    if model is None:
        model, kwargs["peft_config"] = _model(), _config(entropy_weight=weight)
    kwargs.setdefault("train_dataset", _dataset())
    return cls(model=model, args=args, processing_class=tiny_tokenizer(), **kwargs)


@pytest.mark.parametrize("cls", [SFTTrainer, InfoSteerSFTTrainer], ids=["SFTTrainer", "InfoSteerSFTTrainer"])
def test_logged_loss_is_the_task_loss(tmp_path, cls):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainers = {}
    for name, trainer_cls, config in (("lora", SFTTrainer, lora), ("steered", cls, _config(entropy_weight=12.0))):
        torch.manual_seed(0)
        trainers[name] = trainer_cls(
            model=_model(),
            args=_sft_args(tmp_path / name, max_steps=1),
            train_dataset=_dataset(),
            eval_dataset=_dataset(8),
            processing_class=tiny_tokenizer(),
            peft_config=config,
        )
    # identity at init and LoRA B = 0: before any update both models compute the same task loss, whatever lambda is
    evals = {name: trainer.evaluate()["eval_loss"] for name, trainer in trainers.items()}
    for trainer in trainers.values():
        torch.manual_seed(0)
        trainer.train()
    losses = {name: trainer.state.log_history[0]["loss"] for name, trainer in trainers.items()}
    assert evals["steered"] == pytest.approx(evals["lora"], rel=1e-6) and evals["lora"] > 0
    assert losses["steered"] == pytest.approx(losses["lora"], rel=1e-6) and losses["lora"] > 0
    summary = {name: trainer.state.log_history[-1]["train_loss"] for name, trainer in trainers.items()}
    assert summary["steered"] == pytest.approx(summary["lora"], rel=1e-6)


def test_infosteer_sft_trainer_logs_flux_and_loss_in_train_and_eval(tmp_path):
    trainer = _trainer(
        InfoSteerSFTTrainer, tmp_path, args=_sft_args(tmp_path, eval_strategy="steps", eval_steps=2),
        eval_dataset=_dataset(8),
    )  # fmt: skip
    assert isinstance(trainer.model.base_model, peft_infosteer.InfoSteerModel)
    assert isinstance(trainer.callback_handler.callbacks[0], InfoSteerCallback)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h and "infosteer/flux" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_infosteer/flux" in h]
    assert len(train_logs) == 2 and eval_logs
    for h in train_logs:
        assert 0.0 < h["infosteer/flux"] <= 1.0
        assert h["infosteer/loss"] == pytest.approx(-WEIGHT * LOG_D_SUM * h["infosteer/flux"], rel=1e-5)
        assert "entropy" in h  # TRL's own metric is still there, under its own name
    assert 0.0 < eval_logs[-1]["eval_infosteer/flux"] <= 1.0


def _one_step_update(tmp_path, cls, batch, accum, weight=WEIGHT, trainer_kwargs=None, **extra):
    torch.manual_seed(0)
    model = get_peft_model(_model(), _config(entropy_weight=weight))
    before = _adapter_params(model)
    args = _sft_args(
        tmp_path / f"{cls.__name__}-{batch}x{accum}-{weight}-{sorted(extra.items())}",
        max_steps=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        **extra,
    )
    trainer = cls(
        model=model, args=args, train_dataset=_dataset(4), processing_class=tiny_tokenizer(), **(trainer_kwargs or {})
    )
    trainer.train()
    after = _adapter_params(trainer.model)
    return {k: after[k] - before[k] for k in before}


def _assert_same_update(got, want):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def _regularizer_share(tmp_path, cls, full) -> float:
    without = _one_step_update(tmp_path, cls, batch=4, accum=1, weight=0.0)
    return max((full[k] - without[k]).abs().max().item() for k in full if "infosteer_gain" in k)


@pytest.mark.parametrize("cls", [SFTTrainer, InfoSteerSFTTrainer], ids=["SFTTrainer", "InfoSteerSFTTrainer"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, cls):
    full = _one_step_update(tmp_path, cls, batch=4, accum=1)
    _assert_same_update(_one_step_update(tmp_path, cls, batch=2, accum=2), full)
    # the regularizer's share of the update is far larger than the tolerance, so the check above means something
    assert _regularizer_share(tmp_path, cls, full) > 1000 * 1e-6


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, reentrant):
    full = _one_step_update(tmp_path, SFTTrainer, batch=4, accum=1)
    checkpointed = _one_step_update(
        tmp_path, SFTTrainer, batch=4, accum=1, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )  # fmt: skip
    _assert_same_update(checkpointed, full)


def test_plain_sft_trainer_trains_the_regularizer_like_the_infosteer_trainer(tmp_path):
    plain = _one_step_update(tmp_path, SFTTrainer, batch=4, accum=1)
    ours = _one_step_update(tmp_path, InfoSteerSFTTrainer, batch=4, accum=1)
    _assert_same_update(plain, ours)
    assert _regularizer_share(tmp_path, SFTTrainer, plain) > 1e-3


def test_dft_loss_without_the_integration_trains_the_regularizer_and_warns(tmp_path):
    # a plain SFTTrainer: the probes see DFT's unequal token weights and say so (tests/test_loss_weights.py checks the
    # exact normalisation with the integration); lambda 60 because DFT's probability weights shrink the gradient
    updates = {}
    for w in (0, 60):
        with pytest.warns(UserWarning, match="Attach the trainer integration") if w else contextlib.nullcontext():
            updates[w] = _one_step_update(tmp_path, SFTTrainer, batch=4, accum=1, weight=w, loss_type="dft")
    assert max((updates[60][k] - updates[0][k]).abs().max().item() for k in updates[0] if "gain" in k) > 1e-4


def test_custom_compute_loss_func_trains_the_regularizer(tmp_path):
    """TRL runs the model twice on this path (a loss forward without labels, then a metrics forward)."""

    def nll(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else (target != -100).sum())

    updates = {}
    for weight in (0.0, 0.6):  # 0.6: about 5 in the units before 0.2.0
        with pytest.warns(FutureWarning, match="compute_loss_func"):
            updates[weight] = _one_step_update(
                tmp_path, SFTTrainer, batch=4, accum=1, weight=weight, trainer_kwargs={"compute_loss_func": nll}
            )
    assert max((updates[0.6][k] - updates[0.0][k]).abs().max().item() for k in updates[0.0] if "gain" in k) > 1e-4


def test_4bit_base_trains_and_gains_stay_float32(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / "tiny"
    _model().save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    trainer = _trainer(SFTTrainer, tmp_path, model=model, peft_config=_config())
    lora = [p for n, p in trainer.model.named_parameters() if "lora_A" in n]
    assert lora[0].dtype == torch.bfloat16  # TRL's QLoRA cast applies to LoRA ...
    gains = [p for n, p in trainer.model.named_parameters() if "infosteer_gain" in n]
    before = [p.detach().float().clone() for p in gains]
    with pytest.warns(UserWarning, match="training it in float32"):  # ... and the gains are put back
        trainer.train()
    assert all(p.dtype == torch.float32 for p in gains)
    assert any(not torch.equal(b, p) for b, p in zip(before, gains))


def test_infosteer_sft_trainer_without_an_infosteer_adapter_warns(tmp_path):
    lora = LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="nothing InfoSteer-specific will be trained"):
        trainer = _trainer(InfoSteerSFTTrainer, tmp_path, model=_model(), peft_config=lora)
    trainer.train()
    assert not any(isinstance(m, InfoSteerLayer) for m in trainer.model.modules())
    assert not any("infosteer/flux" in h for h in trainer.state.log_history)


def test_evaluate_and_predict(tmp_path):
    trainer = _trainer(InfoSteerSFTTrainer, tmp_path, eval_dataset=_dataset(8))
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert 0.0 < first["eval_infosteer/flux"] <= 1.0
    assert first["eval_infosteer/flux"] == pytest.approx(second["eval_infosteer/flux"])
    assert first["eval_loss"] == pytest.approx(second["eval_loss"])
    prediction = trainer.predict(trainer.eval_dataset)
    assert math.isfinite(prediction.metrics["test_loss"])


class _Recorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): keeps what on_log shows it."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_plain_transformers_trainer_and_one_line_metrics(tmp_path):
    tok = tiny_tokenizer()
    texts = [f"What is {i} plus {i}? It is {2 * i}." for i in range(8)]
    enc = tok(texts, padding="max_length", max_length=24, truncation=True)
    rows = [
        {"input_ids": ids, "attention_mask": am, "labels": [t if m else -100 for t, m in zip(ids, am)]}
        for ids, am in zip(enc["input_ids"], enc["attention_mask"])
    ]
    updates = {}
    for weight in (0.0, 0.6):  # 0.6: about 5 in the units before 0.2.0
        torch.manual_seed(0)
        model = get_peft_model(_model(), _config(entropy_weight=weight))
        before = _gains(model)
        reporter = _Recorder()
        args = TrainingArguments(**_short_run(tmp_path / str(weight)), optim="sgd", max_grad_norm=0.0)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[reporter])
        InfoSteerCallback.attach(trainer)  # the one line: first among the callbacks, so reporters see the metrics
        trainer.train()
        updates[weight] = {k: v - before[k] for k, v in _gains(trainer.model).items()}
        assert any("infosteer/flux" in h for h in trainer.state.log_history)
        assert any("infosteer/flux" in logs for logs in reporter.logs)
    assert max((updates[0.6][k] - updates[0.0][k]).abs().max().item() for k in updates[0.0]) > 1e-4


def test_dpo_trainer_trains_the_regularizer_with_no_subclass(tmp_path):
    from trl import DPOConfig, DPOTrainer

    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
            "rejected": [{"role": "assistant", "content": f"It is {2 * i + 1}."}],
        }
        for i in range(8)
    ]
    updates = {}
    for weight in (0.0, 0.6):  # 0.6: about 5 in the units before 0.2.0
        torch.manual_seed(0)
        model = get_peft_model(_model(), _config(entropy_weight=weight))
        before = _gains(model)
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**_short_run(tmp_path / str(weight)), gradient_checkpointing=False, optim="sgd"),
            train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
        )
        InfoSteerCallback.attach(trainer)
        trainer.train()
        updates[weight] = {k: v - before[k] for k, v in _gains(trainer.model).items()}
        logs = [h for h in trainer.state.log_history if "infosteer/flux" in h]
        assert logs and 0 < logs[0]["infosteer/flux"] <= 1
    assert max((updates[0.6][k] - updates[0.0][k]).abs().max().item() for k in updates[0.0]) > 1e-4


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


# ---- no leftover state; a pure intervention under gradient checkpointing -------------------------------------------


def test_no_flux_work_in_generate_after_train_and_evaluate(tmp_path, monkeypatch):
    calls = []
    original = peft_infosteer.regularizer.fused_information_flux

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_infosteer.regularizer, "fused_information_flux", counting)
    trainer = _trainer(
        InfoSteerSFTTrainer, tmp_path, args=_sft_args(tmp_path, eval_strategy="steps", eval_steps=1),
        eval_dataset=_dataset(4),
    )  # fmt: skip
    trainer.train()
    assert calls and any("eval_infosteer/flux" in h for h in trainer.state.log_history)
    assert 0.0 < trainer.evaluate()["eval_infosteer/flux"] <= 1.0  # a standalone evaluation still measures
    model = trainer.model.eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    calls.clear()
    model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls == []  # after train and evaluate, generate() does no flux work ...
    with peft_infosteer.track_flux(model):
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls  # ... unless asked
    assert not peft_infosteer.find_infosteer_model(model).flux_tracker.measure


def test_pure_intervention_with_checkpointing_logs_alike_and_warns_nothing(tmp_path, recwarn):
    # entropy_weight = 0 (the default elevate config): the flux is measured and logged, lambda = 0 logs a plain 0.0
    logged = {}
    for reentrant in (False, True):
        args = _sft_args(
            tmp_path / str(reentrant), gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        )  # fmt: skip
        config = _config(intervention="elevate", entropy_weight=0.0)
        trainer = _trainer(InfoSteerSFTTrainer, tmp_path, args=args, model=_model(), peft_config=config)
        trainer.train()
        logged[reentrant] = [h for h in trainer.state.log_history if "infosteer/flux" in h]
    assert len(logged[False]) == len(logged[True]) == 2
    for plain, reentrant in zip(logged[False], logged[True], strict=True):
        assert reentrant["infosteer/flux"] == pytest.approx(plain["infosteer/flux"], rel=1e-5)
        assert reentrant["infosteer/loss"] == 0.0 and math.copysign(1.0, reentrant["infosteer/loss"]) == 1.0
    assert not [w for w in recwarn if "InfoSteer" in str(w.message)]
