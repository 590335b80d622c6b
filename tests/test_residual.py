"""The fused residual block ``y = max(bn(x) + residual, 0)`` (fastbn.residual).

Checked against float64 NumPy math, against the composition of fastbn's own
pieces (``batch_norm_forward`` + add + max; masked gradient +
``batch_norm_backward``), against central finite differences in float64, for
NaN confinement, thread-count independence and bad input.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastbn
from fastbn import _launch

#: (shape, axis): planes, channels-last rows, plain rows, 3-D planes.
LAYOUTS = [((4, 6, 5, 7), 1), ((3, 5, 4, 8), -1), ((40, 6), 1), ((5, 3, 11), 1)]
LAYOUT_IDS = ["planes", "channels-last", "rows", "planes-3d"]
DTYPES = [np.float32, np.float64]


def make_inputs(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, c).astype(dtype)
    beta = rng.uniform(-1, 1, c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, r, gamma, beta, dy


def per_channel(a, axis, ndim):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(a, np.float64).reshape(shape)


def reference(x, r, gamma, beta, dy, axis, eps=1e-5):
    """float64 NumPy: (y, dx, dr, dgamma, dbeta) of the block."""
    x, r, dy = (np.asarray(a, np.float64) for a in (x, r, dy))
    ax = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != ax)
    n = x.size // x.shape[ax]
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    g, b = per_channel(gamma, ax, x.ndim), per_channel(beta, ax, x.ndim)
    y = np.maximum(g * x_hat + b + r, 0)
    dr = np.where(y > 0, dy, 0)
    dbeta = dr.sum(axis=axes)
    dgamma = (dr * x_hat).sum(axis=axes)
    dx = g * inv_std / n * (n * dr - per_channel(dbeta, ax, x.ndim)
                            - x_hat * per_channel(dgamma, ax, x.ndim))
    return y, dx, dr, dgamma, dbeta


def rel_err(actual, expected):
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
                 / max(np.max(np.abs(expected)), 1e-300))


# ---------------------------------------------------------------------------
# Against float64 math and fastbn's own composition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_matches_float64_math(shape, axis, dtype):
    x, r, gamma, beta, dy = make_inputs(shape, axis, dtype)
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    y_ref, dx_ref, dr_ref, dgamma_ref, dbeta_ref = reference(x, r, gamma, beta, dy, axis)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    assert y.dtype == dx.dtype == dr.dtype == dgamma.dtype == dbeta.dtype == np.dtype(dtype)
    assert y.shape == dx.shape == dr.shape == shape
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < 5 * tol
    np.testing.assert_array_equal(dr, dr_ref.astype(dtype))
    assert rel_err(dgamma, dgamma_ref) < 5 * tol
    assert rel_err(dbeta, dbeta_ref) < 5 * tol
    assert (y == 0).any() and (y > 0).any()  # both sides of the ReLU are exercised
    np.testing.assert_array_equal(ctx.mean, fastbn.batch_stats(x, axis=axis)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=LAYOUT_IDS)
def test_equals_composition_of_fastbn_pieces(shape, axis, dtype):
    """The same bits as batch_norm_forward + add + maximum, and as the masked gradient +
    batch_norm_backward: the fused sweeps do the same operations in the same order (the
    backward sums dr with the loops of the plain reduction, in its chunk order)."""
    x, r, gamma, beta, dy = make_inputs(shape, axis, dtype)
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    y_bn, ctx_bn = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    z = np.maximum(y_bn + r, 0)
    assert y.tobytes() == z.tobytes()
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    dz = np.where(z > 0, dy, 0).astype(dtype)
    dx_c, dgamma_c, dbeta_c = fastbn.batch_norm_backward(dz, ctx_bn)
    assert dr.tobytes() == dz.tobytes()
    assert dx.tobytes() == dx_c.tobytes()
    assert dgamma.tobytes() == dgamma_c.tobytes() and dbeta.tobytes() == dbeta_c.tobytes()


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_inference_equals_composition(shape, axis):
    x, r, gamma, beta, dy = make_inputs(shape, axis, np.float32)
    c = shape[axis]
    mean = np.linspace(4, 6, c).astype(np.float32)
    var = np.linspace(5, 12, c).astype(np.float32)
    y, ctx = fastbn.batch_norm_add_relu_inference(x, r, mean, var, gamma, beta, axis=axis,
                                                  return_context=True)
    y_bn, ctx_bn = fastbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis,
                                               return_context=True)
    z = np.maximum(y_bn + r, 0)
    assert y.tobytes() == z.tobytes()
    assert fastbn.batch_norm_add_relu_inference(x, r, mean, var, gamma, beta,
                                                axis=axis).tobytes() == y.tobytes()
    assert not ctx.batch_stats
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    dx_c, dgamma_c, dbeta_c = fastbn.batch_norm_backward(np.where(z > 0, dy, 0), ctx_bn)
    np.testing.assert_allclose(dx, dx_c, rtol=1e-6, atol=1e-7)
    inv_std = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    expected = dr * per_channel(gamma * inv_std, axis, x.ndim)
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, dgamma_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, dbeta_c, rtol=1e-5, atol=1e-5)


def test_without_affine_and_with_float64_parameters_for_float32_data():
    x, r, gamma, beta, dy = make_inputs((6, 4, 9), 1, np.float32)
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r)
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    assert dgamma is None and dbeta is None
    y_ref, dx_ref, *_ = reference(x, r, np.ones(4), np.zeros(4), dy, 1)
    assert rel_err(y, y_ref) < 2e-6 and rel_err(dx, dx_ref) < 1e-5
    y64, ctx64 = fastbn.batch_norm_add_relu_forward(x, r, gamma.astype(np.float64),
                                                    beta.astype(np.float64))
    _, _, dgamma64, dbeta64 = fastbn.batch_norm_add_relu_backward(dy, ctx64)
    assert dgamma64.dtype == dbeta64.dtype == np.float64
    y_ref, _, _, dgamma_ref, _ = reference(x, r, gamma, beta, dy, 1)
    assert rel_err(y64, y_ref) < 2e-6 and rel_err(dgamma64, dgamma_ref) < 1e-5


def test_out_buffers_are_filled_and_returned():
    x, r, gamma, beta, dy = make_inputs((4, 6, 5, 7), 1, np.float32)
    y_out, dx_out, dr_out = (np.empty_like(x) for _ in range(3))
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, out=y_out)
    dx, dr, _, _ = fastbn.batch_norm_add_relu_backward(dy, ctx, out=dx_out, out_residual=dr_out)
    assert y is y_out and dx is dx_out and dr is dr_out
    y2, ctx2 = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta)
    dx2, dr2, _, _ = fastbn.batch_norm_add_relu_backward(dy, ctx2)
    assert y.tobytes() == y2.tobytes() and dx.tobytes() == dx2.tobytes()
    assert dr.tobytes() == dr2.tobytes()


def test_non_contiguous_inputs_are_copied_once():
    x, r, gamma, beta, dy = make_inputs((4, 6, 5, 7), 1, np.float64)
    r_strided = np.asfortranarray(r)
    y, ctx = fastbn.batch_norm_add_relu_forward(x[..., ::-1].copy()[..., ::-1], r_strided,
                                                gamma, beta)
    y_ref, *_ = reference(x, r, gamma, beta, dy, 1)
    assert y.flags.c_contiguous and rel_err(y, y_ref) < 1e-13


def test_residual_may_be_x_itself():
    x, _, gamma, beta, dy = make_inputs((8, 3, 6), 1, np.float64)
    y, ctx = fastbn.batch_norm_add_relu_forward(x, x, gamma, beta)
    y_ref, dx_ref, dr_ref, *_ = reference(x, x, gamma, beta, dy, 1)
    dx, dr, _, _ = fastbn.batch_norm_add_relu_backward(dy, ctx)
    assert rel_err(y, y_ref) < 1e-13 and rel_err(dx, dx_ref) < 1e-12
    np.testing.assert_array_equal(dr, dr_ref)


# ---------------------------------------------------------------------------
# Finite differences (float64)
# ---------------------------------------------------------------------------

H = 1e-5


def central_difference(f, a, h=H):
    grad = np.empty_like(a)
    for i in range(a.size):
        plus, minus = a.copy(), a.copy()
        plus.flat[i] += h
        minus.flat[i] -= h
        grad.flat[i] = (f(plus) - f(minus)) / (2 * h)
    return grad


@pytest.mark.parametrize(("shape", "axis"), [((3, 4, 5), 1), ((6, 4), 1), ((2, 3, 3, 4), -1)])
def test_gradients_match_finite_differences(shape, axis):
    x, r, gamma, beta, _ = make_inputs(shape, axis, np.float64, seed=3)
    w = np.random.default_rng(4).standard_normal(shape)
    # Keep every pre-activation away from the ReLU's kink (by more than any step
    # moves it) by shifting the residual, which moves it one for one.
    pre = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)[0] + r
    r = r + np.where(np.abs(pre) < 0.05, 0.1, 0.0)

    def loss(x_, r_, g_, b_):
        return float(np.sum(fastbn.batch_norm_add_relu_forward(x_, r_, g_, b_,
                                                               axis=axis)[0] * w))

    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    assert (y == 0).any() and (y > 0).any()
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(w, ctx)
    fd = [central_difference(lambda a: loss(a, r, gamma, beta), x),
          central_difference(lambda a: loss(x, a, gamma, beta), r),
          central_difference(lambda a: loss(x, r, a, beta), gamma),
          central_difference(lambda a: loss(x, r, gamma, a), beta)]
    for name, analytic, numeric in zip(("dx", "dresidual", "dgamma", "dbeta"),
                                       (dx, dr, dgamma, dbeta), fd, strict=True):
        assert rel_err(analytic, numeric) < 1e-8, name


# ---------------------------------------------------------------------------
# NaN stays in its channel
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_nan_in_x_stays_in_its_channel(shape, axis):
    x, r, gamma, beta, dy = make_inputs(shape, axis, np.float32)
    clean = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    clean_grads = fastbn.batch_norm_add_relu_backward(dy, clean[1])
    bad = np.moveaxis(x.copy(), axis, 0)
    bad[1].flat[3] = np.nan
    bad = np.ascontiguousarray(np.moveaxis(bad, 0, axis))
    y, ctx = fastbn.batch_norm_add_relu_forward(bad, r, gamma, beta, axis=axis)
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)

    def channel(a, c):
        return np.take(a, c, axis=axis)

    assert np.isnan(channel(y, 1)).all() and np.isnan(channel(dx, 1)).all()
    assert (channel(dr, 1) == 0).all()  # max(NaN, 0) passes no gradient
    assert np.isnan(dgamma[1]) and dbeta[1] == 0
    others = [c for c in range(shape[axis]) if c != 1]
    for got, want in zip((y, dx, dr), (clean[0],) + clean_grads[:2], strict=True):
        assert channel(got, others).tobytes() == channel(want, others).tobytes()
    assert dgamma[others].tobytes() == clean_grads[2][others].tobytes()
    assert dbeta[others].tobytes() == clean_grads[3][others].tobytes()


def test_nan_in_residual_stays_in_its_element():
    x, r, gamma, beta, dy = make_inputs((4, 6, 5, 7), 1, np.float32)
    r_bad = r.copy()
    r_bad[2, 3, 1, 4] = np.nan
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r_bad, gamma, beta)
    y0, ctx0 = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta)
    assert np.isnan(y[2, 3, 1, 4]) and np.isnan(y).sum() == 1
    y[2, 3, 1, 4] = y0[2, 3, 1, 4]
    assert y.tobytes() == y0.tobytes()
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    assert np.isfinite(dx).all() and np.isfinite(dgamma).all() and dr[2, 3, 1, 4] == 0


# ---------------------------------------------------------------------------
# Determinism: thread count and serial/parallel variants
# ---------------------------------------------------------------------------

BIG = [((8, 64, 16, 16), 1, np.float32), ((8, 16, 16, 64), -1, np.float32),
       ((256, 512), 1, np.float64), ((1, 4, 32768), 1, np.float32)]
BIG_IDS = ["planes", "channels-last", "rows-f64", "few-huge-planes"]


def run_all(x, r, gamma, beta, dy, axis):
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    return {"y": y, "dx": dx, "dr": dr, "dgamma": dgamma, "dbeta": dbeta, "mean": ctx.mean,
            "var": ctx.var}


def assert_bitwise_equal(a, b):
    differ = [k for k in a if a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"not bitwise identical: {differ}"


@pytest.mark.parametrize(("shape", "axis", "dtype"), BIG, ids=BIG_IDS)
def test_one_two_threads_and_serial_give_identical_bits(num_threads, monkeypatch, shape, axis,
                                                        dtype):
    assert np.prod(shape) >= _launch.SMALL_PROBLEM
    x, r, gamma, beta, dy = make_inputs(shape, axis, dtype)
    num_threads(2)
    two = run_all(x, r, gamma, beta, dy, axis)
    num_threads(1)
    one = run_all(x, r, gamma, beta, dy, axis)
    assert_bitwise_equal(one, two)
    monkeypatch.setattr(_launch, "SMALL_PROBLEM", x.size + 1)
    assert_bitwise_equal(run_all(x, r, gamma, beta, dy, axis), two)
    assert np.any(two["dx"] != 0) and np.any(two["y"] == 0)


# ---------------------------------------------------------------------------
# Bad input names the argument
# ---------------------------------------------------------------------------


def _block(shape=(4, 3, 5), dtype=np.float64):
    x, r, gamma, beta, dy = make_inputs(shape, 1, dtype)
    return x, r, gamma, beta, dy


@pytest.mark.parametrize(("residual", "error", "match"), [
    (np.zeros((4, 3, 6)), ValueError, r"residual must have the shape of x, \(4, 3, 5\)"),
    (np.zeros((4, 3, 5), np.float32), TypeError, "residual must have the dtype of x, float64"),
    (np.zeros((4, 3, 5), np.int64), TypeError, "residual must have dtype"),
    (None, TypeError, "residual must be an array, got None"),
    (np.zeros(5), ValueError, "residual must have at least 2 dimensions"),
])
def test_bad_residual_raises_naming_it(residual, error, match):
    x, _, gamma, beta, _ = _block()
    with pytest.raises(error, match=match):
        fastbn.batch_norm_add_relu_forward(x, residual, gamma, beta)
    with pytest.raises(error, match=match):
        fastbn.batch_norm_add_relu_inference(x, residual, np.zeros(3), np.ones(3))


def test_out_overlapping_an_input_raises():
    x, r, gamma, beta, dy = _block()
    for out in (x, r, x[:]):
        with pytest.raises(ValueError, match="out overlaps an input"):
            fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, out=out)
    with pytest.raises(ValueError, match="out must have shape"):
        fastbn.batch_norm_add_relu_forward(x, r, out=np.empty((4, 3, 4)))
    with pytest.raises(TypeError, match="out must have dtype float64"):
        fastbn.batch_norm_add_relu_forward(x, r, out=np.empty((4, 3, 5), np.float32))
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta)
    for name, kwargs in [("out", {"out": dy}), ("out", {"out": y}), ("out", {"out": x}),
                         ("out_residual", {"out_residual": dy}),
                         ("out_residual", {"out_residual": y})]:
        with pytest.raises(ValueError, match=f"{name} overlaps an input"):
            fastbn.batch_norm_add_relu_backward(dy, ctx, **kwargs)
    buffer = np.empty_like(x)
    with pytest.raises(ValueError, match="out_residual overlaps an input"):
        fastbn.batch_norm_add_relu_backward(dy, ctx, out=buffer, out_residual=buffer)


def test_bad_backward_arguments_raise():
    x, r, gamma, beta, dy = _block()
    _, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta)
    _, plain_ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=True)
    with pytest.raises(TypeError, match="ctx must be the BatchNormAddReluContext"):
        fastbn.batch_norm_add_relu_backward(dy, plain_ctx)
    with pytest.raises(TypeError, match="ctx must be the BatchNormContext"):
        fastbn.batch_norm_backward(dy, ctx)
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3, 5\)"):
        fastbn.batch_norm_add_relu_backward(dy[:2], ctx)
    with pytest.raises(TypeError, match="dy must have the dtype of x, float64, got float32"):
        fastbn.batch_norm_add_relu_backward(dy.astype(np.float32), ctx)


def test_bad_forward_arguments_raise():
    x, r, gamma, beta, _ = _block()
    with pytest.raises(ValueError, match="gamma must have shape"):
        fastbn.batch_norm_add_relu_forward(x, r, gamma[:2], beta)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fastbn.batch_norm_add_relu_forward(x[:1, :, :1], r[:1, :, :1])
    with pytest.raises(ValueError, match="running_var must be non-negative"):
        fastbn.batch_norm_add_relu_inference(x, r, np.zeros(3), -np.ones(3))
    with pytest.raises(TypeError, match="running_mean must be an array"):
        fastbn.batch_norm_add_relu_inference(x, r, None, np.ones(3))
    with pytest.raises(ValueError, match="eps must be a positive"):
        fastbn.batch_norm_add_relu_forward(x, r, eps=-1.0)
    assert "BatchNormAddReluContext(training" in repr(
        fastbn.batch_norm_add_relu_forward(x, r)[1])


# ---------------------------------------------------------------------------
# 16-bit data (float16, bfloat16): float32 arithmetic, rounded once
# ---------------------------------------------------------------------------


def _sixteen_bit_dtypes():
    dtypes = [np.dtype(np.float16)]
    try:
        import ml_dtypes
    except ImportError:
        return dtypes
    return dtypes + [np.dtype(ml_dtypes.bfloat16)]


@pytest.mark.parametrize("dtype", _sixteen_bit_dtypes(), ids=lambda d: d.name)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_sixteen_bit_data(shape, axis, dtype):
    x32, r32, gamma, beta, dy32 = make_inputs(shape, axis, np.float32)
    x, r, dy = (a.astype(dtype) for a in (x32, r32, dy32))
    y, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    dx, dr, dgamma, dbeta = fastbn.batch_norm_add_relu_backward(dy, ctx)
    assert y.dtype == dx.dtype == dr.dtype == dtype and dgamma.dtype == np.float32
    xs, rs, dys = (a.astype(np.float64) for a in (x, r, dy))
    y_ref, dx_ref, dr_ref, dgamma_ref, dbeta_ref = reference(xs, rs, gamma, beta, dys, axis)
    # One rounding to 16 bits: within half an ulp of the format (plus float32 noise).
    ulp = 2.0 ** -7 if dtype.name == "bfloat16" else 2.0 ** -10
    scale = np.maximum(np.abs(y_ref), 2.0 ** -14)
    assert np.max(np.abs(y.astype(np.float64) - y_ref) / scale) <= 0.51 * ulp
    # The mask comes from the rounded y: dr is dy exactly where y > 0.
    np.testing.assert_array_equal(dr.astype(np.float64),
                                  np.where(y.astype(np.float64) > 0, dys, 0))
    assert rel_err(dx, dx_ref) < 4 * ulp
    assert rel_err(dgamma, dgamma_ref) < 1e-3 and rel_err(dbeta, dbeta_ref) < 1e-3


# ---------------------------------------------------------------------------
# The layer: BatchNorm(..., relu=True)(x, residual=z)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_layer_residual_training_and_eval(shape, axis):
    x, r, gamma, beta, dy = make_inputs(shape, axis, np.float32)
    c = shape[axis]
    bn = fastbn.BatchNorm(c, axis=axis, relu=True, momentum=0.2)
    plain = fastbn.BatchNorm(c, axis=axis, relu=True, momentum=0.2)
    for layer in (bn, plain):
        layer.weight[...] = gamma
        layer.bias[...] = beta
    y = bn(x, residual=r)
    plain(x)
    y_f, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, axis=axis)
    assert y.tobytes() == y_f.tobytes()
    # The running statistics behave as today: those of x, as a plain layer's.
    for key, value in plain.state_dict().items():
        assert bn.state_dict()[key].tobytes() == value.tobytes(), key
    assert bn.num_batches_tracked == 1
    dx, dr = bn.backward(dy)
    dx_f, dr_f, dgamma_f, dbeta_f = fastbn.batch_norm_add_relu_backward(dy, ctx)
    assert dx.tobytes() == dx_f.tobytes() and dr.tobytes() == dr_f.tobytes()
    assert bn.grad_weight.tobytes() == dgamma_f.tobytes()
    assert bn.grad_bias.tobytes() == dbeta_f.tobytes()

    bn.eval()
    y_eval = bn(x, residual=r)
    y_eval_f, ctx_eval = fastbn.batch_norm_add_relu_inference(
        x, r, bn.running_mean, bn.running_var, gamma, beta, axis=axis, return_context=True)
    assert y_eval.tobytes() == y_eval_f.tobytes() and bn.num_batches_tracked == 1
    dx_eval, dr_eval = bn.backward(dy)
    assert dx_eval.tobytes() == fastbn.batch_norm_add_relu_backward(dy, ctx_eval)[0].tobytes()
    # A plain call afterwards: the backward returns dx alone again.
    bn.train()
    bn(x)
    assert isinstance(bn.backward(dy), np.ndarray)


def test_layer_residual_without_running_stats_uses_batch_statistics():
    x, r, gamma, beta, dy = make_inputs((6, 4, 9), 1, np.float64)
    bn = fastbn.BatchNorm(4, relu=True, track_running_stats=False, affine=False,
                          dtype=np.float64).eval()
    y = bn(x, residual=r)
    assert y.tobytes() == fastbn.batch_norm_add_relu_forward(x, r)[0].tobytes()
    dx, dr = bn.backward(dy)
    assert rel_err(dx, reference(x, r, np.ones(4), np.zeros(4), dy, 1)[1]) < 1e-12


def test_layer_residual_errors_leave_the_layer_unchanged():
    x, r, gamma, beta, dy = make_inputs((6, 4, 9), 1, np.float32)
    bn = fastbn.BatchNorm(4, relu=True)
    bn(x)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    dx_before = bn.backward(dy)
    bad_x = x.copy()
    bad_x[0, 2, 0] = np.nan
    cases = [
        (ValueError, "residual must have the shape of x", lambda: bn(x, residual=r[:, :, :3])),
        (TypeError, "residual must have the dtype of x",
         lambda: bn(x, residual=r.astype(np.float64))),
        (FloatingPointError, r"channel\(s\) 2", lambda: bn(bad_x, residual=r)),
        (ValueError, "residual= needs a layer with relu=True",
         lambda: fastbn.BatchNorm(4)(x, residual=r)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
        for key, value in bn.state_dict().items():
            assert value.tobytes() == before[key].tobytes(), key
        assert bn.backward(dy).tobytes() == dx_before.tobytes()  # the last good context


class _ThreadRanks:
    """``n`` in-process ranks (threads): ``allreduce_sum`` sums in rank order at a barrier."""

    def __init__(self, n: int):
        self._barrier = threading.Barrier(n, timeout=60)
        self._slots = [None] * n

    def communicator(self, rank: int):
        ranks = self

        class Communicator:
            def allreduce_sum(self, values):
                ranks._slots[rank] = np.array(values, np.float64)
                ranks._barrier.wait()
                total = sum(ranks._slots[1:], ranks._slots[0].copy())
                ranks._barrier.wait()  # everybody has read the slots
                return total

        return Communicator()


def _run_ranks(n, work):
    """``work(rank, communicator)`` on n threads; their results, or the first error."""
    ranks = _ThreadRanks(n)
    results, errors = [None] * n, []

    def run(rank):
        try:
            results[rank] = work(rank, ranks.communicator(rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            ranks._barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3], ids=LAYOUT_IDS[:3])
def test_sync_batch_norm_residual_equals_the_layer_on_the_global_batch(shape, axis):
    """Two ranks (threads) with uneven slices against BatchNorm on the whole batch."""
    from fastbn.distributed import SyncBatchNorm

    x, r, gamma, beta, dy = make_inputs(shape, axis, np.float64)
    c = shape[axis]
    whole = fastbn.BatchNorm(c, axis=axis, relu=True, momentum=0.3, dtype=np.float64)
    whole.weight[...], whole.bias[...] = gamma, beta
    y_whole = whole(x, residual=r)
    dx_whole, dr_whole = whole.backward(dy)
    cut = 2  # rows of rank 0; the rest on rank 1
    slices = [slice(0, cut), slice(cut, None)]

    def work(rank, comm):
        bn = SyncBatchNorm(c, axis=axis, relu=True, momentum=0.3, dtype=np.float64, comm=comm)
        bn.weight[...], bn.bias[...] = gamma, beta
        part = slices[rank]
        y = bn(x[part], residual=r[part])
        dx, dr = bn.backward(dy[part])
        return y, dx, dr, bn.grad_weight.copy(), bn.grad_bias.copy(), bn.state_dict()

    results = _run_ranks(2, work)
    for (y, dx, dr, *_), part in zip(results, slices, strict=True):
        assert rel_err(y, y_whole[part]) < 1e-12 and rel_err(dx, dx_whole[part]) < 1e-12
        assert np.array_equal(dr, dr_whole[part])
    assert rel_err(results[0][3] + results[1][3], whole.grad_weight) < 1e-12
    assert rel_err(results[0][4] + results[1][4], whole.grad_bias) < 1e-12
    for key, value in whole.state_dict().items():
        assert rel_err(results[0][5][key], value) < 1e-12, key
        assert results[0][5][key].tobytes() == results[1][5][key].tobytes(), key


def test_sync_batch_norm_bad_residual_raises_on_its_rank_and_everywhere_else():
    from fastbn.distributed import RemoteRankError, SyncBatchNorm

    x, r, *_ = make_inputs((6, 4, 9), 1, np.float32)

    def work(rank, comm):
        bn = SyncBatchNorm(4, relu=True, comm=comm)
        residual = r[:3, :, :2] if rank == 1 else r[:3]  # rank 1: the wrong shape
        before = bn.state_dict()
        try:
            bn(x[:3], residual=residual)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            unchanged = all(v.tobytes() == before[k].tobytes()
                            for k, v in bn.state_dict().items())
            return type(exc), str(exc), unchanged
        return None

    (error0, _, unchanged0), (error1, message1, unchanged1) = _run_ranks(2, work)
    assert error1 is ValueError and "residual must have the shape of x" in message1
    assert error0 is RemoteRankError
    assert unchanged0 and unchanged1
    with pytest.raises(ValueError, match="relu=True"):
        SyncBatchNorm(4, comm=_ThreadRanks(1).communicator(0))(x, residual=r)
