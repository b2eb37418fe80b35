"""Integration on the real SmolLM2-135M-Instruct: InfoSteer + LoRA, a few AdamW steps on real ARC-Easy chats,
save, reload in a fresh process, identical logits."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from peft_infosteer import InfoSteerConfig, infosteer_loss, last_flux

# the paper's lambda; about 0.1 in the units before 0.2.0 on SmolLM2's 30 layers of d_ff 1536 (0.1 was used then)
LAMBDA = 5e-4

pytestmark = pytest.mark.real_model


def _chat_batch(tokenizer, docs):
    """Chat-formatted (user: question + options, assistant: answer) with loss on the assistant turn only."""
    rows = []
    for doc in docs:
        options = "\n".join(f"- {c}" for c in doc["choices"])
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        # a short system turn: SmolLM2's template would otherwise insert its default one (CPU time matters here)
        system = {"role": "system", "content": "Answer with one option."}
        user = {"role": "user", "content": f"{question}\nOptions:\n{options}"}
        answer = {"role": "assistant", "content": doc["choices"][doc["gold"]]}
        prompt = tokenizer.apply_chat_template([system, user], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([system, user, answer], tokenize=False)
        assert full.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_infosteer_lora_train_save_reload(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_infosteer.assets import MissingAssetError, load_task_docs

    try:
        docs = load_task_docs("arc_easy")[:40]
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    # the two shortest of the first 40 questions: a real batch, but cheap on 2 CPU cores
    docs = sorted(docs, key=lambda d: len(d["query"]) + sum(len(c) for c in d["choices"]))[:2]
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = _chat_batch(tokenizer, docs)
    assert (batch["labels"] != -100).sum() >= 2

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    config = InfoSteerConfig(
        intervention="gain",
        entropy_weight=LAMBDA,
        lora=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    steered = [n for n, _ in model.named_modules() if n.endswith("mlp.down_proj") and hasattr(_, "infosteer_gain")]
    assert len(steered) == base.config.num_hidden_layers == 30
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=2e-3)

    model.train()
    task_losses, fluxes = [], []
    for _ in range(3):
        out = model(**batch)
        fluxes.append(last_flux(model))
        # its value, for logging: the paper's -lambda * sum over the 30 layers of the mean entropy (d_ff 1536)
        assert infosteer_loss(model).item() == pytest.approx(-LAMBDA * 30 * math.log(1536) * fluxes[-1], rel=1e-5)
        optimizer.zero_grad()
        out.loss.backward()  # the regularizer is in this backward
        optimizer.step()
        task_losses.append(out.loss.item())
    assert all(0.0 < f < 1.0 for f in fluxes)
    assert task_losses[-1] < task_losses[0], task_losses
    gains = [n for n in trainable if "infosteer_gain" in n]
    assert all(not torch.equal(trainable[n], before[n]) for n in gains)
    assert sum(not torch.equal(p, before[n]) for n, p in trainable.items()) == len(trainable)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.save_pretrained(tmp_path / "adapter")
    save_file({"logits": expected.contiguous(), **{k: v for k, v in batch.items()}}, tmp_path / "expected.safetensors")

    script = f"""
        import peft_infosteer
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        data = load_file({str(tmp_path / "expected.safetensors")!r})
        base = AutoModelForCausalLM.from_pretrained({str(smollm2_dir)!r}, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        assert torch.equal(logits, data["logits"]), (logits - data["logits"]).abs().max()
        print("OK")
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-1] == "OK"
