"""Every public function against the NumPy references (plain and graph-based) and PyTorch.

The references run in float64 on the same (upcast) data, so a float32 result
is compared with the exact answer for its input.  Error measure: max-abs error
over max-abs value of the expected array.  For ``dx`` the denominator is the
size of the closed form's terms, ``max|gamma * inv_std * dy'|`` (at least
``max|dx|``): with 2 values per channel ``dx`` is itself ~eps/var smaller than
its terms, and rounding errors scale with the terms, not with the result.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import reference

EPS = 1e-5
TOL = {np.float32: 1e-5, np.float64: 1e-12}

#: (shape, channel axis): rows, planes, channels-last and odd sizes.
CASES = [
    ((7, 3), 1),             # (N, C)
    ((2, 1000), 1),          # N = 2, C = 1000
    ((7, 1), 1),             # C = 1
    ((2, 3, 5), 1),          # (N, C, L)
    ((7, 3, 1), 1),          # planes of 1 value
    ((7, 3, 1, 1), 1),       # (N, C, 1, 1)
    ((2, 3, 3000), 1),       # planes of 3000 values
    ((7, 1, 50, 60), 1),     # C = 1, planes of 3000 values
    ((2, 1000, 3), 1),       # C = 1000, small planes
    ((4, 3, 5, 6), 1),       # (N, C, H, W)
    ((2, 5, 6, 3), -1),      # (N, H, W, C)
    ((2, 3, 5, 1000), -1),   # channels-last, C = 1000
    ((3, 4, 5), 0),          # channel axis first: outer == 1
    ((5, 3, 4), -2),         # negative middle axis
]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]
AFFINE = ["none", "both", "gamma", "beta"]


def rel_err(actual, expected, scale=None):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    denom = np.max(np.abs(expected)) if scale is None else scale
    denom = max(float(denom), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual - expected))) / denom


def channel_shape(ndim, axis, n):
    shape = [1] * ndim
    shape[axis % ndim] = n
    return tuple(shape)


def make_data(rng, shape, axis, dtype, affine="both"):
    """x with a different mean and spread per channel, gamma of both signs, beta, dy."""
    n = shape[axis]
    cs = channel_shape(len(shape), axis, n)
    offsets = rng.uniform(-3, 3, n).reshape(cs)
    spreads = rng.uniform(0.5, 4, n).reshape(cs)
    x = (rng.standard_normal(shape) * spreads + offsets).astype(dtype)
    gamma = (rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n)).astype(dtype)
    beta = rng.uniform(-1, 1, n).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if affine in ("none", "beta"):
        gamma = None
    if affine in ("none", "gamma"):
        beta = None
    return x, gamma, beta, dy


def dx_scale(dx_expected, gamma, inv_std, dy, axis):
    g = 1.0 if gamma is None else np.asarray(gamma, np.float64)
    k = (g * inv_std).reshape(channel_shape(dy.ndim, axis, inv_std.size))
    return max(np.max(np.abs(dx_expected)), np.max(np.abs(k * dy)))


# ---------------------------------------------------------------------------
# Training forward + backward against both references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_train_matches_references(rng, shape, axis, dtype, affine, relu):
    x, gamma, beta, dy = make_data(rng, shape, axis, dtype, affine)
    tol = TOL[dtype]
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)

    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert dx.shape == x.shape and dx.dtype == x.dtype and dx.flags.c_contiguous
    assert ctx.mean.dtype == ctx.var.dtype == ctx.inv_std.dtype == np.float64
    assert ctx.count == x.size // shape[axis]
    assert (dgamma is None) == (gamma is None)
    assert (dbeta is None) == (beta is None)
    if gamma is not None:
        assert dgamma.dtype == gamma.dtype and dgamma.shape == gamma.shape
    if beta is not None:
        assert dbeta.dtype == beta.dtype and dbeta.shape == beta.shape

    # The references run in float64 on the (exactly upcast) data: in float32
    # they lose digits of their own (e.g. with 2 close values per channel).
    x, gamma, beta, dy = (None if a is None else a.astype(np.float64)
                          for a in (x, gamma, beta, dy))

    # Pre-activations and the ReLU mask.  Whether a pre-activation within
    # rounding of 0 passes the mask is implementation-defined, so the
    # references' gradients are computed for fastbn's own mask; the mask itself
    # must agree with the reference's wherever the pre-activation is not tiny.
    y_lin, cache = reference.forward(x, gamma, beta, eps=EPS, axis=axis)
    mask = (y > 0) if relu else np.ones(x.shape, bool)
    if relu:
        clear = np.abs(y_lin) > 1e3 * tol * np.max(np.abs(y_lin))
        assert np.array_equal(mask[clear], (y_lin > 0)[clear])
    dy_eff = dy * mask
    y_ref = np.maximum(y_lin, 0) if relu else y_lin

    # Plain closed-form reference.
    assert rel_err(y, y_ref) <= tol
    assert rel_err(ctx.mean, cache["mean"].ravel()) <= tol
    assert rel_err(ctx.var, cache["var"].ravel()) <= tol
    assert rel_err(ctx.inv_std, cache["inv_std"].ravel()) <= tol
    ref_dx, ref_dg, ref_db = reference.backward(dy_eff, cache)
    scale = dx_scale(ref_dx, gamma, ctx.inv_std, dy_eff, axis)
    assert rel_err(dx, ref_dx, scale) <= tol
    if gamma is not None:
        assert rel_err(dgamma, ref_dg) <= tol
    if beta is not None:
        assert rel_err(dbeta, ref_db) <= tol

    # Graph-based staged reference.
    y_graph, tape = reference.graph_forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    assert rel_err(y, y_graph) <= tol
    _, tape_lin = reference.graph_forward(x, gamma, beta, eps=EPS, axis=axis)
    g_dx, g_dg, g_db = reference.graph_backward(dy_eff, tape_lin)
    assert rel_err(dx, g_dx, dx_scale(g_dx, gamma, ctx.inv_std, dy_eff, axis)) <= tol
    if gamma is not None:
        assert rel_err(dgamma, g_dg) <= tol
    if beta is not None:
        assert rel_err(dbeta, g_db) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), [((6, 4), 1), ((3, 4, 7, 5), 1), ((3, 7, 5, 4), -1)])
def test_relu_through_the_references_own_mask(rng, shape, axis, dtype):
    """The references' own ReLU code (not fastbn's mask) gives fastbn's gradients."""
    x, gamma, beta, dy = make_data(rng, shape, axis, np.float64)
    x, gamma, beta, dy = (a.astype(dtype) for a in (x, gamma, beta, dy))
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, axis=axis, relu=True)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    x64, g64, b64, dy64 = (a.astype(np.float64) for a in (x, gamma, beta, dy))
    y_ref, cache = reference.forward(x64, g64, b64, eps=EPS, axis=axis, relu=True)
    # No pre-activation near 0, so fastbn's mask is the exact one.
    assert np.min(np.abs(y_ref[y_ref != 0])) > 1e-4
    assert np.array_equal(y > 0, y_ref > 0)
    ref = reference.backward(dy64, cache)
    _, tape = reference.graph_forward(x64, g64, b64, eps=EPS, axis=axis, relu=True)
    graph = reference.graph_backward(dy64, tape)
    tol = TOL[dtype]
    for expected in (ref, graph):
        scale = dx_scale(expected[0], gamma, ctx.inv_std, dy64 * (y_ref > 0), axis)
        assert rel_err(dx, expected[0], scale) <= tol
        assert rel_err(dgamma, expected[1]) <= tol
        assert rel_err(dbeta, expected[2]) <= tol
    assert rel_err(y, y_ref) <= tol


