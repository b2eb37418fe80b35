"""The regularizer as an in-graph gradient (``peft_infosteer.regularizer``): it equals the gradient of the paper's
``L_task - lambda * sum_l mean_t H_l`` (plain autograd), follows whatever the caller does to the loss, keeps the
reported loss the task loss, survives both kinds of gradient checkpointing, and costs nothing in forwards no backward
follows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from reference import (
    build,
    counted_tokens,
    forward_with_plain_entropy,
    forward_with_plain_flux,
    relative_error,
    steering_layers,
    trainable_grads,
)

import peft_infosteer
from peft_infosteer.regularizer import FluxTracker, token_mask

# the paper's lambda; about 37 in the units before 0.2.0 on these 3 layers of d_ff 64 (40 was used then): large enough
# that the regularizer visibly changes the gradient of a tiny random model
LAMBDA = 3.0
torch.manual_seed(0)
IDS = torch.randint(3, 128, (2, 9))
LABELS = IDS.clone()
LABELS[0, :3] = -100  # a prompt
LABELS[1, 7:] = -100  # padding
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": LABELS}


def _reference_grads(batch: dict = BATCH, scale: float = 1.0) -> dict[str, torch.Tensor]:
    model = build(0.0)
    out, entropy = forward_with_plain_entropy(model, batch)
    (scale * (out.loss - LAMBDA * entropy)).backward()
    return trainable_grads(model)


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_gradient_equals_the_plain_autograd_objective(checkpointing):
    reference = _reference_grads()
    model = build(LAMBDA, checkpointing)
    out = model(**BATCH)
    out.loss.backward()  # nothing but the task loss: the regularizer is already in the graph
    assert relative_error(trainable_grads(model), reference) < 1e-6
    assert 0.0 < peft_infosteer.last_flux(model) < 1.0


def test_reported_loss_is_the_task_loss():
    plain = build(0.0)(**BATCH).loss
    steered = build(LAMBDA)(**BATCH).loss
    assert steered.item() == plain.item()


def test_regularizer_changes_the_gradient():
    plain, steered = build(0.0), build(LAMBDA)
    plain(**BATCH).loss.backward()
    steered(**BATCH).loss.backward()
    assert relative_error(trainable_grads(steered), trainable_grads(plain)) > 1e-3


def test_regularizer_follows_what_the_caller_does_to_the_loss():
    # gradient accumulation divides the loss, loss scaling (fp16) multiplies it: the regularizer must follow
    model = build(LAMBDA)
    (model(**BATCH).loss * 0.25).backward()
    assert relative_error(trainable_grads(model), _reference_grads(scale=0.25)) < 1e-6


def test_manual_gradient_accumulation_follows_the_loss():
    """The documented line: divide ``out.loss`` by the accumulation steps, as for plain LoRA."""
    model = build(LAMBDA)
    for i in range(2):
        micro = {k: v[i : i + 1] for k, v in BATCH.items()}
        (model(**micro).loss / 2).backward()
    reference = build(0.0)
    for i in range(2):
        micro = {k: v[i : i + 1] for k, v in BATCH.items()}
        out, entropy = forward_with_plain_entropy(reference, micro)
        ((out.loss - LAMBDA * entropy) / 2).backward()
    assert relative_error(trainable_grads(model), trainable_grads(reference)) < 1e-6


def test_num_items_in_batch_makes_accumulation_token_exact():
    """``num_items_in_batch`` (what transformers' Trainer passes): micro-batches add up to the full batch exactly."""
    model = build(LAMBDA)
    items = int(counted_tokens(BATCH).sum())
    for i in range(2):
        micro = {k: v[i : i + 1] for k, v in BATCH.items()}
        model(**micro, num_items_in_batch=items).loss.backward()
    assert relative_error(trainable_grads(model), _reference_grads()) < 1e-6


def test_loss_computed_outside_the_model_gets_the_per_forward_mean():
    model = build(LAMBDA)
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    logits = model(**inputs).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), LABELS[:, 1:].flatten(), ignore_index=-100).backward()
    # without labels the forward counts the attention mask, with weight lambda per forward
    reference = build(0.0)
    out, entropy = forward_with_plain_entropy(reference, inputs)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), LABELS[:, 1:].flatten(), ignore_index=-100)
    (loss - LAMBDA * entropy).backward()
    assert relative_error(trainable_grads(model), trainable_grads(reference)) < 1e-6


