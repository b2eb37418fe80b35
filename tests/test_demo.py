"""`peft-infosteer demo`: what a newcomer sees first (no warnings of ours, samples that show what the tune taught)."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_model, tiny_tokenizer

from peft_infosteer import InfoSteerConfig
from peft_infosteer.commands import demo

# `path:line: Category: message`, the first line Python prints for a warning
_WARNING_LINE = re.compile(r"^(?P<path>\S+?):\d+: (?P<category>\w+Warning): ")
# Known upstream warnings the demo cannot avoid, each with the reason (test_the_upstream_allowances_are_still_needed
# fails once upstream stops, so that the allowance goes with it):
_KNOWN_UPSTREAM = (
    # PEFT 0.21.2's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5.25 deprecates:
    # every PeftModel of a transformers model shows it, a plain LoRA one too.
    re.compile(r"transformers/modeling_utils\.py:\d+: FutureWarning: `is_gradient_checkpointing` is deprecated"),
)
# hidden by Python's default filters outside __main__, so a user sees them only when they come from our own files
_HIDDEN_BY_DEFAULT = ("DeprecationWarning", "PendingDeprecationWarning", "ImportWarning", "ResourceWarning")


def _complaints(text: str) -> list[str]:
    """Lines of `text` (run with ``-W default``) that are a warning a user would see, or one from our own code."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        match = _WARNING_LINE.match(line)
        if match:
            ours = "peft_infosteer" in match["path"]
            upstream_ok = match["category"] in _HIDDEN_BY_DEFAULT or any(p.search(line) for p in _KNOWN_UPSTREAM)
            if ours or not upstream_ok:
                found.append(line)
        elif "[WARNING]" in line or "deprecated" in line.lower():  # logger notices (DeepSpeed, transformers)
            found.append(line)
    return found


def _run_demo(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DS_ACCELERATOR")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-W", "default", "-m", "peft_infosteer.cli", "demo", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def test_complaints_are_ours_or_visible_and_not_the_known_upstream_ones():
    text = "\n".join(
        [
            "/x/peft_infosteer/model.py:3: DeprecationWarning: ours, even if hidden by default",
            "/x/torch/jit/_script.py:365: DeprecationWarning: upstream and hidden by default",
            "/x/transformers/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated",
            "/x/transformers/modeling_utils.py:3314: FutureWarning: `is_gradient_checkpointing` is deprecated and",
            "[2026-01-01] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
            "[transformers] `past_key_values`/`cache_params` are deprecated. Use `cache` instead.",
            "  held-out task loss       4.5781 -> 2.1204",
        ]
    )
    assert [line[:24] for line in _complaints(text)] == [
        "/x/peft_infosteer/model.",
        "/x/transformers/training",
        "[2026-01-01] [WARNING] [",
        "[transformers] `past_key",
    ]


def test_the_upstream_allowances_are_still_needed():
    """Drop an entry of _KNOWN_UPSTREAM when this fails: upstream no longer warns there."""
    assert "is_gradient_checkpointing" in inspect.getsource(PeftModel.__init__)


def test_demo_help_prints_no_warning():
    out = _run_demo("--help")
    assert out.returncode == 0, out.stderr
    assert "--eval-examples" in out.stdout
    assert _complaints(out.stdout + out.stderr) == []


def test_training_arguments_turn_checkpointing_off_without_a_deprecation(tmp_path):
    from trl import SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(
            output_dir=str(tmp_path),
            report_to=[],
            bf16=False,
            use_cpu=True,
            **demo._no_activation_checkpointing(SFTConfig),
        )
    assert args.gradient_checkpointing is False
    assert getattr(args, "activation_checkpointing", False) is False


def test_deepspeed_is_told_the_demo_runs_on_the_cpu(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with demo._deepspeed_accelerator(use_cpu=True):
        assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in os.environ
    with demo._deepspeed_accelerator(use_cpu=False):  # on a GPU DeepSpeed detects it and says nothing
        assert "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the user's choice wins and stays
    with demo._deepspeed_accelerator(use_cpu=True):
        assert os.environ["DS_ACCELERATOR"] == "cuda"
    assert os.environ["DS_ACCELERATOR"] == "cuda"


def _reference_scores(model, tokenizer, doc) -> list[float]:
    """Each option's log-likelihood as the whole reply, from one full forward of question + reply (no cache)."""
    question = [{"role": "user", "content": doc["query"]}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_dict=True)["input_ids"]
    scores = []
    for option in doc["choices"]:
        full = tokenizer.apply_chat_template([*question, {"role": "assistant", "content": option}], return_dict=True)[
            "input_ids"
        ]
        end = full.index(tokenizer.eos_token_id, len(prompt)) + 1  # the reply and the end of its turn
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([full[:end]])).logits[0].log_softmax(-1)
        scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(prompt), end)))
    return scores