def test_relu_masks_gradient_where_output_is_zero(rng):
    x, gamma, beta, dy = make_data(rng, (64, 5, 9), 1, np.float64)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=True)
    dx_relu, dg_relu, db_relu = fastbn.batch_norm_backward(dy, ctx)
    assert np.all(y >= 0) and np.any(y == 0) and np.any(y > 0)
    # Same gradients as the plain layer fed a masked dy.
    _, ctx_plain = fastbn.batch_norm_forward(x, gamma, beta)
    dx_plain, dg_plain, db_plain = fastbn.batch_norm_backward(dy * (y > 0), ctx_plain)
    np.testing.assert_allclose(dx_relu, dx_plain, rtol=0, atol=1e-12 * np.abs(dx_plain).max())
    np.testing.assert_allclose(dg_relu, dg_plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db_relu, db_plain, rtol=1e-12, atol=1e-12)
    # And not the unmasked ones.
    dx_unmasked, _, _ = fastbn.batch_norm_backward(dy, ctx_plain)
    assert rel_err(dx_relu, dx_unmasked) > 1e-3


def test_default_arguments_are_axis1_eps1e5_no_affine(rng):
    x, _, _, dy = make_data(rng, (8, 3, 4), 1, np.float64)
    y, ctx = fastbn.batch_norm_forward(x)
    y_ref, cache = reference.forward(x, eps=1e-5, axis=1)
    assert rel_err(y, y_ref) <= 1e-12
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    assert dgamma is None and dbeta is None
    assert rel_err(dx, reference.backward(dy, cache)[0]) <= 1e-12


