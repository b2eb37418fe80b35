"""``InfoSteerModel``: LoRA stacked inside an InfoSteer adapter (structure, LoRA options, several adapters) and
merging (gain and nested LoRA folded into plain transformers weights)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from peft_infosteer import InfoSteerConfig, InfoSteerLayer
from peft_infosteer.layer import Linear as InfoSteerLinear

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64], [9, 9, 31, 77, 4, 100, 56, 23]])
LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# LoRA on the output projection too: the nested case PEFT's default unload would silently drop
LORA_TARGETS = {"llama": ["q_proj", "up_proj", "down_proj"], "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}


def _randomise(model, seed: int, scale: float = 0.2) -> None:
    """Move every trainable parameter away from its identity init (LoRA B starts at zero, gains at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * scale
                p.copy_(1.0 + noise if "infosteer_gain" in name else noise)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _config(**lora_kwargs) -> InfoSteerConfig:
    lora_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora_kwargs}
    return InfoSteerConfig(intervention="gain", entropy_weight=0.1, lora=LoraConfig(**lora_kwargs))


def test_infosteer_wraps_output_projection_outermost(tiny, tmp_path):
    model = get_peft_model(tiny("llama"), _config(), adapter_name="default")
    inner = model.base_model.model
    for i in range(2):
        down = inner.get_submodule(f"model.layers.{i}.mlp.down_proj")
        assert isinstance(down, InfoSteerLinear)
        assert isinstance(down.base_layer, lora.Linear)
        assert type(down.base_layer.base_layer) is nn.Linear
        assert down.get_base_layer() is down.base_layer.base_layer
        for name in LLAMA_LINEARS - {"down_proj"}:
            parent = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            layer = inner.get_submodule(f"model.layers.{i}.{parent}.{name}")
            assert isinstance(layer, lora.Linear) and not isinstance(layer, InfoSteerLayer)
    assert type(inner.lm_head) is nn.Linear  # all-linear leaves the output head alone
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("infosteer_gain" in n for n in names) == 2
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 2 * len(LLAMA_LINEARS)

    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("mlp.down_proj.infosteer_gain") for k in keys)
    assert any(k.endswith("mlp.down_proj.base_layer.lora_A.weight") for k in keys)
    assert any(k.endswith("self_attn.q_proj.lora_B.weight") for k in keys)
    assert not any("base_layer.weight" in k for k in keys)  # base weights are not saved


def test_gpt2_conv1d_stacking(tiny):
    model = get_peft_model(tiny("gpt2"), _config())
    proj = model.base_model.model.get_submodule("transformer.h.0.mlp.c_proj")
    assert isinstance(proj, InfoSteerLinear) and isinstance(proj.base_layer, lora.Linear)
    assert isinstance(proj.get_base_layer(), Conv1D)
    _randomise(model, 0)
    base = tiny("gpt2")
    assert not torch.allclose(_logits(model), _logits(base))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_options_are_respected(tiny, use_rslora):
    r, alpha, dropout = 8, 24, 0.25
    model = get_peft_model(tiny("llama"), _config(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora))
    layers = [m for m in model.modules() if isinstance(m, lora.LoraLayer)]
    targeted = {
        name.removesuffix(".base_layer").rsplit(".", 1)[-1]  # the LoRA on down_proj sits inside InfoSteer
        for name, m in model.base_model.model.named_modules()
        if isinstance(m, lora.LoraLayer)
    }
    assert targeted == LLAMA_LINEARS
    expected_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    for layer in layers:
        assert layer.r["default"] == r
        assert layer.lora_A["default"].weight.shape[0] == r
        assert layer.scaling["default"] == pytest.approx(expected_scaling)
        assert isinstance(layer.lora_dropout["default"], nn.Dropout) and layer.lora_dropout["default"].p == dropout
    # dropout is live in train mode and off in eval mode
    _randomise(model, 1, scale=0.5)
    model.eval()
    assert torch.equal(_logits(model), _logits(model))
    model.train()
    assert not torch.equal(_logits(model), _logits(model))


def test_specific_lora_targets(tiny):
    model = get_peft_model(tiny("llama"), _config(target_modules=["q_proj", "down_proj"], r=2))
    inner = model.base_model.model
    assert isinstance(inner.get_submodule("model.layers.0.self_attn.q_proj"), lora.Linear)
    assert type(inner.get_submodule("model.layers.0.self_attn.v_proj")) is nn.Linear
    down = inner.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(down, InfoSteerLinear) and isinstance(down.base_layer, lora.Linear)
    # LoRA not on the output projection: InfoSteer wraps the plain Linear
    model = get_peft_model(tiny("llama"), _config(target_modules=["v_proj"]))
    down = model.base_model.model.get_submodule("model.layers.1.mlp.down_proj")
    assert type(down.base_layer) is nn.Linear


def test_lora_changes_outputs_and_identity_at_init(tiny):
    base = tiny("llama")
    model = get_peft_model(tiny("llama"), _config())
    assert torch.equal(_logits(model), _logits(base))  # LoRA B = 0 and gain = 1
    _randomise(model, 2)
    assert not torch.allclose(_logits(model), _logits(base), atol=1e-3)


