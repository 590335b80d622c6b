"""Storage formats: what a kernel loads and stores, and the arithmetic type it computes in.

Numba has neither float16 nor bfloat16 on the CPU, so 16-bit data reaches the
kernels as zero-copy integer views (DESIGN.md §10) and is converted in
registers:

==========  =============  ==========================  ==========================
format      kernel dtype   load (to float32)           store (float32 -> bits)
==========  =============  ==========================  ==========================
float16     ``uint16``     ``fpext half`` (F16C)       ``fptrunc`` to half (F16C)
bfloat16    ``int16``      ``bits << 16``              integer round to nearest even
float32     ``float32``    itself                      itself
float64     ``float64``    itself                      itself
==========  =============  ==========================  ==========================

One kernel source serves every format: the kernels call :func:`load` on every
element they read and :func:`encode` on every value they write, and these
resolve at compile time (``@overload``) on the element type.  16-bit data is
computed in float32 (never widened to float64 per element: LLVM would fuse the
two conversions into a half-width ``vcvtph2pd``) and rounded once on store.

Without F16C (``NUMBA_CPU_NAME=generic``, pre-2012 x86 CPUs) LLVM lowers the
half conversions to ``__extendhfsf2``/``__truncsfhf2`` calls that Numba's JIT
cannot resolve: the code compiles, then crashes at the first call.  There the
float16 conversions are exact integer code instead (:data:`F16_HARDWARE`,
decided in :mod:`fastbn._config` from the compile target's features).

Helpers here only *return* values; a helper that itself stores lost
vectorization for int16 in a trial (``notes/low-precision.md``).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .._config import CACHE, F16_HARDWARE

#: Kernel dtypes that carry 16-bit data (the integer views).
F16_BITS = np.dtype(np.uint16)
BF16_BITS = np.dtype(np.int16)

_F16 = types.uint16
_BF16 = types.int16
_SIXTEEN_BIT = (_F16, _BF16)


# ---------------------------------------------------------------------------
# Bit casts (LLVM bitcast: no instruction, no rounding)
# ---------------------------------------------------------------------------


@intrinsic
def _u32_as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_u32(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


# ---------------------------------------------------------------------------
# float16: the F16C instructions through LLVM's half type ...
# ---------------------------------------------------------------------------


@intrinsic
def _half_bits_to_f32_hw(typingctx, bits):
    """``fpext half -> float``: exact; vectorizes to ``vcvtph2ps``."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_half_bits_hw(typingctx, value):
    """``fptrunc float -> half``: round to nearest even; vectorizes to ``vcvtps2ph``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


# ---------------------------------------------------------------------------
# ... or exact integer code where the target has no F16C.  Bit-identical to the
# instructions, NaN included (quieted, payload truncated), for every input.
# All intermediates are wrapped in uint32: Numba's integer typing would widen
# them to 64 bits otherwise.
# ---------------------------------------------------------------------------

_U32 = np.uint32


@njit(cache=CACHE, inline="always")
def _half_bits_to_f32_sw(bits):
    h = _U32(bits)
    sign = _U32((h & _U32(0x8000)) << _U32(16))
    magnitude = _U32((h & _U32(0x7FFF)) << _U32(13))  # exponent and mantissa, float32 place
    exponent = _U32(magnitude & _U32(0x0F800000))
    if exponent == _U32(0x0F800000):  # inf or NaN: all-ones exponent, NaN quieted
        out = _U32(magnitude | _U32(0x7F800000))
        if magnitude & _U32(0x007FFFFF):
            out = _U32(out | _U32(0x00400000))
        return _u32_as_f32(_U32(out | sign))
    if exponent == _U32(0):  # zero or subnormal: value = mantissa * 2**-24, exact in float32
        value = np.float32(h & _U32(0x03FF)) * np.float32(5.9604644775390625e-08)
        return _u32_as_f32(_U32(_f32_as_u32(value) | sign))
    return _u32_as_f32(_U32(_U32(magnitude + _U32(0x38000000)) | sign))  # rebias 15 -> 127


@njit(cache=CACHE, inline="always")
def _f32_to_half_bits_sw(value):
    bits = _f32_as_u32(value)
    sign = _U32((bits >> _U32(16)) & _U32(0x8000))
    magnitude = _U32(bits & _U32(0x7FFFFFFF))
    if magnitude > _U32(0x7F800000):  # NaN: quiet, payload truncated
        return np.uint16(sign | _U32(0x7E00) | _U32((magnitude >> _U32(13)) & _U32(0x03FF)))
    if magnitude >= _U32(0x477FF000):  # rounds to >= 65520: infinity (or is infinity)
        return np.uint16(sign | _U32(0x7C00))
    if magnitude < _U32(0x38800000):  # below 2**-14: a subnormal half (or zero)
        # Scaled by 2**24 the half mantissa is the integer part; rint rounds to even.
        scaled = np.float32(np.abs(value)) * np.float32(16777216.0)
        return np.uint16(sign | _U32(np.rint(scaled)))
    # Normal: round the 13 dropped bits to nearest even, then rebias 127 -> 15
    # (a carry out of the mantissa correctly bumps the exponent).
    odd = _U32((magnitude >> _U32(13)) & _U32(1))
    rounded = _U32(magnitude + _U32(0x0FFF) + odd)
    return np.uint16(sign | _U32((rounded - _U32(0x38000000)) >> _U32(13)))


if F16_HARDWARE:
    half_bits_to_f32 = _half_bits_to_f32_hw
    f32_to_half_bits = _f32_to_half_bits_hw
else:
    half_bits_to_f32 = _half_bits_to_f32_sw
    f32_to_half_bits = _f32_to_half_bits_sw


# ---------------------------------------------------------------------------
# bfloat16: the upper half of a float32
# ---------------------------------------------------------------------------


@njit(cache=CACHE, inline="always")
def bf16_bits_to_f32(bits):
    """Exact: the 16 bits are the float32's upper half (vectorizes to a shift)."""
    return _u32_as_f32(_U32(_U32(np.uint16(bits)) << _U32(16)))


