"""The fused residual block: ``y = max(batch_norm(x) + residual, 0)`` in one training kernel.

Every ResNet block ends with ``relu(bn(x) + identity)``.  Op by op that is
three passes over memory in the forward and more in the backward; here it is
the two sweeps of a batch-norm forward (the residual is one more input stream
of the normalize sweep) and the two sweeps of its backward (the residual's
gradient is the masked ``dy``, written by the reduction sweep).

Formulas (per channel; ``x_hat``, ``mean``, ``inv_std`` as in
:mod:`fastbn.functional`)::

    y       = max(gamma * x_hat + beta + residual, 0)
    dr      = where(y > 0, dy, 0)                  (the residual's gradient)
    dbeta   = sum(dr)
    dgamma  = sum(dr * x_hat)
    dx      = gamma * inv_std / N * (N * dr - dbeta - x_hat * dgamma)

In float32 and float64 the forward gives the same bits as the composition
``np.maximum(batch_norm_forward(x, gamma, beta)[0] + residual, 0)``, and the
backward those of ``batch_norm_backward`` applied to ``where(y > 0, dy, 0)``
(the same operations in the same order; a test checks it); 16-bit data is
computed in float32 and rounded once.  Conventions (dtypes, layouts, NaN, ``out=``)
are those of :mod:`fastbn.functional`.
"""

from __future__ import annotations

import numpy as np

from ._launch import launch
from .functional import (
    _F32,
    _F64,
    _FORMAT_NAMES,
    BatchNormContext,
    _as_data,
    _channel_array,
    _check_eps,
    _check_out,
    _check_training_count,
    _compute_dtype,
    _given_dtype,
    _grads_buffer,
    _is_kernel_ready,
    _kernel_arrays,
    _layout,
    _normalize_axis,
    _parameters,
    _public,
    _raise_bad_statistics,
    _split_grads,
)
from .kernels import N_STATS

__all__ = [
    "BatchNormAddReluContext",
    "batch_norm_add_relu_forward",
    "batch_norm_add_relu_backward",
    "batch_norm_add_relu_inference",
]


class BatchNormAddReluContext(BatchNormContext):
    """What :func:`batch_norm_add_relu_backward` needs from a forward call (read-only).

    A :class:`~fastbn.BatchNormContext` (same attributes) that also holds the
    forward's output ``y`` by reference: the backward takes the ReLU mask
    from it (``y > 0``), as PyTorch's ReLU backward uses its output.  Do not
    modify ``x`` or ``y`` in place between the forward and the backward call.
    The residual is not kept.
    """

    __slots__ = ("_y_view",)

    def __init__(self, x_view, y_view, shape, axis, stats, gamma_dtype, beta_dtype, batch_stats,
                 count):
        super().__init__(x_view, shape, axis, stats, gamma_dtype, beta_dtype, True, batch_stats,
                         count)
        self._y_view = y_view

    y_view = property(lambda self: self._y_view,
                      doc="The forward's output y, as the (outer, C[, inner]) view.")

    def __repr__(self) -> str:
        return "BatchNormAddRelu" + super().__repr__()[len("BatchNorm"):]


def _as_residual(residual, x: np.ndarray) -> np.ndarray:
    """The residual as the kernels see it: x's shape and storage format, or an error."""
    r = _as_data(residual, "residual")
    if r.shape != x.shape:
        raise ValueError(f"residual must have the shape of x, {x.shape}, got {r.shape}")
    if r.dtype != x.dtype:
        raise TypeError(f"residual must have the dtype of x, {_FORMAT_NAMES[x.dtype]}, "
                        f"got {_FORMAT_NAMES[r.dtype]}")
    return r


