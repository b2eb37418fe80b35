"""Tests of the analysis outputs: figures (PNG and SVG), the HTML view and the memory readout."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_analysis import TEXTS, build_tokenizer

from peft_infosteer.analysis import (
    FluxReport,
    compare_reports,
    flux_html,
    measure_flux,
    memory_readout,
    memory_vectors,
    plot_class_differences,
    plot_class_flux,
    plot_flux_vs_surprisal,
    plot_layer_profile,
    plot_token_heatmap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def reports(tokenizer):
    from tiny_models import tiny_model

    model = tiny_model("llama", num_layers=3, vocab_size=len(tokenizer))
    texts = [*TEXTS, "Costs rose by $5 and $7 <b>today</b>.\nNew line & more"]
    base = measure_flux(model, tokenizer, texts, model_name="base")
    other = FluxReport.from_dict({**base.to_dict(), "model": "steered $x$"})
    for t in other.texts:  # a second "model": content tokens get more flux
        t.flux = t.flux + np.where(np.array(t.token_classes)[:, None] == "content", 0.01, 0.0).astype(np.float32)
    return [base, other]


def _assert_figure_files(stem) -> None:
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5000
    text = svg.read_text(encoding="utf-8")
    assert "<svg" in text and len(text) > 5000


def test_plots_written_as_png_and_svg(reports, tmp_path):
    comparison = compare_reports(reports, n_boot=100)
    plot_token_heatmap(reports[0], 3, path=tmp_path / "heatmap")
    plot_class_flux(comparison.summary, path=tmp_path / "class_flux")
    plot_class_flux(comparison.residual_summary, value="mean_residual", path=tmp_path / "residual")
    plot_class_differences(comparison.differences, path=tmp_path / "differences")
    plot_flux_vs_surprisal(comparison.tokens, path=tmp_path / "scatter")
    plot_layer_profile(comparison.layers, path=tmp_path / "layers")
    for stem in ("heatmap", "class_flux", "residual", "differences", "scatter", "layers"):
        _assert_figure_files(tmp_path / stem)


def test_heatmap_labels_and_legends(reports):
    text = reports[0].text(3)
    fig = plot_token_heatmap(reports[0], 3, max_tokens=text.num_tokens - 1)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == text.num_tokens - 1
    assert labels[0].endswith(" 0") and labels[-1].endswith(f" {len(labels) - 1}")
    assert f"of {text.num_tokens}" in ax.get_title()  # says that the text is cut
    assert r"\$" in "".join(labels)  # a "$" in a token must not start matplotlib math mode
    assert "flux" in fig.axes[1].get_ylabel()  # the colour bar has a label with units
    fig = plot_class_flux(compare_reports(reports, n_boot=50).summary)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["base", r"steered \$x\$"]


def test_html_is_self_contained_and_escaped(reports, tmp_path):
    page = flux_html(reports, 3, path=tmp_path / "t3.html")
    assert (tmp_path / "t3.html").read_text(encoding="utf-8") == page
    lowered = page.lower()
    for external in ("http://", "https://", "<script", "<link", "src=", "@import", "url("):
        assert external not in lowered
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # token text is escaped
    assert page.count('class="tok') == 2 * reports[0].text(3).num_tokens
    assert 'title="pos 1 |' in page and "surprisal" in page and "<style>" in page
    assert "<h2>steered $x$</h2>" in page


def test_memory_readout_shapes_and_order(tiny, tokenizer):
    model = tiny("llama", num_layers=2, vocab_size=len(tokenizer))
    captured = {}
    proj = model.model.layers[1].mlp.down_proj
    hook = proj.register_forward_hook(lambda m, a, o: captured.update(k=a[0][0, -2]))
    ids = tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        model(torch.tensor([ids]))
    hook.remove()
    readout = memory_readout(model, tokenizer, TEXTS[0], layer=1, position=-2, top_k=6, top_tokens=4)
    assert (readout.layer, readout.layer_name, readout.position) == (1, "model.layers.1.mlp.down_proj", len(ids) - 2)
    assert len(readout.memories) == 6 and all(len(m.top_tokens) == len(m.top_token_ids) == 4 for m in readout.memories)
    scores = proj.weight.norm(dim=0) * captured["k"].abs()  # |k_i| * ||v_i||, v_i = column i
    top = torch.topk(scores, 6)
    assert [m.index for m in readout.memories] == top.indices.tolist()
    np.testing.assert_allclose([m.score for m in readout.memories], top.values.detach().numpy(), rtol=1e-5)
    assert all(a.score >= b.score for a, b in zip(readout.memories, readout.memories[1:]))
    best = readout.memories[0]
    signed = torch.sign(captured["k"][best.index]) * proj.weight[:, best.index]
    assert best.top_token_ids == torch.topk(model.lm_head.weight @ signed, 4).indices.tolist()
    assert 0 < sum(m.share for m in readout.memories) <= 1 + 1e-6
    df = readout.to_dataframe()
    assert list(df["index"]) == [m.index for m in readout.memories]
    normed = memory_readout(model, tokenizer, TEXTS[0], layer=1, position=-2, top_k=6, use_final_norm=True)
    assert [m.index for m in normed.memories] == top.indices.tolist()
    with pytest.raises(ValueError, match="layer must be"):
        memory_readout(model, tokenizer, TEXTS[0], layer=5)


def test_memory_vectors_conv1d_and_lora(tiny):
    gpt2 = tiny("gpt2", num_layers=1)
    c_proj = gpt2.transformer.h[0].mlp.c_proj  # Conv1D stores (in, out): memories are rows
    assert torch.equal(memory_vectors(c_proj), c_proj.weight)
    llama = tiny("llama", num_layers=1)
    peft_model = get_peft_model(llama, LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False))
    lora_proj = peft_model.get_base_model().model.layers[0].mlp.down_proj
    merged = copy.deepcopy(peft_model).merge_and_unload().model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(memory_vectors(lora_proj), merged.t())
    with peft_model.disable_adapter():
        torch.testing.assert_close(memory_vectors(lora_proj), lora_proj.get_base_layer().weight.t())
