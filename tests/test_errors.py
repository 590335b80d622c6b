"""Bad input: every error case raises the documented exception and names the argument."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn

C = 3


def _x(shape=(4, C), dtype=np.float64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _stats(n=C):
    return np.zeros(n), np.ones(n)


def _ctx(shape=(4, C), dtype=np.float64, relu=False):
    return fastbn.batch_norm_forward(_x(shape, dtype), relu=relu)[1]


#: One call per public function, taking the data array as its only argument.
CALLS = {
    "forward": lambda x: fastbn.batch_norm_forward(x),
    "inference": lambda x: fastbn.batch_norm_inference(x, *_stats(np.shape(x)[1])),
    "stats": lambda x: fastbn.batch_stats(x),
}
CALL_IDS = list(CALLS)


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------

BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object,
              np.longdouble]


def _bad_array(dtype, shape=(4, C)):
    a = np.arange(np.prod(shape)).reshape(shape) % 2 + 1
    return a.astype(dtype)


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("call", CALL_IDS)
def test_non_float_x_is_a_type_error(call, dtype):
    if np.dtype(dtype) == np.float64:  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match=r"x must have dtype float32, float64, float16 or "
                                         r"bfloat16, got"):
        CALLS[call](_bad_array(dtype))


@pytest.mark.parametrize("call", CALL_IDS)
def test_float16_x_is_taken_as_it_is(call):
    """16-bit data is supported (tests/test_low_precision.py has the contract);
    what comes back for data keeps its dtype."""
    x = _x(dtype=np.float16)
    result = CALLS[call](x)
    first = result[0] if isinstance(result, tuple) else result
    expected = np.float64 if call == "stats" else np.float16
    assert first.dtype == expected and np.all(np.isfinite(first))


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex64, np.float16])
def test_bad_dy_dtype(dtype):
    ctx = _ctx()
    with pytest.raises(TypeError, match=r"dy"):
        fastbn.batch_norm_backward(_bad_array(dtype), ctx)


@pytest.mark.parametrize(("x_dtype", "dy_dtype"), [(np.float32, np.float64),
                                                   (np.float64, np.float32)])
def test_dy_dtype_must_match_x(x_dtype, dy_dtype):
    ctx = _ctx(dtype=x_dtype)
    with pytest.raises(TypeError, match=r"dy must have the dtype of x"):
        fastbn.batch_norm_backward(_x(dtype=dy_dtype), ctx)


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.bool_])
def test_bad_parameter_dtype(name, dtype):
    kwargs = dict(zip(("running_mean", "running_var"), _stats(), strict=True))
    kwargs[name] = _bad_array(dtype, (C,))
    with pytest.raises(TypeError, match=rf"{name} must have dtype float32 or float64"):
        fastbn.batch_norm_inference(_x(), **kwargs)
    if name in ("gamma", "beta"):
        with pytest.raises(TypeError, match=rf"{name}"):
            fastbn.batch_norm_forward(_x(), **{name: kwargs[name]})


@pytest.mark.parametrize("where", ["x", "gamma"])
@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_non_native_byte_order_works_or_says_so(where, dtype):
    """Big-endian float32/float64 (e.g. from a file) is either normalized like the
    native array or refused with a message about byte order -- not with "must
    have dtype float32 or float64, got >f4", which reads as a contradiction."""
    x = _x(dtype=np.dtype(dtype).newbyteorder("="))
    gamma = np.linspace(0.5, 2, C, dtype=np.dtype(dtype).newbyteorder("="))
    expected, _ = fastbn.batch_norm_forward(x, gamma)
    args = (x.astype(dtype), gamma) if where == "x" else (x, gamma.astype(dtype))
    try:
        y, _ = fastbn.batch_norm_forward(*args)
    except TypeError as exc:
        assert "byte order" in str(exc) or "endian" in str(exc), str(exc)
        return
    np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("x", [np.float64(1.0), np.array(2.0), np.ones(5), np.ones(5, np.float32)],
                         ids=["scalar", "0-d", "1-d", "1-d-float32"])
@pytest.mark.parametrize("call", ["forward", "stats", "inference1d"])
def test_wrong_ndim(call, x):
    fn = {
        "forward": lambda: fastbn.batch_norm_forward(x),
        "stats": lambda: fastbn.batch_stats(x),
        "inference1d": lambda: fastbn.batch_norm_inference(x, *_stats(1)),
    }[call]
    with pytest.raises(ValueError, match=r"x must have at least 2 dimensions"):
        fn()