def test_option_scores_match_a_full_forward_per_option():
    """The shared question cache and the padded batch of replies give each option's exact log-likelihood."""
    tokenizer = tiny_tokenizer()
    base = tiny_model(vocab_size=len(tokenizer))
    lora = LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)  # a non-identity adapter
    model = get_peft_model(base, InfoSteerConfig(lora=lora, task_type="CAUSAL_LM")).eval()
    doc = {"id": "t/0", "query": "What is 3 plus 3?", "choices": ["It is 6.", "6", "It is 7 plus 3."], "gold": 0}
    scores = demo._option_scores(model, tokenizer, doc)
    torch.testing.assert_close(scores, _reference_scores(model, tokenizer, doc), atol=1e-4, rtol=0)
    assert demo._choice(model, tokenizer, doc) == max(range(3), key=scores.__getitem__)
    with model.disable_adapter():  # the base model's choice comes from the same function, adapter off
        base_scores = demo._option_scores(model, tokenizer, doc)
        torch.testing.assert_close(base_scores, _reference_scores(model, tokenizer, doc), atol=1e-4, rtol=0)
    assert base_scores != scores


_CHOICE = re.compile(r"^ {4}(base model:|with InfoSteer:)\s+(\S.*?)  \((right|wrong)\)$")


@pytest.mark.real_model
@pytest.mark.slow
def test_demo_on_the_real_model_warns_nothing_of_ours_and_shows_base_and_tuned_choices(tmp_path, smollm2_dir):
    """The README's main command, shortened: real SmolLM2 + real data, InfoSteerSFTTrainer, save, reload, samples."""
    out_dir = tmp_path / "demo"
    args = ("--output-dir", str(out_dir), "--max-steps", "2", "--train-examples", "16", "--eval-examples", "4")
    run = _run_demo(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _complaints(run.stdout + run.stderr) == []
    text = run.stdout
    assert "reloaded adapter matches the trained one: yes" in text
    assert "mean information flux" in text
    assert "without an answer" not in text
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert json.loads((out_dir / "adapter_config.json").read_text())["peft_type"] == "INFOSTEER"

    accuracy = re.search(r"accuracy  base model (\d+)/4 -> with InfoSteer (\d+)/4", text)
    assert accuracy, text
    base_right, tuned_right = map(int, accuracy.groups())
    assert ("is not better than the base model" in text) == (tuned_right <= base_right)
    differ = re.search(r"chose differently on (\d+) of the 4 questions \(shown first\)", text)
    assert differ or "chose as the base model did on all 4 questions" in text, text
    blocks = text.split("\n  question: ")[1:]
    assert len(blocks) == 4, text
    changed = []
    for block in blocks:
        lines = block.splitlines()
        options = lines[1].split("options:", 1)[1].strip().split(" | ")
        gold = lines[2].split("gold answer:", 1)[1].strip()
        assert len(options) >= 2 and gold
        choices = [m.groups() for m in map(_CHOICE.match, lines[3:5]) if m]
        assert [who for who, _, _ in choices] == ["base model:", "with InfoSteer:"], block
        for _, choice, verdict in choices:
            assert (verdict == "right") == (choice == gold), block
        changed.append(choices[0][1] != choices[1][1])
    k = int(differ[1]) if differ else 0
    assert changed == [True] * k + [False] * (4 - k), text
