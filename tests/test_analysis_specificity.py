"""Tests of the memory-specificity analysis: H(softmax(v_i W_U)) per memory, the usage-weighted specificity of each
token, its place in the flux report and comparison, the ``flux --specificity`` CLI and the benchmark script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_analysis import ToyLM, build_tokenizer
from test_analysis_cli import workdir  # noqa: F401  (the CLI's tiny model, adapters and texts)
from torch import nn

import peft_infosteer
from peft_infosteer.analysis import (
    FluxReport,
    compare_reports,
    load_reports,
    measure_flux,
    memory_specificity,
    plot_class_differences,
    plot_layer_profile,
    save_reports,
)
from peft_infosteer.cli import main
from peft_infosteer.ops import usage_distribution

ROOT = Path(__file__).resolve().parents[1]  # the benchmarks run as modules from here: python -m benchmarks.<name>


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Independent reference: -sum p log p of softmax over the last dimension, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class ToyHeadLM(ToyLM):
    """:class:`ToyLM` (keys ``k = E[token]``) with its LM head exposed as the output embeddings."""

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_aligned_memory_is_specific_and_zero_memory_is_uniform(tiny):
    model = tiny("llama", num_layers=2, vocab_size=64)
    unembedding = model.get_output_embeddings().weight.detach()  # (V, d_model)
    down = model.model.layers[1].mlp.down_proj.weight  # (d_model, d_ff): column i is memory v_i
    with torch.no_grad():
        down[:, 0] = 1e4 * unembedding[7] / unembedding[7].norm()  # writes (almost) only token 7
        down[:, 1] = 0.0  # writes nothing: P_1 is uniform
    spec = memory_specificity(model)
    h = spec.entropy[1]
    assert spec.layer_names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert [x.shape for x in spec.entropy] == [torch.Size([model.config.intermediate_size])] * 2
    assert h[1].item() == pytest.approx(math.log(64), abs=1e-5) == pytest.approx(spec.max_entropy)
    assert h[0].item() < 1.0 and h[0] == h.min()  # the most specific memory of the layer
    logits_7 = down[:, 0].detach() @ unembedding.t()
    assert int(logits_7.argmax()) == 7
    # every value equals an independent float64 computation of H(softmax(v_i W_U))
    for layer, module in enumerate(m.mlp.down_proj for m in model.model.layers):
        expected = _entropy(module.weight.detach().t() @ unembedding.t())
        torch.testing.assert_close(spec.entropy[layer].double(), expected, atol=2e-5, rtol=0)
    assert spec.layer_means()[1] == pytest.approx(float(h.double().mean()))
    frame = spec.to_dataframe()
    assert len(frame) == 2 * model.config.intermediate_size and frame.entropy.min() == pytest.approx(h[0].item())


def test_chunked_equals_unchunked_and_layer_subset(tiny):
    model = tiny("llama", num_layers=3, vocab_size=50)
    whole = memory_specificity(model, chunk_size=10_000)
    for chunk in (1, 7, None):
        torch.testing.assert_close(memory_specificity(model, chunk_size=chunk).entropy, whole.entropy)
    part = memory_specificity(model, layers=[2, 0], chunk_size=5)
    assert part.layers == [2, 0] and part.layer_names == [whole.layer_names[2], whole.layer_names[0]]
    torch.testing.assert_close(part.entropy, [whole.entropy[2], whole.entropy[0]])
    with pytest.raises(ValueError, match="out of range"):
        memory_specificity(model, layers=[3])
    with pytest.raises(ValueError, match="chunk_size"):
        memory_specificity(model, chunk_size=0)
    # the final-norm variant rescales each v_i (a softmax temperature): different values, still within [0, log V]
    normed = memory_specificity(model, use_final_norm=True)
    assert not torch.allclose(normed.entropy[0], whole.entropy[0])
    assert all(bool(((h >= 0) & (h <= normed.max_entropy + 1e-5)).all()) for h in normed.entropy)


def test_lora_and_infosteer_read_the_effective_memories(tiny):
    def lora():
        return LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)

    base = memory_specificity(tiny("llama", num_layers=2, vocab_size=50))
    torch.manual_seed(0)
    peft_lora = get_peft_model(tiny("llama", num_layers=2, vocab_size=50), lora())
    with_lora = memory_specificity(peft_lora)
    assert not torch.allclose(with_lora.entropy[0], base.entropy[0])  # the LoRA delta is in the memories
    torch.testing.assert_close(memory_specificity(peft_lora.merge_and_unload()).entropy, with_lora.entropy)
    # InfoSteer elevate acts on the keys, not on v_i: an InfoSteer+LoRA adapter has the LoRA model's memories, and
    # with elevate_at_inference=False it merges exactly, into the same memories
    torch.manual_seed(0)
    config = peft_infosteer.InfoSteerConfig(intervention="elevate", elevate_at_inference=False, lora=lora())
    steered = get_peft_model(tiny("llama", num_layers=2, vocab_size=50), config)
    torch.testing.assert_close(memory_specificity(steered).entropy, with_lora.entropy)
    with steered.disable_adapter():
        torch.testing.assert_close(memory_specificity(steered).entropy, base.entropy)
    torch.testing.assert_close(memory_specificity(steered.merge_and_unload()).entropy, with_lora.entropy)


def test_usage_weighted_specificity_per_token_is_p_dot_h(tokenizer):
    vocab, d_ff = len(tokenizer), 6
    torch.manual_seed(0)
    keys = torch.randn(vocab, d_ff)
    keys[:, 0] = 0.0
    one_hot = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    keys[one_hot] = torch.tensor([0.0, 0.0, -3.0, 0.0, 0.0, 0.0])  # this token uses memory 2 only
    model = ToyHeadLM(keys, d_model=4)
    h = memory_specificity(model, target_modules=["mlp.down_proj"]).entropy[0]
    report = measure_flux(model, tokenizer, ["The cat sat on the mat."], target_modules=["mlp.down_proj"],
                          specificity=True)  # fmt: skip
    t = report.texts[0]
    assert report.has_specificity and report.memory_entropy == pytest.approx([float(h.double().mean())])
    expected = usage_distribution(keys[t.token_ids]) @ h
    np.testing.assert_allclose(t.specificity[:, 0], expected.numpy(), rtol=1e-6)
    position = t.token_ids.index(one_hot)
    assert t.specificity[position, 0] == pytest.approx(h[2].item(), rel=1e-6)
    # softmax usage weights by the softmax distribution
    soft = measure_flux(model, tokenizer, ["The cat sat on the mat."], target_modules=["mlp.down_proj"],
                        usage="softmax", usage_temperature=0.5, specificity=True)  # fmt: skip
    expected = usage_distribution(keys[t.token_ids], "softmax", 0.5) @ h
    np.testing.assert_allclose(soft.texts[0].specificity[:, 0], expected.numpy(), rtol=1e-6)
    # the flux itself does not depend on whether the specificity is measured
    plain = measure_flux(model, tokenizer, ["The cat sat on the mat."], target_modules=["mlp.down_proj"])
    np.testing.assert_array_equal(plain.texts[0].flux, t.flux)
    assert plain.texts[0].specificity is None and plain.memory_entropy is None


def test_specificity_of_elevated_keys_and_report_round_trip(tiny, tokenizer, tmp_path):
    model = tiny("llama", num_layers=2, vocab_size=len(tokenizer))
    with torch.no_grad():  # memories from general (small v_i, P_i near uniform) to specific (large v_i)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight *= torch.logspace(0, 3, layer.mlp.down_proj.weight.shape[1])
    texts = ["The cat sat on the mat, and the dog ran.", "What is 2 + 3?"]
    base = measure_flux(model, tokenizer, texts, model_name="base", specificity=True)
    config = peft_infosteer.InfoSteerConfig(intervention="elevate", elevate_fraction=0.25, elevate_scale=4.0)
    steered_model = get_peft_model(model, config)
    steered = measure_flux(steered_model, tokenizer, texts, model_name="elevate", specificity=True)
    # no LoRA: same memories, so the specificity moves only through the usage of the elevated keys
    assert steered.memory_entropy == pytest.approx(base.memory_entropy)
    assert np.abs(steered.texts[0].specificity - base.texts[0].specificity).max() > 1e-2
    for suffix in ("json", "parquet"):
        (loaded_base, loaded) = load_reports(save_reports([base, steered], tmp_path / f"r.{suffix}"))
        for a, b in ((base, loaded_base), (steered, loaded)):
            assert b.memory_entropy == a.memory_entropy
            for x, y in zip(a.texts, b.texts):
                np.testing.assert_array_equal(x.specificity, y.specificity)
    legacy = FluxReport.from_dict({k: v for k, v in base.to_dict().items() if k != "memory_entropy"})
    assert legacy.memory_entropy is None  # a report written before the specificity existed still loads

    comparison = compare_reports([base, steered], reference="base", n_boot=50)
    diffs = comparison.specificity_differences
    assert diffs is not None and comparison.specificity_residual_differences is not None
    tokens = comparison.tokens
    paired = (
        tokens.loc[tokens.model == "elevate", "specificity"].to_numpy()
        - tokens.loc[tokens.model == "base", "specificity"].to_numpy()
    )
    row = diffs[(diffs.model == "elevate") & (diffs.token_class == "all")].iloc[0]
    assert row.mean_diff == pytest.approx(float(np.nanmean(paired))) and row.ci_low <= row.mean_diff <= row.ci_high
    assert "specificity_residual" in tokens.columns
    layers = comparison.layers
    assert {"mean_specificity", "memory_entropy"} <= set(layers.columns)
    assert layers.loc[layers.model == "base", "memory_entropy"].tolist() == pytest.approx(base.memory_entropy)
    assert "Usage-weighted memory specificity" in comparison.to_markdown()
    written = {p.name for p in comparison.save_tables(tmp_path / "tables")}
    assert {"specificity_summary.csv", "specificity_differences.csv"} <= written
    plot_layer_profile(layers, value="mean_specificity", path=tmp_path / "layers", formats=("png",))
    plot_class_differences(diffs, value="specificity (nats)", path=tmp_path / "diffs", formats=("png",))
    assert (tmp_path / "layers.png").is_file() and (tmp_path / "diffs.png").is_file()
    # without the specificity there are no specificity tables, and the layer table has no such columns
    plain = compare_reports([measure_flux(model, tokenizer, texts, model_name="base")], n_boot=10)
    assert plain.specificity_summary is None and "mean_specificity" not in plain.layers.columns
    with pytest.raises(ValueError, match="mean_specificity"):
        plot_layer_profile(plain.layers, value="mean_specificity")


def test_flux_cli_writes_the_specificity(workdir, capsys):  # noqa: F811
    out = workdir / "out-specificity"
    args = ["flux", "--model", str(workdir / "model"), "--texts", str(workdir / "texts.jsonl"), "--out", str(out)]
    args += ["--adapter", str(workdir / "sft-lora"), "--n-boot", "50", "--no-progress", "--specificity"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("usage-weighted memory specificity"))
    values = json.loads(line.split(": ", 1)[1])
    assert set(values) == {"base", "sft-lora"} and all(0 < v < math.log(200_000) for v in values.values())
    reports = load_reports(out / "report.json")
    assert all(r.has_specificity for r in reports)
    assert reports[0].memory_entropy != reports[1].memory_entropy  # the LoRA on down_proj changed the memories
    for name in ("specificity_summary.csv", "specificity_differences.csv", "specificity_layers.png",
                 "specificity_differences.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "Usage-weighted memory specificity" in (out / "summary.md").read_text()
    # without the flag: no specificity anywhere
    plain = workdir / "out-plain"
    assert main(["flux", "--model", str(workdir / "model"), "--texts", str(workdir / "texts.jsonl"), "--out",
                 str(plain), "--n-boot", "10", "--no-progress"]) == 0  # fmt: skip
    assert not load_reports(plain / "report.json")[0].has_specificity
    assert not (plain / "specificity_summary.csv").exists()


@pytest.fixture(scope="module")
def tiny_smol_dir(tmp_path_factory):
    """A tiny random Llama saved with the real SmolLM2 tokenizer (chat template included), as the benchmarks use."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_infosteer.assets import MissingAssetError, smollm2_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir())
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("tiny-smol")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
def test_specificity_benchmark_quick_end_to_end(tiny_smol_dir, tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.specificity", "--quick", "--model", str(tiny_smol_dir)]
    cmd += ["--out", str(tmp_path), "--threads", "1", "--quiet", "--train-tasks", "arc_easy,openbookqa"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "specificity").iterdir()
    result = json.loads((out / "results.json").read_text())
    models = {"base", "InfoSteer elevate", "InfoSteer regularizer"}
    for key in ("differences", "residual_differences"):
        rows = [r for r in result[key] if r["token_class"] == "all"]
        assert {r["model"] for r in rows} == models
        assert all(r["ci_low"] <= r["mean_diff"] <= r["ci_high"] for r in rows)
    assert {r["model"] for r in result["per_model"]} == {"SFT", *models}
    assert all(
        0 < r["usage_weighted_specificity"] <= math.log(result["vocab_size"]) + 1e-4 for r in result["per_model"]
    )
    assert result["adapters"]["InfoSteer elevate"]["intervention"] == "elevate"
    assert result["adapters"]["InfoSteer regularizer"] == {"intervention": "none", "entropy_weight": 0.01}
    assert (out / "specificity.png").is_file() and "specificity - SFT" in (out / "results.md").read_text()