def test_trl_fused_log_probs_are_normalised_like_the_sum_loss():
    """TRL's SFT loss is ``-sum(log_probs) / num_items_in_batch`` from its fused LM head, not the model's loss."""
    from trl.trainer.utils import add_fused_lm_head

    def fused(entropy_weight):
        model = build(entropy_weight)
        add_fused_lm_head(model.get_base_model())
        return model

    items = int(counted_tokens(BATCH).sum()) + 5  # as if other micro-batches of the window held 5 more tokens
    model = fused(LAMBDA)
    out = model(**BATCH, fused_lm_head=True)
    (-out.log_probs.sum() / items * 3.0).backward()  # 3: e.g. the number of processes
    reference = fused(0.0)
    out, entropy = forward_with_plain_entropy(reference, {**BATCH, "fused_lm_head": True})
    count = counted_tokens(BATCH).sum()
    # the regularizer's mean over this forward's tokens, weighted like the loss weighs them: count / items of it
    (3.0 * (-out.log_probs.sum() / items - LAMBDA * entropy * count / items)).backward()
    assert relative_error(trainable_grads(model), trainable_grads(reference)) < 1e-6


def test_forwards_without_backward_do_no_flux_work(monkeypatch):
    calls = []
    original = peft_infosteer.regularizer.fused_information_flux

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_infosteer.regularizer, "fused_information_flux", counting)
    model = build(LAMBDA).eval()
    with torch.no_grad():
        model(**BATCH)
        model.generate(input_ids=IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls == []
    with torch.no_grad(), peft_infosteer.track_flux(model):
        model(**BATCH)
    assert len(calls) == 3  # one per steered layer, when asked
    assert not peft_infosteer.find_infosteer_model(model).flux_tracker.measure  # restored on exit
    calls.clear()
    model.train()
    model(**BATCH).loss.backward()  # a training forward of a regularized model measures
    assert len(calls) == 3


def test_without_regularizer_training_forwards_measure_only_when_asked(monkeypatch):
    model = build(0.0)
    model(**BATCH).loss.backward()
    assert peft_infosteer.last_flux(model) is None
    with peft_infosteer.track_flux(model):
        model(**BATCH).loss.backward()
    assert 0.0 < peft_infosteer.last_flux(model) < 1.0


def test_each_forward_has_its_own_bookkeeping():
    model = build(LAMBDA)
    model(**BATCH).loss.backward()
    both = peft_infosteer.last_flux(model)
    model(**{k: v[:1] for k, v in BATCH.items()}).loss.backward()
    one = peft_infosteer.last_flux(model)
    model(**BATCH).loss.backward()
    assert peft_infosteer.last_flux(model) == pytest.approx(both, abs=1e-4)  # the gains moved nothing: no step
    assert one != pytest.approx(both)
    # the plain model handed back by unload() no longer calls into the tuner
    tracker = peft_infosteer.find_infosteer_model(model).flux_tracker
    plain = model.unload()
    assert not plain._forward_pre_hooks and not plain._forward_hooks
    tracker.last = None
    plain(**BATCH)
    assert tracker.last is None


def test_token_mask_follows_labels_then_attention_mask():
    labels = torch.tensor([[-100, -100, 5, 6, -100]])
    assert token_mask({"labels": labels}).tolist() == [[False, True, True, False, False]]
    assert token_mask({"shift_labels": labels}).tolist() == [[False, False, True, True, False]]
    attention = torch.tensor([[1, 1, 1, 0, 0]])
    assert token_mask({"attention_mask": attention}).tolist() == [[True, True, True, False, False]]
    assert token_mask({"input_ids": attention}) is None


def test_flux_of_the_counted_tokens_only():
    model = build(LAMBDA)
    for batch in (BATCH, {k: v for k, v in BATCH.items() if k != "labels"}, {"input_ids": IDS}):
        with torch.no_grad(), peft_infosteer.track_flux(model):
            _, mean_flux = forward_with_plain_flux(model, batch)
            assert peft_infosteer.last_flux(model) == pytest.approx(float(mean_flux), rel=1e-5)


def test_no_counted_token_gives_no_flux_and_a_finite_zero_regularizer():
    plain, steered = build(0.0), build(LAMBDA)
    batch = {**BATCH, "labels": torch.full_like(IDS, -100)}
    plain(**batch).loss.backward()
    steered(**batch).loss.backward()
    assert peft_infosteer.last_flux(steered) is None
    got, want = trainable_grads(steered), trainable_grads(plain)
    assert all(torch.equal(got[n], want[n]) for n in want)  # the regularizer adds exactly nothing


@pytest.mark.parametrize("batch_size", [1, 3])
def test_sequences_of_length_one(batch_size):
    model = build(LAMBDA)
    ids = torch.randint(3, 100, (batch_size, 1))
    model(input_ids=ids, labels=ids.clone()).loss.backward()  # no next token to predict: nothing counts
    assert peft_infosteer.last_flux(model) is None
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.logits.sum().backward()  # without labels every attended position counts
    assert 0.0 < peft_infosteer.last_flux(model) <= 1.0
    gains = [p.grad for n, p in model.named_parameters() if "infosteer_gain" in n]
    assert gains and all(g is not None and torch.isfinite(g).all() for g in gains)


def test_empty_batch_through_a_steering_layer():
    model = build(LAMBDA, lora=None)
    tracker = peft_infosteer.find_infosteer_model(model).flux_tracker
    tracker.begin({}, with_grad=True, regularizing_layers=3)
    outs = [layer(torch.zeros(0, 5, layer.in_features, requires_grad=True)) for layer in steering_layers(model)]
    tracker.finish({})
    assert all(out.shape[:2] == (0, 5) for out in outs)
    assert peft_infosteer.last_flux(model) is None
    sum(out.sum() for out in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_reentrant_checkpointing_with_two_forwards_before_backward_warns():
    model = build(LAMBDA, checkpointing=True)
    first = model(**BATCH).loss
    with pytest.warns(UserWarning, match="before the backward of the previous one"):
        model(**BATCH)
    first.backward()


@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_without_regularizer_checkpointing_measures_alike_and_warns_nothing(checkpointing, recwarn):
    # lambda = 0 (a pure intervention): a reentrant checkpoint's grad-less first run is where the flux is measured;
    # nothing runs again in the backward, so nothing is out of order between forwards
    model = build(0.0, checkpointing)
    _, want = forward_with_plain_flux(build(0.0), BATCH)
    with peft_infosteer.track_flux(model):
        for _ in range(2):
            model(**BATCH).loss.backward()
            assert peft_infosteer.last_flux(model) == pytest.approx(float(want), rel=1e-5)
    assert not [w for w in recwarn if "InfoSteer" in str(w.message)]


def test_layer_count_follows_the_active_layers():
    # steering only two of three layers: the sum is over those two
    model = build(LAMBDA, layers_to_transform=[0, 2], lora=LoraConfig(r=2, target_modules=["up_proj"]))
    model(**BATCH).loss.backward()
    reference = build(0.0, layers_to_transform=[0, 2], lora=LoraConfig(r=2, target_modules=["up_proj"]))
    out, entropy = forward_with_plain_entropy(reference, BATCH)
    (out.loss - LAMBDA * entropy).backward()
    assert len(steering_layers(model)) == 2
    assert relative_error(trainable_grads(model), trainable_grads(reference)) < 1e-6


@pytest.mark.parametrize("layers", [None, [0, 2]], ids=["all-layers", "two-of-three"])
def test_infosteer_loss_is_minus_lambda_times_the_summed_entropy(layers):
    """The logged value is the paper's term: ``-lambda * sum over steered layers of mean_t H`` (nats)."""
    model = build(LAMBDA, layers_to_transform=layers)
    model(**BATCH)
    _, entropy = forward_with_plain_entropy(build(0.0, layers_to_transform=layers), BATCH)
    entropy = entropy.detach()
    assert float(entropy) > 1.0  # nats over two or three layers of d_ff 64: not the normalised flux
    assert float(peft_infosteer.infosteer_loss(model)) == pytest.approx(-LAMBDA * float(entropy), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_trains_the_regularizer_in_float32(dtype):
    model = build(LAMBDA).to(dtype)
    for layer in steering_layers(model):  # gains stay float32 (model.to casts them; the layer restores them)
        for gain in layer.infosteer_gain.values():
            gain.data = gain.data.float()
    out = model(**BATCH)
    out.loss.backward()
    grads = trainable_grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert peft_infosteer.infosteer_loss(model).dtype == torch.float32
    fp32 = build(LAMBDA)
    fp32(**BATCH)
    assert peft_infosteer.last_flux(model) == pytest.approx(peft_infosteer.last_flux(fp32), abs=5e-3)


def test_tracker_without_a_forward_does_nothing():
    tracker = FluxTracker()
    k = torch.randn(2, 3, 8, requires_grad=True)
    assert tracker.track(k, "abs", 1.0) is k
    assert tracker.begin({}, with_grad=False, regularizing_layers=2) is None
    with pytest.raises(ValueError, match=">= 0"):
        tracker.set_weight(-1.0, True)