def test_wrong_dy_ndim_or_shape():
    ctx = _ctx((4, C, 5))
    with pytest.raises(ValueError, match=r"dy"):
        fastbn.batch_norm_backward(np.ones(4 * C * 5), ctx)
    for shape in [(4, C), (4, C, 6), (5, C, 5), (4, 5, C), (4, C, 5, 1)]:
        with pytest.raises(ValueError, match=r"dy must have the shape of x"):
            fastbn.batch_norm_backward(np.ones(shape), ctx)


@pytest.mark.parametrize("bad", [np.ones(C + 1), np.ones(C - 1), np.ones((C, 1)), np.ones((1, C)),
                                 np.array(1.0)], ids=["C+1", "C-1", "(C,1)", "(1,C)", "0-d"])
@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_channel_count_mismatch_names_the_argument(name, bad):
    kwargs = dict(zip(("running_mean", "running_var"), _stats(), strict=True))
    kwargs[name] = np.abs(bad)
    with pytest.raises(ValueError, match=rf"{name} must have shape \({C},\)"):
        fastbn.batch_norm_inference(_x(), **kwargs)
    if name in ("gamma", "beta"):
        with pytest.raises(ValueError, match=rf"{name} must have shape \({C},\)"):
            fastbn.batch_norm_forward(_x(), **{name: bad})


def test_channel_count_follows_axis():
    x = _x((4, 5, C))  # channels-last: C channels, not 5
    fastbn.batch_norm_forward(x, np.ones(C), axis=-1)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\)"):
        fastbn.batch_norm_forward(x, np.ones(C), axis=1)


@pytest.mark.parametrize(("shape", "axis"), [((1, C), 1), ((1, C, 1), 1), ((1, C, 1, 1), 1),
                                             ((1, 1, C), -1), ((C, 1), 0)])
def test_one_value_per_channel_in_training(shape, axis):
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        fastbn.batch_norm_forward(_x(shape), axis=axis)
    # Eval mode accepts it.
    n = shape[axis]
    y = fastbn.batch_norm_inference(_x(shape), *_stats(n), axis=axis)
    assert y.shape == shape


@pytest.mark.parametrize("shape", [(0, C), (4, 0), (2, 0, 5), (0, C, 4), (2, C, 0)])
@pytest.mark.parametrize("call", CALL_IDS)
def test_empty_arrays(call, shape):
    with pytest.raises(ValueError, match=r"x is empty"):
        CALLS[call](np.empty(shape))


def test_empty_dy():
    with pytest.raises(ValueError, match=r"dy"):
        fastbn.batch_norm_backward(np.empty((0, C)), _ctx())


# ---------------------------------------------------------------------------
# None where an array is required
# ---------------------------------------------------------------------------


def test_none_arrays():
    with pytest.raises(TypeError, match=r"x must be an array"):
        fastbn.batch_norm_forward(None)
    with pytest.raises(TypeError, match=r"x must be an array"):
        fastbn.batch_stats(None)
    with pytest.raises(TypeError, match=r"dy must be an array"):
        fastbn.batch_norm_backward(None, _ctx())
    with pytest.raises(TypeError, match=r"running_mean"):
        fastbn.batch_norm_inference(_x(), None, np.ones(C))
    with pytest.raises(TypeError, match=r"running_var"):
        fastbn.batch_norm_inference(_x(), np.zeros(C), None)


# ---------------------------------------------------------------------------
# eps and axis
# ---------------------------------------------------------------------------

BAD_EPS_VALUES = [0, 0.0, -1e-5, -1, np.nan, np.inf, -np.inf, np.float32(0)]
BAD_EPS_TYPES = ["1e-5", None, True, [1e-5], 1j, np.array([1e-5])]


@pytest.mark.parametrize("eps", BAD_EPS_VALUES, ids=repr)
@pytest.mark.parametrize("call", ["forward", "inference"])
def test_eps_must_be_positive_and_finite(call, eps):
    with pytest.raises(ValueError, match=r"eps must be a positive"):
        if call == "forward":
            fastbn.batch_norm_forward(_x(), eps=eps)
        else:
            fastbn.batch_norm_inference(_x(), *_stats(), eps=eps)


