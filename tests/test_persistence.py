"""Save, then load in a fresh process: bit-identical logits for pure InfoSteer, InfoSteer + LoRA, fp32 and 4-bit."""

from __future__ import annotations

import json
import math
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

from peft_infosteer import InfoSteerConfig, __version__, find_infosteer_model

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
    """Tiny base on disk plus five trained adapters and their logits before saving."""
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
        # the defaults: the paper's elevate (acting at inference too) on LoRA
        "elevate_lora": (None, InfoSteerConfig(lora=lora, task_type="CAUSAL_LM")),
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
    for name in ("pure", "lora", "flatten_lora", "q4_lora", "elevate_lora"):
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

        for name in ("pure", "lora", "flatten_lora", "q4_lora", "elevate_lora"):
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
    assert lines.count("OK") == 6, lines


def test_same_process_reload_with_new_adapter_name(saved):
    """Loading under another adapter name maps the keys back correctly (nested LoRA included)."""
    from safetensors.torch import load_file

    expected = load_file(saved / "expected.safetensors")
    base = AutoModelForCausalLM.from_pretrained(saved / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, saved / "lora", adapter_name="mine")
    assert list(model.peft_config) == ["mine"]
    assert torch.equal(_logits(model), expected["lora"])


# ---- adapters written before 0.2.0: lambda in the old units (weight of the mean normalised flux) -------------------

LEGACY_LAMBDA = 100.0  # the default of peft-infosteer 0.1.0
D_FF = 64  # of reference.build's tiny Llama (3 layers)


def _legacy_dir(root: Path, **fields) -> Path:
    """The adapter of ``reference.build(0.0)`` with its config rewritten as peft-infosteer 0.1.0 wrote it."""
    from reference import build

    source = root / "current"
    if not source.exists():
        tiny_model("llama", num_layers=3, seed=0).save_pretrained(root / "base")
        build(0.0).save_pretrained(source)  # entropy_weight 0: the plain-autograd reference loads this one
    target = root / ("legacy-" + "-".join(f"{k}={v}" for k, v in sorted(fields.items())))
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(infosteer_version="0.1.0", entropy_weight=LEGACY_LAMBDA, max_entropy_weight=1e4, **fields)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def _load(root: Path, adapter: Path, **kwargs) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter, **kwargs)


def test_legacy_lambda_is_converted_and_trains_the_old_gradient_in_a_fresh_process(tmp_path):
    legacy = _legacy_dir(tmp_path)
    script = f"""
        import math
        import peft_infosteer
        import torch
        from peft import PeftModel
        from reference import forward_with_plain_flux, relative_error, trainable_grads
        from transformers import AutoModelForCausalLM

        root = {str(tmp_path)!r}
        ids = torch.tensor({IDS.tolist()!r})
        batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}}

        def load(path):
            base = AutoModelForCausalLM.from_pretrained(root + "/base", dtype=torch.float32)
            return PeftModel.from_pretrained(base, path, is_trainable=True).train()

        model = load({str(legacy)!r})
        config = model.peft_config["default"]
        assert math.isclose(config.entropy_weight, {LEGACY_LAMBDA} / (3 * math.log({D_FF})), rel_tol=1e-12)
        assert math.isclose(config.max_entropy_weight, 1e4 / (3 * math.log({D_FF})), rel_tol=1e-12)
        assert config.infosteer_version == peft_infosteer.__version__ and config.lambda_in_paper_units
        model(**batch).loss.backward()

        # the objective of 0.1.0, written from its definition: L_task - lambda_old * mean over layers and tokens of F
        reference = load(root + "/current")
        assert reference.peft_config["default"].entropy_weight == 0.0
        out, mean_flux = forward_with_plain_flux(reference, batch)
        (out.loss - {LEGACY_LAMBDA} * mean_flux).backward()
        error = relative_error(trainable_grads(model), trainable_grads(reference))
        assert error < 1e-5, error  # float32 noise; a lambda off by even 1% would be off by about 1e-4
        # and the regularizer acts: without it the gradient is another one
        plain = load(root + "/current")
        plain(**batch).loss.backward()
        assert relative_error(trainable_grads(plain), trainable_grads(reference)) > 1e-3
        print("OK")
    """
    assert _run_script(script).split() == ["OK"]


