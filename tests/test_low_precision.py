"""16-bit storage (float16, bfloat16): conversions, the accuracy contract, the API.

The contract (issue 16, DESIGN.md §10):

* ``y`` and ``dx`` are float32 arithmetic rounded once: within one unit in the
  last place of the 16-bit format of the float64 result on the same data --
  plus float32's own rounding of the terms, which only shows where a result is
  far smaller than the terms that cancel to give it (``y ~ 0`` from
  ``(x - mean) * scale ~ -beta``; float16's subnormals are spaced 6e-8 apart,
  float32 rounds a term of 1 by 6e-8);
* ``dgamma``, ``dbeta``, ``mean``, ``var`` within 1e-6 relative of float64;
* a constant channel gives exactly ``beta`` (rounded); a NaN stays in its channel;
* the same bits for any thread count, serial or parallel;
* conversions exact against NumPy's (float16) and ml_dtypes' (bfloat16) casts,
  on every 16-bit pattern, with the F16C instructions and without them.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import _config, _launch, reference
from fastbn.kernels import storage

from .subprocess_utils import run_python

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
FORMATS = [F16, BF16]
FORMAT_IDS = ["float16", "bfloat16"]
#: (mantissa bits incl. the implicit one, smallest normal exponent) per format
PRECISION = {F16: (11, -14), BF16: (8, -126)}


def ulp(reference_values: np.ndarray, fmt: np.dtype) -> np.ndarray:
    """One unit in the last place of ``fmt`` at each float64 value (subnormals included)."""
    digits, min_exponent = PRECISION[fmt]
    _, exponent = np.frexp(np.abs(reference_values))  # |v| = m * 2**e, m in [0.5, 1)
    return np.ldexp(1.0, np.maximum(exponent - 1, min_exponent) - (digits - 1))


#: float32 arithmetic's error, per unit of the terms' magnitude: four roundings
FLOAT32_TERMS = 4 * 2.0**-24


def assert_within_one_ulp(actual, expected, fmt, what, terms=None):
    """|actual - expected| <= 1 ulp of ``fmt`` at ``expected`` (+ float32's rounding of
    ``terms``, the magnitude of what was added to give each value, when given)."""
    actual = actual.astype(np.float64)
    error = np.abs(actual - expected)
    finite = np.isfinite(expected)
    allowed = ulp(expected, fmt)
    if terms is not None:
        allowed = allowed + FLOAT32_TERMS * terms
    ulps = error[finite] / allowed[finite]
    worst = float(ulps.max()) if ulps.size else 0.0
    assert worst <= 1.0, f"{what}: {worst:.3f} of the allowed error (1 ulp of {fmt})"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN pattern"
    if terms is not None:  # the float32 allowance matters for a few tiny results only
        beyond_one_ulp = np.sum(error[finite] > ulp(expected[finite], fmt))
        assert beyond_one_ulp <= max(2, expected.size // 2000), (
            f"{what}: {beyond_one_ulp} of {expected.size} values beyond 1 ulp")


def rel_err(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300)))


def make(shape, axis, fmt, rng, offset=0.5, scale=2.0):
    n = shape[axis]
    x = (rng.standard_normal(shape) * scale + offset).astype(fmt)
    dy = rng.standard_normal(shape).astype(fmt)
    gamma = rng.uniform(0.5, 1.5, n).astype(np.float32)
    beta = rng.standard_normal(n).astype(np.float32)
    return x, dy, gamma, beta


# ---------------------------------------------------------------------------
# Conversions: every 16-bit pattern, both ways
# ---------------------------------------------------------------------------

ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _decode(bits_dtype):
    out = np.empty(ALL_BITS.size, np.float32)
    storage.decode_array(ALL_BITS.view(bits_dtype), out)
    return out


def _encode(values, bits_dtype):
    out = np.empty(values.size, bits_dtype)
    storage.encode_array(np.ascontiguousarray(values, np.float32), out)
    return out


def rounding_probes(fmt: np.dtype) -> np.ndarray:
    """float32 values that exercise rounding: every midpoint between neighbouring
    16-bit values (ties), one float32 ulp either side of it, the overflow edge,
    subnormals, infinities, zeros, and a million random float32 patterns."""
    with np.errstate(invalid="ignore"):  # ml_dtypes warns on NaN patterns
        values = ALL_BITS.view(fmt).astype(np.float64)
    finite = np.unique(values[np.isfinite(values)])
    midpoints = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    bits = midpoints.view(np.uint32)
    random = np.random.default_rng(7).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.996, 65520, 65536, 3e38,
                        2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-133, 2.0**-134, 1e-45],
                       np.float32)
    return np.concatenate([midpoints, (bits + 1).view(np.float32), (bits - 1).view(np.float32),
                           random.astype(np.uint32).view(np.float32), special, -special])


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_every_16_bit_pattern_decodes_exactly(fmt):
    bits_dtype = storage.F16_BITS if fmt == F16 else storage.BF16_BITS
    decoded = _decode(bits_dtype)
    expected = ALL_BITS.view(fmt).astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(decoded[~nan].view(np.uint32), expected[~nan].view(np.uint32))
    assert np.isnan(decoded[nan]).all() and nan.sum() > 0
    # ... and encodes back to the same bits (NaN: quieted, so compare NaN-ness and sign)
    back = _encode(decoded, bits_dtype)
    assert np.array_equal(back[~nan], ALL_BITS.view(bits_dtype)[~nan])
    assert np.isnan(back[nan].view(fmt).astype(np.float32)).all()
    assert np.array_equal(np.signbit(back[nan].view(fmt).astype(np.float32)),
                          np.signbit(expected[nan]))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_float32_rounds_to_nearest_even_like_numpy_and_ml_dtypes(fmt):
    bits_dtype = storage.F16_BITS if fmt == F16 else storage.BF16_BITS
    probes = rounding_probes(fmt)
    encoded = _encode(probes, bits_dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = probes.astype(fmt).view(bits_dtype)
    nan = np.isnan(probes)
    mismatch = np.flatnonzero(encoded[~nan] != expected[~nan])
    assert mismatch.size == 0, (
        f"{mismatch.size} mismatches, e.g. {probes[~nan][mismatch[:3]]!r} -> "
        f"{encoded[~nan][mismatch[:3]]!r}, expected {expected[~nan][mismatch[:3]]!r}")
    assert np.isnan(encoded[nan].view(fmt).astype(np.float32)).all()


SOFTWARE_CHECK = """
import numpy as np, ml_dtypes, fastbn
from fastbn import _config
from fastbn.kernels import storage
assert not _config.F16_HARDWARE
bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
decoded = np.empty(bits.size, np.float32)
storage.decode_array(bits, decoded)
rng = np.random.default_rng(3)
probes = np.concatenate([decoded, rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
                         .astype(np.uint32).view(np.float32)])
