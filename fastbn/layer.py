"""``BatchNorm``: PyTorch's ``nn.BatchNorm{1,2,3}d`` semantics on NumPy arrays.

A thin stateful class over :mod:`fastbn.functional`: it owns the affine
parameters, the running statistics and the context of the last forward call,
and calls :func:`~fastbn.functional.batch_norm_forward`,
:func:`~fastbn.functional.batch_norm_inference` and
:func:`~fastbn.functional.batch_norm_backward` to do the arithmetic.

Example -- one SGD step::

    bn = BatchNorm(64)                       # (N, 64, ...) float32 input
    y = bn(x)                                # training mode: batch statistics
    dx = bn.backward(dy)                     # fills bn.grad_weight, bn.grad_bias
    for p, g in zip(bn.parameters(), bn.gradients()):
        p -= lr * g
    bn.eval()
    y = bn(x)                                # running statistics

What follows PyTorch (``torch.nn.modules.batchnorm._BatchNorm.forward``):

* training mode normalizes with the batch's mean and *biased* variance and
  updates ``running = (1 - m) * running + m * batch`` with the *unbiased*
  batch variance (``var * n / (n - 1)``) going into ``running_var``;
  ``num_batches_tracked`` counts training batches, and ``momentum=None``
  uses the cumulative moving average ``m = 1 / num_batches_tracked``;
* eval mode normalizes with the running statistics, or with the batch's own
  statistics when ``track_running_stats=False`` (then nothing is tracked and
  ``running_mean``, ``running_var``, ``num_batches_tracked`` are None);
* ``affine=False`` means no ``weight``/``bias`` (they are None);
* a training batch with a single value per channel raises ValueError;
* ``state_dict()`` has PyTorch's keys, shapes and dtypes, so
  ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}`` loads as is.

What differs, and why:

* Gradients are explicit.  :meth:`BatchNorm.backward` takes ``dy`` for the
  *last* forward call and returns ``dx``; the parameter gradients are written
  into ``grad_weight`` / ``grad_bias``, persistent buffers that are
  **overwritten in place** by every backward call (not accumulated as in
  PyTorch).  Copy them if you need to keep one.  One forward call may be
  followed by any number of backward calls (each uses the parameters as they
  were at the forward call, even if they were updated in between).
* The input must already have the layer's dtype (no silent casts), or be
  16-bit data -- float16 or bfloat16 -- which a float32 (or float64) layer
  takes as PyTorch's "mixed type" modules do: parameters, running statistics
  and their gradients stay in the layer's dtype, the output and ``dx`` keep
  the data's format.  Any rank >= 2; ``axis`` is the channel axis (``-1``
  for channels-last).
* Non-finite batch statistics raise.  Whenever the layer normalizes with
  batch statistics (training mode, or ``track_running_stats=False``) and a
  channel's mean or variance is NaN/Inf -- the batch holds a NaN or Inf --
  the call raises :class:`FloatingPointError` naming the channels, and the
  layer is left exactly as it was: running statistics, ``num_batches_tracked``
  and the context of the previous forward call (so a pending backward still
  works).  One bad value would otherwise turn the whole channel of the output
  and the running statistics into NaN for good.  In eval mode with running
  statistics, NaN/Inf in ``x`` only affect the matching outputs, nothing is
  updated, and nothing raises (as in PyTorch and :mod:`fastbn.functional`).
* Every failed call (bad dtype, shape, batch of one, NaN batch, bad ``dy``,
  bad state dict, bad file) raises before anything is modified.
* The layer keeps a reference to the last input (the backward needs it):
  do not modify ``x`` in place between forward and backward.
* The fused residual block.  A ``relu=True`` layer takes the block's
  identity branch: ``y = bn(x, residual=z)`` computes ``max(bn(x) + z, 0)``
  in the two sweeps of a plain forward (:mod:`fastbn.residual`), and the
  next :meth:`BatchNorm.backward` returns ``(dx, dz)``, one gradient per
  input of that forward call.  The running statistics are those of ``x``,
  updated exactly as without a residual.  After such a call the layer also
  keeps a reference to ``y`` (the backward takes the ReLU mask from it):
  modify neither ``x`` nor ``y`` in place before the backward call.
"""

from __future__ import annotations

import json
import math
import operator
import os
import threading
from collections.abc import Mapping