@pytest.mark.parametrize("eps", BAD_EPS_TYPES, ids=repr)
@pytest.mark.parametrize("call", ["forward", "inference"])
def test_eps_must_be_a_number(call, eps):
    with pytest.raises(TypeError, match=r"eps must be a positive float"):
        if call == "forward":
            fastbn.batch_norm_forward(_x(), eps=eps)
        else:
            fastbn.batch_norm_inference(_x(), *_stats(), eps=eps)


def test_numeric_eps_types_are_accepted():
    x = _x()
    y_ref, _ = fastbn.batch_norm_forward(x, eps=1.0)
    for eps in (1, np.int64(1), np.float32(1.0), np.float64(1.0)):
        y, _ = fastbn.batch_norm_forward(x, eps=eps)
        np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize(("shape", "axis"), [((4, C), 2), ((4, C), -3), ((4, C, 5, 6), 4),
                                             ((4, C, 5, 6), -5), ((4, C), 100)])
@pytest.mark.parametrize("call", ["forward", "inference", "stats"])
def test_axis_out_of_range(call, shape, axis):
    x = _x(shape)
    fn = {
        "forward": lambda: fastbn.batch_norm_forward(x, axis=axis),
        "inference": lambda: fastbn.batch_norm_inference(x, *_stats(), axis=axis),
        "stats": lambda: fastbn.batch_stats(x, axis=axis),
    }[call]
    with pytest.raises(np.exceptions.AxisError) as info:
        fn()
    assert isinstance(info.value, ValueError)  # so `except ValueError` catches it too
    assert "axis" in str(info.value)


@pytest.mark.parametrize("axis", [1.0, "1", None, [1]], ids=repr)
def test_axis_must_be_an_integer(axis):
    with pytest.raises(TypeError, match=r"axis must be an integer"):
        fastbn.batch_norm_forward(_x(), axis=axis)
    with pytest.raises(TypeError, match=r"axis must be an integer"):
        fastbn.batch_stats(_x(), axis=axis)


# ---------------------------------------------------------------------------
# out= buffers
# ---------------------------------------------------------------------------

SHAPE = (4, C, 5)


def _out_cases(x):
    """(buffer, exception, message) for out= buffers that must be refused for input x."""
    big = np.empty((SHAPE[0] * 2,) + SHAPE[1:])
    ro = np.empty(SHAPE)
    ro.flags.writeable = False
    return {
        "wrong-shape": (np.empty((4, C, 6)), ValueError, r"out must have shape"),
        "transposed-shape": (np.empty((5, C, 4)), ValueError, r"out must have shape"),
        "wrong-dtype": (np.empty(SHAPE, np.float32), TypeError, r"out must have dtype"),
        "fortran": (np.asfortranarray(np.empty(SHAPE)), ValueError, r"out must be C-contiguous"),
        "strided": (big[::2], ValueError, r"out must be C-contiguous"),
        "read-only": (ro, ValueError, r"out is read-only"),
        "list": (np.empty(SHAPE).tolist(), TypeError, r"out must be a numpy.ndarray"),
        "is-x": (x, ValueError, r"out overlaps an input"),
        "view-of-x": (x[...], ValueError, r"out overlaps an input"),
        "reshaped-x": (x.reshape(-1).reshape(SHAPE), ValueError, r"out overlaps an input"),
    }


OUT_CASE_IDS = list(_out_cases(np.empty(SHAPE)))


@pytest.mark.parametrize("case", OUT_CASE_IDS)
def test_forward_out_refused(case):
    x = _x(SHAPE)
    out, exc, msg = _out_cases(x)[case]
    with pytest.raises(exc, match=msg):
        fastbn.batch_norm_forward(x, out=out)


@pytest.mark.parametrize("case", OUT_CASE_IDS)
def test_inference_out_refused(case):
    x = _x(SHAPE)
    out, exc, msg = _out_cases(x)[case]
    with pytest.raises(exc, match=msg):
        fastbn.batch_norm_inference(x, *_stats(), out=out)


@pytest.mark.parametrize("case", OUT_CASE_IDS)
def test_backward_out_refused(case):
    x = _x(SHAPE)
    _, ctx = fastbn.batch_norm_forward(x)
    dy = _x(SHAPE) + 1
    out, exc, msg = _out_cases(x)[case]  # overlapping x (held by ctx)
    with pytest.raises(exc, match=msg):
        fastbn.batch_norm_backward(dy, ctx, out=out)