def test_second_adapter_from_load_adapter_keeps_its_lora(tiny, tmp_path):
    # adapter "b", trained and saved on its own
    donor = get_peft_model(tiny("llama"), _config(r=2, target_modules=["q_proj", "down_proj"]))
    _randomise(donor, 3)
    expected_b = _logits(donor)
    donor.save_pretrained(tmp_path)

    model = get_peft_model(tiny("llama"), _config())
    _randomise(model, 4)
    expected_a = _logits(model)
    model.load_adapter(tmp_path, adapter_name="b")
    assert set(model.peft_config) == {"default", "b"}
    assert all(isinstance(c, InfoSteerConfig) for c in model.peft_config.values())
    down = model.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, InfoSteerLinear) and isinstance(down.base_layer, lora.Linear)
    assert set(down.base_layer.lora_A) == {"default", "b"}
    assert set(down.infosteer_gain) == {"default", "b"}
    q = model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert set(q.lora_A) == {"default", "b"}
    assert torch.count_nonzero(q.lora_B["b"].weight) > 0

    # the active adapter is still "default"
    assert torch.equal(_logits(model), expected_a)
    model.set_adapter("b")
    assert torch.equal(_logits(model), expected_b)
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            assert layer.active_adapters == ["b"], type(layer).__name__
    model.set_adapter("default")
    assert torch.equal(_logits(model), expected_a)


def test_disable_and_delete_adapter_reach_nested_lora(tiny, tmp_path):
    base_logits = _logits(tiny("llama"))
    model = get_peft_model(tiny("llama"), _config())
    _randomise(model, 5)
    with_adapter = _logits(model)
    assert not torch.allclose(with_adapter, base_logits, atol=1e-3)
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)
    assert torch.equal(_logits(model), with_adapter)

    # a second adapter, then delete the first: no trace of it in any layer, nested LoRA included
    other = get_peft_model(tiny("llama"), _config(r=2))
    _randomise(other, 6)
    expected_other = _logits(other)
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="other")
    model.set_adapter("other")
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    for name, layer in model.named_modules():
        if isinstance(layer, lora.LoraLayer):
            assert set(layer.lora_A) == {"other"}, name
            assert layer.active_adapters == ["other"]
        if isinstance(layer, InfoSteerLayer):
            assert set(layer.infosteer_settings) == {"other"} and set(layer.infosteer_gain) == {"other"}
    assert torch.equal(_logits(model), expected_other)
    assert not any("default" in n for n, _ in model.named_parameters())


def test_loaded_second_adapter_round_trips_through_peft_model(tiny, tmp_path):
    """PeftModel.from_pretrained + load_adapter on a fresh base reproduce both adapters exactly."""
    a = get_peft_model(tiny("llama"), _config())
    _randomise(a, 7)
    b = get_peft_model(tiny("llama"), _config(r=2, use_rslora=True))
    _randomise(b, 8)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    loaded = PeftModel.from_pretrained(tiny("llama"), tmp_path / "a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(_logits(loaded), _logits(a))
    loaded.set_adapter("b")
    assert torch.equal(_logits(loaded), _logits(b))


# ---- merging ----------------------------------------------------------------------------------------------------


def _adapter(tiny, model_type: str, **kwargs):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_type], fan_in_fan_out=model_type == "gpt2")
    config = InfoSteerConfig(intervention="gain", lora=lora, **kwargs)
    model = get_peft_model(tiny(model_type), config)
    _randomise(model, 0, scale=0.3)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_and_unload_gives_plain_model_with_same_logits(tiny, model_type):
    base_logits = _logits(tiny(model_type))
    model = _adapter(tiny, model_type)
    expected = _logits(model)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really does something
    merged = model.merge_and_unload()
    assert isinstance(merged, PreTrainedModel) and type(merged).__name__ == type(tiny(model_type)).__name__
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in n or "infosteer_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    proj = merged.get_submodule(
        "model.layers.0.mlp.down_proj" if model_type == "llama" else "transformer.h.0.mlp.c_proj"
    )
    assert type(proj) is (nn.Linear if model_type == "llama" else Conv1D)
    # same parameter names as the base model: loadable by plain transformers
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in tiny(model_type).named_parameters()}
    assert (_logits(merged) - expected).abs().max() <= 1e-4


def test_merged_model_saves_and_loads_with_plain_transformers(tiny, tmp_path):
    model = _adapter(tiny, "llama")
    expected = _logits(model)
    model.merge_and_unload().save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert (_logits(reloaded) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merge_unmerge_round_trip(tiny, model_type):
    model = _adapter(tiny, model_type)
    expected = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.merged for m in layers)
    assert (_logits(model) - expected).abs().max() <= 1e-4
    changed = [n for n, p in model.named_parameters() if n in weights and not torch.equal(p, weights[n])]
    assert any("down_proj" in n or "mlp.c_proj" in n for n in changed)
    model.unmerge_adapter()
    assert not any(m.merged for m in layers)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], atol=1e-5, rtol=1e-5)
    assert (_logits(model) - expected).abs().max() <= 1e-5
    # disabling a merged adapter unmerges it and gives the base outputs back
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), _logits(tiny(model_type)), atol=1e-5, rtol=1e-5)