@pytest.mark.parametrize("eps", [1e-3, 0.5, 2])
def test_eps_is_used(rng, eps):
    x, gamma, beta, dy = make_data(rng, (9, 4, 3), 1, np.float64)
    x *= 0.05  # small variance: eps matters
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=eps)
    y_ref, cache = reference.forward(x, gamma, beta, eps=eps)
    assert rel_err(y, y_ref) <= 1e-12
    np.testing.assert_allclose(ctx.inv_std, 1 / np.sqrt(ctx.var + eps), rtol=1e-14)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    ref = reference.backward(dy, cache)
    assert rel_err(dx, ref[0]) <= 1e-12
    assert rel_err(dgamma, ref[1]) <= 1e-12


def test_parameter_dtypes_are_independent_of_data_dtype(rng):
    """gamma/beta may be float32 with float64 data and vice versa; grads keep their dtype."""
    x, gamma, beta, dy = make_data(rng, (16, 3, 5), 1, np.float64)
    g32, b32 = gamma.astype(np.float32), beta.astype(np.float32)
    y, ctx = fastbn.batch_norm_forward(x, g32, b32)
    _, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    assert y.dtype == np.float64 and dgamma.dtype == np.float32 and dbeta.dtype == np.float32
    y_ref, cache = reference.forward(x, g32.astype(np.float64), b32.astype(np.float64))
    _, ref_dg, ref_db = reference.backward(dy, cache)
    assert rel_err(y, y_ref) <= 1e-12
    assert rel_err(dgamma, ref_dg) <= 1e-6
    assert rel_err(dbeta, ref_db) <= 1e-6
    x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
    _, ctx = fastbn.batch_norm_forward(x32, gamma, beta)
    _, dgamma, dbeta = fastbn.batch_norm_backward(dy32, ctx)
    assert dgamma.dtype == np.float64 and dbeta.dtype == np.float64


def test_context_can_be_reused_and_inputs_are_not_modified(rng):
    for shape, relu in [((10, 4, 6), True), ((10, 4, 6), False), ((30, 7), True)]:
        x, gamma, beta, dy = make_data(rng, shape, 1, np.float32)
        copies = [a.copy() for a in (x, gamma, beta, dy)]
        y, ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=relu)
        first = fastbn.batch_norm_backward(dy, ctx)
        second = fastbn.batch_norm_backward(dy, ctx)
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
        for a, b in zip((x, gamma, beta, dy), copies, strict=True):
            np.testing.assert_array_equal(a, b)
        # A second dy gives its own gradients, not the first one's.
        third = fastbn.batch_norm_backward(2 * dy, ctx)
        np.testing.assert_allclose(third[0], 2 * first[0], rtol=1e-5, atol=1e-6)


