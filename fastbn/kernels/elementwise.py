"""Per-element helpers shared by the rows and planes sweeps (inlined into them).

They take values already converted by :func:`~.storage.load` (the compute
type: float32 for float32 and 16-bit data, float64 for float64) and only
return values.  They are inlined at Numba IR level and re-optimized under the
*caller's* flags, which is why no sweep that calls them uses fastmath: the
centring ``(x - mean_hi) - mean_lo`` would be folded.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from .._config import CACHE
from .plan import PIVOT_VALUES
from .storage import load, to_accumulator, zero_of

# ---------------------------------------------------------------------------
# Arithmetic that fastmath cannot touch.  The reductions are compiled with
# reassociation (REDUCTION_FASTMATH), which is what lets LLVM split a scalar
# accumulator into vector lanes.  Flags live on each LLVM instruction, so an
# operation emitted here, with only the inert ``arcp`` flag, keeps its exact IEEE rounding inside
# such a loop: ``x - mean_hi`` is not rewritten into ``sum(x) - n * mean_hi``
# (which would cancel away every digit at mean/std = 1e4), and the fused-ReLU
# mask is computed with the forward's roundings, bit for bit.
# ---------------------------------------------------------------------------


#: Numba's fastmath pass adds the caller's flags to every float instruction that
#: has none, so "flag-free" needs one flag that permits nothing here: ``arcp``
#: (use a reciprocal instead of dividing) only concerns divisions.
_STRICT = ("arcp",)


@intrinsic
def strict_sub(typingctx, a, b):
    """``a - b``, one IEEE rounding, whatever the caller's fastmath flags."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1], flags=_STRICT)

    return a(a, b), codegen


@intrinsic
def relu_active(typingctx, x, hi, lo, s, b):
    """True where the fused-ReLU forward's value before rounding,
    ``((x - hi) - lo) * s + b``, was > 0: recomputed bit for bit, also inside a
    reassociating reduction.  The comparison is flag-free too: with fast-math
    flags on the ``fcmp``, LLVM may rewrite ``t * s + b > 0`` as ``t * s > -b``,
    which flipped the mask of elements within an ulp of the kink (mean 1e4)."""
    if not (isinstance(x, types.Float) and x == hi == lo == s == b):
        return None

    def codegen(context, builder, signature, args):
        x_value, hi_value, lo_value, scale, shift = args
        centred = builder.fsub(builder.fsub(x_value, hi_value, flags=_STRICT), lo_value,
                               flags=_STRICT)
        value = builder.fadd(builder.fmul(centred, scale, flags=_STRICT), shift, flags=_STRICT)
        return builder.fcmp_ordered(">", value, context.get_constant(x, 0.0), flags=_STRICT)

    return types.boolean(x, hi, lo, s, b), codegen


@njit(cache=CACHE, inline="always")
def masked_grad(dy_value, x_value, hi, lo, s, b, relu):
    """dy, zeroed where the fused-ReLU forward output was not > 0 (a NaN there gives 0)."""
    if relu and not relu_active(x_value, hi, lo, s, b):
        return zero_of(dy_value)
    return dy_value


@njit(cache=CACHE, inline="always")
def grad_input(x_value, dy_value, hi, lo, s, b, inv_std, k_dy, k_const, k_xhat, relu, zero):
    """dx for one element: k_dy*dy' - k_const - k_xhat*x_hat, centred as in the forward."""
    xc = (x_value - hi) - lo
    g = dy_value
    if relu and not xc * s + b > zero:
        g = zero
    return k_dy * g - k_const - k_xhat * (xc * inv_std)


@njit(cache=CACHE, inline="always")
def task_pivot(x, c, o0, i0, i1):
    """The shift of a planes reduction task: the mean of its first (up to PIVOT_VALUES)
    values, in the accumulation type (:func:`~.storage.to_accumulator`).

    Sums of ``x - pivot`` lose to cancellation in proportion to how far the pivot
    is from the mean (in standard deviations); a lone first value can be several
    away, the mean of 32 is rarely more than one third of one.
    """
    n = min(PIVOT_VALUES, i1 - i0)
    first = x[o0, c, i0:i0 + n]
    total = 0.0
    for i in range(n):  # from 0: no wraparound select, no gathers (planes.py)
        total += np.float64(load(first[i]))
    return to_accumulator(total / n, x)
