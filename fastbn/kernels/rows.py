"""Rows layout (``inner == 1``): a 2-D ``(outer, C)`` array, one row of C values per sample.

Loops run over rows and vectorize along the channel axis with per-channel
accumulator vectors, so no fastmath is needed.  Each sweep is a
:func:`~fastbn.kernels._build.kernel` with ``prange`` over row chunks (or row
groups), compiled in a parallel and a serial variant.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._build import kernel
from .elementwise import grad_input, masked_grad
from .plan import CHANNEL_BLOCK, GROUP_MIN_CHANNELS, chunk_bounds


@kernel(parallel=True)
def rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count):
    """Per-chunk (mean, M2, count) of pivot-shifted float64 values, one sweep over x."""
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = chunk_bounds(chunk, n_row_chunks, outer)
        c0 = block * CHANNEL_BLOCK
        c1 = min(n_channels, c0 + CHANNEL_BLOCK)
        width = c1 - c0
        pivot = np.empty(width)
        sum_d = np.zeros(width)
        sum_d2 = np.zeros(width)
        for j in range(width):
            pivot[j] = x[r0, c0 + j]
        # Four rows per pass over the accumulators: the accumulator loads and
        # stores (L1) otherwise bound the loop at half of the L3 bandwidth.
        # The grouping is fixed by the row index, so it is deterministic.
        r = r0
        while r + 4 <= r1:
            xa = x[r, c0:c1]
            xb = x[r + 1, c0:c1]
            xc = x[r + 2, c0:c1]
            xd = x[r + 3, c0:c1]
            for j in range(width):
                p = pivot[j]
                da = np.float64(xa[j]) - p
                db = np.float64(xb[j]) - p
                dc = np.float64(xc[j]) - p
                dd = np.float64(xd[j]) - p
                sum_d[j] += (da + db) + (dc + dd)
                sum_d2[j] += (da * da + db * db) + (dc * dc + dd * dd)
            r += 4
        for rr in range(r, r1):
            xa = x[rr, c0:c1]
            for j in range(width):
                da = np.float64(xa[j]) - pivot[j]
                sum_d[j] += da
                sum_d2[j] += da * da
        count = np.float64(r1 - r0)
        part_count[chunk] = count
        for j in range(width):
            shift = sum_d[j] / count
            part_mean[chunk, c0 + j] = pivot[j] + shift
            part_m2[chunk, c0 + j] = sum_d2[j] - sum_d[j] * shift


@kernel(parallel=True)
def rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
    """y = ((x - mean_hi) - mean_lo) * scale + shift [then max(y, 0)], no fastmath."""
    outer, n_channels = x.shape
    zero = x.dtype.type(0)
    # Long rows: groups of four rows share each load of the per-channel
    # constants.  Short rows: one row per iteration is faster (measured 2x at
    # C = 64), the grouped loop's overhead and alias checks dominating there.
    group_rows = 4 if n_channels >= GROUP_MIN_CHANNELS else 1
    for group in prange((outer + group_rows - 1) // group_rows):
        r0 = group * group_rows
        r1 = min(outer, r0 + group_rows)
        if r1 - r0 == 4 and not relu:
            xa, xb, xc, xd = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
            ya, yb, yc, yd = y[r0], y[r0 + 1], y[r0 + 2], y[r0 + 3]
            for c in range(n_channels):
                hi = mean_hi[c]
                lo = mean_lo[c]
                s = scale[c]
                b = shift[c]
                ya[c] = ((xa[c] - hi) - lo) * s + b
                yb[c] = ((xb[c] - hi) - lo) * s + b
                yc[c] = ((xc[c] - hi) - lo) * s + b
                yd[c] = ((xd[c] - hi) - lo) * s + b
        elif r1 - r0 == 4:
            xa, xb, xc, xd = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
            ya, yb, yc, yd = y[r0], y[r0 + 1], y[r0 + 2], y[r0 + 3]
            for c in range(n_channels):
                hi = mean_hi[c]
                lo = mean_lo[c]
                s = scale[c]
                b = shift[c]
                va = ((xa[c] - hi) - lo) * s + b
                vb = ((xb[c] - hi) - lo) * s + b
                vc = ((xc[c] - hi) - lo) * s + b
                vd = ((xd[c] - hi) - lo) * s + b
                ya[c] = zero if va < zero else va
                yb[c] = zero if vb < zero else vb
                yc[c] = zero if vc < zero else vc
                yd[c] = zero if vd < zero else vd
        else:
            for r in range(r0, r1):
                x_row = x[r]
                y_row = y[r]
                for c in range(n_channels):
                    v = ((x_row[c] - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c]
                    y_row[c] = zero if relu and v < zero else v


@kernel(parallel=True)
def rows_grad_partials(
    x, dy, mean, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
    part_sum_dy, part_sum_dy_xc,
):
    """Per-chunk sum(dy') and sum(dy' * (x - mean)) in float64, dy' masked by the fused ReLU."""
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = chunk_bounds(chunk, n_row_chunks, outer)
        c0 = block * CHANNEL_BLOCK
        c1 = min(n_channels, c0 + CHANNEL_BLOCK)
        width = c1 - c0
        sum_dy = np.zeros(width)
        sum_dy_xc = np.zeros(width)
        mean_b = mean[c0:c1]
        hi_b = mean_hi[c0:c1]
        lo_b = mean_lo[c0:c1]
        s_b = scale[c0:c1]
        b_b = shift[c0:c1]
        # Four rows per pass over the accumulators, as in rows_moment_partials.
        r = r0
        while r + 4 <= r1:
            xa, xb, xc, xd = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
            ga_, gb_, gc_, gd_ = dy[r, c0:c1], dy[r + 1, c0:c1], dy[r + 2, c0:c1], dy[r + 3, c0:c1]
            for j in range(width):
                mu = mean_b[j]
                h, lo, sc, sh = hi_b[j], lo_b[j], s_b[j], b_b[j]
                ga = masked_grad(ga_[j], xa[j], h, lo, sc, sh, relu)
                gb = masked_grad(gb_[j], xb[j], h, lo, sc, sh, relu)
                gc = masked_grad(gc_[j], xc[j], h, lo, sc, sh, relu)
                gd = masked_grad(gd_[j], xd[j], h, lo, sc, sh, relu)
                sum_dy[j] += (ga + gb) + (gc + gd)
                sum_dy_xc[j] += (ga * (np.float64(xa[j]) - mu) + gb * (np.float64(xb[j]) - mu)) + (
                    gc * (np.float64(xc[j]) - mu) + gd * (np.float64(xd[j]) - mu)
                )
            r += 4
        for rr in range(r, r1):
            xa = x[rr, c0:c1]
            ga_ = dy[rr, c0:c1]
            for j in range(width):
                ga = masked_grad(ga_[j], xa[j], hi_b[j], lo_b[j], s_b[j], b_b[j], relu)
                sum_dy[j] += ga
                sum_dy_xc[j] += ga * (np.float64(xa[j]) - mean_b[j])
        for j in range(width):
            part_sum_dy[chunk, c0 + j] = sum_dy[j]
            part_sum_dy_xc[chunk, c0 + j] = sum_dy_xc[j]


