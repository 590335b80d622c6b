"""The fused residual block ``y = max(bn(x) + residual, 0)``: its sweeps and drivers.

The residual is one more input stream of the existing sweeps, not a new kernel
family (DESIGN.md §11):

* forward = the statistics sweep of :mod:`.drivers` (reads ``x``), then
  :func:`planes_add_relu` / :func:`rows_add_relu` (read ``x`` and
  ``residual``, write ``y``);
* backward = :func:`planes_mask_partials` / :func:`rows_mask_partials`, a
  reduction that reads ``dy``, ``y`` and ``x`` and also *writes* the
  residual's gradient ``dr = where(y > 0, dy, 0)`` (the masked gradient), then
  the existing apply sweep of :mod:`.drivers` run on ``dr`` with no ReLU
  (reads ``dr`` and ``x``, writes ``dx``).

Bytes per element in units of the data's item size (4 for float32), not
counting write-allocate reads:

=================  =======================  =====
sweep              reads / writes           units
=================  =======================  =====
statistics         x                        1
add-ReLU           x, residual / y          3
mask-reduce        dy, y, x / dr            4
apply              dr, x / dx               3
=================  =======================  =====

so 4 units forward and 7 backward.  The alternative -- reduce reading
``dy, y, x`` and an apply sweep reading ``dy, y, x`` that writes both ``dx``
and ``dr`` -- moves 3 + 5 = 8 units backward; counting the write-allocate
read of every written line, 9 against 10.  Recomputing the mask from ``x``
and ``residual`` instead of reading ``y`` moves the same as reading ``y``
but repeats the forward's arithmetic and keeps the residual alive.
Measured at ``(32, 64, 56, 56)`` float32, 2 threads: the mask-reduce sweep
moves its 5 units at the rate of ``planes_grad_partials``'s 2 (~27 GB/s),
so both sweeps are bound by memory bandwidth.

The mask is ``y > 0`` on the stored output (as PyTorch's ReLU backward uses
its output): NaN in ``y`` gives ``dr = 0``, as ``max(NaN, 0)`` has no slope.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._config import REDUCTION_FASTMATH
from ._build import kernel
from .drivers import (
    MEAN,
    OK,
    VAR,
    _centre_on_mean,
    _load_parameters,
    _load_statistics,
    _normalize_constants,
    _set_inv_std,
    backward_apply_planes,
    backward_apply_rows,
    moments_planes,
    moments_rows,
)
from .elementwise import strict_sub
from .plan import (
    CHANNEL_BLOCK,
    GROUP_MIN_CHANNELS,
    ROW_BLOCK,
    SEGMENT,
    chunk_bounds,
    merge_sums,
    plane_task,
    planes_plan,
    rows_plan,
)
from .storage import (
    accumulator_zero,
    block_zeros,
    compute_zero,
    encode,
    load,
    to_accumulator,
    zero_of,
)

# ---------------------------------------------------------------------------
# Forward: normalize + add + ReLU (one sweep, no fastmath)
# ---------------------------------------------------------------------------


@kernel(parallel=True)
def planes_add_relu(x, r, mean_hi, mean_lo, scale, shift, y):
    """y = max(((x - mean_hi) - mean_lo) * scale + shift + r, 0), rounded once."""
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
        r_plane = r[o, c]
        y_plane = y[o, c]
        for i in range(inner):
            v = (((load(x_plane[i]) - hi) - lo) * s + b) + load(r_plane[i])
            y_plane[i] = encode(zero if v < zero else v, y_plane[i])


@kernel(parallel=True)
def rows_add_relu(x, r, mean_hi, mean_lo, scale, shift, y):
    """As :func:`planes_add_relu` for an ``(outer, C)`` array."""
    outer, n_channels = x.shape
    zero = compute_zero(x)
    group_rows = 4 if n_channels >= GROUP_MIN_CHANNELS else 1  # as rows_normalize
    for group in prange((outer + group_rows - 1) // group_rows):
        r0 = group * group_rows
        r1 = min(outer, r0 + group_rows)
        if r1 - r0 == 4:
            xa, xb, xc, xd = x[r0], x[r0 + 1], x[r0 + 2], x[r0 + 3]
            ra, rb, rc, rd = r[r0], r[r0 + 1], r[r0 + 2], r[r0 + 3]
            ya, yb, yc, yd = y[r0], y[r0 + 1], y[r0 + 2], y[r0 + 3]
            for c in range(n_channels):
                hi = mean_hi[c]
                lo = mean_lo[c]
                s = scale[c]
                b = shift[c]
                va = (((load(xa[c]) - hi) - lo) * s + b) + load(ra[c])
                vb = (((load(xb[c]) - hi) - lo) * s + b) + load(rb[c])
                vc = (((load(xc[c]) - hi) - lo) * s + b) + load(rc[c])
                vd = (((load(xd[c]) - hi) - lo) * s + b) + load(rd[c])
                ya[c] = encode(zero if va < zero else va, ya[c])
                yb[c] = encode(zero if vb < zero else vb, yb[c])
                yc[c] = encode(zero if vc < zero else vc, yc[c])
                yd[c] = encode(zero if vd < zero else vd, yd[c])
        else:
            for row in range(r0, r1):
                x_row = x[row]
                r_row = r[row]
                y_row = y[row]
                for c in range(n_channels):
                    v = ((((load(x_row[c]) - mean_hi[c]) - mean_lo[c]) * scale[c] + shift[c])
                         + load(r_row[c]))
                    y_row[c] = encode(zero if v < zero else v, y_row[c])


# ---------------------------------------------------------------------------
# Backward: the masked reduction that also writes dr
# ---------------------------------------------------------------------------


@kernel(parallel=True, fastmath=REDUCTION_FASTMATH)
def planes_mask_partials(x, dy, y, mean_hi, n_outer_chunks, n_inner_chunks, dr,
                         part_sum_dy, part_sum_dy_xc):
    """dr = where(y > 0, dy, 0); per-chunk sum(dr) and sum(dr * (x - mean_hi)).

    As :func:`~.planes.planes_grad_partials` (the caller centres on the
    float64 mean); ``dr`` is ``dy`` or zero, so storing it rounds nothing.
    Each segment is masked into ``dr`` first (one loop: loads, a select, a
    store), then summed from ``dr`` while it is in L1 (the loop of
    ``planes_grad_partials``): one loop doing both had too many pointers for
    LLVM's runtime alias checks and did not vectorize.
    """
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = plane_task(
            task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner
        )
        hi = mean_hi[c]
        zero = zero_of(hi)
        hi_sum = to_accumulator(hi, x)
        block_zero = accumulator_zero(x)
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for o in range(o0, o1):
            x_plane = x[o, c, i0:i1]
            dy_plane = dy[o, c, i0:i1]
            y_plane = y[o, c, i0:i1]
            dr_plane = dr[o, c, i0:i1]
            width = i1 - i0
            for s0 in range(0, width, SEGMENT):
                s1 = min(width, s0 + SEGMENT)
                # Slices indexed from 0: planes.py's module doc (gathers otherwise).
                x_segment = x_plane[s0:s1]
                dy_segment = dy_plane[s0:s1]
                y_segment = y_plane[s0:s1]
                dr_segment = dr_plane[s0:s1]
                for i in range(dr_segment.shape[0]):
                    # Both loads unconditional: a load under a branch blocks vectorization.
                    g = load(dy_segment[i])
                    if not load(y_segment[i]) > zero:
                        g = zero
                    dr_segment[i] = encode(g, dr_segment[i])
                segment_dy = block_zero
                segment_dy_xc = block_zero
                for i in range(dr_segment.shape[0]):
                    g = to_accumulator(load(dr_segment[i]), x)
                    segment_dy += g
                    segment_dy_xc += g * strict_sub(to_accumulator(load(x_segment[i]), x), hi_sum)
                sum_dy += np.float64(segment_dy)
                sum_dy_xc += np.float64(segment_dy_xc)
        part_sum_dy[chunk, c] = sum_dy
        part_sum_dy_xc[chunk, c] = sum_dy_xc


@kernel(parallel=True)
def rows_mask_partials(x, dy, y, mean_hi, n_row_chunks, n_blocks, dr,
                       part_sum_dy, part_sum_dy_xc):
    """As :func:`planes_mask_partials` for an ``(outer, C)`` array (per-channel
    accumulator vectors, no fastmath needed): each row is masked into ``dr``,
    then the rows are summed from ``dr`` in ``rows_grad_partials``'s order."""
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
        zero = compute_zero(x)
        hi_b = mean_hi[c0:c1]
        for b0 in range(r0, r1, ROW_BLOCK):
            b1 = min(r1, b0 + ROW_BLOCK)
            for row in range(b0, b1):
                dy_row = dy[row, c0:c1]
                y_row = y[row, c0:c1]
                dr_row = dr[row, c0:c1]
                for j in range(width):
                    g = load(dy_row[j])
                    if not load(y_row[j]) > zero:
                        g = zero
                    dr_row[j] = encode(g, dr_row[j])
            # Four rows per pass over the accumulators, as in rows_grad_partials
            # (and summed in its order).
            row = b0
            while row + 4 <= b1:
                xa, xb, xc, xd = (x[row, c0:c1], x[row + 1, c0:c1], x[row + 2, c0:c1],
                                  x[row + 3, c0:c1])
                fa, fb, fc, fd = (dr[row, c0:c1], dr[row + 1, c0:c1], dr[row + 2, c0:c1],
                                  dr[row + 3, c0:c1])
                for j in range(width):
                    ga, gb, gc, gd = load(fa[j]), load(fb[j]), load(fc[j]), load(fd[j])
                    h_sum = to_accumulator(hi_b[j], x)
                    block_dy[j] += to_accumulator((ga + gb) + (gc + gd), x)
                    block_dy_xc[j] += (
                        ga * (to_accumulator(load(xa[j]), x) - h_sum)
                        + gb * (to_accumulator(load(xb[j]), x) - h_sum)
                    ) + (
                        gc * (to_accumulator(load(xc[j]), x) - h_sum)
                        + gd * (to_accumulator(load(xd[j]), x) - h_sum)
                    )
                row += 4
            for rr in range(row, b1):
                x_row = x[rr, c0:c1]
                dr_row = dr[rr, c0:c1]
                for j in range(width):
                    g = to_accumulator(load(dr_row[j]), x)
                    block_dy[j] += g
                    block_dy_xc[j] += g * (to_accumulator(load(x_row[j]), x)
                                           - to_accumulator(hi_b[j], x))
            for j in range(width):
                sum_dy[j] += np.float64(block_dy[j])
                sum_dy_xc[j] += np.float64(block_dy_xc[j])
                block_dy[j] = 0
                block_dy_xc[j] = 0
        for j in range(width):
            part_sum_dy[chunk, c0 + j] = sum_dy[j]
            part_sum_dy_xc[chunk, c0 + j] = sum_dy_xc[j]


