"""Drivers: one dispatcher call per public operation, plus the per-channel constants.

``functional.py`` calls exactly one driver per operation (a Numba dispatcher
call costs about a microsecond, as much as the arithmetic of a small layer).
Drivers allocate only what depends on the number of channels and write every
per-channel result into one float64 workspace ``stats`` of shape ``(5, C)``:

    stats[MEAN], stats[VAR]      the statistics used to normalize (VAR biased)
    stats[INV_STD]               1 / sqrt(VAR + eps)
    stats[WEIGHT], stats[BIAS]   float64 copies of gamma and beta (1 and 0 when
                                 the caller passed a length-0 array: no affine)

so that one allocation holds the whole backward context.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import CACHE
from ._build import kernel
from .plan import merge_moments, merge_sums, planes_plan, rows_plan
from .planes import planes_apply, planes_grad_partials, planes_moment_partials, planes_normalize
from .rows import rows_apply, rows_grad_partials, rows_moment_partials, rows_normalize
from .storage import compute_empty

MEAN, VAR, INV_STD, WEIGHT, BIAS = 0, 1, 2, 3, 4
N_STATS = 5

# Status codes returned by drivers that validate per-channel inputs: checked
# before anything is written, so a failed call leaves every output untouched.
OK = 0
BAD_MEAN = 1  # running mean holds NaN/Inf
BAD_VAR = 2  # running variance negative, NaN or Inf
BAD_BATCH_STATS = 3  # batch statistics NaN/Inf (running-stats update)
OVERFLOW = 4  # the updated running statistics would overflow their dtype


# ---------------------------------------------------------------------------
# Per-channel constants (serial: C values)
# ---------------------------------------------------------------------------


@njit(cache=CACHE, inline="always")
def _load_parameters(weight, bias, stats):
    n_channels = stats.shape[1]
    for c in range(n_channels):
        stats[WEIGHT, c] = weight[c] if weight.shape[0] else 1.0
        stats[BIAS, c] = bias[c] if bias.shape[0] else 0.0


@njit(cache=CACHE, inline="always")
def _set_inv_std(stats, eps):
    for c in range(stats.shape[1]):
        stats[INV_STD, c] = 1.0 / np.sqrt(stats[VAR, c] + eps)


@njit(cache=CACHE)
def _normalize_constants(stats, like):
    """Split the mean into hi/lo in the compute type of ``like`` and fold the weight
    into the scale.

    The compute type is float32 for float32 and 16-bit data, float64 for
    float64.  ``mean_lo`` is what the float64 mean has beyond ``mean_hi``; for
    float64 data it is zero.  ``scale = weight * inv_std`` and ``shift = bias``
    are rounded once to the compute type.
    """
    n_channels = stats.shape[1]
    mean_hi = compute_empty(n_channels, like)
    mean_lo = compute_empty(n_channels, like)
    scale = compute_empty(n_channels, like)
    shift = compute_empty(n_channels, like)
    for c in range(n_channels):
        mean_hi[c] = stats[MEAN, c]
        mean_lo[c] = stats[MEAN, c] - np.float64(mean_hi[c])
        scale[c] = stats[WEIGHT, c] * stats[INV_STD, c]
        shift[c] = stats[BIAS, c]
    return mean_hi, mean_lo, scale, shift


@njit(cache=CACHE)
def _backward_constants(sums, stats, count, batch_stats, like, grads):
    """Closed-form constants so that dx = k_dy*dy' - k_const - k_xhat*x_hat.

    dbeta = sum(dy'),  dgamma = inv_std * sum(dy' * (x - mean)); with batch
    statistics (training)
        dx = weight*inv_std * (dy' - dbeta/N - x_hat*dgamma/N);
    with fixed statistics (eval) mean and variance are constants, so
        dx = weight*inv_std * dy'.
    The last term is applied to ``x_hat = (x - mean) * inv_std`` rather than
    folding a second ``inv_std`` into the constant: ``weight*inv_std**2`` would
    underflow float32 for data of magnitude ~1e19 and beyond.
    ``grads[0]``, ``grads[1]`` receive dgamma and dbeta.
    """
    n_channels = stats.shape[1]
    k_dy = compute_empty(n_channels, like)
    k_const = compute_empty(n_channels, like)
    k_xhat = compute_empty(n_channels, like)
    inv_std = compute_empty(n_channels, like)
    for c in range(n_channels):
        k_const[c] = 0
        k_xhat[c] = 0
        dgamma = stats[INV_STD, c] * sums[1, c]
        grads[0, c] = dgamma
        grads[1, c] = sums[0, c]
        gain = stats[WEIGHT, c] * stats[INV_STD, c]
        k_dy[c] = gain
        inv_std[c] = stats[INV_STD, c]
        if batch_stats:
            k_const[c] = gain * sums[0, c] / count
            k_xhat[c] = gain * dgamma / count
    return k_dy, k_const, k_xhat, inv_std


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


@kernel()
def moments_rows(x, mean_out, var_out):
    """Per-channel mean and biased variance of a (outer, C) array, float64."""
    outer, n_channels = x.shape
    n_row_chunks, n_blocks = rows_plan(outer, n_channels)
    part_mean = np.empty((n_row_chunks, n_channels))
    part_m2 = np.empty((n_row_chunks, n_channels))
    part_count = np.empty(n_row_chunks)
    rows_moment_partials(x, n_row_chunks, n_blocks, part_mean, part_m2, part_count)
    merge_moments(part_mean, part_m2, part_count, mean_out, var_out)


@kernel()
def moments_planes(x, mean_out, var_out):
    """Per-channel mean and biased variance of a (outer, C, inner) array, float64."""
    outer, n_channels, inner = x.shape
    n_outer_chunks, n_inner_chunks = planes_plan(outer, n_channels, inner)
    n_chunks = n_outer_chunks * n_inner_chunks
    part_mean = np.empty((n_chunks, n_channels))
    part_m2 = np.empty((n_chunks, n_channels))
    part_count = np.empty(n_chunks)
    planes_moment_partials(x, n_outer_chunks, n_inner_chunks, part_mean, part_m2, part_count)
    merge_moments(part_mean, part_m2, part_count, mean_out, var_out)


# ---------------------------------------------------------------------------
# Forward: training (statistics + normalize) and with given statistics
# ---------------------------------------------------------------------------


@kernel()
def train_forward_rows(x, weight, bias, eps, relu, y, stats):
    moments_rows(x, stats[MEAN], stats[VAR])
    _set_inv_std(stats, eps)
    _load_parameters(weight, bias, stats)
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@kernel()
def train_forward_planes(x, weight, bias, eps, relu, y, stats):
    moments_planes(x, stats[MEAN], stats[VAR])
    _set_inv_std(stats, eps)
    _load_parameters(weight, bias, stats)
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)


@njit(cache=CACHE)
def _load_statistics(mean, var, weight, bias, eps, stats):
    """Copy given statistics and parameters into ``stats``; a status code, nothing
    written to ``stats`` rows MEAN/VAR unless every value is valid."""
    n_channels = stats.shape[1]
    for c in range(n_channels):
        if not np.isfinite(mean[c]):
            return BAD_MEAN
        if not (var[c] >= 0.0 and np.isfinite(var[c])):
            return BAD_VAR
    for c in range(n_channels):
        stats[MEAN, c] = mean[c]
        stats[VAR, c] = var[c]
    _set_inv_std(stats, eps)
    _load_parameters(weight, bias, stats)
    return OK


@kernel()
def normalize_rows(x, mean, var, weight, bias, eps, relu, y, stats):
    """Normalize with given statistics (running, or a global batch's): one sweep.

    Returns a status code; on BAD_MEAN/BAD_VAR nothing is written to ``y``.
    """
    status = _load_statistics(mean, var, weight, bias, eps, stats)
    if status != OK:
        return status
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    rows_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)
    return OK


@kernel()
def normalize_planes(x, mean, var, weight, bias, eps, relu, y, stats):
    status = _load_statistics(mean, var, weight, bias, eps, stats)
    if status != OK:
        return status
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    planes_normalize(x, mean_hi, mean_lo, scale, shift, relu, y)
    return OK


# ---------------------------------------------------------------------------
# Backward: reduce sweep (sums), apply sweep (dx), and both
# ---------------------------------------------------------------------------


@njit(cache=CACHE, inline="always")
def _centre_on_mean(sums, stats, mean_hi):
    """sum(dy' * (x - mean_hi)) -> sum(dy' * (x - mean)): the sweeps centre on the
    compute-type ``mean_hi`` (exact near the mean); the rest of the float64 mean
    is subtracted here, in float64."""
    for c in range(sums.shape[1]):
        sums[1, c] -= (stats[MEAN, c] - np.float64(mean_hi[c])) * sums[0, c]


@kernel()
def backward_reduce_rows(x, dy, stats, relu, sums):
    """sums[0] = sum(dy'), sums[1] = sum(dy' * (x - mean)), float64, one sweep."""
    outer, n_channels = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    n_row_chunks, n_blocks = rows_plan(outer, n_channels)
    part_sum_dy = np.empty((n_row_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_row_chunks, n_channels))
    rows_grad_partials(x, dy, mean_hi, mean_lo, scale, shift, relu, n_row_chunks, n_blocks,
                       part_sum_dy, part_sum_dy_xc)
    merge_sums(part_sum_dy, part_sum_dy_xc, sums[0], sums[1])
    _centre_on_mean(sums, stats, mean_hi)


@kernel()
def backward_reduce_planes(x, dy, stats, relu, sums):
    outer, n_channels, inner = x.shape
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    n_outer_chunks, n_inner_chunks = planes_plan(outer, n_channels, inner)
    n_chunks = n_outer_chunks * n_inner_chunks
    part_sum_dy = np.empty((n_chunks, n_channels))
    part_sum_dy_xc = np.empty((n_chunks, n_channels))
    planes_grad_partials(x, dy, mean_hi, mean_lo, scale, shift, relu, n_outer_chunks,
                         n_inner_chunks, part_sum_dy, part_sum_dy_xc)
    merge_sums(part_sum_dy, part_sum_dy_xc, sums[0], sums[1])
    _centre_on_mean(sums, stats, mean_hi)


@kernel()
def backward_apply_rows(x, dy, stats, relu, batch_stats, count, sums, dx, grads):
    """dx from the sums (over this batch or a larger one of ``count`` values per channel)."""
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    k_dy, k_const, k_xhat, inv_std = _backward_constants(sums, stats, count, batch_stats, x,
                                                         grads)
    rows_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat, dx)


@kernel()
def backward_apply_planes(x, dy, stats, relu, batch_stats, count, sums, dx, grads):
    mean_hi, mean_lo, scale, shift = _normalize_constants(stats, x)
    k_dy, k_const, k_xhat, inv_std = _backward_constants(sums, stats, count, batch_stats, x,
                                                         grads)
    planes_apply(x, dy, mean_hi, mean_lo, scale, shift, inv_std, relu, k_dy, k_const, k_xhat,
                 dx)


@kernel()
def backward_rows(x, dy, stats, relu, batch_stats, dx, grads):
    """Both backward sweeps; ``grads[0]``, ``grads[1]`` receive dgamma and dbeta."""
    sums = np.empty((2, stats.shape[1]))
    backward_reduce_rows(x, dy, stats, relu, sums)
    backward_apply_rows(x, dy, stats, relu, batch_stats, np.float64(x.shape[0]), sums, dx, grads)


@kernel()
def backward_planes(x, dy, stats, relu, batch_stats, dx, grads):
    sums = np.empty((2, stats.shape[1]))
    backward_reduce_planes(x, dy, stats, relu, sums)
    count = np.float64(x.shape[0] * x.shape[2])
    backward_apply_planes(x, dy, stats, relu, batch_stats, count, sums, dx, grads)


# ---------------------------------------------------------------------------
# Running statistics (the layer's update, PyTorch's formula)
# ---------------------------------------------------------------------------


@njit(cache=CACHE)
def update_running_stats(stats, count, factor, running_mean, running_var):
    """running = (1 - factor)*running + factor*batch, the unbiased variance into running_var.

    Arithmetic in float64, rounded once to the running statistics' dtype (as
    PyTorch's CPU kernel).  Returns a status code; nothing is written unless
    every batch statistic is finite and every new value fits the dtype.
    """
    n_channels = stats.shape[1]
    correction = count / (count - 1.0)
    keep = 1.0 - factor
    for c in range(n_channels):
        if not (np.isfinite(stats[MEAN, c]) and np.isfinite(stats[VAR, c])):
            return BAD_BATCH_STATS
    for c in range(n_channels):
        new_mean = running_mean.dtype.type(keep * np.float64(running_mean[c])
                                           + factor * stats[MEAN, c])
        new_var = running_var.dtype.type(keep * np.float64(running_var[c])
                                         + factor * (stats[VAR, c] * correction))
        if not (np.isfinite(new_mean) and np.isfinite(new_var)):
            return OVERFLOW
    for c in range(n_channels):
        running_mean[c] = keep * np.float64(running_mean[c]) + factor * stats[MEAN, c]
        running_var[c] = keep * np.float64(running_var[c]) + factor * (stats[VAR, c] * correction)
    return OK
