"""Numerical accuracy: large means, constant channels, extreme scales, NaN/Inf.

The truth is always a float64 computation on the *same* data (float32 data
upcast exactly), so the errors measured are fastbn's own, not the input's
rounding.  Error measure: max-abs error over max-abs value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastbn
from fastbn import reference

try:
    import torch
except ImportError:  # pragma: no cover - torch is an optional oracle
    torch = None


def rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def reduce_axes(ndim, axis):
    return tuple(a for a in range(ndim) if a != axis % ndim)


def two_pass_var(x, axis):
    """Float64 two-pass variance of the same data."""
    x64 = np.asarray(x, np.float64)
    axes = reduce_axes(x.ndim, axis)
    mean = x64.mean(axis=axes, keepdims=True)
    return ((x64 - mean) ** 2).mean(axis=axes)


def take_channel(a, axis, c):
    return np.take(a, c, axis=axis)


# ---------------------------------------------------------------------------
# Statistics far from zero
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), [((4096, 64), 1), ((16, 64, 16, 16), 1),
                                             ((16, 16, 16, 64), -1)])
def test_batch_stats_float32_mean_1e4_std_1(rng, shape, axis):
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    truth = two_pass_var(x, axis)
    mean, var = fastbn.batch_stats(x, axis=axis)
    var_err = np.max(np.abs(var - truth) / truth)
    assert var_err <= 1e-9
    assert rel_err(mean, x.astype(np.float64).mean(axis=reduce_axes(x.ndim, axis))) <= 1e-14

    # The test is meaningful: the naive float32 E[x^2] - E[x]^2 is far off
    # (typically it is wrong by more than the variance itself).
    axes = reduce_axes(x.ndim, axis)
    naive = np.mean(x * x, axis=axes) - np.mean(x, axis=axes) ** 2
    assert naive.dtype == np.float32
    naive_err = np.max(np.abs(naive.astype(np.float64) - truth) / truth)
    assert naive_err > 1e-2
    assert naive_err > 1e6 * var_err


@pytest.mark.parametrize(("shape", "axis"), [((4096, 16), 1), ((8, 16, 32, 32), 1)])
def test_batch_stats_float64_mean_1e8_std_1(rng, shape, axis):
    x = 1e8 + rng.standard_normal(shape)
    _, var = fastbn.batch_stats(x, axis=axis)
    # Truth with exactly rounded sums (math.fsum) for both passes.
    xc = np.moveaxis(x, axis, -1).reshape(-1, shape[axis])
    truth = np.empty(shape[axis])
    for c in range(shape[axis]):
        col = xc[:, c]
        mu = math.fsum(col) / col.size
        truth[c] = math.fsum((col - mu) ** 2) / col.size
    assert np.max(np.abs(var - truth) / truth) <= 1e-6
    naive = np.mean(x * x, axis=reduce_axes(x.ndim, axis)) - x.mean(
        axis=reduce_axes(x.ndim, axis)) ** 2
    assert np.max(np.abs(naive - truth) / truth) > 1e-2  # float64 naive fails here too


OFFSETS = [1e2, 1e3, 1e4, 1e5]


@pytest.mark.parametrize("offset", OFFSETS, ids=[f"offset{o:.0e}" for o in OFFSETS])
@pytest.mark.parametrize("shape", [(4096, 64), (16, 8, 32, 32)], ids=["rows", "planes"])
def test_float32_accuracy_at_large_offsets(rng, shape, offset, record_property):
    """y, dx, dgamma within 1e-6 of float64 on the same float32 data; better than PyTorch."""
    n = shape[1]
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    gamma = rng.uniform(0.5, 2, n).astype(np.float32)
    beta = rng.uniform(-1, 1, n).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    y, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, _ = fastbn.batch_norm_backward(dy, ctx)
    up = [a.astype(np.float64) for a in (x, gamma, beta, dy)]
    y64, cache = reference.forward(up[0], up[1], up[2])
    dx64, dgamma64, _ = reference.backward(up[3], cache)
    errors = {"y": rel_err(y, y64), "dx": rel_err(dx, dx64), "dgamma": rel_err(dgamma, dgamma64)}
    for name, err in errors.items():
        record_property(f"fastbn_{name}_rel_err", err)
    assert max(errors.values()) <= 1e-6, errors

    if torch is None:
        return
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
    (yt * torch.from_numpy(dy)).sum().backward()
    torch_errors = {"y": rel_err(yt.detach().numpy(), y64), "dx": rel_err(xt.grad.numpy(), dx64),
                    "dgamma": rel_err(gt.grad.numpy(), dgamma64)}
    for name, err in torch_errors.items():
        record_property(f"torch_{name}_rel_err", err)
    # Where PyTorch is at float32 rounding level (~1e-7) a comparison is noise;
    # above that, fastbn must be more accurate.
    for name, err in errors.items():
        if torch_errors[name] > 2.5e-7:
            assert err < torch_errors[name], (name, errors, torch_errors)
    if offset >= 1e4:
        # The regime the centring exists for: fastbn at least 10x better.
        assert errors["y"] * 10 < torch_errors["y"]
        assert errors["dgamma"] * 10 < torch_errors["dgamma"]


@pytest.mark.parametrize("scale", [1e-20, 1e-5, 1e5, 1e15, 1e25, 1e35])
@pytest.mark.parametrize(("shape", "axis"), [((64, 4), 1), ((8, 4, 16), 1)],
                         ids=["rows", "planes"])
def test_float32_accuracy_at_extreme_scales(rng, shape, axis, scale):
    """float32 data spread over its whole range: y, dx, dgamma stay accurate.

    Every intermediate of the closed form is representable in float64, and the
    results (|dx| ~ 1/scale) are representable in float32.
    """
    n = shape[axis]
    x = (scale * (1 + rng.standard_normal(shape))).astype(np.float32)
    gamma = rng.uniform(0.5, 2, n).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, ctx = fastbn.batch_norm_forward(x, gamma, axis=axis)
    dx, dgamma, _ = fastbn.batch_norm_backward(dy, ctx)
    y64, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64), axis=axis)
    dx64, dgamma64, _ = reference.backward(dy.astype(np.float64), cache)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(y))
    assert rel_err(y, y64) <= 1e-6
    assert rel_err(dgamma, dgamma64) <= 1e-6
    assert rel_err(dx, dx64) <= 1e-6


# ---------------------------------------------------------------------------
# Constant channels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), [((32, 4), 1), ((300, 4), 1), ((8, 4, 5, 5), 1),
                                             ((4, 4, 64, 64), 1), ((8, 5, 5, 4), -1)])
def test_constant_channel(rng, shape, axis, dtype, relu):
    x = rng.standard_normal(shape).astype(dtype)
    const = dtype(123.456)
    np.moveaxis(x, axis, 0)[1] = const          # channel 1: every value 123.456
    np.moveaxis(x, axis, 0)[3] = dtype(-7.25)   # channel 3: another constant
    gamma = np.array([1.5, 2.0, 0.5, -1.0], dtype)
    beta = np.array([0.25, -0.75, 0.5, 1.25], dtype)
    dy = rng.standard_normal(shape).astype(dtype)

    mean, var = fastbn.batch_stats(x, axis=axis)
    assert var[1] == 0.0 and var[3] == 0.0
    assert mean[1] == np.float64(const) and mean[3] == -7.25

    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    assert not np.any(np.isnan(y))
    assert ctx.var[1] == 0.0 and ctx.var[3] == 0.0
    for c in (1, 3):
        expected = max(beta[c], 0) if relu else beta[c]
        assert np.all(take_channel(y, axis, c) == expected)  # exactly beta

    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma)) and np.all(np.isfinite(dbeta))
    assert dgamma[1] == 0.0 and dgamma[3] == 0.0   # x_hat is exactly 0
    # The rest agrees with the float64 reference.  (Its mean of a constant
    # channel is not always exact, so its dgamma there is ~1e-9, not 0.)
    up = [a.astype(np.float64) for a in (x, gamma, beta, dy)]
    _, cache = reference.forward(up[0], up[1], up[2], axis=axis)
    mask = (y > 0) if relu else np.ones(shape, bool)
    dx64, dg64, db64 = reference.backward(up[3] * mask, cache)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert rel_err(dx, dx64) <= tol
    assert rel_err(dgamma[[0, 2]], dg64[[0, 2]]) <= tol
    assert rel_err(dbeta, db64) <= tol

    y_eval = fastbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis, relu=relu)
    np.testing.assert_array_equal(take_channel(y_eval, axis, 1), take_channel(y, axis, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_channels_constant(dtype):
    x = np.full((16, 3, 4), dtype(123.456))
    y, ctx = fastbn.batch_norm_forward(x)
    np.testing.assert_array_equal(y, np.zeros_like(x))
    np.testing.assert_array_equal(ctx.var, np.zeros(3))
    dy = np.ones_like(x)
    dx, _, _ = fastbn.batch_norm_backward(dy, ctx)
    np.testing.assert_array_equal(dx, np.zeros_like(x))  # N*dy - sum(dy) = 0


# ---------------------------------------------------------------------------
# NaN / Inf stay in their channel
# ---------------------------------------------------------------------------

NAN_CASES = [((16, 5), 1), ((300, 5), 1), ((4, 5, 6, 7), 1), ((2, 5, 128, 128), 1),
             ((4, 6, 7, 5), -1)]
NAN_IDS = ["rows", "rows-2-chunks", "planes", "planes-2-chunks", "channels-last"]


def _poison(a, axis, c, where, value):
    bad = a.copy()
    channel = np.moveaxis(bad, axis, 0)[c]
    idx = 0 if where == "first" else channel.size // 2 + 1
    channel.flat[idx] = value
    return bad


def _others(a, axis, c):
    return np.delete(a, c, axis=axis % a.ndim)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("shape", "axis"), NAN_CASES, ids=NAN_IDS)
def test_nonfinite_x_stays_in_its_channel(rng, shape, axis, value, where, relu):
    x = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2, shape[axis]).astype(np.float32)
    beta = rng.uniform(-1, 1, shape[axis]).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = 2
    bad = _poison(x, axis, c, where, value)

    y_ok, ctx_ok = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    grads_ok = fastbn.batch_norm_backward(dy, ctx_ok)
    y, ctx = fastbn.batch_norm_forward(bad, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)

    assert not np.isfinite(ctx.mean[c]) or not np.isfinite(ctx.var[c])
    assert not np.any(np.isfinite(take_channel(y, axis, c)))
    assert not np.any(np.isfinite(take_channel(dx, axis, c)))
    assert not np.isfinite(dgamma[c])
    # Other channels: exactly the result without the bad value.
    np.testing.assert_array_equal(_others(y, axis, c), _others(y_ok, axis, c))
    np.testing.assert_array_equal(_others(dx, axis, c), _others(grads_ok[0], axis, c))
    np.testing.assert_array_equal(np.delete(dgamma, c), np.delete(grads_ok[1], c))
    np.testing.assert_array_equal(np.delete(dbeta, c), np.delete(grads_ok[2], c))
    np.testing.assert_array_equal(np.delete(ctx.mean, c), np.delete(ctx_ok.mean, c))
    np.testing.assert_array_equal(np.delete(ctx.var, c), np.delete(ctx_ok.var, c))

    mean, var = fastbn.batch_stats(bad, axis=axis)
    assert not (np.isfinite(mean[c]) and np.isfinite(var[c]))
    np.testing.assert_array_equal(np.delete(var, c), np.delete(ctx_ok.var, c))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(("shape", "axis"), NAN_CASES, ids=NAN_IDS)
def test_nonfinite_dy_stays_in_its_channel(rng, shape, axis, value):
    x = rng.standard_normal(shape).astype(np.float64)
    gamma = rng.uniform(0.5, 2, shape[axis])
    beta = rng.uniform(-1, 1, shape[axis])
    dy = rng.standard_normal(shape)
    c = 3
    bad = _poison(dy, axis, c, "middle", value)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    y_copy = y.copy()
    dx_ok, dg_ok, db_ok = fastbn.batch_norm_backward(dy, ctx)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(bad, ctx)
    assert not np.any(np.isfinite(take_channel(dx, axis, c)))
    assert not np.isfinite(dgamma[c]) and not np.isfinite(dbeta[c])
    np.testing.assert_array_equal(_others(dx, axis, c), _others(dx_ok, axis, c))
    np.testing.assert_array_equal(np.delete(dgamma, c), np.delete(dg_ok, c))
    np.testing.assert_array_equal(np.delete(dbeta, c), np.delete(db_ok, c))
    np.testing.assert_array_equal(y, y_copy)


@pytest.mark.parametrize(("shape", "axis"), [((16, 5), 1), ((4, 5, 6, 7), 1)])
def test_nonfinite_x_in_inference_stays_in_place(rng, shape, axis):
    """Eval mode has no statistics to poison: only the bad element itself is NaN."""
    x = rng.standard_normal(shape)
    rm, rv = rng.uniform(-1, 1, shape[axis]), rng.uniform(0.5, 2, shape[axis])
    bad = _poison(x, axis, 2, "middle", np.nan)
    y_ok = fastbn.batch_norm_inference(x, rm, rv)
    y = fastbn.batch_norm_inference(bad, rm, rv)
    assert np.array_equal(np.isnan(y), np.isnan(bad))
    np.testing.assert_array_equal(y[~np.isnan(bad)], y_ok[~np.isnan(bad)])