# ---------------------------------------------------------------------------
# Drivers (one call per public operation)
# ---------------------------------------------------------------------------


@kernel()
def add_relu_train_rows(x, r, weight, bias, eps, y, stats):
    """Training forward: batch statistics (the statistics sweep), then add-ReLU."""
    moments_rows(x, stats[MEAN], stats[VAR])
    _set_inv_std(stats, eps)
    _load_parameters(weight, bias, stats)
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    rows_add_relu(x, r, mean_hi, mean_lo, scale, shift, y)


@kernel()
def add_relu_train_planes(x, r, weight, bias, eps, y, stats):
    moments_planes(x, stats[MEAN], stats[VAR])
    _set_inv_std(stats, eps)
    _load_parameters(weight, bias, stats)
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    planes_add_relu(x, r, mean_hi, mean_lo, scale, shift, y)


@kernel()
def add_relu_normalize_rows(x, r, mean, var, weight, bias, eps, y, stats):
    """With given statistics (inference): a status code, nothing written unless OK."""
    status = _load_statistics(mean, var, weight, bias, eps, stats)
    if status != OK:
        return status
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    rows_add_relu(x, r, mean_hi, mean_lo, scale, shift, y)
    return OK


@kernel()
def add_relu_normalize_planes(x, r, mean, var, weight, bias, eps, y, stats):
    status = _load_statistics(mean, var, weight, bias, eps, stats)
    if status != OK:
        return status
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    planes_add_relu(x, r, mean_hi, mean_lo, scale, shift, y)
    return OK


