"""Tests of peft_infosteer.analysis: measurement, hooks, token classes, statistics, comparison and serialisation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_infosteer
from peft_infosteer.analysis import (
    FluxReport,
    TextFlux,
    bootstrap_mean,
    class_differences,
    classify_tokens,
    compare_reports,
    encode_examples,
    find_key_modules,
    load_reports,
    measure_flux,
    save_reports,
    token_table,
)
from peft_infosteer.ops import flatten_keys, information_flux

TEXTS = [
    "The cat sat on the mat, and the dog ran.",
    "What is 2 + 3?",
    "Plants need water and light to grow; without them they die.",
]


# ---- helpers (also used by test_analysis_cli.py and test_analysis_plots.py) -------------------------------------
CORPUS = [
    "The cat sat on the mat, and the dog ran to the park.",
    "What is 2 + 3? It is 5, because 2 + 3 = 5.",
    "Plants need water and light to grow; without them they die.",
    "Which gas do plants take in? Carbon dioxide.",
]

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"


def build_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style 'Ġ' markers) with BOS/EOS/PAD and a chat template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


class ToyLM(nn.Module):
    """A causal LM whose FFN key vector at each position is the embedding row of the token: ``k = E[token]``.

    So the flux of every token is known in closed form from ``keys``.
    """

    def __init__(self, keys: torch.Tensor, d_model: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        vocab, d_ff = keys.shape
        self.embed = nn.Embedding.from_pretrained(keys.clone(), freeze=True)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.fail = False

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        if self.fail:
            raise RuntimeError("boom")
        k = self.embed(input_ids)
        return SimpleNamespace(logits=self.lm_head(self.mlp.down_proj(k)))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def llama(tiny, tokenizer):
    return tiny("llama", num_layers=2, vocab_size=len(tokenizer))


# ---- the measurement --------------------------------------------------------------------------------------------


def test_flux_of_hand_built_layer_equals_closed_form(tokenizer):
    ids = encode_examples(tokenizer, ["The cat sat on the mat."])[0].token_ids
    d_ff = 4
    keys = torch.rand(len(tokenizer), d_ff) + 0.1
    # hand-picked key vectors for the first three tokens and their exact flux H(|k|/sum|k|) / log(d_ff)
    keys[ids[0]] = torch.tensor([1.0, -1.0, 0.0, 0.0])  # two equal memories: log 2 / log 4 = 0.5
    keys[ids[1]] = torch.tensor([2.0, 2.0, -2.0, 2.0])  # uniform usage: 1
    keys[ids[2]] = torch.tensor([0.0, 0.0, 3.0, 0.0])  # one memory: 0
    keys[ids[3]] = torch.zeros(d_ff)  # no usage distribution: undefined
    model = ToyLM(keys)
    report = measure_flux(model, tokenizer, ["The cat sat on the mat."], target_modules=["mlp.down_proj"])
    flux = report.texts[0].flux[:, 0]
    assert report.layer_names == ["mlp.down_proj"]
    np.testing.assert_allclose(flux[:3], [0.5, 1.0, 0.0], atol=1e-6)
    assert math.isnan(flux[3])
    for t in range(4, len(ids)):  # the other tokens: the closed form on their random key rows
        p = keys[ids[t]].double().abs() / keys[ids[t]].double().abs().sum()
        assert flux[t] == pytest.approx(float(-(p * p.log()).sum() / math.log(d_ff)), abs=1e-6)
    # surprisal: -log softmax(logits_{t-1})[token_t] in nats, none for the first token
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    expected = -torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    surprisal = report.texts[0].surprisal
    assert math.isnan(surprisal[0])
    np.testing.assert_allclose(surprisal[1:], expected.numpy(), rtol=1e-5)
    assert report.surprisal_unit == "nats"


def test_flux_equals_ops_on_keys_read_independently(llama, tokenizer):
    captured = {}
    handles = [
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, a[0].detach()))
        for i, layer in enumerate(llama.model.layers)
    ]
    ids = torch.tensor([encode_examples(tokenizer, [TEXTS[0]])[0].token_ids])
    with torch.no_grad():
        llama(ids)
    for h in handles:
        h.remove()
    for usage in ("abs", "softmax"):
        report = measure_flux(llama, tokenizer, [TEXTS[0]], usage=usage, usage_temperature=0.5)
        expected = torch.stack([information_flux(captured[i][0], usage, 0.5) for i in range(2)], dim=-1)
        np.testing.assert_allclose(report.texts[0].flux, expected.numpy(), atol=1e-6)


def test_batching_and_padding_do_not_change_results(llama, tokenizer):
    texts = [*TEXTS, [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]]
    one = measure_flux(llama, tokenizer, texts, batch_size=1)
    batched = measure_flux(llama, tokenizer, texts, batch_size=3)
    assert [t.text_id for t in batched.texts] == [0, 1, 2, 3]  # input order kept although batches sort by length
    for a, b in zip(one.texts, batched.texts):
        assert a.token_ids == b.token_ids and a.num_tokens == b.flux.shape[0]  # no pad positions in the result
        np.testing.assert_allclose(a.flux, b.flux, atol=1e-5)
        np.testing.assert_allclose(a.surprisal, b.surprisal, atol=1e-4, equal_nan=True)


def test_hooks_removed_and_model_unchanged(llama, tokenizer):
    llama.train()
    llama.model.layers[0].eval()  # a mixed train/eval state must come back exactly
    ids = torch.tensor([encode_examples(tokenizer, [TEXTS[1]])[0].token_ids])
    modes = {name: m.training for name, m in llama.named_modules()}
    params = {n: p.detach().clone() for n, p in llama.named_parameters()}
    with torch.no_grad():
        before = llama(ids).logits
    measure_flux(llama, tokenizer, TEXTS)
    assert {name: m.training for name, m in llama.named_modules()} == modes
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in llama.modules())
    assert all(torch.equal(p, params[n]) for n, p in llama.named_parameters())
    with torch.no_grad():
        after = llama(ids).logits
    assert torch.equal(before, after)


def test_hooks_removed_when_forward_raises(tokenizer):
    model = ToyLM(torch.rand(len(tokenizer), 4))
    model.train()
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        measure_flux(model, tokenizer, TEXTS, target_modules=["mlp.down_proj"])
    assert not model.mlp.down_proj._forward_pre_hooks
    assert model.training and torch.is_grad_enabled()


def test_infosteer_adapter_flux_is_flux_of_steered_keys(llama, tokenizer):
    captured = {}
    hook = llama.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: captured.update(k=a[0]))
    ids = torch.tensor([encode_examples(tokenizer, [TEXTS[2]])[0].token_ids])
    with torch.no_grad():
        llama(ids)
    hook.remove()
    base = measure_flux(llama, tokenizer, [TEXTS[2]], model_name="base")
    lora = LoraConfig(r=2, target_modules="all-linear")
    config = peft_infosteer.InfoSteerConfig(intervention="flatten", flatten_strength=0.5, entropy_weight=0.0, lora=lora)
    model = get_peft_model(llama, config)
    hooks_before = {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()}
    with peft_infosteer.track_flux(model):  # analysis forwards run without grad: they measure only when asked
        steered = measure_flux(model, tokenizer, [TEXTS[2]], model_name="steered")
    assert {name: dict(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
    assert steered.layer_names == base.layer_names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # layer 0 sees k' = flatten(k) of the unchanged base keys (nothing upstream is steered)
    expected = information_flux(flatten_keys(captured["k"][0], 0.5))
    np.testing.assert_allclose(steered.texts[0].flux[:, 0], expected.numpy(), atol=1e-6)
    # all layers agree with what the InfoSteer layers themselves recorded in that forward (public API)
    assert peft_infosteer.last_flux(model) == pytest.approx(float(steered.texts[0].flux.mean()), abs=1e-5)
    assert steered.mean_flux() > base.mean_flux()  # flattening raises flux for any non-uniform usage
    with model.disable_adapter():
        disabled = measure_flux(model, tokenizer, [TEXTS[2]], model_name="disabled")
    np.testing.assert_allclose(disabled.texts[0].flux, base.texts[0].flux, atol=1e-6)


def test_find_key_modules_defaults_explicit_and_errors(tiny, tokenizer):
    gpt2 = tiny("gpt2", num_layers=2)
    assert [n for n, _ in find_key_modules(gpt2)] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    llama = tiny("llama", num_layers=2)
    assert [n for n, _ in find_key_modules(llama, ["layers.1.mlp.down_proj"])] == ["model.layers.1.mlp.down_proj"]
    assert len(find_key_modules(llama, r".*\.mlp\.down_proj")) == 2
    with pytest.raises(ValueError, match="no module"):
        find_key_modules(llama, ["nope"])
    with pytest.raises(ValueError, match="no default FFN output projection"):
        find_key_modules(ToyLM(torch.rand(10, 4)))


# ---- tokens and classes -----------------------------------------------------------------------------------------


def test_classes_on_fixed_strings():
    tokens = ["The", " cat", "'s", " well", "-", "known", " theory", " is", " 3", ".", "14", " +", " x", " =", " 2",
              ",", " and", "\n", " 😀", "<s>", " Info", "steer"]  # fmt: skip
    special = [t == "<s>" for t in tokens]
    assert classify_tokens(tokens, special) == [
        "function", "content", "function", "content", "punctuation", "content", "content", "function", "number",
        "number", "number", "operator", "content", "operator", "number", "punctuation", "function", "whitespace",
        "other", "special", "content", "content",
    ]  # fmt: skip
    # markers of raw BPE / SentencePiece pieces are understood too
    assert classify_tokens(["▁the", "Ġcat", "▁-", "Ġ5"]) == ["function", "content", "operator", "number"]


def test_classes_with_real_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    from peft_infosteer.analysis import token_strings

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    sentence = "The ocean, and the sky, are blue; 12 + 30 = 42."
    enc = encode_examples(tok, [sentence])[0]
    strings = token_strings(tok, enc.token_ids)
    assert "".join(strings) == sentence
    by_word = dict(zip([s.strip() for s in strings], classify_tokens(strings, enc.special)))
    assert by_word["The"] == by_word["and"] == by_word["the"] == by_word["are"] == "function"
    assert by_word["ocean"] == by_word["sky"] == by_word["blue"] == "content"
    assert by_word[","] == by_word[";"] == by_word["."] == "punctuation"
    assert by_word["+"] == by_word["="] == "operator"
    assert by_word["4"] == by_word["2"] == "number"  # SmolLM2 splits numbers into digits
    chat = encode_examples(tok, [[{"role": "user", "content": "Hi there"}]])[0]
    chat_strings = token_strings(tok, chat.token_ids)
    classes = classify_tokens(chat_strings, chat.special)
    content = [s for s, c in zip(chat_strings, classes) if c != "special"]
    assert "".join(content).strip() == "Hi there"  # template scaffolding and system prompt are all "special"


def test_chat_scaffolding_is_special(tokenizer):
    enc = encode_examples(tokenizer, [{"messages": [{"role": "user", "content": "the cat"}]}])[0]
    strings = tokenizer.convert_ids_to_tokens(enc.token_ids)
    flagged = {s for s, sp in zip(strings, enc.special) if sp}
    assert "<s>" in flagged and "</s>" in flagged
    assert not any(sp for s, sp in zip(strings, enc.special) if s in ("the", "Ġcat"))
    with pytest.raises(ValueError, match="'text' string or a 'messages' list"):
        encode_examples(tokenizer, [{"prompt": "x"}])


# ---- statistics and comparison ----------------------------------------------------------------------------------


def test_bootstrap_contains_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(0.8, 0.05, size=300)
    groups = np.repeat(np.arange(30), 10)
    a = bootstrap_mean(values, groups, seed=3)
    b = bootstrap_mean(values, groups, seed=3)
    c = bootstrap_mean(values, groups, seed=4)
    assert a == b and (a.low, a.high) != (c.low, c.high)
    assert a.low < a.mean < a.high and a.mean == pytest.approx(values.mean())
    assert a.n == 300 and a.n_groups == 30
    by_token = bootstrap_mean(values, seed=3)
    assert by_token.n_groups == 300 and by_token.low < by_token.mean < by_token.high
    assert math.isnan(bootstrap_mean([math.nan]).mean)


def _synthetic_report(name: str, shift: dict[str, float], seed: int = 0) -> FluxReport:
    rng = np.random.default_rng(seed)
    classes = ["content", "function", "punctuation", "content", "number"]
    texts = []
    for text_id in range(6):
        surprisal = rng.uniform(0.5, 8.0, size=len(classes)).astype(np.float32)
        surprisal[0] = np.nan
        base = 0.8 + 0.01 * np.nan_to_num(surprisal)  # flux linear in surprisal
        flux = (base + np.array([shift.get(c, 0.0) for c in classes]))[:, None].repeat(3, axis=1)
        texts.append(
            TextFlux(text_id, "a b c d e", [10, 11, 12, 13, 14], ["a", " b", ",", " d", " 5"], classes, flux, surprisal)
        )
    return FluxReport(name, ["l0", "l1", "l2"], texts)


def test_paired_differences_and_surprisal_control():
    base = _synthetic_report("base", {})
    steered = _synthetic_report("steered", {"content": 0.02, "punctuation": -0.01})
    comparison = compare_reports([base, steered], n_boot=200)
    diff = comparison.differences.set_index("token_class")
    assert diff.loc["content", "mean_diff"] == pytest.approx(0.02, abs=1e-6)
    assert diff.loc["punctuation", "mean_diff"] == pytest.approx(-0.01, abs=1e-6)
    assert diff.loc["function", "mean_diff"] == pytest.approx(0.0, abs=1e-6)
    assert diff.loc["content", "ci_low"] <= 0.02 <= diff.loc["content", "ci_high"] + 1e-6
    corr = comparison.correlations.set_index("model")
    assert corr.loc["base", "pearson"] == pytest.approx(1.0, abs=1e-5)
    assert corr.loc["base", "slope"] == pytest.approx(0.01, abs=1e-5)
    residual = comparison.residual_summary.set_index(["model", "token_class"])
    assert abs(residual.loc[("base", "content"), "mean_residual"]) < 1e-5  # base flux is all predictability
    steered_residual = residual.loc["steered", "mean_residual"]
    assert steered_residual["content"] > steered_residual["punctuation"]
    md = comparison.to_markdown()
    assert "Difference to base" in md and "| steered | base | content |" in md
    tokens = token_table([base, _synthetic_report("other", {}, seed=1)])
    tokens.loc[tokens["model"] == "other", "token_id"] += 1
    with pytest.raises(ValueError, match="different tokens"):
        class_differences(tokens, "base")


def test_surprisal_fit_leaves_out_template_tokens():
    from peft_infosteer.analysis import add_surprisal_residuals, surprisal_correlation

    tokens = token_table(_synthetic_report("base", {}))  # flux exactly linear in surprisal
    n = len(tokens)
    template = tokens.assign(token_class="special", flux=0.5, surprisal=np.linspace(0.1, 9.0, n), position=100)
    both = pd.concat([tokens, template], ignore_index=True)
    corr = surprisal_correlation(both).iloc[0]
    assert corr["n_tokens"] == n and corr["pearson"] == pytest.approx(1.0, abs=1e-5)
    assert surprisal_correlation(both, exclude_classes=()).iloc[0]["pearson"] < 0.9
    residuals = add_surprisal_residuals(both)
    assert residuals.loc[residuals.token_class != "special", "flux_residual"].abs().max() < 1e-5
    assert residuals.loc[residuals.token_class == "special", "flux_residual"].notna().all()


def test_token_table_drops_first_position():
    report = _synthetic_report("base", {})
    assert len(token_table(report)) == 6 * 4
    assert len(token_table(report, drop_first=False)) == 6 * 5


# ---- serialisation ----------------------------------------------------------------------------------------------


def _assert_reports_equal(a: FluxReport, b: FluxReport) -> None:
    assert (a.model, a.layer_names, a.usage, a.surprisal_unit) == (b.model, b.layer_names, b.usage, b.surprisal_unit)
    assert len(a.texts) == len(b.texts)
    for x, y in zip(a.texts, b.texts):
        assert (x.text_id, x.text, x.token_ids, x.tokens, x.token_classes) == (
            y.text_id, y.text, y.token_ids, y.tokens, y.token_classes,
        )  # fmt: skip
        np.testing.assert_array_equal(x.flux, y.flux)
        np.testing.assert_array_equal(x.surprisal, y.surprisal)
        assert (x.specificity is None) == (y.specificity is None)
        if x.specificity is not None:
            np.testing.assert_array_equal(x.specificity, y.specificity)
    assert a.memory_entropy == b.memory_entropy


def test_dataframe_json_parquet_round_trip(llama, tokenizer, tmp_path):
    report = measure_flux(llama, tokenizer, [*TEXTS, "a \n\n b"], model_name="tiny")
    report.texts[0].flux[1, 0] = np.nan  # an undefined value survives too
    df = report.to_dataframe()
    assert list(df.columns) == [
        "model", "text_id", "position", "token_id", "token", "token_class", "layer", "layer_name", "flux", "surprisal",
        "specificity",
    ]  # fmt: skip
    assert df["specificity"].isna().all() and not report.has_specificity  # measured only when asked
    assert len(df) == sum(t.num_tokens for t in report.texts) * 2
    row = df[(df.text_id == 1) & (df.position == 2) & (df.layer == 1)].iloc[0]
    assert row.flux == report.texts[1].flux[2, 1] and row.token == report.texts[1].tokens[2]
    for suffix in ("json", "parquet"):
        path = report.save(tmp_path / f"r.{suffix}")
        _assert_reports_equal(report, FluxReport.load(path))
    other = FluxReport.from_dict({**report.to_dict(), "model": "other"})
    both = load_reports(save_reports([report, other], tmp_path / "both.parquet"))
    assert [r.model for r in both] == ["tiny", "other"]
    _assert_reports_equal(other, both[1])
    with pytest.raises(ValueError, match="load_reports"):
        FluxReport.load(tmp_path / "both.parquet")
    with pytest.raises(ValueError, match=r"\.json or \.parquet"):
        report.save(tmp_path / "r.csv")


@pytest.mark.real_model
def test_real_smollm2_flux_and_memory_readout(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_infosteer.analysis import memory_readout

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    texts = ["Question: Which gas do plants take in?\nAnswer: carbon dioxide", "The sky is blue, and the sea too."]
    report = measure_flux(model, tok, texts, batch_size=2)
    assert report.num_layers == 30 and report.layer_names[0] == "model.layers.0.mlp.down_proj"
    for t in report.texts:
        assert np.all((t.flux > 0.0) & (t.flux < 1.0))
        assert t.flux[1:].mean() > 0.8  # a trained model spreads its keys over many of its 1536 memories
        assert np.all(np.isfinite(t.surprisal[1:]) & (t.surprisal[1:] >= 0))
    assert {"content", "function", "punctuation"} <= set(report.texts[1].token_classes)
    readout = memory_readout(model, tok, texts[0], layer=20, position=-1, top_k=3, top_tokens=3)
    assert readout.token == " dioxide" and len(readout.memories) == 3
    assert readout.memories[0].score >= readout.memories[1].score >= readout.memories[2].score
