"""Numba kernels for batch normalization.  No validation, no Python objects.

Every input is seen as a C-contiguous ``(outer, C, inner)`` view (DESIGN.md §1)
and each operation has two memory patterns:

* ``rows``   -- ``inner == 1``: a 2-D ``(outer, C)`` array.  Loops run over rows
  and vectorize along the channel axis with per-channel accumulator vectors,
  so they need no fastmath.
* ``planes`` -- ``inner > 1``: a 3-D ``(outer, C, inner)`` array.  Each channel
  owns contiguous planes of ``inner`` values; reductions keep one scalar
  accumulator per plane, which only vectorizes with reassociation
  (``REDUCTION_FASTMATH``), so those reductions centre and accumulate in float64.

Determinism.  Reductions split the work into chunks that depend on the shape
only (never on the thread count); each chunk writes its own row of a
``(n_chunks, C)`` partials array and the partials are merged per channel in a
fixed order.  Results are therefore bitwise identical for any thread count.

Accuracy.  Statistics are per-chunk sums of values shifted by a per-chunk pivot
(the chunk's first value), in float64, merged with Chan's formula.  Elementwise
sweeps subtract the mean *before* scaling; in float32 the float64 mean is split
into ``mean_hi + mean_lo`` (both float32) and the sweep computes
``((x - mean_hi) - mean_lo) * scale + shift``.  ``x - mean_hi`` is exact when
``x`` is near the mean, so no digits are lost to cancellation even at
mean/std = 1e5, at float32 SIMD width.  Those sweeps are compiled without
fastmath, because reassociation would fold ``mean_hi + mean_lo`` back together.

Drivers (``*_rows`` / ``*_planes`` without a leading underscore) are the entry
points called by ``functional.py``: one dispatcher call per public operation
keeps the Python overhead per call small.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._config import CACHE, PARALLEL, REDUCTION_FASTMATH, harden_cache

# ---------------------------------------------------------------------------
# Chunk plans (shape only -> bitwise determinism across thread counts)
# ---------------------------------------------------------------------------

#: Channels per task in the rows layout: 2 x 1024 float64 accumulators = 16 KiB,
#: resident in L1, and 4 KiB of contiguous float32 per row per task.
CHANNEL_BLOCK = 1024
#: Rows at least this long are processed four at a time by elementwise sweeps.
GROUP_MIN_CHANNELS = 2048
#: Fewest rows per chunk in the rows layout, so the float64 partials stay a
#: small fraction (< 4 %) of the bytes read.
MIN_ROWS_PER_CHUNK = 128
#: Fewest values per (chunk, channel) in the planes layout.
MIN_PLANE_CHUNK = 8192
#: Rough number of parallel tasks a reduction is split into (enough for load
#: balance on machines with many more cores than the 2 CI has).
TARGET_TASKS = 64
MAX_CHUNKS = 256


@njit(cache=CACHE, inline="always")
def _chunk_bounds(k, n_chunks, length):
    """Half-open range of chunk ``k`` when ``length`` items are split into ``n_chunks``."""
    return (k * length) // n_chunks, ((k + 1) * length) // n_chunks


@njit(cache=CACHE, inline="always")
def _plane_task(task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner):
    """(chunk, channel, o0, o1, i0, i1) of a planes-reduction task.

    Consecutive tasks are neighbouring channels of the same chunk, so threads
    sweep adjacent planes.
    """
    chunk = task // n_channels
    c = task % n_channels
    o0, o1 = _chunk_bounds(chunk // n_inner_chunks, n_outer_chunks, outer)
    i0, i1 = _chunk_bounds(chunk % n_inner_chunks, n_inner_chunks, inner)
    return chunk, c, o0, o1, i0, i1


@njit(cache=CACHE)
def rows_plan(outer, n_channels):
    """(n_row_chunks, n_channel_blocks) for the rows layout."""
    n_blocks = (n_channels + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    wanted = max(1, (TARGET_TASKS + n_blocks - 1) // n_blocks)
    n_row_chunks = min(wanted, max(1, outer // MIN_ROWS_PER_CHUNK), MAX_CHUNKS)
    return n_row_chunks, n_blocks


@njit(cache=CACHE)
def planes_plan(outer, n_channels, inner):
    """(n_outer_chunks, n_inner_chunks) per channel for the planes layout."""
    per_channel = outer * inner
    wanted = max(1, (TARGET_TASKS + n_channels - 1) // n_channels)
    n_chunks = min(wanted, max(1, per_channel // MIN_PLANE_CHUNK), MAX_CHUNKS)
    if n_chunks <= outer:
        return n_chunks, 1
    # Few, large planes (e.g. outer == 1): split inside the plane as well.
    return outer, max(1, min(n_chunks // outer, inner))


# ---------------------------------------------------------------------------
# Merging partials: serial, in chunk order (deterministic).  The partials are a
# few per cent of the data at most, and a parallel region costs a thread
# wake-up (and a scheduler quantum on a loaded machine), so serial is faster.
# ---------------------------------------------------------------------------


@njit(cache=CACHE)
def _merge_moments(part_mean, part_m2, part_count, mean_out, var_out):
    """Chan et al. pairwise merge of per-chunk (count, mean, M2), in chunk order.

    ``var_out`` holds the running M2 until the final division.  Every chunk
    has the same count for all channels, so the loop over channels vectorizes.
    """
    n_chunks, n_channels = part_mean.shape
    count = part_count[0]
    for c in range(n_channels):
        mean_out[c] = part_mean[0, c]
        var_out[c] = part_m2[0, c]
    for k in range(1, n_chunks):
        count_b = part_count[k]
        total = count + count_b
        weight_b = count_b / total
        weight_ab = count * count_b / total
        for c in range(n_channels):
            delta = part_mean[k, c] - mean_out[c]
            mean_out[c] += delta * weight_b
            var_out[c] += part_m2[k, c] + delta * delta * weight_ab
        count = total
    for c in range(n_channels):
        m2 = var_out[c]
        if m2 < 0.0:  # rounding only; `<` keeps NaN as NaN
            m2 = 0.0
        var_out[c] = m2 / count


@njit(cache=CACHE)
def _merge_sums(part_a, part_b, sum_a, sum_b):
    """Column sums of two partials arrays, in chunk order."""
    n_chunks, n_channels = part_a.shape
    for c in range(n_channels):
        sum_a[c] = 0.0
        sum_b[c] = 0.0
    for k in range(n_chunks):
        for c in range(n_channels):
            sum_a[c] += part_a[k, c]
            sum_b[c] += part_b[k, c]


# ---------------------------------------------------------------------------
# Statistics sweep: one pass over x
# ---------------------------------------------------------------------------


@njit(cache=CACHE, parallel=PARALLEL)
def _rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count):
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = _chunk_bounds(chunk, n_row_chunks, outer)
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


@njit(cache=CACHE, parallel=PARALLEL, fastmath=REDUCTION_FASTMATH)
def _planes_moment_partials(x, n_outer_chunks, n_inner_chunks, part_mean, part_m2, part_count):
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = _plane_task(
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


@njit(cache=CACHE, nogil=True)
def moments_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of a (outer, C) array, float64."""
    outer, n_channels = x.shape
    n_row_chunks, n_blocks = rows_plan(outer, n_channels)
    part_mean = np.empty((n_row_chunks, n_channels))
    part_m2 = np.empty((n_row_chunks, n_channels))
    part_count = np.empty(n_row_chunks)
    _rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count)
    _merge_moments(part_mean, part_m2, part_count, mean_out, var_out)


