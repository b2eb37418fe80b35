"""Which tokens count follows the task loss's own tokens in each label layout (``regularizer.token_mask``).

Causal LMs score position ``t`` against label ``t + 1`` (tested in test_regularizer.py); token classification scores
position ``t`` against label ``t``; a seq2seq model's labels are the decoder's, unshifted, and InfoSteer steers only
its decoder (encoder modules are refused at creation). Gradients are checked against plain autograd of the paper's
``L_task - lambda * sum_l mean_t H_l`` over those tokens.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import get_peft_model
from reference import relative_error, steering_layers, trainable_grads
from tiny_models import VOCAB
from transformers import AutoConfig, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForTokenClassification

import peft_infosteer
from peft_infosteer import InfoSteerConfig, InfoSteerLayer, information_flux
from peft_infosteer.regularizer import token_mask

LAMBDA = 3.0


def _token_classifier(seed: int = 0) -> LlamaForTokenClassification:
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForTokenClassification(config)


def _t5(seed: int = 0):
    config = AutoConfig.for_model(
        "t5", d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(config)


def _steered(base, entropy_weight: float, **config):
    torch.manual_seed(1)  # init_weights=False: the same non-identity gains in every copy
    config = InfoSteerConfig(intervention="gain", entropy_weight=entropy_weight, init_weights=False, **config)
    return get_peft_model(base, config).train()


def _plain_entropy_grads(model, batch: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of ``loss - LAMBDA * sum_l mean_(mask) H_l``, by plain autograd on the steered keys."""
    keys: list[torch.Tensor] = []
    handles = [
        layer.base_layer.register_forward_pre_hook(lambda _m, args: keys.append(args[0]))
        for layer in steering_layers(model)
    ]
    try:
        out = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    mask = mask.float()
    entropy = sum((information_flux(k) * mask).sum() / mask.sum() * math.log(k.shape[-1]) for k in keys)
    (out.loss - LAMBDA * entropy).backward()
    return trainable_grads(model)


def test_token_mask_layouts():
    labels = torch.tensor([[3, -100, -100, 5]])
    assert token_mask({"labels": labels}).tolist() == [[False, False, True, False]]  # causal: shifted
    assert token_mask({"labels": labels}, layout="token").tolist() == [[True, False, False, True]]
    assert token_mask({"labels": labels}, layout="seq2seq").tolist() == [[True, False, False, True]]
    encoder_mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    # without labels a seq2seq forward counts the decoder's attention mask, never the encoder's
    assert token_mask({"attention_mask": encoder_mask}, layout="seq2seq") is None
    decoder_mask = torch.tensor([[1, 1, 0]])
    kwargs = {"attention_mask": encoder_mask, "decoder_attention_mask": decoder_mask}
    assert token_mask(kwargs, layout="seq2seq").tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="layout must be one of"):
        token_mask({}, layout="shifted")


def test_token_classification_counts_unshifted_labels():
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 0] = 1  # one label, at position 0: a next-token mask would count nothing in this row
    labels[1, 2:4] = torch.tensor([2, 0])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    model = _steered(_token_classifier(), LAMBDA, task_type="TOKEN_CLS")
    model(**batch).loss.backward()
    got = trainable_grads(model)
    assert peft_infosteer.last_flux(model) is not None

    reference = _steered(_token_classifier(), 0.0, task_type="TOKEN_CLS")
    want = _plain_entropy_grads(reference, batch, labels != -100)
    assert relative_error(got, want) < 1e-6

    plain = _steered(_token_classifier(), 0.0, task_type="TOKEN_CLS")
    plain(**batch).loss.backward()
    assert relative_error(got, trainable_grads(plain)) > 1e-3  # the regularizer acts


def test_token_classification_is_recognised_by_the_model_class_too():
    # no task_type: a bare InfoSteerModel on a ...ForTokenClassification model
    model = _steered(_token_classifier(), LAMBDA)
    assert peft_infosteer.find_infosteer_model(model)._label_layout() == "token"


def test_seq2seq_encoder_modules_are_refused_at_creation():
    base = _t5()
    with pytest.raises(ValueError, match=r"steers only the decoder .* matches encoder modules: encoder\.block\.0") as e:
        get_peft_model(base, InfoSteerConfig(target_modules=["wo"]))
    assert r'target_modules=r".*decoder\..*\.wo"' in str(e.value)  # the fix, ready to paste
    assert not any(isinstance(m, InfoSteerLayer) for m in base.modules())  # refused before touching the model


def test_seq2seq_decoder_counts_its_own_labels():
    torch.manual_seed(0)
    source = torch.randint(3, VOCAB, (2, 7))
    encoder_mask = torch.ones_like(source)
    encoder_mask[1, 5:] = 0
    labels = torch.randint(3, VOCAB, (2, 4))  # decoder length 4 != encoder length 7
    labels[1, 3:] = -100
    batch = {"input_ids": source, "attention_mask": encoder_mask, "labels": labels}
    decoder_only = r".*decoder\..*\.wo"

    model = _steered(_t5(), LAMBDA, target_modules=decoder_only)
    assert all(".decoder." in n or n.startswith("base_model.model.decoder") for n, m in model.named_modules()
               if isinstance(m, InfoSteerLayer))  # fmt: skip
    model(**batch).loss.backward()
    got = trainable_grads(model)
    assert 0.0 < peft_infosteer.last_flux(model) < 1.0

    reference = _steered(_t5(), 0.0, target_modules=decoder_only)
    want = _plain_entropy_grads(reference, batch, labels != -100)
    assert relative_error(got, want) < 1e-6


def test_a_training_forward_without_labels_says_which_tokens_count_once():
    from tiny_models import tiny_model

    model = get_peft_model(tiny_model(), InfoSteerConfig(intervention="gain", entropy_weight=0.1)).train()
    ids = torch.randint(1, VOCAB, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.warns(UserWarning, match="got no labels, so the regularizer counts every token of the attention mask"):
        model(**batch).logits.sum().backward()
    with warnings.catch_warnings():
        # once per model; with labels, or without the regularizer, there is nothing to say
        warnings.filterwarnings("error", message="InfoSteer: a training forward got no labels")
        model(**batch).logits.sum().backward()
        fresh = get_peft_model(tiny_model(), InfoSteerConfig(intervention="gain", entropy_weight=0.1)).train()
        fresh(**batch, labels=ids).loss.backward()
        unregularized = get_peft_model(tiny_model(), InfoSteerConfig(intervention="gain", entropy_weight=0.0))
        unregularized.train()(**batch).logits.sum().backward()