import numpy as np

from .functional import (
    _is_bfloat16,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
)
from .kernels import BAD_BATCH_STATS, OVERFLOW, update_running_stats
from .residual import (
    BatchNormAddReluContext,
    batch_norm_add_relu_backward,
    batch_norm_add_relu_forward,
    batch_norm_add_relu_inference,
)

__all__ = ["BatchNorm"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FORMAT = "fastbn.BatchNorm"
_FORMAT_VERSION = 1
_CONFIG_KEY = "__config__"
_CONFIG_FIELDS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "axis",
                  "relu", "dtype")


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


def _check_num_features(num_features) -> int:
    if isinstance(num_features, (bool, np.bool_)):
        raise TypeError("num_features must be a positive integer, got a bool")
    try:
        value = operator.index(num_features)
    except TypeError:
        raise TypeError(
            f"num_features must be a positive integer, got {type(num_features).__name__}"
        ) from None
    if value < 1:
        raise ValueError(f"num_features must be a positive integer, got {value}")
    return value


def _check_eps(eps) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(
        eps, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    value = float(eps)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"eps must be a positive finite float, got {value}")
    return value


def _check_momentum(momentum) -> float | None:
    if momentum is None:
        return None
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(
        momentum, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"momentum must be a float in [0, 1] or None, got {type(momentum).__name__}"
        )
    value = float(momentum)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1] or None, got {value}")
    return value


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_axis(axis) -> int:
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis must be an integer, got a bool")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None


def _check_dtype(dtype) -> np.dtype:
    try:
        value = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if value not in _FLOAT_DTYPES:
        if value.itemsize == 2 and (value.kind == "f" or _is_bfloat16(value)):
            raise TypeError(
                f"dtype is the dtype of the parameters and running statistics and must be "
                f"float32 or float64, got {value}: 16-bit running statistics would lose the "
                f"momentum updates to rounding.  A float32 layer takes {value} data as it is "
                f"(its output keeps the data's dtype): BatchNorm(..., dtype=np.float32)")
        raise TypeError(f"dtype must be float32 or float64, got {value}")
    return value


def _is_sixteen_bit(dtype: np.dtype) -> bool:
    """float16 (native) or bfloat16 data: what every layer accepts besides its own dtype."""
    return dtype == np.float16 or _is_bfloat16(dtype)


