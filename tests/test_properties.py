"""Property-based tests (Hypothesis) over shapes, axes, dtypes, ReLU and affine parameters.

Examples are small arrays (2-4 dimensions of 1-5) drawn with a seed, a data
kind (Gaussian or small integers, the latter giving ties and constant
channels), a scale and an offset.  The example count comes from the profile in
``conftest.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn
from fastbn import reference

EPS = 1e-5
#: Agreement with the float64 reference, relative to the natural scale.
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
#: Unit roundoff.
U = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53}


@dataclass
class Case:
    x: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    dy: np.ndarray
    axis: int
    relu: bool

    @property
    def n(self):
        return self.x.shape[self.axis]

    @property
    def axes(self):
        return tuple(a for a in range(self.x.ndim) if a != self.axis % self.x.ndim)

    @property
    def cshape(self):
        shape = [1] * self.x.ndim
        shape[self.axis % self.x.ndim] = self.n
        return tuple(shape)

    def per_channel(self, values, fill):
        v = np.full(self.n, fill) if values is None else values.astype(np.float64)
        return v.reshape(self.cshape)


@st.composite
def cases(draw, relu=None, affine=None, dtype=None):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    assume(math.prod(shape) // shape[axis] >= 2)  # training needs 2 values per channel
    dtype = draw(st.sampled_from([np.float32, np.float64])) if dtype is None else dtype
    relu = draw(st.booleans()) if relu is None else relu
    affine = draw(st.sampled_from(["none", "both", "gamma", "beta"])) if affine is None else affine
    kind = draw(st.sampled_from(["normal", "integers"]))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e3]))
    offset = scale * draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = shape[axis]
    if kind == "normal":
        base = rng.standard_normal(shape)
    else:  # ties, and often constant channels
        base = rng.integers(-2, 3, shape).astype(np.float64)
    x = (base * scale + offset).astype(dtype)
    gamma = (rng.uniform(0.25, 4, n) * rng.choice([-1, 1], n)).astype(dtype)
    beta = rng.uniform(-2, 2, n).astype(dtype)
    if affine in ("none", "beta"):
        gamma = None
    if affine in ("none", "gamma"):
        beta = None
    dy = rng.standard_normal(shape).astype(dtype)
    return Case(x, gamma, beta, dy, axis, relu)


def is_constant(case):
    xc = np.moveaxis(case.x, case.axis, 0).reshape(case.n, -1)
    return np.all(xc == xc[:, :1], axis=1)


def max_abs(a):
    return float(np.max(np.abs(a))) if np.size(a) else 0.0


def assert_close(actual, expected, scale, tol, what):
    err = max_abs(np.asarray(actual, np.float64) - expected)
    assert err <= tol * scale, f"{what}: error {err:.3g} > {tol:.1g} * {scale:.3g}"


def assert_le(a, b):
    """Elementwise a <= b, with a readable message."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    bad = ~(a <= b)
    assert not bad.any(), f"{a[bad]} > bound {b[bad]}"