def test_backward_uses_the_parameters_of_the_forward_call(rng):
    """Updating gamma/beta in place between forward and backward (an optimizer
    step) does not change the gradients of the forward that was run."""
    for shape, relu in [((10, 4, 6), True), ((30, 4), True), ((30, 4), False)]:
        x, gamma, beta, dy = make_data(rng, shape, 1, np.float64)
        _, ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=relu)
        expected = fastbn.batch_norm_backward(dy, ctx)
        gamma *= -3.0
        beta += 5.0
        for a, b in zip(fastbn.batch_norm_backward(dy, ctx), expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_accepts_array_likes(rng):
    x = [[1.0, 2.0], [3.0, 5.0], [4.0, -1.0]]
    y, ctx = fastbn.batch_norm_forward(x, [1.5, 0.5], [0.0, 1.0])
    y_ref, _ = reference.forward(np.array(x), np.array([1.5, 0.5]), np.array([0.0, 1.0]))
    assert rel_err(y, y_ref) <= 1e-12
    mean, var = fastbn.batch_stats(x)
    np.testing.assert_allclose(mean, np.mean(x, axis=0), rtol=1e-15)
    np.testing.assert_allclose(var, np.var(x, axis=0), rtol=1e-14)


# ---------------------------------------------------------------------------
# batch_stats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=CASE_IDS)
def test_batch_stats(rng, shape, axis, dtype):
    x, _, _, _ = make_data(rng, shape, axis, dtype)
    mean, var = fastbn.batch_stats(x, axis=axis)
    assert mean.dtype == var.dtype == np.float64
    assert mean.shape == var.shape == (shape[axis],)
    axes = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    x64 = x.astype(np.float64)
    # Statistics are accumulated in float64 whatever the data dtype.
    assert rel_err(mean, x64.mean(axis=axes)) <= 1e-13
    assert rel_err(var, x64.var(axis=axes)) <= 1e-13
    _, cache = reference.forward(x, axis=axis)
    tol = TOL[dtype]
    assert rel_err(mean, cache["mean"].ravel()) <= tol
    assert rel_err(var, cache["var"].ravel()) <= tol
    # The training forward normalizes with exactly these statistics.
    _, ctx = fastbn.batch_norm_forward(x, axis=axis)
    np.testing.assert_allclose(ctx.mean, mean, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(ctx.var, var, rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------
# Inference (eval mode), also differentiated with return_context=True
# ---------------------------------------------------------------------------

INFERENCE_CASES = [c for c in CASES if c[0] not in [(2, 3, 3000), (7, 1, 50, 60)]] + [
    ((1, 3), 1),           # one value per channel is fine in eval mode
    ((1, 4, 5, 5), 1),
    ((2, 1, 3000), 1),
]


def make_running(rng, n, dtype):
    mean = rng.uniform(-3, 3, n).astype(dtype)
    var = rng.uniform(0.2, 9, n).astype(dtype)
    if n > 1:
        var[0] = 0  # allowed: non-negative
    return mean, var


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("affine", ["none", "both", "gamma"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), INFERENCE_CASES,
                         ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in INFERENCE_CASES])
def test_inference_and_its_backward(rng, shape, axis, dtype, affine, relu):
    x, gamma, beta, dy = make_data(rng, shape, axis, dtype, affine)
    n = shape[axis]
    rm, rv = make_running(rng, n, dtype)
    tol = TOL[dtype]
    y = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, eps=EPS, axis=axis, relu=relu)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    y_lin = reference.inference(x, rm, rv, gamma, beta, eps=EPS, axis=axis)
    y_ref = reference.inference(x, rm, rv, gamma, beta, eps=EPS, axis=axis, relu=relu)
    assert rel_err(y, y_ref) <= tol

    y2, ctx = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, eps=EPS, axis=axis,
                                          relu=relu, return_context=True)
    np.testing.assert_array_equal(y2, y)
    assert ctx.batch_stats is False
    np.testing.assert_array_equal(ctx.mean, rm.astype(np.float64))
    np.testing.assert_array_equal(ctx.var, rv.astype(np.float64))
    inv_std = 1 / np.sqrt(rv.astype(np.float64) + EPS)
    assert rel_err(ctx.inv_std, inv_std) <= 1e-15

    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    # Eval mode: statistics are constants.
    mask = (y > 0) if relu else np.ones(x.shape, bool)
    if relu:
        clear = np.abs(y_lin) > 1e3 * tol * np.max(np.abs(y_lin))
        assert np.array_equal(mask[clear], (y_lin > 0)[clear])
    cs = channel_shape(x.ndim, axis, n)
    g = np.ones(n) if gamma is None else gamma.astype(np.float64)
    dy_eff = dy.astype(np.float64) * mask
    x_hat = (x.astype(np.float64) - rm.astype(np.float64).reshape(cs)) * inv_std.reshape(cs)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    assert rel_err(dx, dy_eff * (g * inv_std).reshape(cs)) <= tol
    assert dx.dtype == x.dtype
    if gamma is not None:
        assert rel_err(dgamma, (dy_eff * x_hat).sum(axis=axes)) <= tol
        assert dgamma.dtype == gamma.dtype
    else:
        assert dgamma is None
    if beta is not None:
        assert rel_err(dbeta, dy_eff.sum(axis=axes)) <= tol
    else:
        assert dbeta is None