@kernel(parallel=True)
def rows_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat, dx):
    """dx = k_dy*dy' - k_const - k_xhat*x_hat, elementwise, no fastmath."""
    outer, n_channels = x.shape
    zero = dy.dtype.type(0)
    group_rows = 4 if n_channels >= GROUP_MIN_CHANNELS else 1  # as in rows_normalize
    for group in prange((outer + group_rows - 1) // group_rows):
        r0 = group * group_rows
        r1 = min(outer, r0 + group_rows)
        if r1 - r0 == 4:
            xa, xb, xc, xd = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
            ga, gb, gc, gd = dy[r0], dy[r0 + 1], dy[r0 + 2], dy[r0 + 3]
            da, db, dc, dd = dx[r0], dx[r0 + 1], dx[r0 + 2], dx[r0 + 3]
            for c in range(n_channels):
                h, lo, s, b, r = mean_hi[c], mean_lo[c], scale[c], shift[c], inv_std[c]
                a, k0, k1 = k_dy[c], k_const[c], k_xhat[c]
                da[c] = grad_input(xa[c], ga[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                db[c] = grad_input(xb[c], gb[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                dc[c] = grad_input(xc[c], gc[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                dd[c] = grad_input(xd[c], gd[c], h, lo, s, b, r, a, k0, k1, relu, zero)
        else:
            for r in range(r0, r1):
                x_row = x[r]
                dy_row = dy[r]
                dx_row = dx[r]
                for c in range(n_channels):
                    dx_row[c] = grad_input(
                        x_row[c], dy_row[c], mean_hi[c], mean_lo[c], scale[c], shift[c],
                        inv_std[c], k_dy[c], k_const[c], k_xhat[c], relu, zero,
                    )
