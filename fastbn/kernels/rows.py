"""Rows layout (``inner == 1``): a 2-D ``(outer, C)`` array, one row of C values per sample.

Loops run over rows and vectorize along the channel axis with per-channel
accumulator vectors, so no fastmath is needed.  Each sweep is a
:func:`~fastbn.kernels._build.kernel` with ``prange`` over row chunks (or row
groups), compiled in a parallel and a serial variant.  Elements go through
:func:`~.storage.load` / :func:`~.storage.encode` (one source for every
storage format); reductions accumulate ``ROW_BLOCK`` rows in the block type
(float32, or float64 for float64 data) and fold them into float64 vectors.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._build import kernel
from .elementwise import grad_input, masked_grad
from .plan import CHANNEL_BLOCK, GROUP_MIN_CHANNELS, ROW_BLOCK, chunk_bounds
from .storage import (
    accumulator_empty,
    block_zeros,
    compute_zero,
    encode,
    load,
    to_accumulator,
)

#: Rows averaged for the pivot of a rows-reduction task (see ``task_pivot``).
PIVOT_ROWS = 8


@kernel(parallel=True)
def rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count):
    """Per-chunk (mean, M2, count) of pivot-shifted values, one sweep over x."""
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = chunk_bounds(chunk, n_row_chunks, outer)
        c0 = block * CHANNEL_BLOCK
        c1 = min(n_channels, c0 + CHANNEL_BLOCK)
        width = c1 - c0
        # The pivot: the mean of the first rows (in the accumulation type), so
        # that block sums of x - pivot cancel little (elementwise.task_pivot).
        pivot = accumulator_empty(width, x)
        first = np.zeros(width)
        n_first = min(PIVOT_ROWS, r1 - r0)
        for r in range(r0, r0 + n_first):
            x_row = x[r, c0:c1]
            for j in range(width):
                first[j] += np.float64(load(x_row[j]))
        for j in range(width):
            pivot[j] = first[j] / n_first
        sum_d = np.zeros(width)
        sum_d2 = np.zeros(width)
        block_d = block_zeros(width, x)
        block_d2 = block_zeros(width, x)
        for b0 in range(r0, r1, ROW_BLOCK):
            b1 = min(r1, b0 + ROW_BLOCK)
            # Four rows per pass over the accumulators: the accumulator loads and
            # stores (L1) otherwise bound the loop at half of the L3 bandwidth.
            # The grouping is fixed by the row index, so it is deterministic.
            r = b0
            while r + 4 <= b1:
                xa = x[r, c0:c1]
                xb = x[r + 1, c0:c1]
                xc = x[r + 2, c0:c1]
                xd = x[r + 3, c0:c1]
                for j in range(width):
                    p = pivot[j]
                    da = to_accumulator(load(xa[j]), x) - p
                    db = to_accumulator(load(xb[j]), x) - p
                    dc = to_accumulator(load(xc[j]), x) - p
                    dd = to_accumulator(load(xd[j]), x) - p
                    block_d[j] += (da + db) + (dc + dd)
                    block_d2[j] += (da * da + db * db) + (dc * dc + dd * dd)
                r += 4
            for rr in range(r, b1):
                xa = x[rr, c0:c1]
                for j in range(width):
                    da = to_accumulator(load(xa[j]), x) - pivot[j]
                    block_d[j] += da
                    block_d2[j] += da * da
            for j in range(width):
                sum_d[j] += np.float64(block_d[j])
                sum_d2[j] += np.float64(block_d2[j])
                block_d[j] = 0
                block_d2[j] = 0
        count = np.float64(r1 - r0)
        part_count[chunk] = count
        for j in range(width):
            shift = sum_d[j] / count
            part_mean[chunk, c0 + j] = np.float64(pivot[j]) + shift
            part_m2[chunk, c0 + j] = sum_d2[j] - sum_d[j] * shift


@kernel(parallel=True)
def rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
    """y = ((x - mean_hi) - mean_lo) * scale + shift [then max(y, 0)], rounded once."""
    outer, n_channels = x.shape
    zero = compute_zero(x)
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
                ya[c] = encode(((load(xa[c]) - hi) - lo) * s + b, ya[c])
                yb[c] = encode(((load(xb[c]) - hi) - lo) * s + b, yb[c])
                yc[c] = encode(((load(xc[c]) - hi) - lo) * s + b, yc[c])
                yd[c] = encode(((load(xd[c]) - hi) - lo) * s + b, yd[c])
        elif r1 - r0 == 4:
            xa, xb, xc, xd = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
            ya, yb, yc, yd = y[r0], y[r0 + 1], y[r0 + 2], y[r0 + 3]
            for c in range(n_channels):
                hi = mean_hi[c]
                lo = mean_lo[c]
                s = scale[c]
                b = shift[c]
                va = ((load(xa[c]) - hi) - lo) * s + b
                vb = ((load(xb[c]) - hi) - lo) * s + b
                vc = ((load(xc[c]) - hi) - lo) * s + b
                vd = ((load(xd[c]) - hi) - lo) * s + b
                ya[c] = encode(zero if va < zero else va, ya[c])
                yb[c] = encode(zero if vb < zero else vb, yb[c])
                yc[c] = encode(zero if vc < zero else vc, yc[c])
                yd[c] = encode(zero if vd < zero else vd, yd[c])
        else:
            for r in range(r0, r1):
                x_row = x[r]
                y_row = y[r]
                for c in range(n_channels):
                    v = ((load(x_row[c]) - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c]
                    y_row[c] = encode(zero if relu and v < zero else v, y_row[c])


@kernel(parallel=True)
def rows_grad_partials(
    x, dy, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
    part_sum_dy, part_sum_dy_xc,
):
    """Per-chunk sum(dy') and sum(dy' * (x - mean_hi)), dy' masked by the fused ReLU.

    As in ``planes_grad_partials``: the caller subtracts ``mean_lo * sum(dy')``.
    """
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
        block_dy = block_zeros(width, x)
        block_dy_xc = block_zeros(width, x)
        hi_b = mean_hi[c0:c1]
        lo_b = mean_lo[c0:c1]
        s_b = scale[c0:c1]
        b_b = shift[c0:c1]
        for b0 in range(r0, r1, ROW_BLOCK):
            b1 = min(r1, b0 + ROW_BLOCK)
            # Four rows per pass over the accumulators, as in rows_moment_partials.
            r = b0
            while r + 4 <= b1:
                xa, xb, xc, xd = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
                ga_, gb_, gc_, gd_ = (dy[r, c0:c1], dy[r + 1, c0:c1], dy[r + 2, c0:c1],
                                      dy[r + 3, c0:c1])
                for j in range(width):
                    h, lo, sc, sh = hi_b[j], lo_b[j], s_b[j], b_b[j]
                    va, vb, vc, vd = load(xa[j]), load(xb[j]), load(xc[j]), load(xd[j])
                    ga = masked_grad(load(ga_[j]), va, h, lo, sc, sh, relu)
                    gb = masked_grad(load(gb_[j]), vb, h, lo, sc, sh, relu)
                    gc = masked_grad(load(gc_[j]), vc, h, lo, sc, sh, relu)
                    gd = masked_grad(load(gd_[j]), vd, h, lo, sc, sh, relu)
                    h_sum = to_accumulator(h, x)
                    # the four-row sum in the compute type, then widened once (float32
                    # data: as before the 16-bit work, ~1e-7 of four values)
                    block_dy[j] += to_accumulator((ga + gb) + (gc + gd), x)
                    block_dy_xc[j] += (
                        ga * (to_accumulator(va, x) - h_sum) + gb * (to_accumulator(vb, x) - h_sum)
                    ) + (
                        gc * (to_accumulator(vc, x) - h_sum) + gd * (to_accumulator(vd, x) - h_sum)
                    )
                r += 4
            for rr in range(r, b1):
                xa = x[rr, c0:c1]
                ga_ = dy[rr, c0:c1]
                for j in range(width):
                    va = load(xa[j])
                    ga = to_accumulator(
                        masked_grad(load(ga_[j]), va, hi_b[j], lo_b[j], s_b[j], b_b[j], relu), x)
                    block_dy[j] += ga
                    block_dy_xc[j] += ga * (to_accumulator(va, x) - to_accumulator(hi_b[j], x))
            for j in range(width):
                sum_dy[j] += np.float64(block_dy[j])
                sum_dy_xc[j] += np.float64(block_dy_xc[j])
                block_dy[j] = 0
                block_dy_xc[j] = 0
        for j in range(width):
            part_sum_dy[chunk, c0 + j] = sum_dy[j]
            part_sum_dy_xc[chunk, c0 + j] = sum_dy_xc[j]


@kernel(parallel=True)
def rows_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat, dx):
    """dx = k_dy*dy' - k_const - k_xhat*x_hat, elementwise, rounded once."""
    outer, n_channels = x.shape
    zero = compute_zero(x)
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
                da[c] = encode(grad_input(load(xa[c]), load(ga[c]), h, lo, s, b, r, a, k0, k1,
                                          relu, zero), da[c])
                db[c] = encode(grad_input(load(xb[c]), load(gb[c]), h, lo, s, b, r, a, k0, k1,
                                          relu, zero), db[c])
                dc[c] = encode(grad_input(load(xc[c]), load(gc[c]), h, lo, s, b, r, a, k0, k1,
                                          relu, zero), dc[c])
                dd[c] = encode(grad_input(load(xd[c]), load(gd[c]), h, lo, s, b, r, a, k0, k1,
                                          relu, zero), dd[c])
        else:
            for r in range(r0, r1):
                x_row = x[r]
                dy_row = dy[r]
                dx_row = dx[r]
                for c in range(n_channels):
                    dx_row[c] = encode(grad_input(
                        load(x_row[c]), load(dy_row[c]), mean_hi[c], mean_lo[c], scale[c],
                        shift[c], inv_std[c], k_dy[c], k_const[c], k_xhat[c], relu, zero,
                    ), dx_row[c])