@pytest.mark.parametrize("relu", [False, True])
def test_backward_out_overlapping_dy_refused(relu):
    x = _x(SHAPE)
    _, ctx = fastbn.batch_norm_forward(x, relu=relu)
    dy = _x(SHAPE) + 1
    dy_before = dy.copy()
    for out in (dy, dy[...], dy.reshape(-1).reshape(SHAPE)):
        with pytest.raises(ValueError, match=r"out overlaps an input"):
            fastbn.batch_norm_backward(dy, ctx, out=out)
    np.testing.assert_array_equal(dy, dy_before)


def test_out_partially_overlapping_a_shared_buffer_is_refused():
    buf = _x((3 * SHAPE[0],) + SHAPE[1:])
    x = buf[: SHAPE[0]]
    with pytest.raises(ValueError, match=r"out overlaps an input"):
        fastbn.batch_norm_forward(x, out=buf[SHAPE[0] // 2 : SHAPE[0] // 2 + SHAPE[0]])
    # Disjoint slices of one buffer are fine.
    y, _ = fastbn.batch_norm_forward(x, out=buf[SHAPE[0] : 2 * SHAPE[0]])
    assert np.shares_memory(y, buf)
    np.testing.assert_array_equal(y, fastbn.batch_norm_forward(x)[0])


def test_failed_validation_leaves_out_untouched():
    x = _x(SHAPE)
    out = np.full(SHAPE, 7.0)
    with pytest.raises(ValueError):
        fastbn.batch_norm_forward(x, gamma=np.ones(C + 1), out=out)
    with pytest.raises(ValueError):
        fastbn.batch_norm_forward(x, eps=-1.0, out=out)
    np.testing.assert_array_equal(out, 7.0)


# ---------------------------------------------------------------------------
# ctx and running statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("ctx", [None, (), {"mean": np.zeros(C)}, "ctx", np.zeros(C)],
                         ids=["None", "tuple", "dict", "str", "array"])
def test_ctx_must_be_a_context(ctx):
    with pytest.raises(TypeError, match=r"ctx must be the BatchNormContext"):
        fastbn.batch_norm_backward(_x(), ctx)


def test_passing_the_forward_tuple_as_ctx_is_a_type_error():
    result = fastbn.batch_norm_forward(_x())
    with pytest.raises(TypeError, match=r"ctx must be the BatchNormContext.*tuple"):
        fastbn.batch_norm_backward(_x(), result)


@pytest.mark.parametrize("bad", [-1e-12, -1.0, -np.inf])
def test_negative_running_var(bad):
    var = np.ones(C)
    var[1] = bad
    with pytest.raises(ValueError, match=r"running_var must be non-negative"):
        fastbn.batch_norm_inference(_x(), np.zeros(C), var)
    # Zero is allowed.
    var[1] = 0.0
    assert np.all(np.isfinite(fastbn.batch_norm_inference(_x(), np.zeros(C), var)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_non_finite_running_statistics(name, bad):
    stats = dict(zip(("running_mean", "running_var"), _stats(), strict=True))
    stats[name][2] = bad
    with pytest.raises(ValueError, match=rf"{name} must be"):
        fastbn.batch_norm_inference(_x(), **stats)


def test_out_aliasing_a_non_contiguous_x_is_refused_or_harmless():
    """x in Fortran order is copied first; out == x.T (C-contiguous, same memory)
    must either be refused or give the result of a separate buffer."""
    x = np.asfortranarray(_x((5, 5)))
    expected, ctx_expected = fastbn.batch_norm_forward(x.copy())
    dy = _x((5, 5)) + 1
    dx_expected = fastbn.batch_norm_backward(dy, ctx_expected)[0]
    out = x.T
    assert out.flags.c_contiguous and np.shares_memory(out, x)
    try:
        y, ctx = fastbn.batch_norm_forward(x, out=out)
    except ValueError as exc:
        assert "out" in str(exc)
        return
    assert y is out
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(fastbn.batch_norm_backward(dy, ctx)[0], dx_expected)


def test_context_is_immutable():
    ctx = _ctx()
    with pytest.raises(AttributeError):
        ctx.relu = True
