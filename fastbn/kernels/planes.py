"""Planes layout (``inner > 1``): a 3-D ``(outer, C, inner)`` array, contiguous planes per channel.

Every element is read through :func:`~.storage.load` and written through
:func:`~.storage.encode`, so one source serves float64, float32 and 16-bit
data (DESIGN.md §10).

Reductions keep one scalar accumulator per plane, which vectorizes only with
reassociation (``REDUCTION_FASTMATH``).  The accumulator is of the block type
(float32 for float32 and 16-bit data: eight lanes per AVX2 vector and no
float64 conversion per element; float64 for float64 data) and runs over
segments of at most :data:`~.plan.SEGMENT` values of a plane row, each folded
into a float64 total.  Everything whose rounding matters -- the centring
``x - pivot``/``x - mean_hi`` and the fused-ReLU mask -- goes through the
flag-free helpers of :mod:`.elementwise`, which reassociation cannot rewrite.
Elementwise sweeps (normalize, dx) are compiled without fastmath.

Every inner loop indexes a slice from 0 (``for i in range(segment.shape[0])``),
never ``range(s0, s1)`` on the plane: Numba wraps negative indices, and
LLVM could not prove ``s0 + k >= 0``, so it kept the wraparound select and on
AVX-512 vectorized the loads as gathers (``vgatherqps``).  On an AVX-512 Zen 4
runner that made the float32 statistics sweep at (32, 64, 56, 56) compute-bound
(3.9 ms against 1.0 ms for a copy of the same bytes, 2026-12-03); AVX2 targets
had not shown it.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import REDUCTION_FASTMATH
from ._build import kernel
from .elementwise import grad_input, masked_grad, strict_sub, task_pivot
from .plan import SEGMENT, plane_task
from .storage import accumulator_zero, compute_zero, encode, load, to_accumulator, zero_of


@kernel(parallel=True, fastmath=REDUCTION_FASTMATH)
def planes_moment_partials(x, n_outer_chunks, n_inner_chunks, part_mean, part_m2, part_count):
    """Per-chunk (mean, M2, count) of pivot-shifted values, one sweep over x."""
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        pivot = task_pivot(x, c, o0, i0, i1)
        block_zero = zero_of(pivot)
        sum_d = 0.0
        sum_d2 = 0.0
        for o in range(o0, o1):
            plane = x[o, c, i0:i1]
            width = i1 - i0
            for s0 in range(0, width, SEGMENT):
                segment = plane[s0:min(width, s0 + SEGMENT)]
                segment_d = block_zero
                segment_d2 = block_zero
                for i in range(segment.shape[0]):  # from 0: see the module doc (gathers)
                    d = strict_sub(to_accumulator(load(segment[i]), x), pivot)
                    segment_d += d
                    segment_d2 += d * d
                sum_d += np.float64(segment_d)
                sum_d2 += np.float64(segment_d2)
        count = np.float64((o1 - o0) * (i1 - i0))
        if c == 0:
            part_count[chunk] = count
        shift = sum_d / count
        part_mean[chunk, c] = np.float64(pivot) + shift
        part_m2[chunk, c] = sum_d2 - sum_d * shift


@kernel(parallel=True)
def planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
    """y = ((x - mean_hi) - mean_lo) * scale + shift [then max(y, 0)], rounded once."""
    outer, n_channels, inner = x.shape
    zero = compute_zero(x)
    for p in prange(outer * n_channels):
        o = p // n_channels
        c = p % n_channels
        hi = mean_hi[c]
        lo = mean_lo[c]
        s = scale[c]
        b = shift[c]
        x_plane = x[o, c]
        y_plane = y[o, c]
        if relu:
            for i in range(inner):
                v = ((load(x_plane[i]) - hi) - lo) * s + b
                y_plane[i] = encode(zero if v < zero else v, y_plane[i])
        else:
            for i in range(inner):
                y_plane[i] = encode(((load(x_plane[i]) - hi) - lo) * s + b, y_plane[i])


@kernel(parallel=True, fastmath=REDUCTION_FASTMATH)
def planes_grad_partials(
    x, dy, mean_hi, mean_lo, scale, shift, relu, n_outer_chunks, n_inner_chunks,
    part_sum_dy, part_sum_dy_xc,
):
    """Per-chunk sum(dy') and sum(dy' * (x - mean_hi)), dy' masked by the fused ReLU.

    ``x - mean_hi`` is exact near the mean (Sterbenz); the caller subtracts
    ``(mean - mean_hi) * sum(dy')`` in float64 to centre on the float64 mean.
    The mask recomputes the forward's output bit for bit (flag-free arithmetic).
    """
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        hi = mean_hi[c]
        lo = mean_lo[c]
        s = scale[c]
        b = shift[c]
        hi_sum = to_accumulator(hi, x)
        block_zero = accumulator_zero(x)
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for o in range(o0, o1):
            x_plane = x[o, c, i0:i1]
            dy_plane = dy[o, c, i0:i1]
            width = i1 - i0
            for s0 in range(0, width, SEGMENT):
                s1 = min(width, s0 + SEGMENT)
                x_segment = x_plane[s0:s1]
                dy_segment = dy_plane[s0:s1]
                segment_dy = block_zero
                segment_dy_xc = block_zero
                for i in range(x_segment.shape[0]):  # from 0 (gathers: the module doc)
                    xv = load(x_segment[i])
                    g = to_accumulator(masked_grad(load(dy_segment[i]), xv, hi, lo, s, b, relu), x)
                    segment_dy += g
                    segment_dy_xc += g * strict_sub(to_accumulator(xv, x), hi_sum)
                sum_dy += np.float64(segment_dy)
                sum_dy_xc += np.float64(segment_dy_xc)
        part_sum_dy[chunk, c] = sum_dy
        part_sum_dy_xc[chunk, c] = sum_dy_xc


@kernel(parallel=True)
def planes_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat,
                 dx):
    """dx = k_dy*dy' - k_const - k_xhat*x_hat, elementwise, rounded once."""
    outer, n_channels, inner = x.shape
    zero = compute_zero(x)
    for p in prange(outer * n_channels):
        o = p // n_channels
        c = p % n_channels
        h, lo, s, b, r = mean_hi[c], mean_lo[c], scale[c], shift[c], inv_std[c]
        a, k0, k1 = k_dy[c], k_const[c], k_xhat[c]
        x_plane = x[o, c]
        dy_plane = dy[o, c]
        dx_plane = dx[o, c]
        if relu:
            for i in range(inner):
                dx_plane[i] = encode(grad_input(load(x_plane[i]), load(dy_plane[i]), h, lo, s, b,
                                                r, a, k0, k1, True, zero), dx_plane[i])
        else:
            for i in range(inner):
                dx_plane[i] = encode(grad_input(load(x_plane[i]), load(dy_plane[i]), h, lo, s, b,
                                                r, a, k0, k1, False, zero), dx_plane[i])