encoded = np.empty(probes.size, np.uint16)
storage.encode_array(probes, encoded)
np.save({decoded_path!r}, decoded)
np.save({encoded_path!r}, encoded)
x = (np.random.default_rng(0).standard_normal((4, 6, 20, 20)) * 2 + 1).astype(np.float16)
y, ctx = fastbn.batch_norm_forward(x, relu=True)
dx, _, _ = fastbn.batch_norm_backward(x, ctx)
np.save({y_path!r}, np.stack([y, dx]).view(np.uint16))
print("software float16 conversions ran")
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["FASTBN_SOFTWARE_F16", "NUMBA_CPU_NAME=generic"])
def test_software_float16_path_is_bit_identical(tmp_path, how):
    """The path for CPUs without F16C: forced by fastbn's variable, and chosen by itself
    for a target without F16C (where the hardware code would crash at the first call)."""
    paths = {name: str(tmp_path / f"{name}.npy") for name in ("decoded", "encoded", "y")}
    env = ({"FASTBN_SOFTWARE_F16": "1"} if how.startswith("FASTBN")
           else {"NUMBA_CPU_NAME": "generic", "FASTBN_NO_CACHE": "1"})
    result = run_python(["-c", SOFTWARE_CHECK.format(**{f"{k}_path": v for k, v in paths.items()})],
                        env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    decoded = np.load(paths["decoded"])
    encoded = np.load(paths["encoded"])
    # the same bits as this process's conversions (F16C here, where the CPU has it)
    assert np.array_equal(decoded.view(np.uint32), _decode(storage.F16_BITS).view(np.uint32))
    probes = np.concatenate([decoded, np.random.default_rng(3).integers(
        0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    assert np.array_equal(encoded, _encode(probes, storage.F16_BITS))
    x = (np.random.default_rng(0).standard_normal((4, 6, 20, 20)) * 2 + 1).astype(np.float16)
    y, ctx = fastbn.batch_norm_forward(x, relu=True)
    dx, _, _ = fastbn.batch_norm_backward(x, ctx)
    # The kernels around the conversions compile differently, and the reductions may
    # reassociate (vectorize) differently: the statistics may differ in their last
    # float32 bits, so y and dx may differ by one 16-bit ulp, rarely.
    theirs = np.load(paths["y"]).view(np.float16).astype(np.float64)
    ours = np.stack([y, dx]).astype(np.float64)
    ulp = np.spacing(np.abs(ours).astype(np.float16)).astype(np.float64)
    assert (np.abs(theirs - ours) <= ulp).all()
    assert (theirs != ours).mean() < 0.01


def test_hardware_conversion_is_chosen_from_the_target_features(monkeypatch):
    """F16C on x86 decides; the flag mirrors how Numba picks its target."""
    monkeypatch.setattr(_config.numba.config, "CPU_FEATURES", "")
    import platform
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert not _config._target_has_f16_instructions()
        monkeypatch.setattr(_config.numba.config, "CPU_FEATURES", "+avx,+f16c,+sse2")
        assert _config._target_has_f16_instructions()


# ---------------------------------------------------------------------------
# The accuracy contract
# ---------------------------------------------------------------------------

#: (shape, axis): rows, planes (one block and several), channels-last, large enough
#: for the parallel kernels, a channel-block remainder.
SHAPES = [((256, 100), 1), ((16, 8, 9, 9), 1), ((2, 4, 70, 70), 1), ((8, 9, 9, 24), -1),
          ((96, 16, 48), 1), ((300, 1030), 1)]
SHAPE_IDS = ["rows", "planes", "planes-blocks", "channels-last", "planes-parallel",
             "rows-parallel"]


def _float64_truth(x, dy, gamma, beta, axis, relu):
    """Float64 results on the same data and the magnitude of the terms summed to give
    each element of ``y`` and of ``dx`` (for the float32 allowance)."""
    y, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64),
                                 beta.astype(np.float64), 1e-5, axis, relu=relu)
    dy64 = dy.astype(np.float64)
    dx, dgamma, dbeta = reference.backward(dy64, cache)
    gain = cache["gamma"] * cache["inv_std"]
    shape = cache["mean"].shape
    y_terms = np.abs(cache["x_hat"] * cache["gamma"]) + np.abs(beta.reshape(shape))
    n = cache["count"]
    dx_terms = np.abs(gain) * (np.abs(dy64) + np.abs(dbeta.reshape(shape)) / n
                               + np.abs(cache["x_hat"] * dgamma.reshape(shape)) / n)
    return (y, dx, dgamma, dbeta, cache["mean"].ravel(), cache["var"].ravel(), y_terms,
            dx_terms)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_outputs_within_one_ulp_and_statistics_within_1e_6(rng, fmt, shape, axis, relu):
    x, dy, gamma, beta = make(shape, axis, fmt, rng)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    assert y.dtype == fmt and dx.dtype == fmt
    assert dgamma.dtype == dbeta.dtype == np.float32
    assert ctx.mean.dtype == ctx.var.dtype == np.float64 and ctx.dtype == fmt
    y64, dx64, dgamma64, dbeta64, mean64, var64, y_terms, dx_terms = _float64_truth(
        x, dy, gamma, beta, axis, relu)
    assert_within_one_ulp(y, y64, fmt, "y", y_terms)
    assert_within_one_ulp(dx, dx64, fmt, "dx", dx_terms)
    assert rel_err(ctx.mean, mean64) <= 1e-6
    assert rel_err(ctx.var, var64) <= 1e-6
    # dgamma, dbeta are rounded to float32 (their dtype): compare at float32's 6e-8 + 1e-6
    scale = np.abs(dy.astype(np.float64)).sum() / dgamma.size
    assert np.max(np.abs(dgamma - dgamma64)) <= 1e-6 * max(np.abs(dgamma64).max(), scale)
    assert np.max(np.abs(dbeta - dbeta64)) <= 1e-6 * max(np.abs(dbeta64).max(), scale)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_statistics_of_data_far_from_zero(rng, fmt):
    """A mean many standard deviations from zero: the float32 block sums are of
    pivot-shifted values, so the variance keeps its digits."""
    offset = 200.0 if fmt == F16 else 2000.0
    x = (offset + rng.standard_normal((64, 8, 30, 30)) * 3).astype(fmt)
    mean, var = fastbn.batch_stats(x)
    x64 = x.astype(np.float64)
    assert rel_err(mean, x64.mean(axis=(0, 2, 3))) <= 1e-6
    truth = ((x64 - x64.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean(axis=(0, 2, 3))
    assert rel_err(var, truth) <= 1e-6


@pytest.mark.parametrize(("shape", "axis"), [((64, 5), 1), ((4, 5, 30, 30), 1),
                                             ((4, 30, 30, 5), -1)])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_constant_channel_gives_beta_exactly(rng, fmt, shape, axis):
    x, _, gamma, beta = make(shape, axis, fmt, rng)
    index = [slice(None)] * len(shape)
    index[axis] = 2
    x[tuple(index)] = fmt.type(3.25)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
    assert ctx.var[2] == 0.0
    assert np.all(y[tuple(index)] == beta[2].astype(fmt))


@pytest.mark.parametrize("layout", ["rows", "planes"])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_nan_stays_in_its_channel(rng, fmt, layout):
    shape = (64, 6) if layout == "rows" else (4, 6, 12, 12)
    x, dy, gamma, beta = make(shape, 1, fmt, rng)
    x[1, 3] = np.nan
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    others = [c for c in range(6) if c != 3]
    assert np.isnan(y[:, 3]).all() and np.isnan(dx[:, 3]).all() and np.isnan(dgamma[3])
    assert np.isfinite(y[:, others]).all() and np.isfinite(dx[:, others]).all()
    assert np.isfinite(dgamma[others]).all() and np.isfinite(dbeta).all()


@pytest.mark.parametrize(("shape", "axis"), [((1024, 300), 1), ((8, 32, 40, 40), 1),
                                             ((8, 40, 40, 32), -1)])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_bitwise_identical_for_any_thread_count_and_variant(num_threads, monkeypatch, rng, fmt,
                                                            shape, axis):
    x, dy, gamma, beta = make(shape, axis, fmt, rng)
    assert x.size >= _launch.SMALL_PROBLEM

    names = ("y", "dx", "dgamma", "dbeta", "mean", "var", "y_eval")

    def run():
        y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=True)
        dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
        y_eval = fastbn.batch_norm_inference(x, ctx.mean, ctx.var, gamma, beta, axis=axis)
        return dict(zip(names, (np.array(a) for a in (y, dx, dgamma, dbeta, ctx.mean, ctx.var,
                                                       y_eval)), strict=True))

    def differences(got, want):
        """Which outputs differ, in how many bytes (a failure says which sweep)."""
        return {name: int(np.sum(got[name].view(np.uint8) != want[name].view(np.uint8)))
                for name in names if got[name].tobytes() != want[name].tobytes()}

    num_threads(2)
    two = run()
    num_threads(1)
    one = run()
    monkeypatch.setattr(_launch, "SMALL_PROBLEM", x.size + 1)  # the serial variant
    serial = run()
    again = run()  # tells a repeatable difference from a transient one
    assert not differences(one, two), f"1 vs 2 threads: {differences(one, two)}"
    assert not differences(serial, two), (f"serial vs parallel: {differences(serial, two)}; "
                                          f"serial run again: {differences(again, two)}")


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_16_bit_data_equals_float32_data_of_the_same_values(rng, fmt):
    """Same arithmetic as float32 (widened exactly), one more rounding at the end.

    The statistics differ in the last digits (16-bit data sums in float32 blocks,
    float32 data in float64), so the float32 side normalizes with the 16-bit
    call's own statistics."""
    x, dy, gamma, beta = make((8, 6, 16, 16), 1, fmt, rng)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    _, ctx32 = fastbn.batch_norm_forward(x.astype(np.float32), gamma, beta)
    y32 = fastbn.batch_norm_inference(x.astype(np.float32), ctx.mean, ctx.var, gamma, beta)
    assert np.array_equal(y.view(np.uint16), y32.astype(fmt).view(np.uint16))
    assert rel_err(ctx.var, ctx32.var) <= 1e-6
    assert rel_err(ctx.mean, ctx32.mean) <= 1e-6


# ---------------------------------------------------------------------------
# The API: every entry point, out=, parameters, errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_out_buffers_of_the_data_format(rng, fmt):
    x, dy, gamma, beta = make((4, 6, 10, 10), 1, fmt, rng)
    y_out, dx_out = np.empty_like(x), np.empty_like(x)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, out=y_out)
    dx, _, _ = fastbn.batch_norm_backward(dy, ctx, out=dx_out)
    assert y is y_out and dx is dx_out
    expected, ctx2 = fastbn.batch_norm_forward(x, gamma, beta)
    assert np.array_equal(y.view(np.uint16), expected.view(np.uint16))
    y_eval = np.empty_like(x)
    assert fastbn.batch_norm_inference(x, ctx.mean, ctx.var, gamma, beta, out=y_eval) is y_eval


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_out_of_another_format_names_out(rng, fmt):
    x, dy, gamma, beta = make((4, 6), 1, fmt, rng)
    other = BF16 if fmt == F16 else F16
    for wrong in (np.empty(x.shape, other), np.empty(x.shape, np.float32),
                  np.empty(x.shape, np.uint16), np.empty(x.shape, np.int16)):
        with pytest.raises(TypeError, match=rf"out must have dtype {fmt.name}, got"):
            fastbn.batch_norm_forward(x, gamma, beta, out=wrong)
    _, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    with pytest.raises(TypeError, match=rf"out must have dtype {fmt.name}"):
        fastbn.batch_norm_backward(dy, ctx, out=np.empty(x.shape, other))


def test_mixed_16_bit_formats_name_dy(rng):
    x, dy, gamma, beta = make((4, 6), 1, F16, rng)
    _, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    with pytest.raises(TypeError, match="dy must have the dtype of x, float16, got bfloat16"):
        fastbn.batch_norm_backward(dy.astype(BF16), ctx)
    with pytest.raises(TypeError, match="dy must have the dtype of x, float16, got float32"):
        fastbn.batch_norm_backward(dy.astype(np.float32), ctx)


def test_integer_arrays_are_not_taken_for_16_bit_floats():
    with pytest.raises(TypeError, match="x must have dtype float32, float64, float16 or bfloat16"):
        fastbn.batch_norm_forward(np.ones((4, 3), np.uint16))
    with pytest.raises(TypeError, match="x must have dtype"):
        fastbn.batch_stats(np.ones((4, 3), np.int16))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_16_bit_parameters_are_widened_and_their_gradients_rounded(rng, fmt):
    """PyTorch allows bf16 weights with bf16 data; fastbn computes with their exact
    float32 values and returns dgamma/dbeta in their dtype."""
    x, dy, gamma, beta = make((32, 6), 1, fmt, rng)
    y, ctx = fastbn.batch_norm_forward(x, gamma.astype(fmt), beta.astype(fmt))
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    y32, ctx32 = fastbn.batch_norm_forward(x, gamma.astype(fmt).astype(np.float32),
                                           beta.astype(fmt).astype(np.float32))
    dx32, dgamma32, dbeta32 = fastbn.batch_norm_backward(dy, ctx32)
    assert np.array_equal(y.view(np.uint16), y32.view(np.uint16))
    assert dgamma.dtype == dbeta.dtype == fmt
    assert np.array_equal(dgamma.view(np.uint16), dgamma32.astype(fmt).view(np.uint16))
    y_eval = fastbn.batch_norm_inference(x, ctx.mean.astype(fmt), ctx.var.astype(fmt),
                                         gamma.astype(fmt), beta.astype(fmt))
    assert y_eval.dtype == fmt


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_split_api(rng, fmt):
    from fastbn.functional import (
        batch_norm_backward_apply,
        batch_norm_backward_reduce,
        batch_norm_normalize,
    )

    x, dy, gamma, beta = make((16, 6, 5, 5), 1, fmt, rng)
    mean, var = fastbn.batch_stats(x)
    y, ctx = batch_norm_normalize(x, mean, var, x.size // 6, gamma, beta)
    sums = batch_norm_backward_reduce(dy, ctx)
    dx = batch_norm_backward_apply(dy, ctx, *sums)
    y_ref, ctx_ref = fastbn.batch_norm_forward(x, gamma, beta)
    dx_ref, _, _ = fastbn.batch_norm_backward(dy, ctx_ref)
    assert y.dtype == dx.dtype == fmt
    assert np.array_equal(y.view(np.uint16), y_ref.view(np.uint16))
    assert np.array_equal(dx.view(np.uint16), dx_ref.view(np.uint16))


@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_layer_takes_16_bit_data_with_its_own_parameter_dtype(rng, fmt, layer_dtype):
    """The layer is the functional API plus state: the same bits as the functional
    calls, running statistics as a float64 layer's on the same data."""
    bn = fastbn.BatchNorm(6, dtype=layer_dtype)
    bn64 = fastbn.BatchNorm(6, dtype=np.float64)
    for step in range(3):
        x, dy, _, _ = make((32, 6, 4, 4), 1, fmt, rng, offset=step)
        weight, bias = bn.weight.copy(), bn.bias.copy()
        y = bn(x)
        dx = bn.backward(dy)
        y_fn, ctx = fastbn.batch_norm_forward(x, weight, bias)
        dx_fn, dgamma, _ = fastbn.batch_norm_backward(dy, ctx)
        bn64(x.astype(np.float64))
        assert y.dtype == dx.dtype == fmt
        assert bn.running_mean.dtype == bn.grad_weight.dtype == np.dtype(layer_dtype)
        assert np.array_equal(y.view(np.uint16), y_fn.view(np.uint16))
        assert np.array_equal(dx.view(np.uint16), dx_fn.view(np.uint16))
        assert np.array_equal(bn.grad_weight, dgamma)
        assert rel_err(bn.running_mean, bn64.running_mean) <= 1e-6
        assert rel_err(bn.running_var, bn64.running_var) <= 1e-6
        bn.weight -= 0.1 * bn.grad_weight
    bn.eval()
    x, _, _, _ = make((8, 6, 4, 4), 1, fmt, rng)
    expected = fastbn.batch_norm_inference(x, bn.running_mean, bn.running_var, bn.weight,
                                           bn.bias)
    assert np.array_equal(bn(x).view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_layer_refuses_16_bit_parameters_naming_dtype(fmt):
    with pytest.raises(TypeError, match="dtype is the dtype of the parameters .* float32"):
        fastbn.BatchNorm(4, dtype=fmt)


def test_failed_16_bit_call_leaves_the_layer_untouched(rng):
    bn = fastbn.BatchNorm(6)
    x, dy, _, _ = make((16, 6), 1, BF16, rng)
    bn(x)
    before = {k: v.copy() for k, v in bn.state_dict().items()}
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(FloatingPointError):
        bn(bad)
    with pytest.raises(TypeError, match="dy"):
        bn.backward(dy.astype(np.float16))
    after = bn.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert bn.backward(dy).dtype == BF16  # the pending context is still the good batch's


ASM_CHECK = """
import re, numpy as np, fastbn
from fastbn.kernels import SERIAL
x = np.ones((2, 8, 32, 32), np.float16)  # below SMALL_PROBLEM: the serial kernels
y, ctx = fastbn.batch_norm_forward(x)
fastbn.batch_norm_backward(x, ctx)
for name in ("train_forward_planes", "backward_planes"):
    dispatcher = getattr(SERIAL, name)
    asm = dispatcher.inspect_asm(dispatcher.signatures[0])
    vector = len(re.findall(r"vcvtph2ps\\s+[^\\n]*ymm", asm))
    print(name, vector, asm.count("vcvtph2pd"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (_config.F16_HARDWARE and __import__("platform").machine() == "x86_64"),
                    reason="checks the F16C instructions of an x86-64 CPU that has them")
def test_kernels_convert_in_registers():
    """The forward and backward sweeps use F16C's vector conversions (ymm: 8 values per
    instruction) and never widen half to double per element (vcvtph2pd would halve
    the width).  Compiled afresh: Numba cannot show the assembly of cached code."""
    result = run_python(["-c", ASM_CHECK], {"FASTBN_NO_CACHE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in result.stdout.split("\n"):
        if line.strip():
            name, vector, widened = line.split()
            assert int(vector) > 0, f"{name}: no vector half -> float conversion"
            assert int(widened) == 0, f"{name}: half widened to double per element"
