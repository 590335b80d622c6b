"""Planes layout (``inner > 1``): a 3-D ``(outer, C, inner)`` array, contiguous planes per channel.

Reductions keep one scalar accumulator per plane, which vectorizes only with
reassociation (``REDUCTION_FASTMATH``); those reductions therefore centre and
accumulate in float64, where the summation order changes the result by ~1e-16.
Elementwise sweeps and the fused-ReLU reduction use the float32 hi/lo centring
and are compiled without fastmath.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import REDUCTION_FASTMATH
from ._build import kernel
from .elementwise import grad_input, masked_grad
from .plan import plane_task


@kernel(parallel=True, fastmath=REDUCTION_FASTMATH)
def planes_moment_partials(x, n_outer_chunks, n_inner_chunks, part_mean, part_m2, part_count):
    """Per-chunk (mean, M2, count) of pivot-shifted float64 values, one sweep over x."""
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        pivot = np.float64(x[o0, c, i0])
        sum_d = 0.0
        sum_d2 = 0.0
        for o in range(o0, o1):
            plane = x[o, c, i0:i1]
            for i in range(i1 - i0):
                d = np.float64(plane[i]) - pivot
                sum_d += d
                sum_d2 += d * d
        count = np.float64((o1 - o0) * (i1 - i0))
        if c == 0:
            part_count[chunk] = count
        shift = sum_d / count
        part_mean[chunk, c] = pivot + shift
        part_m2[chunk, c] = sum_d2 - sum_d * shift


@kernel(parallel=True)
def planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
    """y = ((x - mean_hi) - mean_lo) * scale + shift [then max(y, 0)], no fastmath."""
    outer, n_channels, inner = x.shape
    zero = x.dtype.type(0)
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
                v = ((x_plane[i] - hi) - lo) * s + b
                y_plane[i] = zero if v < zero else v
        else:
            for i in range(inner):
                y_plane[i] = ((x_plane[i] - hi) - lo) * s + b


@kernel(parallel=True, fastmath=REDUCTION_FASTMATH)
def planes_grad_partials(x, dy, mean, n_outer_chunks, n_inner_chunks, part_sum_dy,
                         part_sum_dy_xc):
    """Planes reduction without ReLU (fastmath: vectorized float64 accumulators)."""
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        mu = mean[c]
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for o in range(o0, o1):
            x_plane = x[o, c, i0:i1]
            dy_plane = dy[o, c, i0:i1]
            for i in range(i1 - i0):
                g = np.float64(dy_plane[i])
                sum_dy += g
                sum_dy_xc += g * (np.float64(x_plane[i]) - mu)
        part_sum_dy[chunk, c] = sum_dy
        part_sum_dy_xc[chunk, c] = sum_dy_xc


#: Independent accumulators per plane in the fused-ReLU planes reduction.
RELU_LANES = 32


@kernel(parallel=True)
def planes_grad_partials_relu(
    x, dy, mean, mean_hi, mean_lo, scale, shift, n_outer_chunks, n_inner_chunks,
    part_sum_dy, part_sum_dy_xc,
):
    """Planes reduction with the fused-ReLU mask, compiled without fastmath.

    The mask must equal the forward's bit for bit, and fastmath would fold
    ``(x - mean_hi) - mean_lo`` (even inside an inlined helper, whose
    instructions inherit the caller's flags).  Without reassociation a single
    scalar accumulator does not vectorize, so each plane is summed into
    ``RELU_LANES`` explicit accumulators (element i goes to lane i % lanes):
    a fixed order, hence still deterministic, that LLVM vectorizes as is.
    """
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        mu = mean[c]
        hi = mean_hi[c]
        lo = mean_lo[c]
        s = scale[c]
        b = shift[c]
        lanes_dy = np.zeros(RELU_LANES)
        lanes_dy_xc = np.zeros(RELU_LANES)
        width = i1 - i0
        body = width - width % RELU_LANES
        for o in range(o0, o1):
            x_plane = x[o, c, i0:i1]
            dy_plane = dy[o, c, i0:i1]
            for i in range(0, body, RELU_LANES):
                for lane in range(RELU_LANES):
                    g = masked_grad(dy_plane[i + lane], x_plane[i + lane], hi, lo, s, b, True)
                    lanes_dy[lane] += g
                    lanes_dy_xc[lane] += g * (np.float64(x_plane[i + lane]) - mu)
            for i in range(body, width):
                g = masked_grad(dy_plane[i], x_plane[i], hi, lo, s, b, True)
                lanes_dy[0] += g
                lanes_dy_xc[0] += g * (np.float64(x_plane[i]) - mu)
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for lane in range(RELU_LANES):
            sum_dy += lanes_dy[lane]
            sum_dy_xc += lanes_dy_xc[lane]
        part_sum_dy[chunk, c] = sum_dy
        part_sum_dy_xc[chunk, c] = sum_dy_xc


@kernel(parallel=True)
def planes_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat,
                 dx):
    """dx = k_dy*dy' - k_const - k_xhat*x_hat, elementwise, no fastmath."""
    outer, n_channels, inner = x.shape
    zero = dy.dtype.type(0)
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
                dx_plane[i] = grad_input(x_plane[i], dy_plane[i], h, lo, s, b, r, a, k0, k1,
                                         True, zero)
        else:
            for i in range(inner):
                dx_plane[i] = grad_input(x_plane[i], dy_plane[i], h, lo, s, b, r, a, k0, k1,
                                         False, zero)