@njit(cache=CACHE, inline="always")
def f32_to_bf16_bits(value):
    """Round to nearest even on the dropped 16 bits; NaN stays NaN (quieted).

    Branch-free, and the NaN test is a float compare (one instruction) selecting
    between two 32-bit results before the one narrowing: the integer-compare
    form with a branch per path measured 2.3x slower than F16C's float16
    stores in a normalize sweep (its masks were packed to 16 bits separately).
    """
    # (every intermediate cast back to uint32: Numba widens uint32 arithmetic to
    # 64 bits, which halves the vector width)
    bits = _f32_as_u32(value)
    high = _U32(bits >> _U32(16))
    rounded = _U32(_U32(bits + _U32(0x7FFF)) + _U32(high & _U32(1))) >> _U32(16)
    quieted = _U32(high | _U32(0x0040))
    return np.int16(np.uint16(_U32(quieted if value != value else _U32(rounded))))


# ---------------------------------------------------------------------------
# What the kernels call
# ---------------------------------------------------------------------------


def load(value):
    """An element as the kernel computes with it: float32 for 16-bit data, else itself."""


def encode(value, like):
    """``value`` (compute type) rounded once to the storage type of ``like`` (an element)."""


def zero_of(value):
    """0 of the type of a scalar."""


def compute_zero(data):
    """0 in the compute type of an array's elements."""


def compute_empty(n, data):
    """``np.empty(n)`` in the compute type of ``data``'s elements (per-channel constants)."""


def block_zeros(n, data):
    """Zeroed accumulators for one reduction block, in the accumulation type of
    ``data`` (see :func:`to_accumulator`)."""


def to_accumulator(value, data):
    """A compute-type value in the accumulation type of the array ``data``: float64
    for float32 and float64 data, float32 for 16-bit data.

    16-bit data is summed in float32 over short blocks folded into float64
    (widening every element to float64 would halve the sweep's speed; the
    blocks keep the float32 rounding error at ~1e-7 of the block, far below
    the 16-bit format's 4e-3).  Float32 data keeps float64 accumulation: on
    AVX2 it measured as fast as float32 blocks in the planes layout (the sweeps
    are memory-bound) and its statistics stay within 1e-12 of float64 math.
    The rows layout's statistics sweep is compute-bound with it (3.68 ms
    against 2.15 ms with float32 blocks at (32, 56, 56, 64), 2026-12-03); using
    float32 blocks there needs a fallback for block sums that overflow float32
    (|x - pivot| beyond ~1.8e19, which 16-bit bfloat16 data can reach too).
    """


def accumulator_zero(data):
    """0 in the accumulation type of ``data``'s elements."""


def accumulator_empty(n, data):
    """``np.empty(n)`` in the accumulation type of ``data``'s elements."""


@overload(load)
def _load(value):
    if value == _F16:
        return lambda value: half_bits_to_f32(value)
    if value == _BF16:
        return lambda value: bf16_bits_to_f32(value)
    return lambda value: value


@overload(encode)
def _encode(value, like):
    if like == _F16:
        return lambda value, like: f32_to_half_bits(np.float32(value))
    if like == _BF16:
        return lambda value, like: f32_to_bf16_bits(np.float32(value))
    if like == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


@overload(zero_of)
def _zero_of(value):
    if value == types.float32:
        return lambda value: np.float32(0)
    return lambda value: np.float64(0)


@overload(compute_zero)
def _compute_zero(data):
    if data.dtype in _SIXTEEN_BIT or data.dtype == types.float32:
        return lambda data: np.float32(0)
    return lambda data: np.float64(0)


@overload(compute_empty)
def _compute_empty(n, data):
    if data.dtype in _SIXTEEN_BIT or data.dtype == types.float32:
        return lambda n, data: np.empty(n, np.float32)
    return lambda n, data: np.empty(n, np.float64)


@overload(block_zeros)
def _block_zeros(n, data):
    if data.dtype in _SIXTEEN_BIT:
        return lambda n, data: np.zeros(n, np.float32)
    return lambda n, data: np.zeros(n, np.float64)


@overload(to_accumulator)
def _to_accumulator(value, data):
    if data.dtype in _SIXTEEN_BIT:
        return lambda value, data: np.float32(value)
    return lambda value, data: np.float64(value)


@overload(accumulator_zero)
def _accumulator_zero(data):
    if data.dtype in _SIXTEEN_BIT:
        return lambda data: np.float32(0)
    return lambda data: np.float64(0)


@overload(accumulator_empty)
def _accumulator_empty(n, data):
    if data.dtype in _SIXTEEN_BIT:
        return lambda n, data: np.empty(n, np.float32)
    return lambda n, data: np.empty(n, np.float64)


# ---------------------------------------------------------------------------
# Whole-array conversions (tests and the exhaustive checks; not on a hot path)
# ---------------------------------------------------------------------------


@njit(cache=CACHE)
def decode_array(bits, out):
    """``out[i] = load(bits[i])`` for 1-D arrays (16-bit bits in, float32 out)."""
    for i in range(bits.shape[0]):
        out[i] = load(bits[i])


@njit(cache=CACHE)
def encode_array(values, out):
    """``out[i] = encode(values[i])`` for 1-D arrays (float32 in, 16-bit bits out)."""
    for i in range(values.shape[0]):
        out[i] = encode(values[i], out[i])
