"""Save, then load in a fresh process: bit-identical logits for pure InfoSteer, InfoSteer + LoRA, fp32 and 4-bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_infosteer import InfoSteerConfig

TESTS_DIR = Path(__file__).parent
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])


def _run_script(script: str, timeout: float = 180) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, f"fresh process failed ({proc.returncode}):\n{proc.stderr[-5000:]}"
    return proc.stdout


def _randomise(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.2
                p.copy_((1.0 + noise if "infosteer_gain" in name else noise).to(p.dtype))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _four_bit() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny base on disk plus four trained adapters and their logits before saving."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("persistence")
    base_dir = root / "base"
    # bitsandbytes' CPU 4-bit path needs in_features >= its block size (64)
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    cases = {
        "pure": (None, InfoSteerConfig(intervention="gain", entropy_weight=0.2, task_type="CAUSAL_LM")),
        "lora": (None, InfoSteerConfig(intervention="gain", lora=lora, task_type="CAUSAL_LM")),
        "flatten_lora": (
            None,
            InfoSteerConfig(intervention="flatten", flatten_strength=0.3, usage="softmax", lora=lora),
        ),
        "q4_lora": (_four_bit(), InfoSteerConfig(intervention="gain", lora=lora, task_type="CAUSAL_LM")),
    }
    expected = {}
    for seed, (name, (quant, config)) in enumerate(cases.items()):
        kwargs = {"quantization_config": quant, "device_map": "cpu"} if quant else {"dtype": torch.float32}
        base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs).eval()
        model = get_peft_model(base, config)
        _randomise(model, seed)
        expected[name] = _logits(model).contiguous()
        model.save_pretrained(root / name)
    save_file(expected, root / "expected.safetensors")
    return root


def test_saved_files(saved):
    for name in ("pure", "lora", "flatten_lora", "q4_lora"):
        files = sorted(p.name for p in (saved / name).iterdir())
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        config = json.loads((saved / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "INFOSTEER" and config["inference_mode"] is True
        assert config["base_model_name_or_path"] == str(saved / "base")
    assert json.loads((saved / "pure" / "adapter_config.json").read_text())["lora"] is None
    assert json.loads((saved / "lora" / "adapter_config.json").read_text())["lora"]["r"] == 4


def test_fresh_process_reload_is_bit_identical(saved):
    script = f"""
        import sys
        assert "peft" not in sys.modules
        import peft_infosteer  # registers INFOSTEER before peft is imported by anything else
        import torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        root = {str(saved)!r}
        ids = torch.tensor({IDS.tolist()!r})
        expected = load_file(root + "/expected.safetensors")
        four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)

        def logits(model):
            with torch.no_grad():
                return model(input_ids=ids).logits.float()

        def trainable(model):
            return sum(p.numel() for p in model.parameters() if p.requires_grad)

        for name in ("pure", "lora", "flatten_lora", "q4_lora"):
            kwargs = dict(quantization_config=four_bit, device_map="cpu") if name.startswith("q4") else {{}}
            base = AutoModelForCausalLM.from_pretrained(root + "/base", **kwargs)
            model = PeftModel.from_pretrained(base, root + "/" + name)
            assert type(model.peft_config["default"]).__name__ == "InfoSteerConfig"
            assert trainable(model) == 0, (name, trainable(model))
            got = logits(model)
            assert torch.equal(got, expected[name]), (name, (got - expected[name]).abs().max())
            if name.startswith("q4"):
                assert getattr(model.base_model.model, "is_loaded_in_4bit", False)

            auto = AutoPeftModelForCausalLM.from_pretrained(root + "/" + name, **kwargs)
            assert torch.equal(logits(auto), expected[name]), name
            print("OK", name)

        # loading for further training gives trainable gain and LoRA parameters again
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(root + "/base"), root + "/lora", is_trainable=True
        )
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert any("infosteer_gain" in n for n in names) and any("lora_B" in n for n in names)
        assert torch.equal(logits(model), expected["lora"])
        print("OK trainable")
    """
    lines = _run_script(script).split()
    assert lines.count("OK") == 5, lines


def test_same_process_reload_with_new_adapter_name(saved):
    """Loading under another adapter name maps the keys back correctly (nested LoRA included)."""
    from safetensors.torch import load_file

    expected = load_file(saved / "expected.safetensors")
    base = AutoModelForCausalLM.from_pretrained(saved / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, saved / "lora", adapter_name="mine")
    assert list(model.peft_config) == ["mine"]
    assert torch.equal(_logits(model), expected["lora"])
