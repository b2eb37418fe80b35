"""Property-based tests (hypothesis) of the InfoSteer math in ``peft_infosteer.ops`` (docs/design.md, section 1).

Each property runs on generated key vectors, including zeros, denormals, huge values and low-precision dtypes.
Degenerate batches through a model (empty, all padding, length 1, no loss token) are in ``test_regularizer.py``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from peft_infosteer.ops import (
    elevate_keys,
    flatten_keys,
    fused_information_flux,
    gain_keys,
    information_flux,
    usage_distribution,
)

# PEFT_INFOSTEER_PROPERTY_EXAMPLES=1000 for a deeper search than the quick default
FAST = settings(
    max_examples=int(os.environ.get("PEFT_INFOSTEER_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
USAGES = st.sampled_from([("abs", 1.0), ("softmax", 1.0), ("softmax", 0.3), ("softmax", 7.0)])
TINY = float(np.finfo(np.float32).tiny)


def f32(x: float) -> float:
    """The float32 value nearest to ``x`` (hypothesis wants bounds that float32 represents exactly)."""
    return float(np.float32(x))


def floats32(lo: float, hi: float, subnormal: bool | None = None):
    return st.floats(
        min_value=f32(lo), max_value=f32(hi), width=32, allow_nan=False, allow_infinity=False, allow_subnormal=subnormal
    )


# float32 values over a wide range: zeros, denormals, ordinary numbers and huge ones. The bound 1e37 keeps k / tau
# finite for the temperatures below (an activation near the float32 maximum has overflowed the model already).
WIDE = st.one_of(
    st.just(0.0),
    floats32(-1e-38, 1e-38),  # denormals and signed zeros
    floats32(-1e37, 1e37),
    st.sampled_from([f32(v) for v in (1e30, -1e30, 1e37, -1e37, 1e-45, -1e-45)]),
)
# ordinary magnitudes (zeros, or 1e-6 <= |k| <= 100), where float32 autograd through the plain reference is itself
# accurate: every nonzero p_i stays far above the smallest normal float32
MODERATE = st.one_of(st.just(0.0), floats32(1e-6, 100.0), floats32(-100.0, -1e-6))


def keys(elements=WIDE, min_rows: int = 0, max_rows: int = 4, min_d: int = 2, max_d: int = 24):
    """Strategy for a float32 tensor of shape (rows, d_ff)."""
    shapes = st.tuples(st.integers(min_rows, max_rows), st.integers(min_d, max_d))
    return shapes.flatmap(lambda shape: arrays(np.float32, shape, elements=elements)).map(torch.from_numpy)


def _flux(k: torch.Tensor, usage: str, temperature: float) -> torch.Tensor:
    return fused_information_flux(k, usage, temperature)[0]


# ---- range and invariances -------------------------------------------------------------------------------------


@FAST
@given(k=keys(), mode=USAGES)
def test_flux_is_finite_and_in_unit_interval(k, mode):
    flux, valid = fused_information_flux(k, *mode)
    assert flux.shape == k.shape[:-1] and flux.dtype == torch.float32
    assert torch.isfinite(flux).all()
    assert ((flux >= 0) & (flux <= 1 + 1e-6)).all()
    # a row is undefined exactly when it has no mass (abs mode); undefined rows give 0
    if mode[0] == "abs":
        assert torch.equal(valid, (k != 0).any(-1))
        assert (flux[~valid] == 0).all()
    else:
        assert valid.all()


@FAST
@given(k=keys(), mode=USAGES)
def test_fused_flux_equals_the_plain_reference(k, mode):
    torch.testing.assert_close(_flux(k, *mode), information_flux(k, *mode), rtol=1e-4, atol=1e-5)


@FAST
@given(k=keys(min_rows=1), mode=USAGES, data=st.data())
def test_flux_is_invariant_under_permutation_of_memories(k, mode, data):
    perm = torch.tensor(data.draw(st.permutations(range(k.shape[-1]))))
    torch.testing.assert_close(_flux(k[:, perm], *mode), _flux(k, *mode), rtol=1e-5, atol=1e-5)


@FAST
@given(
    k=keys(elements=st.one_of(st.just(0.0), floats32(1e-6, 1e6), floats32(-1e6, -1e-6)), min_rows=1),
    exponent=st.integers(-40, 40),
)
def test_abs_flux_is_invariant_under_positive_scaling(k, exponent):
    scale = 2.0**exponent  # a power of two scales every value exactly (no underflow or overflow in this range)
    torch.testing.assert_close(_flux(k * scale, "abs", 1.0), _flux(k, "abs", 1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        usage_distribution(k * scale), usage_distribution(k), rtol=1e-5, atol=1e-6
    )  # the whole distribution, not only its entropy


@FAST
@given(k=keys(), mode=USAGES)
def test_usage_distribution_is_a_distribution(k, mode):
    p = usage_distribution(k, *mode)
    assert p.dtype == torch.float32 and torch.isfinite(p).all() and (p >= 0).all()
    sums = p.sum(-1)
    defined = (k != 0).any(-1) if mode[0] == "abs" else torch.ones_like(sums, dtype=torch.bool)
    torch.testing.assert_close(sums[defined], torch.ones_like(sums[defined]), rtol=0, atol=1e-5)
    assert (sums[~defined] == 0).all()


# ---- gradients ---------------------------------------------------------------------------------------------------


@FAST
@given(k=keys(elements=MODERATE, min_rows=1), mode=USAGES, data=st.data())
def test_fused_gradient_equals_plain_autograd(k, mode, data):
    weights = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=k.shape[0], max_size=k.shape[0])))
    k_fused = k.clone().requires_grad_(True)
    k_plain = k.clone().requires_grad_(True)
    (_flux(k_fused, *mode) * weights).sum().backward()
    (information_flux(k_plain, *mode) * weights).sum().backward()
    # compare relative to the gradient's natural size |w| / (S log d) (abs) or |w| / (tau log d) (softmax): near a
    # stationary point (uniform usage) the true gradient is 0 and both sides are rounding noise of that size
    norm = k.abs().sum(-1) if mode[0] == "abs" else torch.full((k.shape[0],), mode[1])
    natural = (weights.abs() / (norm * math.log(k.shape[-1])))[norm > 0]
    scale = torch.cat([k_plain.grad.abs().flatten(), natural, torch.tensor([1e-6])]).max()
    torch.testing.assert_close(k_fused.grad / scale, k_plain.grad / scale, rtol=0, atol=2e-4)
    if mode[0] == "abs":
        assert (k_fused.grad[k == 0] == 0).all()  # dF/dk_i = 0 where k_i = 0


@FAST
@given(k=keys(), mode=USAGES)
def test_fused_gradient_is_finite_for_extreme_inputs(k, mode):
    k = k.clone().requires_grad_(True)
    _flux(k, *mode).sum().backward()
    assert torch.isfinite(k.grad).all()


@FAST
@given(
    k=keys(elements=floats32(-6e4, 6e4), min_rows=0),
    mode=USAGES,
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_low_precision_inputs_give_finite_flux_and_gradients(k, mode, dtype):
    k = k.to(dtype).requires_grad_(True)
    flux, _ = fused_information_flux(k, *mode)
    assert flux.dtype == torch.float32 and torch.isfinite(flux).all()
    torch.testing.assert_close(flux, information_flux(k.detach().float(), *mode), rtol=1e-4, atol=1e-5)
    flux.sum().backward()
    assert k.grad.dtype == dtype and torch.isfinite(k.grad).all()


def test_special_values_one_by_one():
    d = 16
    for value in (0.0, 1e-45, 1e-40, TINY, 1.0, 1e30, -1e30, 3.4e38):
        for usage in ("abs", "softmax"):
            k = torch.full((3, d), value)
            k[1, 0] = -value  # mixed signs
            k[2, ::2] = 0.0  # half zeros
            k.requires_grad_(True)
            flux, _ = fused_information_flux(k, usage)
            flux.sum().backward()
            assert torch.isfinite(flux).all() and torch.isfinite(k.grad).all(), (value, usage)
            assert ((flux >= 0) & (flux <= 1 + 1e-6)).all(), (value, usage)


def test_empty_batches():
    for shape in ((0, 8), (2, 0, 8), (0, 0, 8)):
        k = torch.zeros(shape, requires_grad=True)
        flux, valid = fused_information_flux(k)
        assert flux.shape == shape[:-1] and valid.shape == shape[:-1]
        flux.sum().backward()
        assert k.grad.shape == k.shape
    with pytest.raises(ValueError, match="d_ff > 0"):
        fused_information_flux(torch.zeros(2, 0))


# ---- interventions -----------------------------------------------------------------------------------------------


@FAST
@given(k=keys(elements=MODERATE, min_rows=1), alpha=st.floats(0.0, 1.0))
def test_flatten_never_lowers_flux_and_keeps_signs(k, alpha):
    flat = flatten_keys(k, alpha)
    assert torch.isfinite(flat).all()
    assert torch.equal(torch.sign(flat), torch.sign(k))  # zero coefficients stay zero
    assert (_flux(flat, "abs", 1.0) >= _flux(k, "abs", 1.0) - 1e-5).all()


@FAST
@given(
    k=keys(elements=st.one_of(floats32(1e-3, 100.0), floats32(-100.0, -1e-3)), min_rows=1),
    alpha=st.floats(0.0, 1.0),
)
def test_flatten_mixes_usage_with_uniform(k, alpha):
    # with no zero coefficient, p' = (1 - alpha) p + alpha / d_ff and the total magnitude is kept
    d = k.shape[-1]
    flat = flatten_keys(k, alpha)
    expected = (1 - alpha) * usage_distribution(k) + alpha / d
    torch.testing.assert_close(usage_distribution(flat), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flat.abs().sum(-1), k.abs().sum(-1), rtol=1e-4, atol=1e-4)


@FAST
@given(k=keys(elements=MODERATE), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_unit_gain_is_the_identity(k, dtype):
    k = k.to(dtype)
    assert torch.equal(gain_keys(k, torch.ones(k.shape[-1])), k)


# ---- elevate (the paper's intervention) -----------------------------------------------------------------------------

RANKS = st.sampled_from(["magnitude", "value"])
FRACTIONS = st.floats(1e-6, 0.999)


@FAST
@given(k=keys(elements=MODERATE, min_rows=1), fraction=FRACTIONS, alpha=st.floats(0.0, 5.0), rank=RANKS)
def test_elevate_replaces_the_bottom_by_alpha_times_the_mean(k, fraction, alpha, rank):
    from test_elevate import check_is_an_elevation  # the tie-proof check, written from the formula

    check_is_an_elevation(k, elevate_keys(k, fraction, alpha, rank), fraction, alpha, rank)


@FAST
@given(k=keys(elements=MODERATE, min_rows=1), fraction=FRACTIONS, alpha=st.floats(0.0, 5.0), rank=RANKS, data=st.data())
def test_elevate_gradient_equals_plain_autograd(k, fraction, alpha, rank, data):
    from test_elevate import autograd_elevate

    from peft_infosteer._elevate import elevate_reference
    from peft_infosteer._native import native_elevate

    weight = torch.from_numpy(data.draw(arrays(np.float32, tuple(k.shape), elements=floats32(-1.0, 1.0))))
    # the formula through autograd with the same selection, ties included: the native CPU kernel takes tied keys in
    # index order (as a stable sort does), the ATen path as topk does
    reference = autograd_elevate if native_elevate() is not None else elevate_reference
    grads = []
    for fn in (elevate_keys, reference):
        kk = k.clone().requires_grad_(True)
        (fn(kk, fraction, alpha, rank) * weight).sum().backward()
        grads.append(kk.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@FAST
@given(
    k=keys(min_rows=1),
    fraction=FRACTIONS,
    alpha=st.floats(0.0, 5.0),
    rank=RANKS,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_elevate_is_finite_for_extreme_and_low_precision_keys(k, fraction, alpha, rank, dtype):
    k = k.to(dtype)
    if not torch.isfinite(k).all():  # float16 overflows the widest float32 keys before elevate sees them
        return
    kk = k.clone().requires_grad_(True)
    out = elevate_keys(kk, fraction, alpha, rank)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(kk.grad).all()
    assert torch.isfinite(out).all() or dtype == torch.float16  # alpha * mean may exceed float16's range