def test_inference_with_batch_statistics_equals_training_forward(rng):
    x, gamma, beta, _ = make_data(rng, (16, 5, 7), 1, np.float64)
    y_train, ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=True)
    y_eval = fastbn.batch_norm_inference(x, ctx.mean, ctx.var, gamma, beta, relu=True)
    np.testing.assert_allclose(y_eval, y_train, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------
# out= buffers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis", "relu"),
                         [((9, 5), 1, False), ((4, 3, 6, 7), 1, True), ((4, 6, 7, 3), -1, True),
                          ((4, 3, 6, 7), 1, False)])
def test_out_buffers_are_filled_and_returned(rng, shape, axis, relu, dtype):
    x, gamma, beta, dy = make_data(rng, shape, axis, dtype)
    y_new, ctx_new = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx_new, dg_new, db_new = fastbn.batch_norm_backward(dy, ctx_new)

    out = np.full(shape, np.nan, dtype)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu, out=out)
    assert y is out
    np.testing.assert_array_equal(out, y_new)
    dx_out = np.full(shape, np.nan, dtype)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx_out, dx_new)
    np.testing.assert_array_equal(dgamma, dg_new)
    np.testing.assert_array_equal(dbeta, db_new)

    rm, rv = make_running(rng, shape[axis], dtype)
    expected = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, relu=relu)
    out = np.full(shape, np.nan, dtype)
    y = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, relu=relu, out=out)
    assert y is out
    np.testing.assert_array_equal(out, expected)
    out = np.full(shape, np.nan, dtype)
    y, ctx = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, relu=relu, out=out,
                                         return_context=True)
    assert y is out
    dx_out = np.full(shape, np.nan, dtype)
    dx, _, _ = fastbn.batch_norm_backward(dy, ctx, out=dx_out)
    assert dx is dx_out and np.all(np.isfinite(dx_out))


def test_out_buffer_reused_across_steps(rng):
    """A training loop can reuse one y buffer and one dx buffer."""
    y_buf = np.empty((12, 4, 5), np.float32)
    dx_buf = np.empty_like(y_buf)
    for _ in range(3):
        x, gamma, beta, dy = make_data(rng, (12, 4, 5), 1, np.float32)
        y, ctx = fastbn.batch_norm_forward(x, gamma, beta, out=y_buf)
        dx, _, _ = fastbn.batch_norm_backward(dy, ctx, out=dx_buf)
        y_ref, cache = reference.forward(x, gamma, beta)
        assert y is y_buf and dx is dx_buf
        assert rel_err(y_buf, y_ref) <= 1e-5
        assert rel_err(dx_buf, reference.backward(dy, cache)[0]) <= 1e-5


# ---------------------------------------------------------------------------
# Non-contiguous and read-only inputs
# ---------------------------------------------------------------------------


def _layouts(a):
    """Non-C-contiguous arrays with the values of ``a``."""
    return {
        "fortran": np.asfortranarray(a),
        "batch-last": np.moveaxis(np.moveaxis(a, 0, -1).copy(), -1, 0),
        "negative-strides": a[::-1].copy()[::-1],
        "strided-slice": np.repeat(a, 2, axis=-1)[..., ::2],
    }


