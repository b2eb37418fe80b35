"""The native CPU kernel of ``elevate`` (``peft_infosteer/csrc/elevate_cpu.cpp``) against the ATen path and the
formula: the selection (ties to the lower index, NaN last), the values, the gradient, threads and row layouts, and the
switch and the fallback of ``peft_infosteer._native``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_infosteer import _native
from peft_infosteer._elevate import Elevate, elevate_backward, elevate_forward
from peft_infosteer._native import native_elevate, set_native_kernel

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="the native kernel needs a C++ compiler"
)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.fixture(scope="module")
def kernel():
    module = native_elevate()
    assert module is not None, _native.native_kernel_failure()
    return module


@contextmanager
def aten_path() -> Iterator[None]:
    set_native_kernel(False)
    try:
        yield
    finally:
        set_native_kernel(True)


def expected_selection(k: torch.Tensor, m: int, by_value: bool) -> torch.Tensor:
    """The ``m`` lowest keys of each row, ties to the lower index, NaN last (``-0.0`` equals ``+0.0``)."""
    key = k.double() if by_value else k.double().abs()
    return torch.sort(key, dim=-1, stable=True).indices[..., :m]


def expected_output(k: torch.Tensor, m: int, scale: float, by_value: bool) -> torch.Tensor:
    """The formula in float64 with :func:`expected_selection`."""
    wide = k.double()
    index = expected_selection(k, m, by_value)
    mean = (wide if by_value else wide.abs()).mean(-1, keepdim=True)
    picked = wide.gather(-1, index)
    new = (scale * mean).expand_as(picked)
    if not by_value:
        new = torch.where(picked >= 0, new, -new)
    return wide.scatter(-1, index, new).to(k.dtype)


def keys(rows: int, d: int, dtype: torch.dtype, seed: int = 0, drift: float = 0.0) -> torch.Tensor:
    """Signed keys whose scale drifts from row to row by ``10 ** drift`` (what carries the threshold is tested)."""
    g = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (drift * torch.linspace(-1, 1, max(rows, 1))[:rows, None].double())
    return (torch.randn(rows, d, generator=g, dtype=torch.float64) * scales).to(dtype)


def check_forward(kernel, k: torch.Tensor, m: int, scale: float, by_value: bool) -> None:
    out, index, picked = kernel.elevate_forward(k, m, scale, by_value)
    assert out.shape == k.shape and out.dtype == k.dtype
    assert index.shape == (*k.shape[:-1], m) and index.dtype == torch.long
    want = expected_selection(k, m, by_value)
    assert torch.equal(index.sort(-1).values, want.sort(-1).values)
    assert torch.equal(picked, k.gather(-1, index))
    tol = TOLERANCE[k.dtype]
    torch.testing.assert_close(out, expected_output(k, m, scale, by_value), rtol=tol, atol=0, equal_nan=True)


# ---- forward -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_value", [False, True], ids=["magnitude", "value"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_is_the_formula_with_ties_to_the_lower_index(kernel, dtype, by_value):
    for rows, d, m, drift in [(1, 1536, 16, 0.0), (64, 300, 3, 3.0), (40, 37, 1, 0.0), (9, 64, 64, 1.0)]:
        check_forward(kernel, keys(rows, d, dtype, seed=d, drift=drift), m, 1.5, by_value)
    ties = torch.tensor([[1.0, -1.0, 7.0, 1.0, 0.0, -0.0, 6.0, -0.0]], dtype=dtype)
    for m in range(1, 9):
        check_forward(kernel, ties, m, 2.0, by_value)


@pytest.mark.parametrize("by_value", [False, True], ids=["magnitude", "value"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_ranks_last_and_infinities_and_subnormals_rank_as_floats(kernel, dtype, by_value):
    k = keys(6, 200, dtype, seed=1) * torch.logspace(-3, 3, 200, dtype=torch.float64).to(dtype)
    k[0, 5], k[5, 0] = float("nan"), -float("nan")
    k[1, 7], k[1, 8] = float("inf"), float("-inf")
    k[2, 11], k[3, 13], k[4, 17] = -0.0, torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).tiny / 4
    for m in (1, 3, 199):
        check_forward(kernel, k, m, 1.0, by_value)


def test_rows_in_any_layout_and_threads_give_the_same_result(kernel):
    k = keys(512, 96, torch.float32, seed=2, drift=2.0)
    serial = kernel.elevate_forward(k, 4, 1.0, False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = kernel.elevate_forward(k, 4, 1.0, False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
    transposed = k.t().contiguous().t()  # the same values, not contiguous
    assert not transposed.is_contiguous()
    assert torch.equal(kernel.elevate_forward(transposed, 4, 1.0, False)[0], serial[0])
    empty = kernel.elevate_forward(torch.empty(0, 7, 96), 4, 1.0, False)
    assert [t.shape for t in empty] == [(0, 7, 96), (0, 7, 4), (0, 7, 4)]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 40),
    d=st.integers(1, 160),
    m_fraction=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    by_value=st.booleans(),
    levels=st.sampled_from([0, 3, 50]),  # 0: continuous values; else few distinct values (many ties)
    drift=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_the_formula_on_any_rows(kernel, rows, d, m_fraction, dtype, by_value, levels, drift, seed):
    k = keys(rows, d, torch.float64, seed=seed, drift=drift)
    if levels and k.numel():
        k = torch.round(k / k.abs().max().clamp_min(1e-30) * levels)
    m = max(1, min(d, round(m_fraction * d)))
    check_forward(kernel, k.to(dtype), m, 1.25, by_value)


# ---- backward ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_value", [False, True], ids=["magnitude", "value"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_equals_the_aten_backward(kernel, dtype, by_value):
    k = keys(33, 200, dtype, seed=3, drift=1.0)
    k[0, :3] = 0.0  # zeros in the selection: their sign counts as + for the value, 0 for |k|'s gradient
    saved = kernel.elevate_forward(k, 5, 2.0, by_value)
    g = torch.randn(k.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(dtype)
    native = kernel.elevate_backward(g, *saved, 2.0, by_value)
    with aten_path():
        aten = elevate_backward(g, *saved, 2.0, by_value)
    torch.testing.assert_close(native, aten, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("by_value", [False, True], ids=["magnitude", "value"])
def test_gradcheck_through_the_kernel_in_double_precision(kernel, by_value):
    k = keys(5, 40, torch.float64, seed=5, drift=1.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Elevate.apply(x, 3, 1.5, by_value), (k,))


@pytest.mark.parametrize("by_value", [False, True], ids=["magnitude", "value"])
def test_kernel_and_aten_path_agree_through_autograd(kernel, by_value):
    k = keys(64, 256, torch.float32, seed=6, drift=2.0)
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    results = []
    for use_kernel in (True, False):
        set_native_kernel(use_kernel)
        try:
            x = k.clone().requires_grad_(True)
            out = Elevate.apply(x, 3, 2.0, by_value)
            (out * weight).sum().backward()
            results.append((out.detach(), x.grad))
        finally:
            set_native_kernel(True)
    (out, grad), (aten_out, aten_grad) = results
    # a signed mean ("value") cancels: ATen's float32 sum and the kernel's double sum differ by more than 1e-6 of it
    torch.testing.assert_close(out, aten_out, rtol=1e-6, atol=1e-6 if by_value else 0)
    torch.testing.assert_close(grad, aten_grad, rtol=1e-6, atol=1e-7)


# ---- the switch and the fallback -----------------------------------------------------------------------------------


class _Spy:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def elevate_forward(self, k, m, scale, by_value):
        self.calls.append("forward")
        with aten_path():
            return elevate_forward(k, m, scale, by_value)

    def elevate_backward(self, *args):
        self.calls.append("backward")
        with aten_path():
            return elevate_backward(*args)


def test_cpu_calls_go_to_the_kernel_unless_it_is_switched_off(kernel, monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(_native._KERNEL, "module", spy)
    x = keys(3, 50, torch.float32).requires_grad_(True)
    Elevate.apply(x, 2, 1.0, False).sum().backward()
    elevate_forward(x.detach(), 2, 1.0, False)
    assert spy.calls == ["forward", "backward", "forward"]
    with aten_path():
        Elevate.apply(x, 2, 1.0, False).sum().backward()
    assert spy.calls == ["forward", "backward", "forward"]


def test_a_failed_build_warns_once_and_the_aten_path_runs(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*_args, **_kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernel = _native._NativeKernel()
    kernel.enabled = True
    with pytest.warns(RuntimeWarning, match=r"could not be built \(RuntimeError: Ninja.*PEFT_INFOSTEER_NATIVE=0"):
        assert kernel.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.get() is None  # once: no second attempt, no second warning
    monkeypatch.setattr(_native, "_KERNEL", kernel)
    k = keys(2, 30, torch.float32)
    with aten_path():
        want = elevate_forward(k, 2, 1.0, False)[0]
    kernel.enabled = True  # aten_path() re-enabled it and cleared the failure: a new attempt fails again
    with pytest.warns(RuntimeWarning):
        assert torch.equal(elevate_forward(k, 2, 1.0, False)[0], want)


def test_the_environment_switch_turns_the_kernel_off_in_a_fresh_process():
    code = "from peft_infosteer._native import native_elevate; print(native_elevate() is None)"
    env = {**os.environ, "PEFT_INFOSTEER_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ---- in a model ----------------------------------------------------------------------------------------------------


# gated signed keys; GELU keys. (ReLU keys tie at 0, where the ATen path's choice among the zeros is arbitrary: the
# kernel's lowest-index choice is checked there against the formula, tests/test_elevate.py)
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_a_model_trains_and_generates_the_same_on_the_kernel_and_the_aten_path(kernel, family):
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model

    from peft_infosteer import InfoSteerConfig

    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 11, 30], [9, 9, 31, 77, 4, 100, 56, 23, 7, 81]])
    results = []
    for use_kernel in (True, False):
        set_native_kernel(use_kernel)
        try:
            torch.manual_seed(0)
            config = InfoSteerConfig(lora=LoraConfig(r=4, target_modules="all-linear"), elevate_fraction=0.05)
            model = get_peft_model(tiny_model(family), config).train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            model.eval()
            with torch.no_grad():
                tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            results.append((loss.detach(), grads, tokens))
        finally:
            set_native_kernel(True)
    (loss, grads, tokens), (aten_loss, aten_grads, aten_tokens) = results
    torch.testing.assert_close(loss, aten_loss, rtol=1e-5, atol=1e-6)
    for g, aten_g in zip(grads, aten_grads, strict=True):
        torch.testing.assert_close(g, aten_g, rtol=1e-4, atol=1e-6)
    assert torch.equal(tokens, aten_tokens)
