"""``push_to_hub`` / ``save_pretrained`` of an InfoSteer adapter: the model card says how to load it (upload mocked)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors

from peft_infosteer import InfoSteerConfig


class FakeHfApi:
    """Records what ``push_to_hub`` would upload; no network."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.commits: list[dict[str, bytes]] = []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        return None

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
        self.commits.append(files)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1", oid="1")


@pytest.fixture
def hub(monkeypatch):
    api = FakeHfApi()
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    existing: dict[str, str] = {}
    load_local = transformers_hub.ModelCard.load

    def load_card(repo_id, **kwargs):
        if Path(repo_id).is_file():
            return load_local(repo_id, **kwargs)
        if repo_id not in existing:
            raise transformers_hub.EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(existing[repo_id])

    monkeypatch.setattr(transformers_hub.ModelCard, "load", staticmethod(load_card))
    api.existing = existing
    return api


def _model(tiny, tmp_path, **config_kwargs):
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "tiny-llama"
    tiny("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = InfoSteerConfig(
        intervention="gain",
        entropy_weight=0.25,
        lora=LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"),
        task_type="CAUSAL_LM",
        **config_kwargs,
    )
    return get_peft_model(base, config), str(base_dir)


def _check_card(text: str, base: str, repo_id: str | None = None) -> ModelCard:
    card = ModelCard(text)
    assert "pip install peft-infosteer" in card.text
    assert "a start-up hook of the package registers it" in card.text and "KeyError: 'INFOSTEER'" in card.text
    assert "This is an **InfoSteer** adapter" in card.text
    assert "AutoPeftModelForCausalLM.from_pretrained" in card.text and "PeftModel.from_pretrained" in card.text
    if repo_id is not None:
        assert f'from_pretrained("{repo_id}")' in card.text
    for setting in ("entropy_weight", "intervention", "usage", "lora.r", "lora.lora_alpha", "lora.target_modules"):
        assert f"| `{setting}` |" in card.text, setting
    assert "| `entropy_weight` | 0.25 |" in card.text
    assert "| `intervention` | gain |" in card.text
    assert "| `target_modules` | `mlp.down_proj` |" in card.text
    assert "| `lora.r` | 4 |" in card.text and "| `lora.lora_alpha` | 16 |" in card.text
    # "all-linear" as PEFT resolved it on this model
    linears = "`down_proj`, `gate_proj`, `k_proj`, `o_proj`, `q_proj`, `up_proj`, `v_proj` (14 modules)"
    assert f"| `lora.target_modules` | {linears} |" in card.text
    tags = card.data.tags
    assert {"peft", "infosteer", "lora", f"base_model:adapter:{base}"} <= set(tags)
    assert card.data.library_name == "peft"
    assert card.data.base_model == base
    assert card.text.count("## InfoSteer adapter") == 1
    return card


def test_push_to_hub_uploads_card_config_and_weights(tiny, tmp_path, hub):
    model, base = _model(tiny, tmp_path)
    model.push_to_hub("me/infosteer-tiny")
    assert hub.repos == ["me/infosteer-tiny"]
    (files,) = hub.commits
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    card = _check_card(files["README.md"].decode(), base, repo_id="me/infosteer-tiny")
    # PEFT's own card content survives transformers' card replacement
    assert "PEFT" in card.text and card.data.pipeline_tag == "text-generation"
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "INFOSTEER" and config["entropy_weight"] == 0.25
    weights = load_safetensors(files["adapter_model.safetensors"])
    assert any(k.endswith("infosteer_gain") for k in weights) and any("lora_A" in k for k in weights)


def test_push_to_existing_repo_keeps_its_card_and_does_not_duplicate(tiny, tmp_path, hub):
    model, _ = _model(tiny, tmp_path)
    hub.existing["me/adapter"] = "---\nlicense: apache-2.0\ntags:\n- my-tag\n---\n\n# My adapter\n\nMy own notes.\n"
    model.push_to_hub("me/adapter")
    first = hub.commits[-1]["README.md"].decode()
    hub.existing["me/adapter"] = first
    model.base_model.peft_config["default"].entropy_weight = 0.5
    model.push_to_hub("me/adapter", tags=["extra"])
    second = hub.commits[-1]["README.md"].decode()
    for text in (first, second):
        card = ModelCard(text)
        assert "My own notes." in card.text and card.data.license == "apache-2.0"
        assert {"my-tag", "peft", "infosteer"} <= set(card.data.tags)
        assert card.text.count("## InfoSteer adapter") == 1
    assert "| `entropy_weight` | 0.5 |" in second and "| `entropy_weight` | 0.25 |" not in second
    assert "extra" in ModelCard(second).data.tags


def test_save_pretrained_readme_has_the_same_note(tiny, tmp_path):
    model, base = _model(tiny, tmp_path)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    _check_card((out / "README.md").read_text(), base)
    model.save_pretrained(out)  # saving again refreshes, never duplicates
    _check_card((out / "README.md").read_text(), base)


def test_flatten_settings_are_listed(tiny, tmp_path):
    model, _ = _model(tiny, tmp_path)
    model.base_model.peft_config["default"].intervention = "flatten"
    model.base_model.peft_config["default"].flatten_strength = 0.3
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| `flatten_strength` | 0.3 |" in text and "| `mergeable` | no (`flatten`" in text


@pytest.mark.parametrize("at_inference", [True, False])
def test_elevate_settings_are_listed(tiny, tmp_path, at_inference):
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    config = InfoSteerConfig(elevate_fraction=0.02, elevate_scale=2.0, elevate_at_inference=at_inference, lora=lora)
    model = get_peft_model(tiny("llama"), config)
    model.save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| `intervention` | elevate |" in text and "| `elevate_fraction` | 0.02 |" in text
    assert "| `elevate_scale` | 2.0 |" in text and "| `elevate_rank` | magnitude |" in text
    assert f"| `elevate_at_inference` | {at_inference} |" in text
    assert ("| `mergeable` | yes |" in text) is not at_inference
    assert ("`elevate_at_inference` is true" in text) is at_inference


def test_other_adapter_types_are_untouched(tiny, tmp_path, hub):
    model = get_peft_model(tiny("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "lora")
    assert "peft-infosteer" not in (tmp_path / "lora" / "README.md").read_text()
    model.push_to_hub("me/plain-lora")
    assert "peft-infosteer" not in hub.commits[-1]["README.md"].decode()
