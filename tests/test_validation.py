"""Faults and bad input: each gives one clear error that names the problem; nothing is silently ignored.

Bad config values (in code and in ``adapter_config.json``), target modules that match nothing, truncated or edited
config files, safetensors files with missing, extra or mis-shaped tensors, adapters loaded onto another architecture,
a training run that dies in the middle of saving a checkpoint, and loading without ``import peft_infosteer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import peft_infosteer  # registers INFOSTEER
from peft_infosteer import InfoSteerConfig
from peft_infosteer.validation import check_adapter_dir

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

BAD_VALUES = [
    ("intervention", "sharpen", r"intervention must be one of \('elevate', 'none', 'gain', 'flatten'\)"),
    ("usage", "l2", r"usage must be one of \('abs', 'softmax'\)"),
    ("entropy_weight", -0.1, r"entropy_weight must be a finite number >= 0"),
    ("flatten_strength", 1.5, r"flatten_strength must be a number in \[0, 1\]"),
    ("flatten_strength", -0.2, r"flatten_strength must be a number in \[0, 1\]"),
    ("usage_temperature", 0.0, r"usage_temperature must be a finite number > 0"),
    ("lora", 8, r"lora must be a peft.LoraConfig"),
    # PEFT would steer layer 0 only ([0, "1"]) or fail inside its matching with a TypeError ("0", 1.5)
    ("layers_to_transform", [0, "1"], r"layers_to_transform must be a layer index .* got \[0, '1'\]"),
    ("layers_to_transform", "0", r"layers_to_transform must be a layer index .* got '0'"),
    ("layers_to_transform", 1.5, r"layers_to_transform must be a layer index .* got 1.5"),
]


def _save_adapter(path: Path, lora: bool = True, **overrides) -> Path:
    torch.manual_seed(0)
    kwargs = {"intervention": "gain", "entropy_weight": 0.1, **overrides}
    if lora:
        kwargs["lora"] = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(**kwargs))
    model.save_pretrained(path)
    return path


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / CONFIG).read_text())
    data.update(changes)
    (path / CONFIG).write_text(json.dumps(data))


def _load(path: Path, model_type: str = "llama", **model_kwargs):
    return PeftModel.from_pretrained(tiny_model(model_type, **model_kwargs), str(path))


# ---- config values: in code, and in a saved adapter_config.json -------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES)
def test_bad_config_value_in_code(field, value, message):
    with pytest.raises(ValueError, match=message):
        InfoSteerConfig(**{field: value})


@pytest.mark.parametrize(("field", "value", "message"), BAD_VALUES)
def test_bad_config_value_in_adapter_config_json(tmp_path, field, value, message):
    path = _save_adapter(tmp_path)
    _edit_config(path, **{field: value})
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_lora_entry_of_another_method_in_adapter_config_json(tmp_path):
    path = _save_adapter(tmp_path)
    _edit_config(path, lora={"peft_type": "IA3", "target_modules": ["down_proj"]})
    with pytest.raises(ValueError, match=r"lora must describe a LoRA adapter, got peft_type='IA3'"):
        _load(path)


def test_nested_lora_config_is_validated_the_way_loading_uses_it(tmp_path):
    path = _save_adapter(tmp_path)
    data = json.loads((path / CONFIG).read_text())
    _edit_config(path, lora={**data["lora"], "r": "two"})  # LoraConfig(r="two") itself accepts it
    message = r"InfoSteerConfig.lora: r must be a positive integer, got 'two'"
    with pytest.raises(ValueError, match=message):
        check_adapter_dir(path)
    with pytest.raises(ValueError, match=message):
        _load(path)
    with pytest.raises(ValueError, match=r"InfoSteerConfig.lora: r must be a positive integer, got 0"):
        InfoSteerConfig(lora=LoraConfig(r=0))


def test_check_adapter_dir_refuses_pickle_weights(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(intervention="gain"))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / WEIGHTS).exists()
    with pytest.raises(ValueError, match=r"adapter_model.bin is a pickle weights file, which this check refuses"):
        check_adapter_dir(tmp_path)


def test_add_weighted_adapter_names_infosteer():
    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(intervention="gain"))
    with pytest.raises(NotImplementedError, match=r"add_weighted_adapter is not supported for InfoSteer adapters"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def _qwen3_moe(mlp_only_layers: list[int]):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=128, mlp_only_layers=mlp_only_layers,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_moe_layers_left_unsteered_are_named(recwarn):
    # layers 0 and 2 are dense (Qwen3MoeMLP.down_proj), layer 1 a sparse MoE block whose experts are fused parameters
    config = InfoSteerConfig(target_modules=["mlp.down_proj"], intervention="gain")
    message = r"steers 2 of the 3 layers of model.layers; the mixture-of-experts layers \[1\] stay unsteered: their "
    with pytest.warns(UserWarning, match=message + r"experts \(model.layers.1.mlp.experts \(Qwen3MoeExperts\)\)"):
        model = get_peft_model(_qwen3_moe([0, 2]), config)
    assert sum(isinstance(m, peft_infosteer.InfoSteerLayer) for m in model.modules()) == 2
    # saying which layers are meant silences it
    recwarn.clear()
    get_peft_model(_qwen3_moe([0, 2]), InfoSteerConfig(target_modules=["mlp.down_proj"], layers_to_transform=[0, 2]))
    assert not [w for w in recwarn if "unsteered" in str(w.message)]
    # a dense model where the targets pick some layers: a choice, not a gap
    get_peft_model(tiny_model("llama", num_layers=3), InfoSteerConfig(target_modules=r".*\.1\.mlp\.down_proj"))
    assert not [w for w in recwarn if "unsteered" in str(w.message)]


def test_lora_of_the_wrong_type_in_code():
    from peft import IA3Config

    with pytest.raises(ValueError, match=r"lora must be a peft.LoraConfig .* got IA3Config"):
        InfoSteerConfig(lora=IA3Config(target_modules=["down_proj"]))


def test_target_modules_matching_nothing():
    config = InfoSteerConfig(target_modules=["mlp.no_such_proj"], intervention="gain")
    with pytest.raises(ValueError, match=r"InfoSteer found none of its target modules in this llama model") as info:
        get_peft_model(tiny_model("llama"), config)
    message = str(info.value)
    assert "mlp.no_such_proj" in message and "['mlp.down_proj']" in message  # what was asked, and what exists


def test_lora_target_modules_matching_nothing():
    config = InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match=r"The LoRA stacked in this InfoSteer adapter found none of its target"):
        get_peft_model(tiny_model("llama"), config)


# ---- adapter_config.json: truncated or edited ------------------------------------------------------------------


def test_truncated_adapter_config_json(tmp_path):
    path = _save_adapter(tmp_path)
    text = (path / CONFIG).read_text()
    (path / CONFIG).write_text(text[: len(text) // 2])
    # PEFT parses the file before any InfoSteer code runs: json's own error, a ValueError with line and column
    with pytest.raises(ValueError, match=r"line \d+ column \d+"):
        _load(path)
    # the adapter check (and InfoSteerConfig.from_pretrained) name the file and the likely cause
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON .*truncated"):
        check_adapter_dir(path)


def test_adapter_config_json_with_an_unknown_key(tmp_path):
    path = _save_adapter(tmp_path)
    _edit_config(path, entropy_wieght=0.5)  # a typo must not be dropped with a warning
    with pytest.raises(ValueError, match=r"keys that peft-infosteer .* does not know: \['entropy_wieght'\]"):
        _load(path)


def test_adapter_config_json_that_is_not_an_object(tmp_path):
    path = _save_adapter(tmp_path)
    (path / CONFIG).write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        check_adapter_dir(path)


def test_adapter_config_json_of_another_method(tmp_path):
    path = _save_adapter(tmp_path)
    _edit_config(path, peft_type="LORA")
    with pytest.raises(ValueError, match=r"describes a 'LORA' adapter, not an InfoSteer one"):
        check_adapter_dir(path)


# ---- adapter_model.safetensors: missing, extra, mis-shaped, truncated ------------------------------------------


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def test_weights_file_missing_a_tensor(tmp_path):
    path = _save_adapter(tmp_path)
    dropped = next(k for k in load_file(path / WEIGHTS) if "infosteer_gain" in k)
    _rewrite_weights(path, lambda t: t.pop(dropped))
    with pytest.raises(ValueError, match=r"do not match this model: 1 missing: .*layers\.0\.mlp\.down_proj"):
        _load(path)


def test_weights_file_missing_a_lora_tensor(tmp_path):
    path = _save_adapter(tmp_path)
    dropped = next(k for k in load_file(path / WEIGHTS) if "lora_B" in k)
    _rewrite_weights(path, lambda t: t.pop(dropped))
    with pytest.raises(ValueError, match=r"1 missing: .*lora_B\.default\.weight"):
        _load(path)


def test_weights_file_with_an_extra_tensor(tmp_path):
    path = _save_adapter(tmp_path)
    extra = "base_model.model.model.layers.7.mlp.down_proj.infosteer_gain"
    _rewrite_weights(path, lambda t: t.update({extra: torch.ones(64)}))
    with pytest.raises(ValueError, match=r"1 unexpected: base_model\.model\.model\.layers\.7\.mlp\.down_proj"):
        _load(path)


def test_weights_file_with_a_mis_shaped_tensor(tmp_path):
    path = _save_adapter(tmp_path)
    key = next(k for k in load_file(path / WEIGHTS) if "infosteer_gain" in k)
    _rewrite_weights(path, lambda t: t.update({key: torch.ones(63)}))
    with pytest.raises(
        ValueError, match=r"1 with the wrong shape: .*infosteer_gain\.default: \(63,\) in the file, \(64,\)"
    ):
        _load(path)


def test_truncated_weights_file(tmp_path):
    path = _save_adapter(tmp_path)
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors cannot be read .*truncated or corrupt"):
        _load(path)


def test_missing_weights_file(tmp_path):
    path = _save_adapter(tmp_path)
    (path / WEIGHTS).unlink()
    # PEFT falls back to the Hub and complains about the repo id; the adapter check says what is missing
    with pytest.raises(ValueError):
        _load(path)
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors is missing"):
        check_adapter_dir(path)
    check_adapter_dir(_save_adapter(tmp_path / "complete"))  # a complete adapter passes


def test_a_second_adapter_is_checked_too(tmp_path):
    good = _save_adapter(tmp_path / "good")
    bad = _save_adapter(tmp_path / "bad")
    dropped = next(k for k in load_file(bad / WEIGHTS) if "infosteer_gain" in k)
    _rewrite_weights(bad, lambda t: t.pop(dropped))
    model = _load(good)
    with pytest.raises(ValueError, match=r"InfoSteer adapter 'other' do not match this model: 1 missing"):
        model.load_adapter(str(bad), adapter_name="other")


# ---- an adapter saved for another base model -------------------------------------------------------------------


def test_llama_adapter_onto_gpt2(tmp_path):
    path = _save_adapter(tmp_path, lora=False)
    with pytest.raises(ValueError, match=r"InfoSteer found none of its target modules in this gpt2 model") as info:
        _load(path, "gpt2")
    assert "different architecture" in str(info.value) and "mlp.c_proj" in str(info.value)


def test_llama_lora_stacked_adapter_onto_gpt2(tmp_path):
    path = _save_adapter(tmp_path, lora=True)
    with pytest.raises(ValueError, match=r"The LoRA stacked in this InfoSteer adapter found none .* gpt2 model"):
        _load(path, "gpt2")


def test_adapter_onto_a_model_of_another_size(tmp_path):
    path = _save_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"with the wrong shape: .*different base model"):
        _load(path, intermediate_size=128)


# ---- a training run killed in the middle of saving a checkpoint ------------------------------------------------


class _KilledDuringSave(RuntimeError):
    pass


def test_run_killed_mid_save_leaves_the_previous_checkpoint_loadable_and_resumable(tmp_path, monkeypatch):
    import peft.peft_model
    from datasets import Dataset
    from tiny_sft import chat_rows, chat_tokenizer
    from trl import SFTConfig

    from peft_infosteer import InfoSteerSFTTrainer

    tok = chat_tokenizer()
    data = Dataset.from_list(chat_rows(12))

    def trainer(out: Path) -> InfoSteerSFTTrainer:
        torch.manual_seed(0)
        model = tiny_model("llama", vocab_size=len(tok))
        args = SFTConfig(
            output_dir=str(out), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="steps",
            save_steps=1, report_to=[], use_cpu=True, bf16=False, max_length=48, gradient_checkpointing=False, seed=0,
            dataloader_num_workers=0,
        )  # fmt: skip
        config = InfoSteerConfig(
            intervention="gain", entropy_weight=0.5, lora=LoraConfig(r=2, target_modules="all-linear")
        )
        return InfoSteerSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=config)

    reference = trainer(tmp_path / "reference")
    reference.train()
    expected = {n: p.detach().clone() for n, p in reference.model.named_parameters() if p.requires_grad}

    # the process "dies" half-way through writing checkpoint-2's weights
    real_save = peft.peft_model.safe_save_file
    calls = []

    def dying_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "checkpoint-2" in str(filename):
            real_save(tensors, filename, *args, **kwargs)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise _KilledDuringSave(filename)
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", dying_save)
    out = tmp_path / "run"
    with pytest.raises(_KilledDuringSave):
        trainer(out).train()
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)

    # the half-written checkpoint gives one clear error (PEFT writes the config after the weights, so it is missing);
    # the adapter check also names the truncated weights file
    partial = out / "checkpoint-2"
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at .*checkpoint-2"):
        PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tok)), str(partial))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2/adapter_config.json is missing.*interrupted"):
        check_adapter_dir(partial)
    (partial / CONFIG).write_text((out / "checkpoint-1" / CONFIG).read_text())
    with pytest.raises(ValueError, match=r"checkpoint-2/adapter_model.safetensors cannot be read .*interrupted"):
        check_adapter_dir(partial)
    check_adapter_dir(out / "checkpoint-1")
    previous = out / "checkpoint-1"
    assert (previous / "trainer_state.json").is_file() and (previous / "optimizer.pt").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("llama", vocab_size=len(tok)), str(previous))
    assert isinstance(loaded.base_model, peft_infosteer.InfoSteerModel)

    # resuming from it finishes the run exactly like the uninterrupted one
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=str(previous))
    got = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


# ---- loading without `import peft_infosteer` -------------------------------------------------------------------