def batch_norm_add_relu_forward(x, residual, gamma=None, beta=None, eps: float = 1e-5,
                                axis: int = 1, out=None):
    """Training-mode ``y = max(gamma * x_hat + beta + residual, 0)`` in two sweeps.

    ``x_hat`` is ``x`` normalized with its batch statistics, exactly as in
    :func:`~fastbn.batch_norm_forward` (whose statistics sweep this reuses).
    Sweep 1 reads ``x`` (statistics); sweep 2 reads ``x`` and ``residual`` and
    writes ``y``: 4 item sizes of traffic per element (16 bytes in float32),
    against 8 for batch norm (3), add (3) and an in-place ReLU (2) done one
    by one.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, ndim >= 2
        At least 2 values per channel.
    residual : ndarray
        The block's identity branch: the shape and dtype of ``x`` (a
        non-C-contiguous one is copied once).
    gamma, beta : array of shape (C,) or None
        Scale and shift; None means 1 and 0.
    eps : float > 0
    axis : int
        Channel axis; 1 for ``(N, C, ...)``, -1 for channels-last.
    out : ndarray, optional
        Buffer for ``y`` (shape and dtype of ``x``, C-contiguous, overlapping
        neither ``x`` nor ``residual``).

    Returns
    -------
    y : ndarray
        Shape and dtype of ``x``, C-contiguous.
    ctx : BatchNormAddReluContext
        For :func:`batch_norm_add_relu_backward`.  It holds ``x`` and ``y``
        by reference (not the residual): do not modify them in place before
        the backward call.

    Raises
    ------
    ValueError, TypeError
        Naming the argument: a ``residual`` of another shape or dtype, an
        ``out`` of the wrong shape/dtype or overlapping an input, a batch of
        one value per channel, bad ``gamma``/``beta``/``eps``/``axis``.
    """
    x_given, residual_given = x, residual
    x = _as_data(x, "x")
    r = _as_residual(residual, x)
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    eps = _check_eps(eps)
    like = x.dtype if x.dtype is _F32 or x.dtype is _F64 else _compute_dtype(x.dtype)
    weight, bias, gamma_dtype, beta_dtype = _parameters(gamma, beta, n_channels, like)
    count = x.size // n_channels
    if count < 2:
        _check_training_count(x, n_channels)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given, r, residual_given))
    view, rows = _layout(x, axis)
    stats = np.empty((N_STATS, n_channels))
    y_view = y if view is x else y.reshape(view.shape)
    launch("add_relu_train_rows" if rows else "add_relu_train_planes", x.size,
           view, r if view is x else r.reshape(view.shape), weight, bias, eps, y_view, stats)
    return _public(y, out), BatchNormAddReluContext(view, y_view, x.shape, axis, stats,
                                                    gamma_dtype, beta_dtype, True, count)


