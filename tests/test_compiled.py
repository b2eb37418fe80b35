"""The compiled path: the InfoSteer math under ``torch.compile`` (the default for users) gives the eager closed-form
results; steered models compile with no graph break; a compiled training step equals the eager one; TRL's
``torch_compile=True`` trains; and where compiling fails the math falls back to eager with one warning."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from reference import build, relative_error, trainable_grads

from peft_infosteer import InfoSteerConfig, find_infosteer_model, ops


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
    "elevate+regularizer+lora": dict(
        entropy_weight=0.5, intervention="elevate", elevate_fraction=0.05, elevate_scale=2.0
    ),
    "elevate-value+lora": dict(entropy_weight=0.0, intervention="elevate", elevate_rank="value"),
    "elevate-training-only+lora": dict(entropy_weight=0.5, intervention="elevate", elevate_at_inference=False),
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
@pytest.mark.parametrize("case", ["gain+regularizer+lora", "flatten+lora", "elevate+regularizer+lora"])
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
        processing_class=tiny_tokenizer(),
        peft_config=InfoSteerConfig(intervention="gain", entropy_weight=1.0, lora=LoraConfig(r=2)),
    )  # fmt: skip
    gains = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "infosteer_gain" in n}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    after = {n: p for n, p in trainer.model.named_parameters() if "infosteer_gain" in n}
    assert any(not torch.equal(gains[n], after[n]) for n in gains)


@pytest.mark.parametrize("rank", ["magnitude", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elevate_inside_a_users_compiled_graph_equals_eager(rank, dtype):
    """``fullgraph=True`` fails on a graph break, and reading a value on the host (``.item()``, ``.tolist()``, a
    data-dependent branch) is one: the traced intervention stays on the device, forward and backward."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 5, 200, generator=g).to(dtype)
    k[0, 0, :3] = 0.0  # the sign of 0; fewer than the 4 replaced per row, so no tie leaves the choice to topk
    grad = torch.randn(3, 5, 200, generator=g).to(dtype)
    torch._dynamo.reset()
    compiled_elevate = torch.compile(lambda kk: ops.elevate_keys(kk, 0.02, 2.0, rank), fullgraph=True, dynamic=True)
    results = []
    for fn in (compiled_elevate, lambda kk: ops.elevate_keys(kk, 0.02, 2.0, rank)):
        kk = k.clone().requires_grad_(True)
        out = fn(kk)
        out.backward(grad)
        results.append((out.detach(), kk.grad))
    (out, got), (want_out, want) = results
    assert out.dtype == got.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_a_failing_compile_falls_back_to_eager_once(compiled, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(ops._PROCESS, "functions", {})
    k = torch.randn(4, 32)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here.*eager closed-form"):
        flux, _ = ops.fused_information_flux(k)
    assert not ops.compiled_math_enabled()
    torch.testing.assert_close(flux, ops.information_flux(k), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("default", [False, True], ids=["process-eager", "process-compiled"])
def test_each_model_keeps_its_own_compiled_math_setting(monkeypatch, default):
    """Two models in one process, one compiled and one eager: each runs its own path whatever the process's default
    (which stays as it was), with the same gradients, also under non-reentrant checkpointing (whose recomputation must
    take the path the forward took)."""
    compiled_formulas: list[str] = []

    def recording_compile(fn, **kwargs):
        compiled_formulas.append(fn.__name__)
        return fn  # the formula itself: which path runs is tested here, the compiler above

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(ops._PROCESS, "functions", {})
    monkeypatch.setattr(ops._PROCESS, "default", default)
    settings = dict(intervention="flatten", lora=LoraConfig(r=2, target_modules=["up_proj"]))
    ids = torch.randint(3, 100, (2, 8))
    grads = {}
    for name, enabled, checkpointing in (("eager", False, None), ("compiled", True, None), ("ckpt", True, False)):
        model = build(5.0, checkpointing=checkpointing, num_layers=1, **settings)
        find_infosteer_model(model).flux_state.compiled_math = enabled
        ops._PROCESS.functions.clear()
        compiled_formulas.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        if enabled:
            assert {"_flux_forward", "flux_backward", "_flatten_formula", "flatten_backward"} <= set(compiled_formulas)
        else:
            assert compiled_formulas == []
        grads[name] = trainable_grads(model)
        assert ops.compiled_math_enabled() is default
    assert relative_error(grads["compiled"], grads["eager"]) < 1e-5
    assert relative_error(grads["ckpt"], grads["eager"]) < 1e-5
    with pytest.raises(TypeError, match="True, False or None"):
        find_infosteer_model(model).flux_state.compiled_math = 1


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


@pytest.mark.parametrize("k_grad", [True, False])
def test_float32_gain_keeps_only_its_output_and_gives_exact_gradients(compiled, k_grad):
    """Plain ``k * g`` kept ``k`` for the gain's gradient beside the ``k'`` a stacked LoRA keeps (+8% peak memory)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 5, 64, generator=g)
    k[0, 0, :7] = 0.0
    gain = torch.rand(64, generator=g) * 2 - 0.5  # signs and magnitudes of every kind, none exactly 0
    grad = torch.randn(3, 5, 64, generator=g)
    kk, gg = k.clone().requires_grad_(k_grad), gain.clone().requires_grad_(True)
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = ops.gain_keys(kk, gg)
    out.backward(grad)
    assert len(packed) == 2 and packed[0] is out and packed[1] is gg  # k itself is not kept
    assert torch.equal(out, k * gain)
    torch.testing.assert_close(gg.grad, (grad * k).sum((0, 1)), atol=1e-5, rtol=1e-5)
    if k_grad:
        assert torch.equal(kk.grad, grad * gain)
    else:
        assert kk.grad is None


def test_a_zero_gain_keeps_the_keys_so_its_gradient_stays_exact(compiled):
    """``k`` cannot be recovered from ``k' = 0 * k``: with a gain at exactly 0 the plain product is used."""
    k, grad = torch.randn(4, 8), torch.randn(4, 8)
    gain = torch.ones(8)
    gain[3] = 0.0
    kk, gg = k.clone().requires_grad_(True), gain.clone().requires_grad_(True)
    packed: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = ops.gain_keys(kk, gg)
    out.backward(grad)
    assert any(t is kk for t in packed)
    torch.testing.assert_close(gg.grad, (grad * k).sum(0))
    assert gg.grad[3] != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_grad", [True, False])
def test_gain_inside_a_users_compiled_graph_gives_the_eager_gradients(compiled, dtype, k_grad):
    """Traced, the gain's gradient is a matrix-vector product (``ops._GainInCompiledGraph``), exact also at a 0 gain."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, 5, 64, generator=g).to(dtype)
    gain = torch.rand(64, generator=g) * 2 - 0.5
    gain[3] = 0.0
    grad = torch.randn(3, 5, 64, generator=g).to(dtype)
    torch._dynamo.reset()
    compiled_gain = torch.compile(lambda kk, gg: ops.gain_keys(kk, gg), fullgraph=True)
    results = []
    for fn in (compiled_gain, ops.gain_keys):
        kk, gg = k.clone().requires_grad_(k_grad), gain.clone().requires_grad_(True)
        out = fn(kk, gg)
        out.backward(grad)
        results.append((out.detach(), kk.grad, gg.grad))
    (out, k_got, gain_got), (want_out, k_want, gain_want) = results
    assert out.dtype == dtype and torch.equal(out, want_out)
    assert gain_got.dtype == torch.float32 and gain_got[3] != 0
    torch.testing.assert_close(gain_got, (grad.float() * k.float()).sum((0, 1)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gain_got, gain_want, atol=1e-4, rtol=1e-4)
    if k_grad:
        assert torch.equal(k_got, k_want)
    else:
        assert k_got is None


def test_a_traced_gain_takes_its_gradient_by_matrix_vector_product():
    """The column sum derived by the compiler re-read the gradient's inputs in a loop of its own (see the function)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_ops: list[str] = []

    def backward_compiler(gm, _inputs):
        backward_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, _inputs: make_boxed_func(gm.forward), bw_compiler=backward_compiler)
    torch._dynamo.reset()
    k, gain = torch.randn(8, 16, requires_grad=True), torch.rand(16, requires_grad=True)
    torch.compile(ops.gain_keys, backend=backend, fullgraph=True)(k, gain).sum().backward()
    assert "aten.mm.default" in backward_ops and "aten.sum.dim_IntList" not in backward_ops, backward_ops


@pytest.mark.parametrize(
    ("usage", "dtype"), [("abs", torch.float32), ("abs", torch.bfloat16), ("softmax", torch.float32)]
)
def test_flux_inside_a_users_compiled_graph_equals_the_eager_closed_form(compiled, usage, dtype):
    k = _keys(dtype) if usage == "abs" else torch.randn(3, 7, 96, dtype=dtype)
    torch._dynamo.reset()
    compiled_flux = torch.compile(lambda kk: ops.fused_information_flux(kk, usage, 0.7), fullgraph=True)
    kk = k.clone().requires_grad_(True)
    flux, valid = compiled_flux(kk)
    (flux * torch.linspace(-1, 2, flux.numel()).reshape(flux.shape)).sum().backward()
    ops.set_compiled_math(False)
    want_flux, want_grad = _flux_and_grad(k, usage, 0.7)
    torch.testing.assert_close(flux.detach(), want_flux, atol=2e-6, rtol=1e-5)
    assert kk.grad.dtype == dtype and torch.isfinite(kk.grad).all()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert float((kk.grad.double() - want_grad.double()).norm() / want_grad.double().norm()) < tol
    if usage == "abs":
        assert torch.all(kk.grad[0, 1] == 0) and not valid[0, 1] and valid.sum() == valid.numel() - 1


def _saved_key_sized(step, *inputs) -> list[str]:
    """The tensors of size ``[rows, d_ff]`` that a compiled ``step`` keeps for backward (AOTAutograd's partition)."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved: list[str] = []

    def forward_compiler(gm, _inputs):
        (outputs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
        for node in outputs:
            val = getattr(node, "meta", {}).get("val")
            if isinstance(val, torch.Tensor) and tuple(val.shape) == (64, 96):
                saved.append(f"{node} {val.dtype}")
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda gm, _inputs: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch._dynamo.reset()
    torch.compile(step, backend=backend, fullgraph=True)(*inputs).sum().backward()
    return saved


def test_the_regularizer_in_a_users_compiled_graph_keeps_nothing_of_key_size():
    """Traced as a plain formula, the flux made the partitioner keep a float32 ``|k| / max |k|`` (+9% memory)."""
    from peft_infosteer.regularizer import _AttachFlux

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w_up, w_down = torch.randn(96, 32, generator=g), torch.randn(32, 96, generator=g)
    lora_a = torch.randn(4, 96, generator=g, requires_grad=True)

    def layer(x, lora_a, regularize: bool):
        k = torch.nn.functional.silu(x @ w_up.T) * (x @ w_up.T)
        if regularize:
            flux, valid = ops.fused_information_flux(k)
            stats = torch.stack([(flux.detach() * valid).sum(), valid.float().sum()])
            weights, coefficient = torch.full((64,), 1 / 64), torch.tensor(-1.0)
            k, carrier = _AttachFlux.apply(k, flux, stats, torch.zeros(2), weights, coefficient, None, 1.0)
        out = (k @ w_down.T + k @ lora_a.T @ torch.ones(4, 32)).square()
        return out + carrier.sum() * 0 if regularize else out  # the carrier's gradient reaches the attach node

    plain = _saved_key_sized(lambda x, a: layer(x, a, False), x, lora_a)
    regularized = _saved_key_sized(lambda x, a: layer(x, a, True), x, lora_a)
    assert plain and len(regularized) == len(plain), (plain, regularized)