@njit(cache=CACHE, nogil=True)
def moments_planes(x, mean_out, var_out):
    """Per-channel mean and biased variance of a (outer, C, inner) array, float64."""
    outer, n_channels, inner = x.shape
    n_outer_chunks, n_inner_chunks = planes_plan(outer, n_channels, inner)
    n_chunks = n_outer_chunks * n_inner_chunks
    part_mean = np.empty((n_chunks, n_channels))
    part_m2 = np.empty((n_chunks, n_channels))
    part_count = np.empty(n_chunks)
    _planes_moment_partials(
        x, n_outer_chunks, n_inner_chunks, part_mean, part_m2, part_count
    )
    _merge_moments(part_mean, part_m2, part_count, mean_out, var_out)


# ---------------------------------------------------------------------------
# Per-channel constants (float64 in, data dtype out)
# ---------------------------------------------------------------------------


@njit(cache=CACHE)
def _inv_std(var, eps, inv_std_out):
    for c in range(var.shape[0]):
        inv_std_out[c] = 1.0 / np.sqrt(var[c] + eps)


@njit(cache=CACHE)
def _normalize_constants(mean, inv_std, weight, bias, like):
    """Split mean into hi/lo in ``like.dtype`` and fold weight into scale.

    ``mean_lo`` is what float64 ``mean`` has beyond ``mean_hi``; for float64
    data it is zero.  ``scale = weight * inv_std`` and ``shift = bias`` are
    rounded once to the data dtype.
    """
    n_channels = mean.shape[0]
    mean_hi = np.empty(n_channels, like.dtype)
    mean_lo = np.empty(n_channels, like.dtype)
    scale = np.empty(n_channels, like.dtype)
    shift = np.empty(n_channels, like.dtype)
    for c in range(n_channels):
        mean_hi[c] = mean[c]
        mean_lo[c] = mean[c] - np.float64(mean_hi[c])
        scale[c] = weight[c] * inv_std[c]
        shift[c] = bias[c]
    return mean_hi, mean_lo, scale, shift


