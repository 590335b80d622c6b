"""Rows layout (``inner == 1``): a 2-D ``(outer, C)`` array, one row of C values per sample.

Loops run over rows and vectorize along the channel axis with per-channel
accumulator vectors, so no fastmath is needed.  Each sweep is a
:func:`~fastbn.kernels._build.kernel` with ``prange`` over row chunks (or row
groups), compiled in a parallel and a serial variant.  Elements go through
:func:`~.storage.load` / :func:`~.storage.encode` (one source for every
storage format); reductions accumulate ``ROW_BLOCK`` rows in the block type
(the accumulation type of :func:`~.storage.to_accumulator`: float32 for 16-bit
data, float64 for float32 and float64) and fold them into float64 vectors.
A task whose float32 block sums cannot be trusted (:func:`untrusted`:
overflow, NaN/Inf, underflow) sums those channels again in float64 blocks,
so bfloat16 data beyond float32's squared range (|x - pivot| > ~1.8e19) keeps
its variance, and a channel's result never depends on its neighbours.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._config import CACHE
from ._build import kernel
from .elementwise import grad_input, masked_grad, untrusted_sums
from .plan import CHANNEL_BLOCK, GROUP_MIN_CHANNELS, ROW_BLOCK, chunk_bounds
from .storage import (
    accumulator_empty,
    block_zeros,
    compute_zero,
    encode,
    is_narrow,
    load,
    to_block,
)

#: Rows averaged for the pivot of a rows-reduction task (see ``task_pivot``).
PIVOT_ROWS = 8


@njit(cache=CACHE, inline="always")
def _moment_sums(x, r0, r1, c0, pivot, block_d, block_d2, sum_d, sum_d2):
    """sum(x - pivot) and sum((x - pivot)**2) over rows r0:r1 of channels c0:c0+width,
    in blocks of ``ROW_BLOCK`` rows of the pivot's type, each folded into float64.

    The block type is the type of ``pivot`` and of the zeroed accumulators
    ``block_d``, ``block_d2`` (float32 or float64), so one source serves the
    fast pass and the float64 re-sum.  (The caller allocates them: arrays
    allocated with another array's ``dtype`` inside an inlined helper crashed
    the parallel variant.)
    """
    width = pivot.shape[0]
    c1 = c0 + width
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
                da = to_block(load(xa[j]), pivot) - p
                db = to_block(load(xb[j]), pivot) - p
                dc = to_block(load(xc[j]), pivot) - p
                dd = to_block(load(xd[j]), pivot) - p
                block_d[j] += (da + db) + (dc + dd)
                block_d2[j] += (da * da + db * db) + (dc * dc + dd * dd)
            r += 4
        for rr in range(r, b1):
            xa = x[rr, c0:c1]
            for j in range(width):
                da = to_block(load(xa[j]), pivot) - pivot[j]
                block_d[j] += da
                block_d2[j] += da * da
        for j in range(width):
            sum_d[j] += np.float64(block_d[j])
            sum_d2[j] += np.float64(block_d2[j])
            block_d[j] = 0
            block_d2[j] = 0


@njit(cache=CACHE, inline="always")
def untrusted(sum_a, sum_b, pivot, count, squares, redo):
    """Mark in ``redo`` the channels whose float32 block sums cannot be trusted
    (:func:`~.elementwise.untrusted_sums`); returns how many."""
    n_untrusted = 0
    for j in range(sum_a.shape[0]):
        bad = untrusted_sums(sum_a[j], sum_b[j], pivot[j], count, squares)
        redo[j] = bad
        n_untrusted += bad
    return n_untrusted


@kernel(parallel=True)
def rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count):
    """Per-chunk (mean, M2, count) of pivot-shifted values, one sweep over x.

    Blocks are summed in the accumulation type (float32 for 16-bit data); a
    task whose float32 sums are untrusted (:func:`untrusted`) sums again in
    float64 blocks, so overflow beyond float32's range (|x - pivot| > ~1.8e19)
    and underflow of tiny data cost time, not accuracy.  Which pass is used
    depends on the data only, so results stay the same for any thread count.
    """
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = chunk_bounds(chunk, n_row_chunks, outer)
        c0 = block * CHANNEL_BLOCK
        c1 = min(n_channels, c0 + CHANNEL_BLOCK)
        width = c1 - c0
        # The pivot: the mean of the first rows, so that block sums of x - pivot
        # cancel little (elementwise.task_pivot), rounded to the block type.
        first = np.zeros(width)
        n_first = min(PIVOT_ROWS, r1 - r0)
        for r in range(r0, r0 + n_first):
            x_row = x[r, c0:c1]
            for j in range(width):
                first[j] += np.float64(load(x_row[j]))
        pivot = accumulator_empty(width, x)
        pivot_used = np.empty(width)  # in float64, whichever pass is kept
        for j in range(width):
            pivot[j] = first[j] / n_first
            pivot_used[j] = pivot[j]
        count = np.float64(r1 - r0)
        sum_d = np.zeros(width)
        sum_d2 = np.zeros(width)
        _moment_sums(x, r0, r1, c0, pivot, block_zeros(width, x), block_zeros(width, x),
                     sum_d, sum_d2)
        redo = np.empty(width, np.bool_)
        if is_narrow(pivot) and untrusted(sum_d, sum_d2, pivot, count, True, redo):
            # Re-sum the task in float64 blocks (vectorized) and keep those sums
            # for the untrusted channels only: a channel's result never depends
            # on its neighbours (a NaN elsewhere changes no bit here).
            pivot_wide = np.empty(width)
            for j in range(width):
                pivot_wide[j] = first[j] / n_first
            wide_d = np.zeros(width)
            wide_d2 = np.zeros(width)
            _moment_sums(x, r0, r1, c0, pivot_wide, np.zeros(width), np.zeros(width), wide_d,
                         wide_d2)
            for j in range(width):
                if redo[j]:
                    pivot_used[j] = pivot_wide[j]
                    sum_d[j] = wide_d[j]
                    sum_d2[j] = wide_d2[j]
        part_count[chunk] = count
        for j in range(width):
            shift = sum_d[j] / count
            part_mean[chunk, c0 + j] = pivot_used[j] + shift
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


@njit(cache=CACHE, inline="always")
def grad_block(x, dy, b0, b1, c0, hi_b, lo_b, s_b, b_b, relu, hi_block, block_dy, block_dy_xc):
    """Add sum(dy') and sum(dy' * (x - mean_hi)) over rows b0:b1 (one block) of
    channels c0:c0+width to the block accumulators, in ``hi_block``'s type.

    Also the summation of the fused residual block's backward
    (``residual.rows_mask_partials``, on ``dr`` with ``relu=False``), so that it
    gives the bits of the composition of fastbn's pieces.
    """
    width = hi_block.shape[0]
    c1 = c0 + width
    # Four rows per pass over the accumulators, as in _moment_sums.
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
            h_block = hi_block[j]
            # the four-row sum in the compute type, then in the block type
            block_dy[j] += to_block((ga + gb) + (gc + gd), hi_block)
            block_dy_xc[j] += (
                to_block(ga, hi_block) * (to_block(va, hi_block) - h_block)
                + to_block(gb, hi_block) * (to_block(vb, hi_block) - h_block)
            ) + (
                to_block(gc, hi_block) * (to_block(vc, hi_block) - h_block)
                + to_block(gd, hi_block) * (to_block(vd, hi_block) - h_block)
            )
        r += 4
    for rr in range(r, b1):
        xa = x[rr, c0:c1]
        ga_ = dy[rr, c0:c1]
        for j in range(width):
            va = load(xa[j])
            ga = to_block(
                masked_grad(load(ga_[j]), va, hi_b[j], lo_b[j], s_b[j], b_b[j], relu), hi_block)
            block_dy[j] += ga
            block_dy_xc[j] += ga * (to_block(va, hi_block) - hi_block[j])


@njit(cache=CACHE, inline="always")
def fold_blocks(block_a, block_b, sum_a, sum_b):
    """Add two block accumulators to their float64 sums and zero them."""
    for j in range(block_a.shape[0]):
        sum_a[j] += np.float64(block_a[j])
        sum_b[j] += np.float64(block_b[j])
        block_a[j] = 0
        block_b[j] = 0


@njit(cache=CACHE, inline="always")
def grad_sums(x, dy, r0, r1, c0, hi_b, lo_b, s_b, b_b, relu, hi_block, block_dy, block_dy_xc,
              sum_dy, sum_dy_xc):
    """sum(dy') and sum(dy' * (x - mean_hi)) over rows r0:r1 of channels
    c0:c0+width, in blocks of ``ROW_BLOCK`` rows of ``hi_block``'s type (the
    block type: float32 or float64, as in :func:`_moment_sums`) and of the zeroed
    accumulators ``block_dy``, ``block_dy_xc``."""
    for b0 in range(r0, r1, ROW_BLOCK):
        b1 = min(r1, b0 + ROW_BLOCK)
        grad_block(x, dy, b0, b1, c0, hi_b, lo_b, s_b, b_b, relu, hi_block, block_dy,
                   block_dy_xc)
        fold_blocks(block_dy, block_dy_xc, sum_dy, sum_dy_xc)


@njit(cache=CACHE, inline="always")
def redo_wide(x, dy, r0, r1, c0, hi_b, lo_b, s_b, b_b, relu, redo, sum_dy, sum_dy_xc):
    """Replace the sums of the channels marked in ``redo`` by float64-block sums."""
    width = redo.shape[0]
    hi_wide = np.empty(width)
    for j in range(width):
        hi_wide[j] = hi_b[j]
    wide_dy = np.zeros(width)
    wide_dy_xc = np.zeros(width)
    grad_sums(x, dy, r0, r1, c0, hi_b, lo_b, s_b, b_b, relu, hi_wide, np.zeros(width),
              np.zeros(width), wide_dy, wide_dy_xc)
    for j in range(width):
        if redo[j]:
            sum_dy[j] = wide_dy[j]
            sum_dy_xc[j] = wide_dy_xc[j]


@kernel(parallel=True)
def rows_grad_partials(
    x, dy, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
    part_sum_dy, part_sum_dy_xc,
):
    """Per-chunk sum(dy') and sum(dy' * (x - mean_hi)), dy' masked by the fused ReLU.

    As in ``planes_grad_partials``: the caller subtracts ``mean_lo * sum(dy')``.
    Float32 blocks with a float64 re-sum of untrusted tasks, as in
    ``rows_moment_partials``.
    """
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = chunk_bounds(chunk, n_row_chunks, outer)
        c0 = block * CHANNEL_BLOCK
        c1 = min(n_channels, c0 + CHANNEL_BLOCK)
        width = c1 - c0
        hi_b = mean_hi[c0:c1]
        lo_b = mean_lo[c0:c1]
        s_b = scale[c0:c1]
        b_b = shift[c0:c1]
        hi_block = accumulator_empty(width, x)
        for j in range(width):
            hi_block[j] = hi_b[j]
        sum_dy = np.zeros(width)
        sum_dy_xc = np.zeros(width)
        grad_sums(x, dy, r0, r1, c0, hi_b, lo_b, s_b, b_b, relu, hi_block,
                  block_zeros(width, x), block_zeros(width, x), sum_dy, sum_dy_xc)
        count = np.float64(r1 - r0)
        redo = np.empty(width, np.bool_)
        if is_narrow(hi_block) and untrusted(sum_dy, sum_dy_xc, hi_block, count, False, redo):
            # as in rows_moment_partials: float64 sums for the untrusted channels only
            redo_wide(x, dy, r0, r1, c0, hi_b, lo_b, s_b, b_b, relu, redo, sum_dy, sum_dy_xc)
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