@pytest.mark.parametrize("layout", ["fortran", "batch-last", "negative-strides", "strided-slice"])
@pytest.mark.parametrize(("shape", "axis", "relu"),
                         [((9, 6), 1, False), ((5, 3, 4, 6), 1, True), ((5, 4, 6, 3), -1, False)])
def test_non_contiguous_inputs_give_contiguous_results(rng, shape, axis, relu, layout):
    x, gamma, beta, dy = make_data(rng, shape, axis, np.float32)
    xv, dyv = _layouts(x)[layout], _layouts(dy)[layout]
    assert not xv.flags.c_contiguous and not dyv.flags.c_contiguous
    np.testing.assert_array_equal(xv, x)
    gv = np.repeat(gamma, 2)[::2]
    bv = np.repeat(beta, 2)[::-2][::-1]
    assert not gv.flags.c_contiguous

    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dg, db = fastbn.batch_norm_backward(dy, ctx)
    yv, ctxv = fastbn.batch_norm_forward(xv, gv, bv, axis=axis, relu=relu)
    dxv, dgv, dbv = fastbn.batch_norm_backward(dyv, ctxv)
    assert yv.flags.c_contiguous and dxv.flags.c_contiguous
    for a, b in [(y, yv), (dx, dxv), (dg, dgv), (db, dbv), (ctx.mean, ctxv.mean),
                 (ctx.var, ctxv.var)]:
        np.testing.assert_array_equal(b, a)
    m, v = fastbn.batch_stats(xv, axis=axis)
    np.testing.assert_array_equal(m, ctx.mean)
    np.testing.assert_array_equal(v, ctx.var)

    rm, rv = make_running(rng, shape[axis], np.float64)
    rmv, rvv = np.repeat(rm, 3)[::3], np.repeat(rv, 2)[::2]
    expected = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, relu=relu)
    got = fastbn.batch_norm_inference(xv, rmv, rvv, gv, bv, axis=axis, relu=relu)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


def test_read_only_inputs(rng):
    for shape, axis in [((9, 6), 1), ((5, 3, 4, 6), 1)]:
        x, gamma, beta, dy = make_data(rng, shape, axis, np.float64)
        rm, rv = make_running(rng, shape[axis], np.float64)
        y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=True)
        grads = fastbn.batch_norm_backward(dy, ctx)
        y_eval = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis)
        stats = fastbn.batch_stats(x, axis=axis)
        for a in (x, gamma, beta, dy, rm, rv):
            a.flags.writeable = False
        y_ro, ctx_ro = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=True)
        np.testing.assert_array_equal(y_ro, y)
        for a, b in zip(fastbn.batch_norm_backward(dy, ctx_ro), grads, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(
            fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis), y_eval)
        for a, b in zip(fastbn.batch_stats(x, axis=axis), stats, strict=True):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# PyTorch as a third oracle
# ---------------------------------------------------------------------------

TORCH_CASES = [((7, 3), 1), ((2, 1000), 1), ((4, 3, 5, 6), 1), ((2, 5, 6, 3), -1),
               ((3, 2, 3000), 1), ((6, 4, 7), 1)]


def _torch_train(torch, x, gamma, beta, dy, axis, relu, eps):
    F = torch.nn.functional
    xt = torch.tensor(x, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    xin = xt.movedim(axis, 1)
    y = F.batch_norm(xin, None, None, gt, bt, training=True, eps=eps)
    if relu:
        y = torch.relu(y)
    y = y.movedim(1, axis)
    (y * torch.tensor(dy)).sum().backward()
    grad = (lambda t: None if t is None else t.grad.numpy())
    return y.detach().numpy(), xt.grad.numpy(), grad(gt), grad(bt)


@pytest.mark.parametrize("affine", ["none", "both"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), TORCH_CASES,
                         ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in TORCH_CASES])
