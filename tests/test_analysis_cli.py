"""End-to-end test of ``peft-infosteer flux`` on a tiny model saved with a tokenizer, and its error handling."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_analysis import build_tokenizer

import peft_infosteer
from peft_infosteer.analysis import load_reports
from peft_infosteer.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny llama + tokenizer, an InfoSteer gain adapter and a LoRA adapter for it, and a texts file."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("flux_cli")
    tokenizer = build_tokenizer()
    model = tiny_model("llama", num_layers=2, vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    steered = get_peft_model(
        tiny_model("llama", num_layers=2, vocab_size=len(tokenizer)),
        peft_infosteer.InfoSteerConfig(intervention="gain", entropy_weight=0.1),
    )
    torch.manual_seed(1)
    for name, param in steered.named_parameters():
        if "infosteer_gain" in name:
            param.data = torch.rand_like(param) * 2  # a gain far from the identity
    steered.save_pretrained(root / "infosteer-gain")
    lora = get_peft_model(
        tiny_model("llama", num_layers=2, vocab_size=len(tokenizer)),
        LoraConfig(r=2, target_modules=["down_proj", "up_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(root / "sft-lora")

    lines = [
        {"text": "The cat sat on the mat, and the dog ran."},
        {"text": "What is 2 + 3? It is 5."},
        {"messages": [{"role": "user", "content": "Which gas do plants take in?"},
                      {"role": "assistant", "content": "Carbon dioxide."}]},
    ]  # fmt: skip
    (root / "texts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    return root


def test_flux_cli_end_to_end(workdir, capsys):
    out = workdir / "out"
    args = ["flux", "--model", str(workdir / "model"), "--texts", str(workdir / "texts.jsonl"), "--out", str(out)]
    args += ["--adapter", str(workdir / "infosteer-gain"), "--adapter", str(workdir / "sft-lora")]
    args += ["--show-texts", "0", "2", "--n-boot", "100", "--batch-size", "2"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "mean flux" in captured.out and "flux base" in captured.err  # the summary line and the progress bar
    names = ["base", "infosteer-gain", "sft-lora"]
    for name in ("report.json", "report.parquet", "summary.md", "summary.csv", "differences.csv", "correlations.csv",
                 "residual_summary.csv", "text0.html", "text2.html"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    for stem in ("class_flux", "class_flux_residual", "class_differences", "flux_vs_surprisal", "layer_profile",
                 *[f"heatmap_text{i}_{n}" for i in (0, 2) for n in names]):  # fmt: skip
        for suffix in (".png", ".svg"):
            assert (out / f"{stem}{suffix}").stat().st_size > 1000, stem + suffix
    reports = load_reports(out / "report.parquet")
    assert [r.model for r in reports] == names
    assert len(reports[0].texts) == 3 and "special" in reports[0].texts[2].token_classes
    base, gain, lora = (r.texts[0].flux for r in reports)
    assert abs(gain - base).max() > 1e-3 and abs(lora - base).max() > 1e-6  # each adapter was really applied
    assert reports[1].metadata["adapter_path"].endswith("infosteer-gain")
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "| infosteer-gain | base | all |" in summary and "Predictability control" in summary


def test_flux_cli_labels(workdir):
    out = workdir / "out_labels"
    args = ["flux", "--model", str(workdir / "model"), "--texts", str(workdir / "texts.jsonl"), "--out", str(out)]
    args += ["--adapter", str(workdir / "infosteer-gain"), "--labels", "Base", "InfoSteer", "--no-progress"]
    args += ["--max-texts", "1", "--n-boot", "20"]
    assert main(args) == 0
    assert [r.model for r in load_reports(out / "report.json")] == ["Base", "InfoSteer"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "model directory not found"),
        ("missing_adapter", "adapter directory not found"),
        ("missing_texts", "texts file not found"),
        ("bad_texts", 'expected {"text": "..."}'),
        ("unsupported", "unsupported model"),
        ("bad_labels", "--labels needs"),
    ],
)
def test_flux_cli_errors_are_one_line(workdir, tmp_path, capsys, case, message):
    model, texts, extra = workdir / "model", workdir / "texts.jsonl", []
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "missing_adapter":
        extra = ["--adapter", str(tmp_path / "nope")]
    elif case == "missing_texts":
        texts = tmp_path / "nope.jsonl"
    elif case == "bad_texts":
        texts = tmp_path / "bad.jsonl"
        texts.write_text('{"prompt": "x"}\n', encoding="utf-8")
    elif case == "unsupported":
        from transformers import BertConfig

        model = tmp_path / "bert"
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
            model
        )
    elif case == "bad_labels":
        extra = ["--labels", "a", "b", "c"]
    code = main(["flux", "--model", str(model), "--texts", str(texts), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("peft-infosteer flux: error:") and message in err