@kernel()
def add_relu_backward_rows(x, dy, y, stats, batch_stats, dx, dr, grads):
    """Both backward sweeps: dr (masked dy) and the sums, then dx from dr."""
    outer, n_channels = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    n_row_chunks, n_blocks = rows_plan(outer, n_channels)
    part_sum_dy = np.empty((n_row_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_row_chunks, n_channels))
    rows_mask_partials(x, dy, y, mean_hi, n_row_chunks, n_blocks, dr, part_sum_dy,
                       part_sum_dy_xc)
    sums = np.empty((2, n_channels))
    merge_sums(part_sum_dy, part_sum_dy_xc, sums[0], sums[1])
    _centre_on_mean(sums, stats, mean_hi)
    backward_apply_rows(x, dr, stats, False, batch_stats, np.float64(outer), sums, dx, grads)


@kernel()
def add_relu_backward_planes(x, dy, y, stats, batch_stats, dx, dr, grads):
    outer, n_channels, inner = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    n_outer_chunks, n_inner_chunks = planes_plan(outer, n_channels, inner)
    n_chunks = n_outer_chunks * n_inner_chunks
    part_sum_dy = np.empty((n_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_chunks, n_channels))
    planes_mask_partials(x, dy, y, mean_hi, n_outer_chunks, n_inner_chunks, dr, part_sum_dy,
                         part_sum_dy_xc)
    sums = np.empty((2, n_channels))
    merge_sums(part_sum_dy, part_sum_dy_xc, sums[0], sums[1])
    _centre_on_mean(sums, stats, mean_hi)
    count = np.float64(outer * inner)
    backward_apply_planes(x, dr, stats, False, batch_stats, count, sums, dx, grads)