def test_train_matches_torch(rng, shape, axis, dtype, affine):
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = make_data(rng, shape, axis, dtype, affine)
    # PyTorch runs in float64 on the upcast data (its float32 path is less
    # accurate than fastbn's: see test_numerics.py).
    y_t, dx_t, dg_t, db_t = _torch_train(
        torch, *(None if a is None else a.astype(np.float64) for a in (x, gamma, beta, dy)),
        axis, False, EPS)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, axis=axis)
    dx, dg, db = fastbn.batch_norm_backward(dy, ctx)
    tol = TOL[dtype]
    assert rel_err(y, y_t) <= tol
    assert rel_err(dx, dx_t, dx_scale(dx_t, gamma, ctx.inv_std, dy, axis)) <= tol
    if gamma is not None:
        assert rel_err(dg, dg_t) <= tol
        assert rel_err(db, db_t) <= tol


@pytest.mark.parametrize(("shape", "axis"), [((9, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)])
def test_train_relu_matches_torch_float64(rng, shape, axis):
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = make_data(rng, shape, axis, np.float64)
    y_t, dx_t, dg_t, db_t = _torch_train(torch, x, gamma, beta, dy, axis, True, EPS)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, axis=axis, relu=True)
    dx, dg, db = fastbn.batch_norm_backward(dy, ctx)
    assert np.array_equal(y > 0, y_t > 0)
    assert rel_err(y, y_t) <= 1e-12
    assert rel_err(dx, dx_t, dx_scale(dx_t, gamma, ctx.inv_std, dy, axis)) <= 1e-12
    assert rel_err(dg, dg_t) <= 1e-12
    assert rel_err(db, db_t) <= 1e-12


# ---------------------------------------------------------------------------
# Large inputs: every chunked path (several row chunks and channel blocks,
# several plane chunks, planes split inside) merged correctly
# ---------------------------------------------------------------------------

LARGE_CASES = [((600, 2100), 1), ((1, 3, 70000), 1), ((3, 4, 100, 100), 1),
               ((16, 20, 20, 40), -1)]


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), LARGE_CASES,
                         ids=[f"{'x'.join(map(str, s))}-axis{a}" for s, a in LARGE_CASES])
def test_large_chunked_inputs_match_reference(rng, shape, axis, dtype, relu):
    x, gamma, beta, dy = make_data(rng, shape, axis, np.float64)
    # A strong trend along the flattened data: chunks have very different means,
    # so merging per-chunk statistics (Chan's formula) is exercised for real.
    x = (x + np.linspace(0, 40, x.size).reshape(shape) + 100).astype(dtype)
    gamma, beta, dy = gamma.astype(dtype), beta.astype(dtype), dy.astype(dtype)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    up = [a.astype(np.float64) for a in (x, gamma, beta, dy)]
    y_lin, cache = reference.forward(up[0], up[1], up[2], axis=axis)
    mask = (y > 0) if relu else np.ones(shape, bool)
    ref_dx, ref_dg, ref_db = reference.backward(up[3] * mask, cache)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert rel_err(ctx.var, cache["var"].ravel()) <= 1e-12
    assert rel_err(ctx.mean, cache["mean"].ravel()) <= 1e-14
    assert rel_err(y, np.maximum(y_lin, 0) if relu else y_lin) <= tol
    assert rel_err(dx, ref_dx, dx_scale(ref_dx, gamma, ctx.inv_std, up[3] * mask, axis)) <= tol
    assert rel_err(dgamma, ref_dg) <= tol
    assert rel_err(dbeta, ref_db) <= tol


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axis"), [((9, 4), 1), ((3, 4, 5, 6), 1), ((1, 4, 5), 1)])
def test_inference_matches_torch(rng, shape, axis, dtype):
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = make_data(rng, shape, axis, dtype)
    rm, rv = make_running(rng, shape[axis], dtype)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, torch.tensor(rm), torch.tensor(rv), gt, bt,
                                        training=False, eps=EPS)
    (yt * torch.tensor(dy)).sum().backward()
    y, ctx = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, eps=EPS, axis=axis,
                                         return_context=True)
    dx, dg, db = fastbn.batch_norm_backward(dy, ctx)
    tol = TOL[dtype]
    assert rel_err(y, yt.detach().numpy()) <= tol
    assert rel_err(dx, xt.grad.numpy()) <= tol
    assert rel_err(dg, gt.grad.numpy()) <= tol
    assert rel_err(db, bt.grad.numpy()) <= tol