def run(case):
    y, ctx = fastbn.batch_norm_forward(case.x, case.gamma, case.beta, eps=EPS, axis=case.axis,
                                       relu=case.relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(case.dy, ctx)
    return y, ctx, dx, dgamma, dbeta


@given(cases())
def test_agrees_with_reference(case):
    y, ctx, dx, dgamma, dbeta = run(case)
    dtype = case.x.dtype
    up = [None if a is None else a.astype(np.float64) for a in (case.x, case.gamma, case.beta,
                                                                 case.dy)]
    y_lin, cache = reference.forward(up[0], up[1], up[2], eps=EPS, axis=case.axis)
    # Condition number of centring: both sides round the float64 mean (~u64 * |x|),
    # which x_hat sees multiplied by inv_std (|mean| / std up to 1e3 here).
    cond = max_abs(up[0]) * float(np.max(cache["inv_std"]))
    tol = TOL[dtype] + 16 * U[np.dtype(np.float64)] * cond
    g = case.per_channel(case.gamma, 1.0)
    mask = (y > 0) if case.relu else np.ones(y.shape, bool)
    if case.relu:  # the mask agrees wherever the pre-activation is not within rounding of 0
        clear = np.abs(y_lin) > 1e3 * tol * (max_abs(g) * max_abs(cache["x_hat"]) + 1)
        assert np.array_equal(mask[clear], (y_lin > 0)[clear])
    dy_eff = up[3] * mask
    ref_dx, ref_dg, ref_db = reference.backward(dy_eff, cache)
    _, tape = reference.graph_forward(up[0], up[1], up[2], eps=EPS, axis=case.axis)
    graph_dx, graph_dg, graph_db = reference.graph_backward(dy_eff, tape)

    y_ref = np.maximum(y_lin, 0) if case.relu else y_lin
    y_scale = max(max_abs(y_ref), max_abs(g))
    assert_close(y, y_ref, y_scale, tol, "y")
    mean, var = fastbn.batch_stats(case.x, axis=case.axis)
    x_scale = max_abs(up[0]) + 1e-300
    assert_close(mean, cache["mean"].ravel(), x_scale, 1e-13, "mean")
    assert_close(var, cache["var"].ravel(), max(max_abs(cache["var"]), x_scale**2 * 1e-13),
                 1e-12, "var")
    np.testing.assert_array_equal(ctx.mean, mean)
    np.testing.assert_array_equal(ctx.var, var)

    dx_scale = max(max_abs(ref_dx), max_abs(g * cache["inv_std"] * dy_eff)) + 1e-300
    dg_scale = max(max_abs(ref_dg), max_abs(dy_eff)) + 1e-300
    for name, ref in (("reference", (ref_dx, ref_dg, ref_db)),
                      ("graph", (graph_dx, graph_dg, graph_db))):
        assert_close(dx, ref[0], dx_scale, tol, f"dx vs {name}")
        if case.gamma is not None:
            assert_close(dgamma, ref[1], dg_scale, tol, f"dgamma vs {name}")
        if case.beta is not None:
            assert_close(dbeta, ref[2], dg_scale, tol, f"dbeta vs {name}")
    assert (dgamma is None) == (case.gamma is None)
    assert (dbeta is None) == (case.beta is None)


@given(cases(relu=False))
def test_output_is_normalized_per_channel(case):
    """mean(y) == beta per channel; var(y) == var/(var+eps) (about 1) for gamma == 1.

    Rounding bound per element of y: a few ulps of |y| and |beta|, plus the
    float64 rounding of the mean (~u64 * |x|) amplified by |gamma| * inv_std.
    """
    y, ctx, _, _, _ = run(case)
    u = U[case.x.dtype]
    y64 = y.astype(np.float64)
    b = case.per_channel(case.beta, 0.0).ravel()
    g = case.per_channel(case.gamma, 1.0).ravel()
    x_max = np.max(np.abs(case.x.astype(np.float64)), axis=case.axes)
    y_max = np.max(np.abs(y64), axis=case.axes)
    delta = 8 * u * (y_max + np.abs(b)) + 16 * U[np.dtype(np.float64)] * np.abs(
        g) * ctx.inv_std * x_max + 1e-300
    assert_le(np.abs(y64.mean(axis=case.axes) - b), delta)

    constant = is_constant(case)
    yc = np.moveaxis(y, case.axis, 0).reshape(case.n, -1)
    for c in np.flatnonzero(constant):
        assert ctx.var[c] == 0.0
        assert np.all(yc[c] == case.x.dtype.type(b[c]))  # exactly beta
    if case.gamma is None:
        y_var = y64.var(axis=case.axes)
        expected = ctx.var / (ctx.var + EPS)
        x_hat_max = np.max(np.abs(y64 - b.reshape(case.cshape)), axis=case.axes) + delta
        bound = 2 * x_hat_max * delta + delta**2
        assert_le(np.abs(y_var - expected), bound)
        big = ~constant & (ctx.var >= 1.0)  # eps / var <= 1e-5
        np.testing.assert_allclose(y_var[big], 1.0, rtol=1e-5 + 4 * bound.max(initial=0))


@given(cases())
def test_dbeta_is_sum_of_masked_dy(case):
    y, _, _, _, dbeta = run(case)
    assert (dbeta is None) == (case.beta is None)
    if dbeta is None:
        return
    dy_eff = case.dy.astype(np.float64) * ((y > 0) if case.relu else 1)
    expected = dy_eff.sum(axis=case.axes)
    bound = 8 * U[dbeta.dtype] * np.abs(dy_eff).sum(axis=case.axes) + 1e-300
    assert_le(np.abs(dbeta - expected), bound)


@given(cases(relu=False))
def test_dx_is_orthogonal_to_one_and_x_hat(case):
    """Closed-form properties per channel: sum(dx) == 0 and
    sum(dx * x_hat) == gamma * inv_std * sum(dy * x_hat) * eps / (var + eps)  (0 if eps == 0).
    """
    _, ctx, dx, _, _ = run(case)
    u = U[case.x.dtype]
    mean = ctx.mean.reshape(case.cshape)
    inv_std = ctx.inv_std.reshape(case.cshape)
    x_hat = (case.x.astype(np.float64) - mean) * inv_std
    g = case.per_channel(case.gamma, 1.0)
    gain = np.abs(g * inv_std)
    dy = case.dy.astype(np.float64)
    n = case.x.size // case.n
    mean_dy = dy.mean(axis=case.axes, keepdims=True)
    mean_dy_xhat = (dy * x_hat).mean(axis=case.axes, keepdims=True)
    # Size of the terms dx is computed from: rounding errors scale with them.
    # The last one is the float64 rounding of the mean (~u64 * |x|) carried
    # through the x_hat term.
    terms = gain * (np.abs(dy) + np.abs(mean_dy) + np.abs(x_hat * mean_dy_xhat)
                    + U[np.dtype(np.float64)] / u * np.abs(mean_dy_xhat) * inv_std
                    * np.abs(case.x.astype(np.float64)))
    dx64 = dx.astype(np.float64)
    s0 = dx64.sum(axis=case.axes)
    s1 = (dx64 * x_hat).sum(axis=case.axes)
    s1_expected = (g * inv_std * (dy * x_hat).sum(axis=case.axes, keepdims=True)).ravel() * (
        EPS / (ctx.var + EPS))
    slack = 16 * u * max(n, 8)
    assert_le(np.abs(s0), slack * terms.sum(axis=case.axes) + 1e-300)
    assert_le(np.abs(s1 - s1_expected),
                                 slack * (terms * (np.abs(x_hat) + 1)).sum(axis=case.axes)
                                 + 1e-300)


@given(cases(relu=False))
def test_fused_relu_is_relu_of_the_plain_output(case):
    y_plain, ctx_plain = fastbn.batch_norm_forward(case.x, case.gamma, case.beta, axis=case.axis)
    y_relu, ctx_relu = fastbn.batch_norm_forward(case.x, case.gamma, case.beta, axis=case.axis,
                                                 relu=True)
    np.testing.assert_array_equal(y_relu, np.maximum(y_plain, 0))
    assert np.all(y_relu >= 0)
    np.testing.assert_array_equal(ctx_relu.mean, ctx_plain.mean)
    # Backward through the fused ReLU == plain backward of the masked dy.
    dx_relu, _, _ = fastbn.batch_norm_backward(case.dy, ctx_relu)
    masked = np.where(y_plain > 0, case.dy, 0).astype(case.x.dtype)
    dx_plain, _, _ = fastbn.batch_norm_backward(masked, ctx_plain)
    scale = max_abs(case.per_channel(case.gamma, 1.0) * ctx_plain.inv_std.reshape(case.cshape)
                    * case.dy) + 1e-300
    assert_close(dx_relu, dx_plain.astype(np.float64), scale, TOL[case.x.dtype], "dx")


@given(cases(), st.data())
def test_layout_and_channel_order_do_not_matter(case, data):
    """Moving the channel axis or permuting channels moves/permutes the results."""
    y, ctx, dx, dgamma, dbeta = run(case)
    new_axis = data.draw(st.integers(0, case.x.ndim - 1), label="new_axis")
    perm = np.asarray(data.draw(st.permutations(range(case.n)), label="perm"), dtype=np.intp)
    ax = case.axis % case.x.ndim

    def move(a):
        return np.ascontiguousarray(np.moveaxis(np.take(a, perm, axis=ax), ax, new_axis))

    take = (lambda v: None if v is None else v[perm])
    y2, ctx2 = fastbn.batch_norm_forward(move(case.x), take(case.gamma), take(case.beta),
                                         eps=EPS, axis=new_axis, relu=case.relu)
    dx2, dgamma2, dbeta2 = fastbn.batch_norm_backward(move(case.dy), ctx2)
    tol = TOL[case.x.dtype]
    x_max = max_abs(case.x.astype(np.float64))
    u64 = U[np.dtype(np.float64)]
    np.testing.assert_allclose(ctx2.mean, ctx.mean[perm], rtol=0, atol=64 * u64 * x_max)
    np.testing.assert_allclose(ctx2.var, ctx.var[perm], rtol=1e-11,
                               atol=64 * u64 * x_max**2)
    g = case.per_channel(case.gamma, 1.0)
    y_scale = max(max_abs(y), max_abs(g))
    if case.relu:
        # A pre-activation within rounding of 0 may land on either side of the
        # ReLU; gradients are comparable only where both runs agree on the mask.
        flipped = (move(y) > 0) != (y2 > 0)
        assert max_abs(y2[flipped]) <= 1e3 * tol * y_scale
        assume(not flipped.any())
    assert_close(y2, move(y).astype(np.float64), y_scale, tol, "y")
    dx_scale = max_abs(g * ctx.inv_std.reshape(case.cshape) * case.dy) + 1e-300
    assert_close(dx2, move(dx).astype(np.float64), dx_scale, tol, "dx")
    dg_scale = max_abs(case.dy) * max(1, case.x.size // case.n)
    if dgamma is not None:
        assert_close(dgamma2, dgamma[perm].astype(np.float64), dg_scale, tol, "dgamma")
    if dbeta is not None:
        assert_close(dbeta2, dbeta[perm].astype(np.float64), dg_scale, tol, "dbeta")


@given(cases(affine="both"))
def test_inference_with_batch_statistics_matches_training(case):
    y, ctx, _, _, _ = run(case)
    y_eval, ctx_eval = fastbn.batch_norm_inference(
        case.x, ctx.mean, ctx.var, case.gamma, case.beta, eps=EPS, axis=case.axis,
        relu=case.relu, return_context=True)
    np.testing.assert_array_equal(ctx_eval.inv_std, ctx.inv_std)
    # The same sweep with the same constants: bitwise equal.
    np.testing.assert_array_equal(y_eval, y)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(case.dy, ctx_eval)
    mask = (y > 0) if case.relu else 1
    dy_eff = case.dy.astype(np.float64) * mask
    gain = case.per_channel(case.gamma, 1.0) * ctx.inv_std.reshape(case.cshape)
    assert_close(dx, dy_eff * gain, max_abs(dy_eff * gain) + 1e-300, 4 * U[case.x.dtype], "dx")