# ---------------------------------------------------------------------------
# Normalize sweep: y = ((x - mean_hi) - mean_lo) * scale + shift [, relu]
# No fastmath: the float32 hi/lo centring depends on operation order.
# ---------------------------------------------------------------------------


@njit(cache=CACHE, parallel=PARALLEL)
def _rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
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


@njit(cache=CACHE, parallel=PARALLEL)
def _planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y):
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


# ---------------------------------------------------------------------------
# Backward reduction sweep: sum(dy') and sum(dy' * (x - mean)), dy' = dy * mask
# ---------------------------------------------------------------------------


@njit(cache=CACHE, inline="always")
def _relu_active(x_value, hi, lo, s, b):
    """True where the fused-ReLU forward output was > 0 (recomputed bit-for-bit)."""
    return ((x_value - hi) - lo) * s + b > 0


@njit(cache=CACHE, inline="always")
def _masked_grad(dy_value, x_value, hi, lo, s, b, relu):
    """dy as float64, zeroed where the fused-ReLU forward output was not > 0."""
    if relu and not _relu_active(x_value, hi, lo, s, b):
        return 0.0
    return np.float64(dy_value)


@njit(cache=CACHE, parallel=PARALLEL)
def _rows_grad_partials(
    x, dy, mean, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
    part_sum_dy, part_sum_dy_xc,
):
    outer, n_channels = x.shape
    for task in prange(n_row_chunks * n_blocks):
        chunk = task // n_blocks
        block = task % n_blocks
        r0, r1 = _chunk_bounds(chunk, n_row_chunks, outer)
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
        # Four rows per pass over the accumulators, as in _rows_moment_partials.
        r = r0
        while r + 4 <= r1:
            xa, xb, xc, xd = x[r, c0:c1], x[r + 1, c0:c1], x[r + 2, c0:c1], x[r + 3, c0:c1]
            ga_, gb_, gc_, gd_ = dy[r, c0:c1], dy[r + 1, c0:c1], dy[r + 2, c0:c1], dy[r + 3, c0:c1]
            for j in range(width):
                mu = mean_b[j]
                h, lo, sc, sh = hi_b[j], lo_b[j], s_b[j], b_b[j]
                ga = _masked_grad(ga_[j], xa[j], h, lo, sc, sh, relu)
                gb = _masked_grad(gb_[j], xb[j], h, lo, sc, sh, relu)
                gc = _masked_grad(gc_[j], xc[j], h, lo, sc, sh, relu)
                gd = _masked_grad(gd_[j], xd[j], h, lo, sc, sh, relu)
                sum_dy[j] += (ga + gb) + (gc + gd)
                sum_dy_xc[j] += (ga * (np.float64(xa[j]) - mu) + gb * (np.float64(xb[j]) - mu)) + (
                    gc * (np.float64(xc[j]) - mu) + gd * (np.float64(xd[j]) - mu)
                )
            r += 4
        for rr in range(r, r1):
            xa = x[rr, c0:c1]
            ga_ = dy[rr, c0:c1]
            for j in range(width):
                ga = _masked_grad(ga_[j], xa[j], hi_b[j], lo_b[j], s_b[j], b_b[j], relu)
                sum_dy[j] += ga
                sum_dy_xc[j] += ga * (np.float64(xa[j]) - mean_b[j])
        for j in range(width):
            part_sum_dy[chunk, c0 + j] = sum_dy[j]
            part_sum_dy_xc[chunk, c0 + j] = sum_dy_xc[j]