def batch_norm_add_relu_inference(x, residual, running_mean, running_var, gamma=None,
                                  beta=None, eps: float = 1e-5, axis: int = 1, out=None,
                                  return_context: bool = False):
    """Inference-mode ``y = max(bn(x) + residual, 0)`` with fixed statistics (one sweep).

    ``bn(x) = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``.
    ``running_mean`` must be finite and ``running_var`` finite and
    non-negative (ValueError before anything is written).  Reads ``x`` and
    ``residual``, writes ``y``.  With ``return_context=True`` returns
    ``(y, ctx)``; :func:`batch_norm_add_relu_backward` then treats the
    statistics as constants (``dx = dr * gamma * inv_std``).  Arguments
    otherwise as in :func:`batch_norm_add_relu_forward`.
    """
    x_given, residual_given = x, residual
    x = _as_data(x, "x")
    r = _as_residual(residual, x)
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    eps = _check_eps(eps)
    mean, var = running_mean, running_var
    if mean is None or var is None:
        name = "running_mean" if mean is None else "running_var"
        raise TypeError(f"{name} must be an array of shape ({n_channels},), got None")
    like = x.dtype if x.dtype is _F32 or x.dtype is _F64 else _compute_dtype(x.dtype)
    if (_is_kernel_ready(mean, like, n_channels) and _is_kernel_ready(var, like, n_channels)
            and _is_kernel_ready(gamma, like, n_channels)
            and _is_kernel_ready(beta, like, n_channels)):
        weight, bias, gamma_dtype, beta_dtype = gamma, beta, like, like
    else:
        gamma_dtype, beta_dtype = _given_dtype(gamma), _given_dtype(beta)
        mean = _channel_array(mean, "running_mean", n_channels)
        var = _channel_array(var, "running_var", n_channels)
        gamma = _channel_array(gamma, "gamma", n_channels)
        beta = _channel_array(beta, "beta", n_channels)
        mean, var, weight, bias = _kernel_arrays(like, mean, var, gamma, beta)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given, r, residual_given))
    view, rows = _layout(x, axis)
    stats = np.empty((N_STATS, n_channels))
    y_view = y if view is x else y.reshape(view.shape)
    status = launch("add_relu_normalize_rows" if rows else "add_relu_normalize_planes",
                    x.size, view, r if view is x else r.reshape(view.shape), mean, var, weight,
                    bias, eps, y_view, stats)
    _raise_bad_statistics(status, "running_mean", "running_var")
    y = _public(y, out)
    if not return_context:
        return y
    return y, BatchNormAddReluContext(view, y_view, x.shape, axis, stats, gamma_dtype,
                                      beta_dtype, False, view.size // n_channels)


def batch_norm_add_relu_backward(dy, ctx: BatchNormAddReluContext, out=None,
                                 out_residual=None):
    """Gradients of the fused block: ``(dx, dresidual, dgamma, dbeta)``.

    Two sweeps.  The reduction sweep reads ``dy``, ``y`` and ``x``, writes
    ``dresidual = where(y > 0, dy, 0)`` and accumulates ``sum(dresidual)`` and
    ``sum(dresidual * (x - mean))`` per channel in float64; the apply sweep
    reads ``dresidual`` and ``x`` and writes ``dx``.  Traffic per element: 7
    item sizes (28 bytes in float32): 4 for the reduction, 3 for the apply
    sweep.  An apply sweep that re-reads ``dy`` and ``y`` to write both
    gradients would move 3 + 5 = 8, as does the op-by-op composition (the
    masked gradient 3, then the batch-norm backward 2 + 3).  The
    mask is taken from the stored ``y`` (``y > 0``; NaN gives 0), as
    PyTorch's ReLU backward does.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to ``y``: shape and dtype of ``x``.
    ctx : BatchNormAddReluContext
        From :func:`batch_norm_add_relu_forward` (or the inference function
        with ``return_context=True``).  May be used for several backward calls.
    out, out_residual : ndarray, optional
        Buffers for ``dx`` and ``dresidual`` (shape and dtype of ``x``,
        C-contiguous, overlapping neither each other nor ``dy``, ``x``, ``y``).

    Returns
    -------
    dx, dresidual : ndarray, shape and dtype of ``x``
    dgamma, dbeta : ndarray of shape (C,) in the dtype of gamma/beta, or None
        when the forward call had no gamma/beta.
    """
    if type(ctx) is not BatchNormAddReluContext:
        raise TypeError(f"ctx must be the BatchNormAddReluContext returned by "
                        f"batch_norm_add_relu_forward, got {type(ctx).__name__}")
    dy_given = dy
    dy = _as_data(dy, "dy")
    view, y_view, shape = ctx._x_view, ctx._y_view, ctx._shape
    if dy.shape != shape:
        raise ValueError(f"dy must have the shape of x, {shape}, got {dy.shape}")
    if dy.dtype != view.dtype:
        raise TypeError(f"dy must have the dtype of x, {_FORMAT_NAMES[view.dtype]}, "
                        f"got {_FORMAT_NAMES[dy.dtype]}")
    dx = (np.empty(shape, view.dtype) if out is None
          else _check_out(out, "out", shape, view.dtype, view, y_view, dy, dy_given))
    dr = (np.empty(shape, view.dtype) if out_residual is None
          else _check_out(out_residual, "out_residual", shape, view.dtype, view, y_view, dy,
                          dy_given, dx))
    stats = ctx._stats
    grads = _grads_buffer(ctx, stats.shape[1])
    if dy.shape != view.shape:
        dy = dy.reshape(view.shape)
    launch("add_relu_backward_rows" if view.ndim == 2 else "add_relu_backward_planes",
           view.size, view, dy, y_view, stats, ctx._batch_stats, dx.reshape(view.shape),
           dr.reshape(view.shape), grads)
    dgamma, dbeta = _split_grads(ctx, grads)
    return _public(dx, out), _public(dr, out_residual), dgamma, dbeta