def _channel_list(bad: np.ndarray) -> str:
    channels = np.flatnonzero(bad)
    shown = ", ".join(str(c) for c in channels[:10])
    more = f" and {channels.size - 10} more" if channels.size > 10 else ""
    return f"{shown}{more}"


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class BatchNorm:
    """Batch normalization over every axis but the channel axis, with PyTorch semantics.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (then ``max(y, 0)``
    when ``relu``), per channel.  See the module docstring for the exact
    training/eval semantics and how this differs from ``torch.nn.BatchNorm2d``.

    Parameters
    ----------
    num_features : int
        Number of channels ``C`` (the size of ``x`` along ``axis``).
    eps : float > 0
        Added to the variance for stability.
    momentum : float in [0, 1] or None
        Weight of the new batch in the running statistics; None uses a
        cumulative moving average (``1 / num_batches_tracked``).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); both None when False.
    track_running_stats : bool
        Keep ``running_mean`` (zeros), ``running_var`` (ones) and
        ``num_batches_tracked`` (0).  When False they are None and eval mode
        normalizes with batch statistics, as in PyTorch.
    axis : int
        The channel axis of the input: 1 for ``(N, C, ...)``, -1 for channels-last.
    relu : bool
        Fuse ``max(y, 0)`` into the layer (forward and backward).
    dtype : float32 or float64
        Dtype of the parameters, the running statistics and the accepted input;
        16-bit input (float16, bfloat16) is accepted too, with float32
        arithmetic, and its output keeps its format.

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
        Parameters, updated in place by the user (see :meth:`parameters`).
    grad_weight, grad_bias : ndarray (C,) or None
        Gradients from the last :meth:`backward`; zeros before the first.
        Overwritten in place by every backward call.
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : int or None
    training : bool
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, relu=False, dtype=np.float32):
        self._num_features = _check_num_features(num_features)
        self.eps = eps  # validated by the property setters
        self.momentum = momentum
        self._affine = _check_bool(affine, "affine")
        self._track_running_stats = _check_bool(track_running_stats, "track_running_stats")
        self._axis = _check_axis(axis)
        self._relu = _check_bool(relu, "relu")
        self._dtype = _check_dtype(dtype)
        self.training = True
        c, dt = self._num_features, self._dtype
        if self._affine:
            self.weight = np.ones(c, dt)
            self.bias = np.zeros(c, dt)
            self.grad_weight = np.zeros(c, dt)
            self.grad_bias = np.zeros(c, dt)
        else:
            self.weight = self.bias = self.grad_weight = self.grad_bias = None
        if self._track_running_stats:
            self.running_mean = np.zeros(c, dt)
            self.running_var = np.ones(c, dt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._ctx = None

    # -- configuration ------------------------------------------------------

    num_features = property(lambda self: self._num_features, doc="Number of channels.")
    affine = property(lambda self: self._affine, doc="Whether weight/bias exist.")
    track_running_stats = property(lambda self: self._track_running_stats,
                                   doc="Whether running statistics are kept.")
    axis = property(lambda self: self._axis, doc="The channel axis of the input.")
    relu = property(lambda self: self._relu, doc="Whether a ReLU is fused after the affine.")
    dtype = property(lambda self: self._dtype, doc="Dtype of parameters, statistics and input.")

    @property
    def eps(self) -> float:
        """Added to the variance; settable (validated), as in PyTorch."""
        return self._eps

    @eps.setter
    def eps(self, value) -> None:
        self._eps = _check_eps(value)

    @property
    def momentum(self) -> float | None:
        """Running-statistics momentum (None: cumulative average); settable (validated)."""
        return self._momentum

    @momentum.setter
    def momentum(self, value) -> None:
        self._momentum = _check_momentum(value)

    def _config(self) -> dict:
        return {
            "num_features": self._num_features,
            "eps": self._eps,
            "momentum": self._momentum,
            "affine": self._affine,
            "track_running_stats": self._track_running_stats,
            "axis": self._axis,
            "relu": self._relu,
            "dtype": self._dtype.name,
        }

    def __repr__(self) -> str:
        cfg = self._config()
        rest = ", ".join(f"{k}={cfg[k]}" for k in _CONFIG_FIELDS[1:])
        return f"{type(self).__name__}({cfg['num_features']}, {rest})"

    # -- mode ---------------------------------------------------------------

    def train(self, mode: bool = True) -> BatchNorm:
        """Set training mode (``mode=True``) or eval mode; returns self."""
        self.training = _check_bool(mode, "mode")
        return self

    def eval(self) -> BatchNorm:
        """Set eval mode (normalize with running statistics); returns self."""
        return self.train(False)

    # -- parameters and statistics -----------------------------------------

    def parameters(self) -> list:
        """``[weight, bias]`` (the arrays themselves; ``[]`` when ``affine=False``).

        Update them in place (``p -= lr * g``), paired with :meth:`gradients`.
        """
        return [self.weight, self.bias] if self._affine else []

    def gradients(self) -> list:
        """``[grad_weight, grad_bias]`` in the order of :meth:`parameters`.

        The arrays are persistent buffers overwritten in place by each
        :meth:`backward`, so a list taken once stays valid across steps.
        """
        return [self.grad_weight, self.grad_bias] if self._affine else []

    def zero_grad(self) -> None:
        """Set ``grad_weight`` and ``grad_bias`` to zero (in place)."""
        for g in self.gradients():
            g.fill(0)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (in place)."""
        if self._track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight to 1, bias to 0 (as PyTorch)."""
        self.reset_running_stats()
        if self._affine:
            self.weight.fill(1)
            self.bias.fill(0)

    # -- forward / backward --------------------------------------------------

    def _check_input(self, x) -> np.ndarray:
        if type(x) is np.ndarray and x.dtype is self._dtype and x.ndim >= 2:
            axis = self._axis
            if -x.ndim <= axis < x.ndim and x.shape[axis] == self._num_features:
                return x  # the fast path: what a training loop passes every step
        if x is None:
            raise TypeError("x must be an array, got None")
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype != self._dtype and not _is_sixteen_bit(x.dtype):
            hint = (f"; cast it with x.astype(np.{self._dtype.name}) or build the layer with "
                    f"dtype=np.{x.dtype.name}" if x.dtype in _FLOAT_DTYPES else "")
            raise TypeError(f"{self!r} expects input of dtype {self._dtype} (or 16-bit float16 "
                            f"or bfloat16 data), got {x.dtype}{hint}")
        if x.ndim < 2:
            raise ValueError(
                f"expected input with at least 2 dimensions (batch and channel), got shape "
                f"{x.shape}"
            )
        if not -x.ndim <= self._axis < x.ndim:
            raise ValueError(
                f"channel axis {self._axis} is out of range for input of shape {x.shape}"
            )
        channels = x.shape[self._axis]
        if channels != self._num_features:
            raise ValueError(
                f"expected {self._num_features} channels on axis {self._axis}, got input of "
                f"shape {x.shape} with {channels}"
            )
        return x

    def forward(self, x, residual=None) -> np.ndarray:
        """Normalize ``x`` (training or eval mode, see the class docstring); returns ``y``.

        With ``residual`` (only for ``relu=True`` layers): the fused residual
        block ``y = max(bn(x) + residual, 0)``; ``residual`` must have the
        shape and dtype of ``x``, and the next :meth:`backward` returns
        ``(dx, dresidual)``.

        ``x`` must have the layer's dtype, at least 2 dimensions and
        ``num_features`` entries along ``axis``; a non-C-contiguous ``x`` is
        copied once.  ``y`` is a new C-contiguous array of ``x``'s shape.
        In training mode (with ``track_running_stats``) the running statistics
        and ``num_batches_tracked`` are updated after the batch passed every
        check.  Raises FloatingPointError (state untouched) when batch
        statistics are NaN/Inf.
        """
        x = self._check_input(x)
        if residual is not None:
            return self._forward_residual(x, residual)
        # The functional calls copy the parameters into the context, so an
        # in-place update of self.weight/self.bias before backward() is safe.
        if not (self.training or not self._track_running_stats):
            y, ctx = batch_norm_inference(x, self.running_mean, self.running_var, self.weight,
                                          self.bias, eps=self._eps, axis=self._axis,
                                          relu=self._relu, return_context=True)
            self._ctx = ctx
            return y

        y, ctx = batch_norm_forward(x, self.weight, self.bias, eps=self._eps, axis=self._axis,
                                    relu=self._relu)
        self._keep_batch_context(ctx)
        return y

    def _keep_batch_context(self, ctx) -> None:
        """After a batch-statistics forward: update (or, without tracking, only check) the
        running statistics, then keep ``ctx`` for the backward."""
        if self.training and self._track_running_stats:
            self._update_running_stats(ctx._stats, ctx.count)
        else:
            self._check_finite_statistics(ctx.mean, ctx.var)
        self._ctx = ctx

    def _require_relu_for_residual(self) -> None:
        if not self._relu:
            raise ValueError(f"residual= needs a layer with relu=True (the fused block is "
                             f"max(bn(x) + residual, 0)); {self!r} has relu=False: add the "
                             f"residual to its output yourself")

    def _forward_residual(self, x, residual) -> np.ndarray:
        self._require_relu_for_residual()
        if not (self.training or not self._track_running_stats):
            y, ctx = batch_norm_add_relu_inference(
                x, residual, self.running_mean, self.running_var, self.weight, self.bias,
                eps=self._eps, axis=self._axis, return_context=True)
            self._ctx = ctx
            return y
        y, ctx = batch_norm_add_relu_forward(x, residual, self.weight, self.bias, eps=self._eps,
                                             axis=self._axis)
        self._keep_batch_context(ctx)
        return y

    def __call__(self, x, residual=None) -> np.ndarray:
        """Same as :meth:`forward`."""
        if residual is None:
            return self.forward(x)  # subclasses may override forward(x) alone
        return self.forward(x, residual)

    @staticmethod
    def _check_finite_statistics(mean, var) -> None:
        bad = ~(np.isfinite(mean) & np.isfinite(var))
        if bad.any():
            raise FloatingPointError(
                f"non-finite batch statistics (the batch holds NaN or Inf) in channel(s) "
                f"{_channel_list(bad)}; the layer's state was left unchanged"
            )

    def _momentum_factor(self) -> float:
        """Weight of this batch in the running statistics (before counting it)."""
        if self._momentum is None:
            return 1.0 / (self.num_batches_tracked + 1)
        return self._momentum

    def _update_running_stats(self, stats: np.ndarray, count: int) -> None:
        """PyTorch's update from batch statistics (``stats[0]`` mean, ``stats[1]`` biased
        variance, float64, over ``count`` values per channel), in one serial kernel
        that writes nothing on failure."""
        status = update_running_stats(stats, float(count), self._momentum_factor(),
                                      self.running_mean, self.running_var)
        if status == BAD_BATCH_STATS:
            self._check_finite_statistics(stats[0], stats[1])  # raises, naming the channels
        if status == OVERFLOW:  # float32 overflow of a huge variance
            with np.errstate(over="ignore"):
                unbiased = (stats[1] * (count / (count - 1))).astype(self._dtype)
            raise FloatingPointError(
                f"running statistics would overflow {self._dtype} in channel(s) "
                f"{_channel_list(~np.isfinite(unbiased))}; the layer's state was left unchanged"
            )
        self.num_batches_tracked += 1

    def backward(self, dy):
        """Gradient of the loss with respect to the last forward call's input(s).

        ``dy`` has the shape and dtype of that input.  Returns ``dx``; writes
        ``grad_weight`` (``sum(dy' * x_hat)``) and ``grad_bias`` (``sum(dy')``),
        ``dy'`` being ``dy`` masked by the fused ReLU, into their buffers,
        overwriting (not accumulating) them.  After an eval-mode forward with
        running statistics the statistics are constants: ``dx = dy' * weight /
        sqrt(running_var + eps)``.  Any number of backward calls may follow one
        forward call; each uses that forward's input and parameters.

        After a forward call with ``residual=``, returns ``(dx, dresidual)``,
        ``dresidual = where(y > 0, dy, 0)`` (``dy'`` above).
        """
        if self._ctx is None:
            raise RuntimeError("backward() called before forward(): there is nothing to "
                               "differentiate")
        if type(self._ctx) is BatchNormAddReluContext:
            dx, dresidual, dgamma, dbeta = batch_norm_add_relu_backward(dy, self._ctx)
        else:
            dx, dgamma, dbeta = batch_norm_backward(dy, self._ctx)
            dresidual = None
        if self._affine:
            self.grad_weight[...] = dgamma
            self.grad_bias[...] = dbeta
        return dx if dresidual is None else (dx, dresidual)

    # -- folding -------------------------------------------------------------

    def fold_into_linear(self, W, b=None, transposed: bool = False):
        """Fold this (eval-mode) batch norm into the affine layer before it.

        For ``z = x @ W + b`` followed by this layer in eval mode, returns
        ``(W2, b2)`` with ``x @ W2 + b2 == bn(x @ W + b)`` (up to rounding)::

            s  = weight / sqrt(running_var + eps)
            W2 = W * s                       (column c scaled by s[c])
            b2 = (b - running_mean) * s + bias

        Parameters
        ----------
        W : float array (in_features, num_features)
            NumPy layout for ``x @ W``.  With ``transposed=True``, PyTorch's
            ``nn.Linear.weight`` layout (num_features, in_features) for
            ``x @ W.T + b``; W2 is then returned in that layout too.
        b : float array (num_features,) or None
            None means no bias (zero).

        Returns
        -------
        W2, b2 : ndarray
            Computed in float64 and returned in ``W``'s dtype (float32 or
            float64).  The linear output's last axis must be this layer's
            channel axis.

        Raises
        ------
        RuntimeError
            In training mode (the layer then normalizes with batch
            statistics, which no fixed affine map reproduces) or without
            running statistics.
        ValueError
            When ``relu=True`` (a ReLU is not affine: fold into a
            ``relu=False`` layer and apply ``max(., 0)`` after the folded
            linear layer).
        """
        if self.training:
            raise RuntimeError("fold_into_linear needs eval mode (call .eval() first): in "
                               "training mode the layer uses batch statistics")
        if not self._track_running_stats:
            raise RuntimeError("fold_into_linear needs running statistics; this layer has "
                               "track_running_stats=False and always uses batch statistics")
        if self._relu:
            raise ValueError("cannot fold a layer with relu=True into a linear layer (ReLU is "
                             "not affine); fold a relu=False copy and apply the ReLU after")
        W = np.asarray(W)
        if W.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"W must have dtype float32 or float64, got {W.dtype}")
        c = self._num_features
        expected = "(num_features, in_features)" if transposed else "(in_features, num_features)"
        if W.ndim != 2 or W.shape[0 if transposed else 1] != c:
            raise ValueError(f"W must have shape {expected} with num_features={c}, "
                             f"got {W.shape}")
        if b is None:
            b64 = np.zeros(c)
        else:
            b = np.asarray(b)
            if b.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"b must have dtype float32 or float64, got {b.dtype}")
            if b.shape != (c,):
                raise ValueError(f"b must have shape ({c},), got {b.shape}")
            b64 = b.astype(np.float64)
        scale = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self._eps)
        if self._affine:
            scale = scale * self.weight.astype(np.float64)
            shift = self.bias.astype(np.float64)
        else:
            shift = 0.0
        W64 = W.astype(np.float64)
        W2 = W64 * scale[:, None] if transposed else W64 * scale
        b2 = (b64 - self.running_mean.astype(np.float64)) * scale + shift
        return W2.astype(W.dtype), b2.astype(W.dtype)

    # -- state dict ----------------------------------------------------------

    def _expected_state(self) -> dict:
        """key -> (shape, kind) for this configuration: 'f' float, 'i' integer."""
        c = (self._num_features,)
        expected = {}
        if self._affine:
            expected.update(weight=(c, "f"), bias=(c, "f"))
        if self._track_running_stats:
            expected.update(running_mean=(c, "f"), running_var=(c, "f"),
                            num_batches_tracked=((), "i"))
        return expected

    def state_dict(self) -> dict:
        """PyTorch's keys, shapes and dtypes, as copies.

        ``weight``, ``bias`` (when affine), ``running_mean``, ``running_var``
        (shape ``(C,)``, the layer dtype) and ``num_batches_tracked`` (0-d
        int64) (when tracking).
        """
        state = {}
        if self._affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self._track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy values from a :meth:`state_dict`-like mapping into the layer.

        Accepts NumPy arrays (or anything ``np.asarray`` takes, such as a CPU
        torch tensor).  Float arrays of any float dtype are cast to the layer
        dtype (as PyTorch's ``copy_``); integer, bool or complex arrays are
        rejected (TypeError).  Shapes must match exactly; all values must be
        finite, ``running_var`` non-negative and ``num_batches_tracked`` a
        non-negative integer scalar (ValueError).  With ``strict`` (default)
        missing and unexpected keys raise ValueError; with ``strict=False``
        unexpected keys are ignored and missing entries keep their values.

        Everything is validated before anything is assigned: on any error the
        layer is unchanged.  Values are copied in place, so references taken
        from :meth:`parameters` stay valid.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a dict), got {type(state).__name__}")
        expected = self._expected_state()
        keys = set(state.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(str(k) for k in keys - set(expected))
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing}")
            if unexpected:
                parts.append(f"unexpected key(s) {unexpected}")
            raise ValueError(f"state dict does not match {self!r}: " + "; ".join(parts))

        new = {}
        for key, (shape, kind) in expected.items():
            if key not in state:
                continue
            new[key] = self._check_state_value(key, state[key], shape, kind)

        for key, value in new.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                getattr(self, key)[...] = value

    def _check_state_value(self, key, value, shape, kind):
        try:
            array = np.asarray(value)
        except Exception as exc:  # e.g. a CUDA tensor, a ragged list
            raise TypeError(f"state[{key!r}] cannot be converted to an array: {exc}") from exc
        if kind == "i":
            if array.dtype.kind not in "iu":
                raise TypeError(f"state[{key!r}] must be an integer, got dtype {array.dtype}")
            if array.shape != shape:
                raise ValueError(f"state[{key!r}] must be a 0-d integer array, got shape "
                                 f"{array.shape}")
            count = int(array)
            if count < 0:
                raise ValueError(f"state[{key!r}] must be non-negative, got {count}")
            return count
        if array.dtype.kind != "f":
            raise TypeError(f"state[{key!r}] must be a float array, got dtype {array.dtype}")
        if array.shape != shape:
            raise ValueError(f"state[{key!r}] must have shape {shape} for {self!r}, got "
                             f"{array.shape}")
        with np.errstate(over="ignore"):
            cast = array.astype(self._dtype)  # a copy, so later changes to state don't leak
        if not np.all(np.isfinite(cast)):
            raise ValueError(f"state[{key!r}] holds NaN or Inf (or overflows {self._dtype})")
        if key == "running_var" and np.any(cast < 0):
            raise ValueError(f"state[{key!r}] must be non-negative")
        return cast

    # -- files -------------------------------------------------------------

    def save(self, file) -> None:
        """Write the configuration, training flag and state dict as an ``.npz`` file.

        ``file`` is a path (written exactly there -- no ``.npz`` is appended --
        through a temporary file renamed into place, so a crash never leaves
        a truncated file) or a writable binary file object.  The configuration
        is stored as a JSON string in a 0-d unicode array under ``__config__``;
        nothing is pickled.
        """
        config = dict(self._config(), format=_FORMAT, version=_FORMAT_VERSION,
                      training=self.training)
        arrays = dict(self.state_dict())
        arrays[_CONFIG_KEY] = np.array(json.dumps(config))
        if hasattr(file, "write"):
            np.savez(file, **arrays)
            return
        path = os.fspath(file)
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, file) -> BatchNorm:
        """Build a layer from a file written by :meth:`save` (path or binary file object).

        Loaded with ``allow_pickle=False``.  The layer gets the saved
        configuration, state and training flag.  A corrupt, truncated or
        mismatched file (not an npz, bad or missing ``__config__``, missing or
        unexpected arrays, wrong shapes or dtypes, non-finite values) raises
        ValueError or TypeError; a missing file raises FileNotFoundError.
        To load into an existing layer: ``bn.load_state_dict(BatchNorm.load(f).state_dict())``.
        """
        config, state = _read_npz(file)
        training = config.pop("training")
        try:
            layer = cls(**config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid configuration in {_name(file)}: {exc}") from exc
        layer.load_state_dict(state)
        layer.train(training)
        return layer


def _name(file) -> str:
    return repr(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else "file object"


def _read_npz(file):
    """(config dict with 'training', state dict of arrays) from a saved file."""
    # A damaged archive can fail in many ways: BadZipFile, zlib.error, EOFError,
    # ValueError (npy header, pickled data), OSError (a bit flip in the central
    # directory gives a bad seek), NotImplementedError / RuntimeError (zip flag
    # bits for compression methods or encryption), MemoryError (a flipped shape
    # in an npy header).  All of them mean "not a valid file"; a missing or
    # unreadable file is not corrupt and is re-raised as is.
    not_corrupt = (FileNotFoundError, PermissionError, IsADirectoryError)
    try:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy gives an array
            raise ValueError("not an .npz archive")
        with data:
            # read every member now: a truncated member fails here, not later
            arrays = {key: data[key] for key in data.files}
    except not_corrupt:
        raise
    except Exception as exc:
        raise ValueError(f"{_name(file)} is not a valid fastbn BatchNorm file "
                         f"(corrupt or truncated): {type(exc).__name__}: {exc}") from exc

    raw = arrays.pop(_CONFIG_KEY, None)
    if raw is None:
        raise ValueError(f"{_name(file)} is not a fastbn BatchNorm file: no {_CONFIG_KEY} entry")
    if raw.shape != () or raw.dtype.kind != "U":
        raise ValueError(f"{_name(file)}: {_CONFIG_KEY} must be a 0-d unicode array")
    try:
        config = json.loads(str(raw))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{_name(file)}: {_CONFIG_KEY} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{_name(file)}: {_CONFIG_KEY} must be a JSON object")
    if config.get("format") != _FORMAT:
        raise ValueError(f"{_name(file)} is not a fastbn BatchNorm file "
                         f"(format {config.get('format')!r})")
    if config.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{_name(file)}: unsupported format version {config.get('version')!r}")
    fields = set(_CONFIG_FIELDS) | {"format", "version", "training"}
    missing = sorted(fields - set(config))
    unexpected = sorted(set(config) - fields)
    if missing or unexpected:
        raise ValueError(f"{_name(file)}: bad configuration (missing {missing}, "
                         f"unexpected {unexpected})")
    if not isinstance(config["training"], bool):
        raise ValueError(f"{_name(file)}: 'training' must be a bool")
    del config["format"], config["version"]
    return config, arrays