def test_legacy_flux_target_start_and_cap_are_converted_and_so_is_an_old_checkpoint_state(tmp_path):
    legacy = _legacy_dir(tmp_path, flux_target_rise=0.01)
    factor = 3 * math.log(D_FF)
    model = _load(tmp_path, legacy, is_trainable=True)
    config = model.peft_config["default"]
    assert config.entropy_weight == pytest.approx(LEGACY_LAMBDA / factor, rel=1e-12)
    assert config.max_entropy_weight == pytest.approx(1e4 / factor, rel=1e-12)
    tuner = find_infosteer_model(model)
    target = tuner.flux_target
    assert target.start_weight == target.weight == pytest.approx(LEGACY_LAMBDA / factor, rel=1e-12)
    assert target.max_weight == pytest.approx(1e4 / factor, rel=1e-12)
    assert float(tuner.flux_tracker.weight) == pytest.approx(LEGACY_LAMBDA / factor, rel=1e-6)
    # a trainer checkpoint of 0.1.0 holds lambda in the old units (no "lambda_units"): resuming converts it ...
    target.load_state_dict({"weight": 250.0, "flux_start": 0.8, "steps": 3, "last_flux": 0.805})
    assert target.weight == pytest.approx(250.0 / factor) and target.steps == 3 and target.flux_start == 0.8
    assert float(tuner.flux_tracker.weight) == pytest.approx(250.0 / factor, rel=1e-6)
    # ... and one of this version comes back as it was
    state = {**target.state_dict(), "weight": 0.5}
    target.load_state_dict(state)
    assert target.weight == 0.5 and target.state_dict() == state


def test_configs_in_the_current_units_are_never_converted(tmp_path):
    # built in code: the current version, the paper's lambda as given
    config = InfoSteerConfig(intervention="gain", entropy_weight=0.05)
    assert config.infosteer_version == __version__ and config.lambda_in_paper_units
    assert get_peft_model(tiny_model("llama"), config).peft_config["default"].entropy_weight == 0.05

    # a legacy config built in code is converted once, by its first injection, over the layers it steers
    legacy = InfoSteerConfig(
        intervention="gain", entropy_weight=LEGACY_LAMBDA, layers_to_transform=[0, 2], infosteer_version="0.1.0"
    )
    assert not legacy.lambda_in_paper_units
    model = get_peft_model(tiny_model("llama", num_layers=3), legacy)
    converted = LEGACY_LAMBDA / (2 * math.log(D_FF))
    assert model.peft_config["default"].entropy_weight == pytest.approx(converted, rel=1e-12)
    model.add_adapter("again", model.peft_config["default"])  # a second injection of the same config object
    assert model.peft_config["again"].entropy_weight == pytest.approx(converted, rel=1e-12)
    get_peft_model(tiny_model("llama", num_layers=3), legacy)  # and another model
    assert legacy.entropy_weight == pytest.approx(converted, rel=1e-12)

    # an adapter saved after a conversion carries the current version and the converted lambda: loaded as saved
    loaded = _legacy_dir(tmp_path)
    model = _load(tmp_path, loaded)
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    assert saved["infosteer_version"] == __version__
    assert saved["entropy_weight"] == pytest.approx(LEGACY_LAMBDA / (3 * math.log(D_FF)), rel=1e-12)
    again = _load(tmp_path, tmp_path / "resaved")
    assert again.peft_config["default"].entropy_weight == pytest.approx(saved["entropy_weight"], rel=1e-12)
    # a second adapter loaded from a legacy directory is converted on its own, the first one left alone
    again.load_adapter(loaded, adapter_name="old")
    assert again.peft_config["old"].entropy_weight == pytest.approx(saved["entropy_weight"], rel=1e-12)
    assert again.peft_config["default"].entropy_weight == pytest.approx(saved["entropy_weight"], rel=1e-12)
