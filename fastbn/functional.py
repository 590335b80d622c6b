"""The public functional API: validate, build the ``(outer, C, inner)`` view, call a kernel.

Formulas (per channel ``c``; ``N`` values per channel, every axis but ``axis``
reduced)::

    mean    = sum(x) / N
    var     = sum((x - mean)**2) / N              (biased)
    inv_std = 1 / sqrt(var + eps)
    x_hat   = (x - mean) * inv_std
    y       = gamma * x_hat + beta                (then max(y, 0) if relu)

    dy'     = where(y > 0, dy, 0) if relu else dy   (NaN in dy where y <= 0 gives 0)
    dbeta   = sum(dy')
    dgamma  = sum(dy' * x_hat)
    dx      = gamma * inv_std / N * (N * dy' - dbeta - x_hat * dgamma)

Conventions shared by every function here:

* ``x`` is float32 or float64 with at least 2 dimensions; outputs have the
  dtype and shape of ``x`` and are C-contiguous.  A non-C-contiguous ``x``
  (Fortran order, negative strides, a strided view) is copied once.
* Statistics and parameter gradients are accumulated in float64; ``mean``,
  ``var`` and ``inv_std`` are returned as float64, ``dgamma``/``dbeta`` in the
  dtype of ``gamma``/``beta``.
* ``gamma``/``beta`` may be None (no affine transform; the matching gradient
  is then None).
* NaN or Inf in a channel of ``x`` makes that channel's statistics, output
  and gradients NaN (or Inf); other channels are unaffected.  Nothing raises.
* ``out=`` buffers must be C-contiguous, writeable, of the right shape and
  dtype, and must not overlap the inputs.  With them a training loop allocates
  nothing proportional to the input.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

from . import _kernels
from ._config import launch_guard

__all__ = [
    "BatchNormContext",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_stats",
    "batch_norm_normalize",
    "batch_norm_backward_reduce",
    "batch_norm_backward_apply",
]

_SUPPORTED = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True, eq=False)
class BatchNormContext:
    """What :func:`batch_norm_backward` needs from a forward call.

    ``x`` is held by reference, not copied: do not modify it in place between
    the forward and the backward call.

    Attributes
    ----------
    mean, var, inv_std : float64 arrays of shape (C,)
        Statistics used to normalize (``var`` is biased; ``inv_std`` includes eps).
    count : int
        Values per channel, ``N``.
    batch_stats : bool
        True for a training forward (statistics depend on ``x``), False for an
        inference forward (statistics are constants).
    """

    x_view: np.ndarray
    shape: tuple
    axis: int
    mean: np.ndarray
    var: np.ndarray
    inv_std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    gamma_dtype: np.dtype | None
    beta_dtype: np.dtype | None
    relu: bool
    batch_stats: bool
    count: int

    @property
    def dtype(self) -> np.dtype:
        return self.x_view.dtype


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_float_dtype(dtype: np.dtype, name: str) -> None:
    """Accept float32/float64 in either byte order (callers convert to native)."""
    if dtype.newbyteorder("=") in _SUPPORTED:
        return
    if dtype.kind == "f" and dtype.itemsize == 2:
        raise TypeError(f"{name} has dtype float16, which fastbn does not support; cast to float32")
    raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")


def _as_data(x, name: str) -> np.ndarray:
    """Validate a data array (x or dy); return a native-endian, C-contiguous ndarray.

    Array subclasses are viewed as plain ndarrays (outputs are plain ndarrays),
    except masked arrays, whose mask batch norm cannot honour.
    """
    if type(x) is not np.ndarray:
        if x is None:
            raise TypeError(f"{name} must be an array, got None")
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{name} is a masked array; fastbn ignores no values: pass "
                            f"{name}.filled(...) or the unmasked values")
        x = np.asarray(x)
    _check_float_dtype(x.dtype, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and channel), got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); batch norm needs at least one value")
    if not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="), order="C")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x


def _normalize_axis(axis, ndim: int) -> int:
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim, "axis (the channel axis)")
    return axis % ndim


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps}")
    return eps


def _per_channel(values, name: str, n_channels: int, fill: float | None):
    """(float64 array, original dtype) for a per-channel parameter or statistic."""
    if values is None:
        if fill is None:
            raise TypeError(f"{name} must be an array of shape ({n_channels},), got None")
        return np.full(n_channels, fill), None
    if not isinstance(values, np.ndarray):
        values = np.asarray(values)
    _check_float_dtype(values.dtype, name)
    if values.shape != (n_channels,):
        raise ValueError(
            f"{name} must have shape ({n_channels},) to match the {n_channels} channels of x, "
            f"got shape {values.shape}"
        )
    # Always a copy: the context keeps it for backward, and callers update
    # their parameters in place between forward and backward.
    return np.array(values, dtype=np.float64), values.dtype


def _check_out(out, name: str, shape: tuple, dtype: np.dtype, *inputs) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for array in inputs:
        if np.may_share_memory(out, array):
            raise ValueError(f"{name} overlaps an input array; pass a separate buffer")
    return out


def _layout(x: np.ndarray, axis: int):
    """The (outer, C) or (outer, C, inner) view of a C-contiguous x, and its kernel family."""
    shape = x.shape
    n_channels = shape[axis]
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    if inner == 1:
        return x.reshape(outer, n_channels), True
    return x.reshape(outer, n_channels, inner), False


def _check_training_count(x: np.ndarray, n_channels: int) -> None:
    if x.size // n_channels < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def batch_stats(x, axis: int = 1):
    """Per-channel mean and biased variance in one sweep over ``x``.

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2
    axis : int
        The channel axis (negative counts from the end; ``-1`` is channels-last).

    Returns
    -------
    mean, var : float64 ndarrays of shape (C,)
        ``var`` is biased (divides by N).  Both are accumulated in float64 from
        values shifted by a per-chunk pivot and merged with Chan's formula, so
        data far from zero (mean 1e4, std 1 in float32) keeps full precision.
    """
    x = _as_data(x, "x")
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    view, rows = _layout(x, axis)
    mean = np.empty(n_channels)
    var = np.empty(n_channels)
    with launch_guard(x.size):
        if rows:
            _kernels.moments_rows(view, mean, var)
        else:
            _kernels.moments_planes(view, mean, var)
    return mean, var


def batch_norm_forward(x, gamma=None, beta=None, eps: float = 1e-5, axis: int = 1,
                       relu: bool = False, out=None):
    """Training-mode batch normalization: normalize with the batch's own statistics.

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, then ``max(y, 0)`` when
    ``relu`` is true, with ``mean`` and biased ``var`` taken over every axis of
    ``x`` except ``axis``.  Two sweeps over memory: one for the statistics, one
    to normalize (the mean is subtracted before scaling, so float32 keeps its
    digits when the data's mean is large compared with its spread).

    Parameters
    ----------
    x : ndarray, float32 or float64, ndim >= 2, at least 2 values per channel
    gamma, beta : array of shape (C,) or None
        Scale and shift.  None means 1 and 0 (no affine transform).
    eps : float > 0
    axis : int
        Channel axis; 1 for ``(N, C, ...)``, -1 for channels-last.
    relu : bool
        Fuse a ReLU after the affine transform.
    out : ndarray, optional
        Buffer for ``y`` (shape and dtype of ``x``, C-contiguous, not overlapping ``x``).

    Returns
    -------
    y : ndarray
    ctx : BatchNormContext
        Pass to :func:`batch_norm_backward`; ``ctx.mean`` and ``ctx.var`` are the
        batch statistics (float64).
    """
    x_given = x
    x = _as_data(x, "x")
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    eps = _check_eps(eps)
    weight, gamma_dtype = _per_channel(gamma, "gamma", n_channels, 1.0)
    bias, beta_dtype = _per_channel(beta, "beta", n_channels, 0.0)
    _check_training_count(x, n_channels)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given))
    view, rows = _layout(x, axis)
    y_view = y.reshape(view.shape)
    mean = np.empty(n_channels)
    var = np.empty(n_channels)
    inv_std = np.empty(n_channels)
    relu = bool(relu)
    kernel = _kernels.train_forward_rows if rows else _kernels.train_forward_planes
    with launch_guard(x.size):
        kernel(view, weight, bias, eps, relu, y_view, mean, var, inv_std)
    ctx = BatchNormContext(view, x.shape, axis, mean, var, inv_std, weight, bias,
                           gamma_dtype, beta_dtype, relu, True, x.size // n_channels)
    return y, ctx


def batch_norm_inference(x, running_mean, running_var, gamma=None, beta=None,
                         eps: float = 1e-5, axis: int = 1, relu: bool = False, out=None,
                         return_context: bool = False):
    """Inference-mode batch normalization with fixed statistics (one sweep).

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` (then
    ReLU if ``relu``).  ``running_mean`` must be finite and ``running_var``
    finite and non-negative (ValueError otherwise).  With
    ``return_context=True`` returns ``(y, ctx)``; :func:`batch_norm_backward`
    then treats the statistics as constants (``dx = dy' * gamma * inv_std``).
    Any number of values per channel, including 1, is accepted.
    """
    x_given = x
    x = _as_data(x, "x")
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    eps = _check_eps(eps)
    mean, _ = _per_channel(running_mean, "running_mean", n_channels, None)
    var, _ = _per_channel(running_var, "running_var", n_channels, None)
    if not np.all(np.isfinite(mean)):
        raise ValueError("running_mean must be finite (it holds NaN or Inf)")
    if not np.all(var >= 0) or not np.all(np.isfinite(var)):
        raise ValueError(
            "running_var must be non-negative and finite (it holds a negative value, NaN or Inf)"
        )
    weight, gamma_dtype = _per_channel(gamma, "gamma", n_channels, 1.0)
    bias, beta_dtype = _per_channel(beta, "beta", n_channels, 0.0)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given))
    view, rows = _layout(x, axis)
    inv_std = np.empty(n_channels)
    relu = bool(relu)
    kernel = _kernels.inference_rows if rows else _kernels.inference_planes
    with launch_guard(x.size):
        kernel(view, mean, var, eps, weight, bias, relu, y.reshape(view.shape), inv_std)
    if not return_context:
        return y
    ctx = BatchNormContext(view, x.shape, axis, mean, var, inv_std, weight, bias,
                           gamma_dtype, beta_dtype, relu, False, x.size // n_channels)
    return y, ctx


def batch_norm_backward(dy, ctx: BatchNormContext, out=None):
    """Gradients of a batch-norm forward call: ``(dx, dgamma, dbeta)``.

    Closed form, two sweeps over memory: one fused reduction for ``sum(dy')`` and
    ``sum(dy' * (x - mean))`` in float64, then ``dx`` elementwise.  With a
    fused ReLU the mask ``y > 0`` is recomputed from ``x`` bit for bit; nothing
    is stored by the forward call.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to ``y``: same shape and dtype as ``x``.
    ctx : BatchNormContext
        From :func:`batch_norm_forward` (or ``batch_norm_inference(...,
        return_context=True)``).  Can be used for several backward calls.
    out : ndarray, optional
        Buffer for ``dx``.

    Returns
    -------
    dx : ndarray, shape and dtype of ``x``
    dgamma, dbeta : ndarray of shape (C,) in the dtype of gamma/beta, or None
        when the forward call had no gamma/beta.
    """
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(
            f"ctx must be the BatchNormContext returned by batch_norm_forward, "
            f"got {type(ctx).__name__}"
        )
    dy_given = dy
    dy = _as_data(dy, "dy")
    if dy.shape != ctx.shape:
        raise ValueError(f"dy must have the shape of x, {ctx.shape}, got {dy.shape}")
    if dy.dtype != ctx.dtype:  # both native-endian here
        raise TypeError(f"dy must have the dtype of x, {ctx.dtype}, got {dy.dtype}")
    view = ctx.x_view
    dx = (np.empty(ctx.shape, ctx.dtype) if out is None
          else _check_out(out, "out", ctx.shape, ctx.dtype, view, dy, dy_given))
    n_channels = ctx.mean.shape[0]
    dgamma = np.empty(n_channels)
    dbeta = np.empty(n_channels)
    kernel = _kernels.backward_rows if view.ndim == 2 else _kernels.backward_planes
    with launch_guard(view.size):
        kernel(view, dy.reshape(view.shape), ctx.mean, ctx.inv_std, ctx.weight, ctx.bias,
               ctx.relu, ctx.batch_stats, dx.reshape(view.shape), dgamma, dbeta)
    dgamma = None if ctx.gamma_dtype is None else dgamma.astype(ctx.gamma_dtype, copy=False)
    dbeta = None if ctx.beta_dtype is None else dbeta.astype(ctx.beta_dtype, copy=False)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------
# Split training API: statistics from elsewhere (e.g. a global batch over
# several processes, fastbn.distributed).  The single-process functions above
# are these pieces with the statistics and sums of x itself.
# ---------------------------------------------------------------------------


def _check_count(count, local: int) -> int:
    try:
        count = operator.index(count)
    except TypeError:
        raise TypeError(f"count must be an integer, got {type(count).__name__}") from None
    if count < local:
        raise ValueError(f"count ({count}) must be at least the {local} values per channel of x")
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got count {count}"
        )
    return count


def batch_norm_normalize(x, mean, var, count, gamma=None, beta=None, eps: float = 1e-5,
                         axis: int = 1, relu: bool = False, out=None):
    """Training-mode normalize of ``x`` with batch statistics computed elsewhere.

    For batch norm over a batch of which ``x`` is one part (synchronized batch
    norm): ``mean`` and biased ``var`` (float arrays of shape (C,)) are the
    statistics of the whole batch, ``count`` its number of values per channel.
    One sweep over ``x``.  Returns ``(y, ctx)``; ``ctx.batch_stats`` is True
    (the backward treats the statistics as functions of the whole batch) and
    ``ctx.count == count``.  Backward with :func:`batch_norm_backward_reduce`
    (this part's sums), a reduction of the sums over the parts, then
    :func:`batch_norm_backward_apply`.  With ``mean, var = batch_stats(x)``
    and ``count = x.size // C`` this is :func:`batch_norm_forward`.
    """
    y, ctx = batch_norm_inference(x, mean, var, gamma, beta, eps=eps, axis=axis, relu=relu,
                                  out=out, return_context=True)
    count = _check_count(count, ctx.count)
    ctx = BatchNormContext(ctx.x_view, ctx.shape, ctx.axis, ctx.mean, ctx.var, ctx.inv_std,
                           ctx.weight, ctx.bias, ctx.gamma_dtype, ctx.beta_dtype, ctx.relu,
                           True, count)
    return y, ctx


def _check_backward_args(dy, ctx):
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(
            f"ctx must be the BatchNormContext returned by a forward call, "
            f"got {type(ctx).__name__}"
        )
    dy = _as_data(dy, "dy")
    if dy.shape != ctx.shape:
        raise ValueError(f"dy must have the shape of x, {ctx.shape}, got {dy.shape}")
    if dy.dtype != ctx.dtype:
        raise TypeError(f"dy must have the dtype of x, {ctx.dtype}, got {dy.dtype}")
    return dy


def batch_norm_backward_reduce(dy, ctx: BatchNormContext):
    """This part's ``(sum_dy, sum_dy_xc)``: ``sum(dy')`` and ``sum(dy' * (x - mean))``.

    float64 arrays of shape (C,), one sweep over ``x`` and ``dy`` (``dy'`` is
    ``dy`` masked by the fused ReLU).  Summed over every part of the batch,
    they give :func:`batch_norm_backward_apply` what it needs; this part's
    parameter gradients are ``dgamma = ctx.inv_std * sum_dy_xc`` and
    ``dbeta = sum_dy``.
    """
    dy = _check_backward_args(dy, ctx)
    view = ctx.x_view
    dy_view = dy.reshape(view.shape)
    n_channels = ctx.mean.shape[0]
    mean_hi, mean_lo, scale, shift = _kernels._normalize_constants(
        ctx.mean, ctx.inv_std, ctx.weight, ctx.bias, view)
    sum_dy = np.empty(n_channels)
    sum_dy_xc = np.empty(n_channels)
    with launch_guard(view.size):
        if view.ndim == 2:
            n_row_chunks, n_blocks = _kernels.rows_plan(view.shape[0], n_channels)
            part_a = np.empty((n_row_chunks, n_channels))
            part_b = np.empty((n_row_chunks, n_channels))
            _kernels._rows_grad_partials(view, dy_view, ctx.mean, mean_hi, mean_lo, scale, shift,
                                         ctx.relu, n_row_chunks, n_blocks, part_a, part_b)
        else:
            n_outer, n_inner = _kernels.planes_plan(*view.shape)
            part_a = np.empty((n_outer * n_inner, n_channels))
            part_b = np.empty((n_outer * n_inner, n_channels))
            if ctx.relu:
                _kernels._planes_grad_partials_relu(view, dy_view, ctx.mean, mean_hi, mean_lo,
                                                    scale, shift, n_outer, n_inner, part_a,
                                                    part_b)
            else:
                _kernels._planes_grad_partials(view, dy_view, ctx.mean, n_outer, n_inner,
                                               part_a, part_b)
        _kernels._merge_sums(part_a, part_b, sum_dy, sum_dy_xc)
    return sum_dy, sum_dy_xc


def batch_norm_backward_apply(dy, ctx: BatchNormContext, sum_dy, sum_dy_xc, out=None):
    """``dx`` from the sums over the whole batch (see :func:`batch_norm_backward_reduce`).

    ``dx = weight*inv_std * (dy' - sum_dy/N - x_hat * inv_std*sum_dy_xc/N)`` with
    ``N = ctx.count``; one sweep.  Returns ``dx`` (shape and dtype of ``x``).
    """
    dy = _check_backward_args(dy, ctx)
    view = ctx.x_view
    n_channels = ctx.mean.shape[0]
    sum_dy, _ = _per_channel(sum_dy, "sum_dy", n_channels, None)
    sum_dy_xc, _ = _per_channel(sum_dy_xc, "sum_dy_xc", n_channels, None)
    dx = (np.empty(ctx.shape, ctx.dtype) if out is None
          else _check_out(out, "out", ctx.shape, ctx.dtype, view, dy))
    mean_hi, mean_lo, scale, shift = _kernels._normalize_constants(
        ctx.mean, ctx.inv_std, ctx.weight, ctx.bias, view)
    k_dy, k_const, k_xhat, inv_std_d = _kernels._backward_constants(
        sum_dy, sum_dy_xc, ctx.inv_std, ctx.weight, np.float64(ctx.count), ctx.batch_stats,
        view, np.empty(n_channels), np.empty(n_channels))
    apply = _kernels._rows_apply if view.ndim == 2 else _kernels._planes_apply
    with launch_guard(view.size):
        apply(view, dy.reshape(view.shape), mean_hi, mean_lo, scale, shift, inv_std_d, ctx.relu,
              k_dy, k_const, k_xhat, dx.reshape(view.shape))
    return dx