def test_unload_without_merge_restores_the_base(tiny):
    base_logits = _logits(tiny("llama"))
    model = _adapter(tiny, "llama")
    plain = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert torch.equal(_logits(plain), base_logits)


def test_merging_flatten_raises(tiny):
    model = get_peft_model(
        tiny("llama"), InfoSteerConfig(intervention="flatten", flatten_strength=0.2, entropy_weight=0)
    )
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="flatten"):
            merge()
    # nothing was changed by the refused merge
    assert all(not m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_merging_on_a_4bit_base_raises(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    model = get_peft_model(
        base, InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"]))
    )
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="4-bit"):
            merge()


# ---- PEFT's tuner contract: regressions of defects found by PEFT's own tests and by users -----------------------


def test_deleting_a_merged_adapter_is_refused_like_peft(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain", init_weights=False))
    with torch.no_grad():
        base = model.get_base_model()
        reference = _logits(tiny("llama"))
    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(base), reference, atol=1e-6, rtol=1e-6)  # the base is intact
    model.delete_adapter("default")


def test_loading_a_second_adapter_keeps_the_trainable_flags_of_the_first(tiny, tmp_path):
    config = InfoSteerConfig(lora=LoraConfig(r=2, target_modules="all-linear"))
    get_peft_model(tiny("llama"), config).save_pretrained(tmp_path)
    model = get_peft_model(tiny("llama"), InfoSteerConfig(lora=LoraConfig(r=2, target_modules="all-linear")))
    before = {n: p.requires_grad for n, p in model.named_parameters() if ".default" in n}
    assert any(before.values())
    model.load_adapter(str(tmp_path), adapter_name="ref")  # is_trainable=False: "ref" is frozen ...
    assert {n: p.requires_grad for n, p in model.named_parameters() if ".default" in n} == before  # ... default isn't
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref" in n)
    # and the other way round: a trainable adapter loaded onto an inference model leaves the loaded one frozen
    frozen = PeftModel.from_pretrained(tiny("llama"), str(tmp_path))
    frozen.load_adapter(str(tmp_path), adapter_name="trainable", is_trainable=True)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".default" in n)
    assert any(p.requires_grad for n, p in frozen.named_parameters() if ".trainable" in n)


def test_mixed_adapter_batches_are_refused(tiny):
    model = get_peft_model(tiny("llama"), InfoSteerConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model(input_ids=IDS, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model.generate(input_ids=IDS, adapter_names=["default", "__base__"], max_new_tokens=1)
    model(input_ids=IDS)  # without adapter_names nothing changes


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_applies_to_gains_and_lora(tiny, autocast):
    config = InfoSteerConfig(intervention="gain", lora=LoraConfig(r=2, target_modules=["down_proj"]))
    base = tiny("llama").to(torch.bfloat16)
    if autocast:
        model = get_peft_model(base, config, autocast_adapter_dtype=True)
    else:
        with pytest.warns(UserWarning, match="half precision"):
            model = get_peft_model(base, config, autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}


def test_every_intervention_is_accepted_with_or_without_lora(tiny):
    with pytest.warns(UserWarning, match="nothing to train"):  # all defaults: the paper's elevate, no weights
        model = get_peft_model(tiny("llama"), InfoSteerConfig())
    assert not any(p.requires_grad for p in model.parameters())
    model = get_peft_model(tiny("llama"), InfoSteerConfig(intervention="gain"))  # a trainable gain per coefficient
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 64
    for intervention in ("elevate", "none", "gain", "flatten"):
        get_peft_model(tiny("llama"), InfoSteerConfig(intervention=intervention, lora=LoraConfig(r=2)))
        if intervention != "gain":
            with pytest.warns(UserWarning, match="nothing to train"):
                get_peft_model(tiny("llama"), InfoSteerConfig(intervention=intervention))
            get_peft_model(tiny("llama"), InfoSteerConfig(intervention=intervention, inference_mode=True))


def test_unknown_architecture_names_the_model_type_and_target_modules():
    class Tiny(PreTrainedModel):
        config_class = None

    from transformers import PretrainedConfig

    class MysteryConfig(PretrainedConfig):
        model_type = "mystery"

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    model.config = MysteryConfig()
    with pytest.raises(ValueError, match=r"model_type='mystery'.*target_modules"):
        get_peft_model(model, InfoSteerConfig())
    with pytest.raises(ValueError, match=r"model_type='mystery'.*target_modules"):  # before LoRA is injected
        get_peft_model(model, InfoSteerConfig(lora=LoraConfig(r=2, target_modules=["0"])))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    get_peft_model(model, InfoSteerConfig(target_modules=["2"]))  # naming the output projection works
