"""``push_to_hub`` / ``save_pretrained`` of an InfoSteer adapter: the model card says how to load it (upload mocked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
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


_LORA_FILES = """
    import os, sys, torch
    from pathlib import Path
    from types import SimpleNamespace

    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from tiny_models import tiny_model

    out, infosteer_first = Path(sys.argv[1]), sys.argv[2] == "1"
    if infosteer_first:  # an InfoSteer model in the same process, built and saved before the LoRA model
        from peft_infosteer import InfoSteerConfig

        get_peft_model(tiny_model("llama"), InfoSteerConfig(intervention="gain")).save_pretrained(out / "infosteer")
        assert "InfoSteer adapter" in (out / "infosteer" / "README.md").read_text()
    else:
        assert "peft_infosteer" not in sys.modules
    wrapped = [getattr(getattr(PeftModel, n), "_infosteer_hook", False)
               for n in ("create_or_update_model_card", "_upload_modified_files")]
    assert wrapped == [infosteer_first] * 2, wrapped

    pushed = out / "pushed"
    pushed.mkdir(parents=True)

    class Api:  # what push_to_hub would upload, no network
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_branch(self, **kwargs):
            return None

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                source = op.path_or_fileobj
                data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
                (pushed / op.path_in_repo).write_bytes(data)
            return SimpleNamespace(commit_url="https://hub.invalid/me/lora/commit/1", oid="1")

    load_local = ModelCard.load

    def load_card(repo_id, **kwargs):
        if Path(repo_id).is_file():
            return load_local(repo_id, **kwargs)
        raise transformers_hub.EntryNotFoundError(f"{repo_id} has no README.md")

    transformers_hub.hf_api = lambda: Api()
    ModelCard.load = staticmethod(load_card)

    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_model("llama"), lora)
    model.save_pretrained(out / "lora")
    model.push_to_hub("me/lora")
    ids = torch.arange(3, 15).reshape(2, -1)
    with torch.no_grad():
        logits = model(ids).logits
        reloaded = PeftModel.from_pretrained(tiny_model("llama"), out / "lora")(ids).logits
    save_file({"logits": logits.contiguous(), "reloaded": reloaded.contiguous()}, out / "logits.safetensors")
"""


def test_an_unrelated_lora_model_is_byte_for_byte_unaffected(tmp_path):
    """A LoRA model saved, pushed and run after an InfoSteer model exists in the process (the card wrappers installed)
    gives exactly the files and outputs of a fresh process where peft-infosteer was never imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONHASHSEED"] = "0"  # PEFT writes target_modules, a set, in hash order
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(_LORA_FILES)
    outs = {flag: tmp_path / f"infosteer-first-{flag}" for flag in ("1", "0")}
    procs = {
        flag: subprocess.Popen(
            [sys.executable, "-c", code, str(out), flag],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "PEFT_INFOSTEER_AUTOLOAD": flag},  # "0": not even the start-up hook imports the package
        )
        for flag, out in outs.items()
    }
    for proc in procs.values():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    after, fresh = outs["1"], outs["0"]

    def listing(root: Path) -> list[str]:  # the LoRA model's files (not the InfoSteer adapter's)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    files = listing(fresh)
    assert {"lora/README.md", "lora/adapter_model.safetensors", "pushed/README.md", "logits.safetensors"} <= set(files)
    assert [f for f in listing(after) if not f.startswith("infosteer/")] == files
    different = [name for name in files if (after / name).read_bytes() != (fresh / name).read_bytes()]
    assert not different


def test_a_model_unpickled_in_a_fresh_process_saves_the_infosteer_card(tiny, tmp_path):
    """Unpickling runs no ``__init__``: ``InfoSteerModel.__setstate__`` installs the card wrappers instead."""
    import pickle

    model, base = _model(tiny, tmp_path)
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps(model))
    out = tmp_path / "adapter"
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()).save_pretrained(sys.argv[2])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(pickled), str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_card((out / "README.md").read_text(), base)
