"""The flux target (``peft_infosteer.target``): lambda as a dual variable, updated once per optimizer step from the
step's mean flux, bounded, capped with a warning, checkpointed, and driven by the optimizer that trains the model (the
bound one, else any over the model's parameters; never another) or one documented call."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer
from trl import SFTConfig, SFTTrainer

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerSFTTrainer
from peft_infosteer.regularizer import FluxTracker
from peft_infosteer.target import FLUX_GAP_SCALE, FluxTarget

torch.manual_seed(0)
IDS = torch.randint(3, 128, (4, 10))


START = 0.01  # lambda in the paper's units (the defaults of entropy_weight's paper setting and max_entropy_weight)


def _target(**kwargs) -> FluxTarget:
    settings = dict(rise=0.01, absolute=None, start_weight=START, rate=0.2, max_weight=100.0) | kwargs
    return FluxTarget(FluxTracker(), **settings)


def _feed(target: FluxTarget, flux: float, count: float = 10.0) -> None:
    target.observe(torch.tensor([flux * count, count]))


def test_the_dual_step_follows_the_gap_with_a_bounded_multiplicative_step():
    target = _target()
    _feed(target, 0.80)
    target.step()  # the first step measures the start: target = 0.81, gap = +0.01 -> the full step up
    assert target.flux_start == pytest.approx(0.80) and target.target == pytest.approx(0.81)
    assert target.weight == pytest.approx(START * math.exp(0.2))
    _feed(target, 0.805)
    target.step()  # half the gap scale below the target: half the step
    assert target.weight == pytest.approx(START * math.exp(0.2) * math.exp(0.2 * 0.005 / FLUX_GAP_SCALE))
    before = target.weight
    _feed(target, 0.95)
    target.step()  # far above: the step is bounded by exp(-rate)
    assert target.weight == pytest.approx(before * math.exp(-0.2))
    assert float(target.tracker.weight) == pytest.approx(target.weight)  # what the next forward uses


def test_the_window_sums_every_forward_of_the_step_and_empty_steps_change_nothing():
    target = _target(absolute=0.9, rise=None)
    _feed(target, 0.9, count=30)
    _feed(target, 0.6, count=10)  # a second micro-batch of the same step, fewer tokens
    target.step()
    assert target.last_flux == pytest.approx((0.9 * 30 + 0.6 * 10) / 40)
    weight = target.weight
    target.step()  # nothing measured since: nothing to do
    assert target.weight == weight and target.steps == 1


def test_an_unreachable_target_stops_at_the_cap_and_warns_once():
    target = _target(absolute=0.99, rise=None, max_weight=0.015)
    with pytest.warns(UserWarning, match="out of reach.*max_entropy_weight=0.015"):
        for _ in range(5):
            _feed(target, 0.8)
            target.step()
    assert target.weight == 0.015


def test_state_round_trip():
    target = _target()
    for flux in (0.8, 0.802, 0.803):
        _feed(target, flux)
        target.step()
    other = _target()
    other.load_state_dict(target.state_dict())
    assert other.state_dict() == target.state_dict()
    assert float(other.tracker.weight) == pytest.approx(target.weight)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="not both"):
        InfoSteerConfig(flux_target_rise=0.01, flux_target=0.9)
    with pytest.raises(ValueError, match="flux_target_rise"):
        InfoSteerConfig(flux_target_rise=-0.1)
    with pytest.raises(ValueError, match=r"flux_target must be a number in \(0, 1\)"):
        InfoSteerConfig(flux_target=1.5)
    with pytest.raises(ValueError, match="where lambda starts"):
        InfoSteerConfig(flux_target_rise=0.01, entropy_weight=0.0)
    assert InfoSteerConfig(flux_target_rise=0.01, entropy_weight=0.01).has_flux_target
    assert not InfoSteerConfig().has_flux_target


def _model(**config):
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules="all-linear")
    config.setdefault("intervention", "gain")
    return get_peft_model(tiny_model("llama"), InfoSteerConfig(lora=lora, **config)).train()


def test_any_torch_optimizer_steps_lambda_once_per_step_over_the_accumulation_window():
    model = _model(flux_target_rise=0.01, entropy_weight=1.0)
    target = peft_infosteer.find_infosteer_model(model).flux_target
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    weights = []
    for _ in range(3):
        for micro in (IDS[:2], IDS[2:]):  # gradient accumulation: two forwards, one step
            model(input_ids=micro, labels=micro).loss.backward()
        assert target.steps == len(weights)  # not before the optimizer step
        optimizer.step()
        optimizer.zero_grad()
        weights.append(target.weight)
    assert target.steps == 3 and len(set(weights)) == 3
    # the first step's window is both micro-batches: the starting flux is their joint mean
    with torch.no_grad(), peft_infosteer.track_flux(model):
        pass


def test_a_loop_without_a_torch_optimizer_makes_the_one_documented_call():
    model = _model(flux_target_rise=0.01, entropy_weight=1.0)
    target = peft_infosteer.find_infosteer_model(model).flux_target
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        with torch.no_grad():
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
        peft_infosteer.step_flux_target(model)
    assert target.steps == 2 and target.weight != 1.0


def test_a_fixed_lambda_is_not_driven():
    model = _model(entropy_weight=3.0)
    assert peft_infosteer.find_infosteer_model(model).flux_target is None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert float(peft_infosteer.find_infosteer_model(model).flux_tracker.weight) == 3.0


def _sft_args(out, **kwargs) -> SFTConfig:
    defaults = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", max_length=48, gradient_checkpointing=False, bf16=False,
        seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return SFTConfig(**(defaults | kwargs))


def _dataset(n: int = 16):
    from datasets import Dataset

    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"It is {2 * i}." + " ok" * (i % 3)}]}
        for i in range(n)
    ]  # fmt: skip
    return Dataset.from_list(rows)


def _config():
    # lambda starts at 1.0 (about 10 in the units before 0.2.0 on these 2 layers of d_ff 64)
    return InfoSteerConfig(
        flux_target_rise=0.01,
        entropy_weight=1.0,
        intervention="gain",
        lora=LoraConfig(r=4, target_modules="all-linear"),
    )


@pytest.mark.parametrize("cls", [SFTTrainer, InfoSteerSFTTrainer], ids=["SFTTrainer", "InfoSteerSFTTrainer"])
def test_trainers_follow_the_target(tmp_path, cls):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
    trainer = cls(
        model=model, args=_sft_args(tmp_path), train_dataset=_dataset(), processing_class=tiny_tokenizer(),
        peft_config=_config(),
    )  # fmt: skip
    trainer.train()
    target = peft_infosteer.find_infosteer_model(trainer.model).flux_target
    assert target.steps == 4 and target.weight != 1.0 and target.flux_start is not None
    if cls is InfoSteerSFTTrainer:
        logs = [h for h in trainer.state.log_history if "infosteer/lambda" in h]
        assert len(logs) == 4 and logs[-1]["infosteer/lambda"] == pytest.approx(target.weight)
        assert logs[-1]["infosteer/flux_target"] == pytest.approx(target.flux_start + 0.01)


def test_resume_from_checkpoint_continues_lambda_exactly(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_save = True
                control.should_training_stop = True

    def make(out, callbacks=()):
        torch.manual_seed(0)
        model = tiny_model("llama", vocab_size=len(tiny_tokenizer()))
        return InfoSteerSFTTrainer(
            model=model, args=_sft_args(out, save_strategy="steps", save_steps=100, per_device_train_batch_size=2),
            train_dataset=_dataset(), processing_class=tiny_tokenizer(), peft_config=_config(),
            callbacks=list(callbacks),
        )  # fmt: skip

    full = make(tmp_path / "full")
    full.train()
    make(tmp_path / "part", [StopAt()]).train()
    resumed = make(tmp_path / "part")
    resumed.train(resume_from_checkpoint=True)
    want = peft_infosteer.find_infosteer_model(full.model).flux_target.state_dict()
    got = peft_infosteer.find_infosteer_model(resumed.model).flux_target.state_dict()
    assert got["steps"] == want["steps"] == 4
    assert got["flux_start"] == pytest.approx(want["flux_start"], rel=1e-6)
    assert got["weight"] == pytest.approx(want["weight"], rel=1e-5)
    lambdas = {
        name: [h["infosteer/lambda"] for h in t.state.log_history if "infosteer/lambda" in h]
        for name, t in (("full", full), ("resumed", resumed))
    }
    # the resumed run's history holds the checkpoint's steps 1-2 and its own 3-4
    assert len(lambdas["full"]) == 4 and lambdas["resumed"] == pytest.approx(lambdas["full"], rel=1e-5)


# ---- which optimizer steps the target ---------------------------------------------------------------------------


def _train_forward(model) -> None:
    model(input_ids=IDS, labels=IDS).loss.backward()


def _unrelated_optimizer() -> torch.optim.Optimizer:
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    return torch.optim.SGD([weight], lr=0.1)


def test_a_bound_optimizer_steps_lambda_and_no_other_optimizer_does():
    model = _model(flux_target_rise=0.01, entropy_weight=1.0)
    target = peft_infosteer.find_infosteer_model(model).flux_target
    params = [p for p in model.parameters() if p.requires_grad]
    a = torch.optim.SGD(params, lr=0.1)
    peft_infosteer.bind_flux_target(model, a)
    other = torch.optim.SGD(params, lr=0.0)  # a second optimizer, even over the model's own parameters
    for step in range(1, 3):
        _train_forward(model)
        weight = target.weight
        _unrelated_optimizer().step()
        other.step()
        assert target.steps == step - 1 and target.weight == weight
        a.step()
        a.zero_grad()
        assert target.steps == step and target.weight != weight
    peft_infosteer.bind_flux_target(model, None)  # unbound: any optimizer over the model's parameters again
    _train_forward(model)
    other.step()
    assert target.steps == 3


def test_unbound_only_an_optimizer_that_holds_the_models_parameters_steps_lambda():
    first, second = _model(flux_target_rise=0.01, entropy_weight=1.0), _model(flux_target_rise=0.01, entropy_weight=1.0)
    targets = [peft_infosteer.find_infosteer_model(m).flux_target for m in (first, second)]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (first, second)]
    _train_forward(first)
    _train_forward(second)
    with pytest.warns(UserWarning, match="holds none of its parameters.*bind_flux_target"):
        _unrelated_optimizer().step()  # e.g. DeepSpeed's flattened copies: told once, per model
    assert [t.steps for t in targets] == [0, 0]
    optimizers[0].step()  # the first model's optimizer steps its target, not the second model's
    assert [t.steps for t in targets] == [1, 0] and targets[0].weight != 1.0 and targets[1].weight == 1.0
    optimizers[1].step()
    assert [t.steps for t in targets] == [1, 1]


def test_the_trainer_binds_its_optimizer_while_it_trains(tmp_path):
    from transformers import TrainerCallback

    moved: list[int] = []

    class SecondOptimizer(TrainerCallback):
        """Steps a second optimizer over the model's own parameters (lr 0) before each step of the trainer's."""

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            target = peft_infosteer.find_infosteer_model(model).flux_target
            before = target.steps
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0).step()
            moved.append(target.steps - before)

    torch.manual_seed(0)
    trainer = InfoSteerSFTTrainer(
        model=tiny_model("llama", vocab_size=len(tiny_tokenizer())), args=_sft_args(tmp_path),
        train_dataset=_dataset(), processing_class=tiny_tokenizer(), peft_config=_config(),
        callbacks=[SecondOptimizer()],
    )  # fmt: skip
    trainer.train()
    state = peft_infosteer.find_infosteer_model(trainer.model).flux_state
    assert moved == [0, 0, 0, 0]  # the second optimizer never stepped lambda
    assert state.active_target.steps == 4  # the trainer's optimizer did, once per step
    assert state.bound_optimizer is None  # after training: unbound, as before


def test_a_copy_follows_no_optimizer_of_the_original_and_an_unloaded_model_none():
    import copy

    model = _model(flux_target_rise=0.01, entropy_weight=1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    peft_infosteer.bind_flux_target(model, optimizer)
    twin = copy.deepcopy(model)
    twin_state = peft_infosteer.find_infosteer_model(twin).flux_state
    assert twin_state.bound_optimizer is None
    _train_forward(twin)
    with pytest.warns(UserWarning, match="holds none of its parameters"):
        optimizer.step()  # the original's optimizer: not the copy's parameters
    assert twin_state.active_target.steps == 0
    torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1).step()
    assert twin_state.active_target.steps == 1
    target = peft_infosteer.find_infosteer_model(model).flux_target
    _train_forward(model)
    model.merge_and_unload()
    optimizer.step()
    assert target.steps == 0  # unloaded: its flux state let go of the optimizer


def test_when_the_bound_optimizer_is_gone_any_optimizer_over_the_parameters_steps_lambda():
    import gc
    import pickle

    model = _model(flux_target_rise=0.01, entropy_weight=1.0)
    target = peft_infosteer.find_infosteer_model(model).flux_target
    params = [p for p in model.parameters() if p.requires_grad]
    peft_infosteer.bind_flux_target(model, torch.optim.SGD(params, lr=0.1))  # bound, then dropped by the loop
    gc.collect()
    _train_forward(model)
    torch.optim.SGD(params, lr=0.1).step()
    assert target.steps == 1
    # a pickled copy is a whole model too: its own target, following its own parameters' optimizer
    copy = pickle.loads(pickle.dumps(model))
    copy_target = peft_infosteer.find_infosteer_model(copy).flux_target
    _train_forward(copy)
    torch.optim.SGD([p for p in copy.parameters() if p.requires_grad], lr=0.1).step()
    assert copy_target.steps == 2 and target.steps == 1
