"""Chunk plans and partial merges: shapes in, fixed work splits out (no threads here).

Reductions split the work into chunks that depend on the shape only, never on
the thread count; each chunk writes its own row of a ``(n_chunks, C)``
partials array, and the partials are merged per channel in chunk order.  So
results are bitwise identical for any number of threads and for the serial and
parallel variants alike.  Merges run serially: the partials are a few per cent
of the data at most, and another parallel region would cost a thread wake-up.
"""

from __future__ import annotations

from numba import njit

from .._config import CACHE

#: Channels per task in the rows layout: 2 x 1024 float64 accumulators = 16 KiB,
#: resident in L1, and 4 KiB of contiguous float32 per row per task.
CHANNEL_BLOCK = 1024
#: Values of one plane row a planes reduction sums in the float32 accumulator
#: (vectorized by reassociation into 4 x 8 lanes, so ~8 terms per lane) before
#: adding the sum to a float64 total.  Segment boundaries depend on the shape
#: only, so results do not depend on the thread count.  Over 8 terms a float32
#: sum is nearly exact; with lanes of ~200 terms (segments of 6272 tried first)
#: the mean of N(0.5, 2) data was off by 4e-7 of its standard deviation, 2-3 ulp
#: of float16 for outputs near zero.  The horizontal sum and the fold cost ~12
#: instructions per segment.
SEGMENT = 256
#: Values averaged for the pivot of a reduction task (elementwise.task_pivot).
PIVOT_VALUES = 32
#: Rows a rows-layout reduction sums into float32 accumulators (one per
#: channel, four rows per addition) before folding them into float64.
ROW_BLOCK = 32
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
def chunk_bounds(k, n_chunks, length):
    """Half-open range of chunk ``k`` when ``length`` items are split into ``n_chunks``."""
    return (k * length) // n_chunks, ((k + 1) * length) // n_chunks


@njit(cache=CACHE, inline="always")
def plane_task(task, n_channels, n_outer_chunks, n_inner_chunks, outer, inner):
    """(chunk, channel, o0, o1, i0, i1) of a planes-reduction task.

    Consecutive tasks are neighbouring channels of the same chunk, so threads
    sweep adjacent planes.
    """
    chunk = task // n_channels
    c = task % n_channels
    o0, o1 = chunk_bounds(chunk // n_inner_chunks, n_outer_chunks, outer)
    i0, i1 = chunk_bounds(chunk % n_inner_chunks, n_inner_chunks, inner)
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


@njit(cache=CACHE)
def merge_moments(part_mean, part_m2, part_count, mean_out, var_out):
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
def merge_sums(part_a, part_b, sum_a, sum_b):
    """Column sums of two partials arrays, in chunk order."""
    n_chunks, n_channels = part_a.shape
    for c in range(n_channels):
        sum_a[c] = 0.0
        sum_b[c] = 0.0
    for k in range(n_chunks):
        for c in range(n_channels):
            sum_a[c] += part_a[k, c]
            sum_b[c] += part_b[k, c]