@njit(cache=CACHE, parallel=PARALLEL, fastmath=REDUCTION_FASTMATH)
def _planes_grad_partials(
    x, dy, mean, n_outer_chunks, n_inner_chunks, part_sum_dy, part_sum_dy_xc
):
    """Planes reduction without ReLU (fastmath: vectorized float64 accumulators)."""
    outer, n_channels, inner = x.shape
    n_chunks = n_outer_chunks * n_inner_chunks
    for task in prange(n_chunks * n_channels):
        chunk, c, o0, o1, i0, i1 = _plane_task(
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


@njit(cache=CACHE, parallel=PARALLEL)
def _planes_grad_partials_relu(
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
        chunk, c, o0, o1, i0, i1 = _plane_task(
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
                    g = _masked_grad(dy_plane[i + lane], x_plane[i + lane], hi, lo, s, b, True)
                    lanes_dy[lane] += g
                    lanes_dy_xc[lane] += g * (np.float64(x_plane[i + lane]) - mu)
            for i in range(body, width):
                g = _masked_grad(dy_plane[i], x_plane[i], hi, lo, s, b, True)
                lanes_dy[0] += g
                lanes_dy_xc[0] += g * (np.float64(x_plane[i]) - mu)
        sum_dy = 0.0
        sum_dy_xc = 0.0
        for lane in range(RELU_LANES):
            sum_dy += lanes_dy[lane]
            sum_dy_xc += lanes_dy_xc[lane]
        part_sum_dy[chunk, c] = sum_dy
        part_sum_dy_xc[chunk, c] = sum_dy_xc


# ---------------------------------------------------------------------------
# Backward apply sweep: dx = k_dy * dy' - k_const - k_xhat * (x - mean) * inv_std
# ---------------------------------------------------------------------------


@njit(cache=CACHE, inline="always")
def _grad_input(x_value, dy_value, hi, lo, s, b, inv_std, k_dy, k_const, k_xhat, relu, zero):
    """dx for one element: k_dy*dy' - k_const - k_xhat*x_hat, centred as in the forward."""
    xc = (x_value - hi) - lo
    g = dy_value
    if relu and not xc * s + b > zero:
        g = zero
    return k_dy * g - k_const - k_xhat * (xc * inv_std)


@njit(cache=CACHE, parallel=PARALLEL)
def _rows_apply(
    x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat, dx
):
    outer, n_channels = x.shape
    zero = dy.dtype.type(0)
    # Long rows: groups of four rows share each load of the per-channel
    # constants.  Short rows: one row per iteration is faster (measured 2x at
    # C = 64), the grouped loop's overhead and alias checks dominating there.
    group_rows = 4 if n_channels >= GROUP_MIN_CHANNELS else 1
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
                da[c] = _grad_input(xa[c], ga[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                db[c] = _grad_input(xb[c], gb[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                dc[c] = _grad_input(xc[c], gc[c], h, lo, s, b, r, a, k0, k1, relu, zero)
                dd[c] = _grad_input(xd[c], gd[c], h, lo, s, b, r, a, k0, k1, relu, zero)
        else:
            for r in range(r0, r1):
                x_row = x[r]
                dy_row = dy[r]
                dx_row = dx[r]
                for c in range(n_channels):
                    dx_row[c] = _grad_input(
                        x_row[c], dy_row[c], mean_hi[c], mean_lo[c], scale[c], shift[c],
                        inv_std[c], k_dy[c], k_const[c], k_xhat[c], relu, zero,
                    )


@njit(cache=CACHE, parallel=PARALLEL)
def _planes_apply(
    x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat, dx
):
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
                dx_plane[i] = _grad_input(x_plane[i], dy_plane[i], h, lo, s, b, r, a, k0, k1,
                                          True, zero)
        else:
            for i in range(inner):
                dx_plane[i] = _grad_input(x_plane[i], dy_plane[i], h, lo, s, b, r, a, k0, k1,
                                          False, zero)


@njit(cache=CACHE)
def _backward_constants(
    sum_dy, sum_dy_xc, inv_std, weight, count, batch_stats, like, dgamma_out, dbeta_out
):
    """Closed-form backward constants, so that dx = k_dy*dy' - k_const - k_xhat*x_hat.

    dbeta = sum(dy'),  dgamma = inv_std * sum(dy' * (x - mean)), and with batch
    statistics (training)
        dx = weight*inv_std * (dy' - dbeta/N - x_hat*dgamma/N);
    with fixed statistics (eval) the mean and variance are constants, so
        dx = weight*inv_std * dy'.
    The last term is applied to ``x_hat = (x - mean) * inv_std`` rather than
    folding a second ``inv_std`` into the constant: ``weight*inv_std**2`` would
    underflow float32 for data of magnitude ~1e19 and beyond.
    """
    n_channels = sum_dy.shape[0]
    k_dy = np.empty(n_channels, like.dtype)
    k_const = np.zeros(n_channels, like.dtype)
    k_xhat = np.zeros(n_channels, like.dtype)
    inv_std_d = np.empty(n_channels, like.dtype)
    for c in range(n_channels):
        dgamma = inv_std[c] * sum_dy_xc[c]
        dgamma_out[c] = dgamma
        dbeta_out[c] = sum_dy[c]
        gain = weight[c] * inv_std[c]
        k_dy[c] = gain
        inv_std_d[c] = inv_std[c]
        if batch_stats:
            k_const[c] = gain * sum_dy[c] / count
            k_xhat[c] = gain * dgamma / count
    return k_dy, k_const, k_xhat, inv_std_d


# ---------------------------------------------------------------------------
# Drivers: one dispatcher call per public operation
# ---------------------------------------------------------------------------


@njit(cache=CACHE, nogil=True)
def train_forward_rows(x, weight, bias, eps, relu, y, mean_out, var_out, inv_std_out):
    moments_rows(x, mean_out, var_out)
    _inv_std(var_out, eps, inv_std_out)
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean_out, inv_std_out, weight, bias, x)
    _rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@njit(cache=CACHE, nogil=True)
def train_forward_planes(x, weight, bias, eps, relu, y, mean_out, var_out, inv_std_out):
    moments_planes(x, mean_out, var_out)
    _inv_std(var_out, eps, inv_std_out)
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean_out, inv_std_out, weight, bias, x)
    _planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@njit(cache=CACHE, nogil=True)
def inference_rows(x, mean, var, eps, weight, bias, relu, y, inv_std_out):
    """Normalize with given (running) statistics: the elementwise sweep only."""
    _inv_std(var, eps, inv_std_out)
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean, inv_std_out, weight, bias, x)
    _rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@njit(cache=CACHE, nogil=True)
def inference_planes(x, mean, var, eps, weight, bias, relu, y, inv_std_out):
    _inv_std(var, eps, inv_std_out)
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean, inv_std_out, weight, bias, x)
    _planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@njit(cache=CACHE, nogil=True)
def backward_rows(
    x, dy, mean, inv_std, weight, bias, relu, batch_stats, dx, dgamma_out, dbeta_out
):
    """Both backward sweeps for the rows layout.

    ``batch_stats`` is True after a training forward (mean and variance depend
    on x) and False after an inference forward (they are constants).
    """
    outer, n_channels = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean, inv_std, weight, bias, x)
    n_row_chunks, n_blocks = rows_plan(outer, n_channels)
    part_sum_dy = np.empty((n_row_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_row_chunks, n_channels))
    _rows_grad_partials(
        x, dy, mean, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
        part_sum_dy, part_sum_dy_xc,
    )
    sum_dy = np.empty(n_channels)
    sum_dy_xc = np.empty(n_channels)
    _merge_sums(part_sum_dy, part_sum_dy_xc, sum_dy, sum_dy_xc)
    k_dy, k_const, k_xhat, inv_std_d = _backward_constants(
        sum_dy, sum_dy_xc, inv_std, weight, np.float64(outer), batch_stats, x,
        dgamma_out, dbeta_out,
    )
    _rows_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std_d, relu, k_dy, k_const, k_xhat,
                dx)


@njit(cache=CACHE, nogil=True)
def backward_planes(
    x, dy, mean, inv_std, weight, bias, relu, batch_stats, dx, dgamma_out, dbeta_out
):
    """Both backward sweeps for the planes layout."""
    outer, n_channels, inner = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(mean, inv_std, weight, bias, x)
    n_outer_chunks, n_inner_chunks = planes_plan(outer, n_channels, inner)
    n_chunks = n_outer_chunks * n_inner_chunks
    part_sum_dy = np.empty((n_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_chunks, n_channels))
    if relu:
        _planes_grad_partials_relu(
            x, dy, mean, mean_hi, mean_lo, scale, shift, n_outer_chunks, n_inner_chunks,
            part_sum_dy, part_sum_dy_xc,
        )
    else:
        _planes_grad_partials(
            x, dy, mean, n_outer_chunks, n_inner_chunks, part_sum_dy, part_sum_dy_xc
        )
    sum_dy = np.empty(n_channels)
    sum_dy_xc = np.empty(n_channels)
    _merge_sums(part_sum_dy, part_sum_dy_xc, sum_dy, sum_dy_xc)
    k_dy, k_const, k_xhat, inv_std_d = _backward_constants(
        sum_dy, sum_dy_xc, inv_std, weight, np.float64(outer * inner), batch_stats, x,
        dgamma_out, dbeta_out,
    )
    _planes_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std_d, relu, k_dy, k_const, k_xhat,
                  dx)


harden_cache(globals())
