"""The compiled path: the InfoSteer math under ``torch.compile`` (the default for users) gives the eager closed-form
results; steered models compile with no graph break; a compiled training step equals the eager one; TRL's
``torch_compile=True`` trains; and where compiling fails the math falls back to eager with one warning."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from reference import build, relative_error, trainable_grads

from peft_infosteer import InfoSteerConfig, ops


@pytest.fixture
def compiled():
    ops.set_compiled_math(True)
    yield
    ops.set_compiled_math(False)


def _keys(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 7, 96, generator=g)
    k[0, 1] = 0.0  # no usage distribution: flux 0, no gradient
    k[1, 2] *= 1e30  # huge, and (next) tiny rows: the formula must not overflow or underflow
    k[2, 3] *= 1e-30
    k[2, 4, :90] = 0.0  # mostly zeros
    return k.to(dtype)


def _flux_and_grad(k: torch.Tensor, usage: str, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = k.clone().requires_grad_(True)
    flux, _ = ops.fused_information_flux(k, usage, temperature)
    (flux * torch.linspace(-1, 2, flux.numel()).reshape(flux.shape)).sum().backward()
    return flux.detach(), k.grad


@pytest.mark.parametrize(
    ("usage", "dtype"), [("abs", torch.float32), ("abs", torch.bfloat16), ("softmax", torch.float32)]
)
def test_compiled_flux_equals_the_eager_closed_form(compiled, usage, dtype):
    k = _keys(dtype) if usage == "abs" else torch.randn(3, 7, 96, dtype=dtype)
    got_flux, got_grad = _flux_and_grad(k, usage, 0.7)
    ops.set_compiled_math(False)
    want_flux, want_grad = _flux_and_grad(k, usage, 0.7)
    torch.testing.assert_close(got_flux, want_flux, atol=2e-6, rtol=1e-5)
    assert got_grad.dtype == want_grad.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    finite = torch.isfinite(want_grad)
    assert torch.isfinite(got_grad).all() and finite.all()
    # in float64: gradients of the tiny row are ~1e30, whose float32 norm overflows
    assert float((got_grad.double() - want_grad.double()).norm() / want_grad.double().norm()) < tol
    if dtype == torch.float32 and usage == "abs":
        assert torch.all(got_grad[0, 1] == 0)


def test_compiled_interventions_equal_the_eager_ones(compiled):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    gain = torch.rand(64, generator=g) + 0.5
    results = {}
    for enabled in (True, False):
        ops.set_compiled_math(enabled)
        kk, gg = k.clone().requires_grad_(True), gain.clone().requires_grad_(True)
        out = ops.flatten_keys(ops.gain_keys(kk, gg), 0.3)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results[enabled] = (out.detach(), kk.grad, gg.grad)
    for got, want in zip(results[True], results[False]):
        # bfloat16: the compiled kernels round once where eager rounds after every op; the gain's gradient sums
        # such products over rows, so compare whole tensors, as for the flux above
        assert float((got.double() - want.double()).norm() / want.double().norm()) < 1e-2


CASES = {
    "gain+regularizer": dict(entropy_weight=5.0, lora=None),
    "gain+regularizer+lora": dict(entropy_weight=5.0),
    "gain": dict(entropy_weight=0.0, lora=None),
    "flatten+lora": dict(entropy_weight=5.0, intervention="flatten", lora=LoraConfig(r=2, target_modules=["up_proj"])),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_steered_forward_has_no_graph_break(compiled, case, mode):
    settings = {k: v for k, v in CASES[case].items() if k != "entropy_weight"}
    model = getattr(build(CASES[case]["entropy_weight"], num_layers=1, **settings), mode)()
    ids = torch.randint(3, 100, (2, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids).loss)()
    assert explanation.graph_break_count == 0, [str(r.reason)[:200] for r in explanation.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gain+regularizer+lora", "flatten+lora"])
def test_a_compiled_training_step_equals_the_eager_one(compiled, case):
    ids = torch.randint(3, 100, (2, 8))
    settings = {k: v for k, v in CASES[case].items() if k != "entropy_weight"}
    eager = build(5.0, num_layers=1, **settings)
    eager(input_ids=ids, labels=ids).loss.backward()
    model = build(5.0, num_layers=1, **settings)
    torch._dynamo.reset()
    step = torch.compile(lambda: model(input_ids=ids, labels=ids).loss, fullgraph=True)
    step().backward()  # forward and backward compiled: the regularizer's attach and probe nodes included
    assert relative_error(trainable_grads(model), trainable_grads(eager)) < 1e-4


@pytest.mark.slow
def test_trl_torch_compile_trains(tmp_path):
    from datasets import Dataset
    from tiny_models import tiny_model, tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(8)]  # fmt: skip
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", max_length=32, gradient_checkpointing=False, bf16=False,
        torch_compile=True, dataloader_num_workers=0,
    )  # fmt: skip
    torch._dynamo.reset()
    trainer = SFTTrainer(
        model=tiny_model("llama", num_layers=1, vocab_size=len(tiny_tokenizer())), args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer(), peft_config=InfoSteerConfig(entropy_weight=5.0, lora=LoraConfig(r=2)),
    )  # fmt: skip
    gains = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "infosteer_gain" in n}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    after = {n: p for n, p in trainer.model.named_parameters() if "infosteer_gain" in n}
    assert any(not torch.equal(gains[n], after[n]) for n in gains)


def test_a_failing_compile_falls_back_to_eager_once(compiled, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setitem(ops._compile_state, "compiled", {})
    k = torch.randn(4, 32)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here.*eager closed-form"):
        flux, _ = ops.fused_information_flux(k)
    assert not ops.compiled_math_enabled()
    torch.testing.assert_close(flux, ops.information_flux(k), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_flatten_saves_only_what_the_closed_form_saves(compiled, dtype):
    """Compiling flatten whole kept ``k`` for backward beside ``k'`` (+8% peak memory in the overhead benchmark)."""
    k = torch.randn(3, 5, 64).to(dtype)
    k[0, 0, :7] = 0.0
    grad = torch.randn_like(k)
    results = {}
    for enabled in (True, False):
        ops.set_compiled_math(enabled)
        packed: list[torch.Tensor] = []
        kk = k.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=packed: saved.append(t) or t, lambda t: t):
            out = ops.flatten_keys(kk, 0.3)
        out.backward(grad)
        assert len(packed) == 1 and packed[0] is (kk if dtype == torch.float16 else out), enabled
        results[enabled] = (out.detach(), kk.grad)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
