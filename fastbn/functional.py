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

* ``x`` is float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``,
  recognised without importing ml_dtypes) with at least 2 dimensions; outputs
  have the dtype and shape of ``x`` and are C-contiguous.  A
  non-C-contiguous ``x`` (Fortran order, negative strides, a strided view)
  is copied once.
* 16-bit data is storage only: every element is computed in float32 and
  rounded once to the data's format; statistics and parameter gradients are
  accumulated in float32 over short blocks folded into float64.  Parameters
  and statistics passed in may be float32 or float64 (float32 is the usual
  companion of 16-bit data, as PyTorch's "mixed type"); 16-bit ones are
  widened to float32 (exactly), and their gradients come back rounded to them.
* Statistics and parameter gradients are accumulated in float64 (float32
  blocks for float32 and 16-bit data, folded into float64); ``mean``, ``var``
  and ``inv_std`` are returned as float64, ``dgamma``/``dbeta`` in the dtype
  of ``gamma``/``beta``.
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

import numpy as np

from ._launch import launch
from .kernels import BAD_MEAN, BAD_VAR, N_STATS

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

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)
_SUPPORTED = (_F32, _F64)
_NO_PARAMETER = {_F32: np.empty(0, _F32), _F64: np.empty(0, _F64)}  # "None" for a kernel
_MEAN, _VAR, _INV_STD, _WEIGHT, _BIAS = range(N_STATS)

# 16-bit data reaches the kernels as zero-copy integer views (kernels/storage.py):
# the kernel dtype names the format, so views never lose what they hold.
_F16_BITS = np.dtype(np.uint16)
_BF16_BITS = np.dtype(np.int16)
#: ``ml_dtypes.bfloat16``, recorded the first time an array of it comes in (fastbn
#: never imports ml_dtypes: whoever passes bfloat16 data has it).
_bfloat16: np.dtype | None = None
_FORMAT_NAMES = {_F32: "float32", _F64: "float64", _F16_BITS: "float16", _BF16_BITS: "bfloat16"}
_SIXTEEN_BIT = (_F16_BITS, _BF16_BITS)


class _BFloat16Bits(np.ndarray):
    """The int16 bits of bfloat16 data, marked as such: how callers without ml_dtypes
    (fastbn.torch, whose bfloat16 tensors NumPy cannot hold) pass bfloat16 arrays and
    ``out=`` buffers.  Not public: a plain int16 array is never taken for bfloat16."""


def _bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """An int16 array of bfloat16 bits, marked for fastbn (no copy)."""
    return bits.view(_BFloat16Bits)


def _is_bfloat16(dtype: np.dtype) -> bool:
    if dtype is _bfloat16:  # the one seen before: ``dtype.name`` costs ~1 us per call
        return True
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def _kernel_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype the kernels see for data of ``dtype`` (None: not a data dtype)."""
    if dtype is _F32 or dtype is _F64:
        return dtype
    if dtype is _F16 or dtype == _F16:
        return _F16_BITS
    if _is_bfloat16(dtype):
        return _BF16_BITS
    if dtype in _SUPPORTED:
        return dtype.newbyteorder("=")
    return None


def _kernel_view(a: np.ndarray) -> np.ndarray:
    """``a`` as the kernels see it: 16-bit floats as their integer bits (no copy)."""
    global _bfloat16
    dtype = a.dtype
    if dtype is _F32 or dtype is _F64:
        return a
    if dtype is _F16 or dtype == _F16:
        return a.view(_F16_BITS)
    if _is_bfloat16(dtype):
        _bfloat16 = dtype
        return a.view(_BF16_BITS)
    return a


def _public_dtype(kernel_dtype: np.dtype) -> np.dtype:
    """The data dtype users see for arrays the kernels see as ``kernel_dtype``."""
    if kernel_dtype is _F16_BITS:
        return _F16
    if kernel_dtype is _BF16_BITS:  # identity first: a dtype ``==`` costs ~0.3 us
        return _bfloat16 if _bfloat16 is not None else kernel_dtype
    if kernel_dtype == _F16_BITS:
        return _F16
    if kernel_dtype == _BF16_BITS:
        return _bfloat16 if _bfloat16 is not None else kernel_dtype
    return kernel_dtype


def _public(a: np.ndarray, out=None) -> np.ndarray:
    """A kernel-view output as the user's dtype (no copy): ``out`` itself when given."""
    if out is not None:
        return out
    dtype = a.dtype
    if dtype is _F32 or dtype is _F64:
        return a
    public = _public_dtype(dtype)
    return a if public is dtype else a.view(public)


def _compute_dtype(kernel_dtype: np.dtype) -> np.dtype:
    """Per-channel arrays the kernels take uncopied for this data: float32 for 16-bit."""
    return _F64 if kernel_dtype is _F64 or kernel_dtype == _F64 else _F32


class BatchNormContext:
    """What the backward functions need from a forward call (read-only).

    ``x`` is held by reference, not copied: do not modify it in place between
    the forward and the backward call.  The statistics and a float64 copy of
    the parameters live in one ``(5, C)`` float64 array.

    Attributes
    ----------
    mean, var, inv_std : float64 arrays of shape (C,)
        Statistics used to normalize (``var`` is biased; ``inv_std`` includes eps).
    weight, bias : float64 arrays of shape (C,)
        The parameters as they were at the forward call (1 and 0 without affine).
    count : int
        Values per channel of the batch the statistics describe, ``N``.
    batch_stats : bool
        True for a training forward (statistics depend on the batch), False
        for an inference forward (statistics are constants).
    shape, dtype, axis, relu
        Of the forward call's input and options.
    """

    __slots__ = ("_x_view", "_shape", "_axis", "_stats", "_gamma_dtype", "_beta_dtype",
                 "_relu", "_batch_stats", "_count")

    def __init__(self, x_view, shape, axis, stats, gamma_dtype, beta_dtype, relu, batch_stats,
                 count):
        self._x_view = x_view
        self._shape = shape
        self._axis = axis
        self._stats = stats
        self._gamma_dtype = gamma_dtype
        self._beta_dtype = beta_dtype
        self._relu = relu
        self._batch_stats = batch_stats
        self._count = count

    x_view = property(lambda self: self._x_view, doc="The (outer, C[, inner]) view of x.")
    shape = property(lambda self: self._shape, doc="Shape of x.")
    axis = property(lambda self: self._axis, doc="The channel axis (non-negative).")
    relu = property(lambda self: self._relu, doc="Whether a ReLU was fused.")
    batch_stats = property(lambda self: self._batch_stats,
                           doc="True after a training forward (statistics of the batch).")
    count = property(lambda self: self._count, doc="Values per channel, N.")
    gamma_dtype = property(lambda self: self._gamma_dtype, doc="dtype of gamma, or None.")
    beta_dtype = property(lambda self: self._beta_dtype, doc="dtype of beta, or None.")
    mean = property(lambda self: self._stats[_MEAN], doc="float64 (C,) mean used.")
    var = property(lambda self: self._stats[_VAR], doc="float64 (C,) biased variance used.")
    inv_std = property(lambda self: self._stats[_INV_STD], doc="float64 (C,) 1/sqrt(var+eps).")
    weight = property(lambda self: self._stats[_WEIGHT], doc="float64 (C,) gamma used.")
    bias = property(lambda self: self._stats[_BIAS], doc="float64 (C,) beta used.")

    @property
    def dtype(self) -> np.dtype:
        """dtype of x (float16/bfloat16 data is held as its integer bits)."""
        return _public_dtype(self._x_view.dtype)

    def __repr__(self) -> str:
        kind = "training" if self._batch_stats else "inference"
        return (f"BatchNormContext({kind}, shape={self._shape}, axis={self._axis}, "
                f"dtype={self.dtype}, count={self._count}, relu={self._relu})")


# ---------------------------------------------------------------------------
# Validation helpers.  The common case (a C-contiguous native float32/float64
# ndarray, per-channel arrays of the data's dtype) takes a few attribute
# reads; everything else goes through the full checks and conversions.
# ---------------------------------------------------------------------------


def _check_float_dtype(dtype: np.dtype, name: str) -> None:
    """Accept float32/float64 in either byte order (callers convert to native)."""
    if dtype.newbyteorder("=") in _SUPPORTED:
        return
    raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")


def _check_data_dtype(dtype: np.dtype, name: str) -> None:
    """Data may also be 16-bit: float16 (either byte order) or bfloat16."""
    if dtype is _F16 or dtype is _F32 or dtype is _F64:
        return
    if dtype.kind == "f" and dtype.newbyteorder("=") in (_F32, _F64, _F16):
        return
    if _is_bfloat16(dtype):
        return
    raise TypeError(f"{name} must have dtype float32, float64, float16 or bfloat16, got {dtype}")


class _ReadOnlyAlias:
    """Exposes a read-only array's memory to NumPy as writeable (it keeps the array alive).

    Numba types a read-only array as a different type and compiles every
    kernel again for it; the kernels never write their inputs, so a read-only
    input is passed through a writeable alias instead: no second compilation,
    and the very same machine code (hence the same bits) as a writeable input.
    """

    __slots__ = ("base", "__array_interface__")

    def __init__(self, base: np.ndarray):
        self.base = base
        interface = dict(base.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def _as_data(x, name: str) -> np.ndarray:
    """Validate a data array (x or dy); return it as the kernels see it.

    That is a native-endian, C-contiguous ndarray, 16-bit floats viewed as
    their integer bits (:func:`_kernel_view`).  Array subclasses are viewed as
    plain ndarrays (outputs are plain ndarrays), except masked arrays, whose
    mask batch norm cannot honour.  A read-only array comes back as a
    writeable alias of the same memory (see :class:`_ReadOnlyAlias`); fastbn
    never writes to its inputs.
    """
    if type(x) is np.ndarray:
        dtype = x.dtype
        if (dtype is _F32 or dtype is _F64) and x.ndim >= 2 and x.size:
            flags = x.flags
            if flags.c_contiguous and flags.writeable:
                return x  # the fast path
    elif type(x) is _BFloat16Bits:
        x = x.view(np.ndarray)  # int16: already the kernels' view of bfloat16
        if x.dtype != _BF16_BITS or x.ndim < 2 or x.size == 0 or not x.flags.c_contiguous:
            raise ValueError(f"{name}: marked bfloat16 bits must be a C-contiguous int16 "
                             f"array of ndim >= 2, got {x.dtype} {x.shape}")
        return x if x.flags.writeable else np.asarray(_ReadOnlyAlias(x))
    elif x is None:
        raise TypeError(f"{name} must be an array, got None")
    elif isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; fastbn ignores no values: pass "
                        f"{name}.filled(...) or the unmasked values")
    else:
        x = np.asarray(x)
    _check_data_dtype(x.dtype, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (batch and channel), got shape {x.shape}"
        )
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); batch norm needs at least one value")
    if not x.dtype.isnative:
        return _kernel_view(x.astype(x.dtype.newbyteorder("="), order="C"))
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    x = _kernel_view(x)
    if not x.flags.writeable:
        x = np.asarray(_ReadOnlyAlias(x))
    return x


def _normalize_axis(axis, ndim: int) -> int:
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim  # the fast path
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(axis, ndim, "axis (the channel axis)")
    return axis % ndim


def _check_eps(eps) -> float:
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps  # the fast path
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {eps}")
    return eps


def _channel_array(values, name: str, n_channels: int):
    """A per-channel array as given (validated), or None when it is None.

    float32 and float64 are taken as they are; float16 and bfloat16 (parameters
    or statistics kept in 16 bits) are widened to float32, which holds them exactly.
    """
    if values is None:
        return None
    if type(values) is not np.ndarray:
        values = np.asarray(values)
    dtype = values.dtype
    if not (dtype is _F32 or dtype is _F64):
        if dtype == _F16 or _is_bfloat16(dtype):
            values = values.astype(_F32)
        else:
            _check_float_dtype(dtype, name)
    if values.shape != (n_channels,):
        raise ValueError(
            f"{name} must have shape ({n_channels},) to match the {n_channels} channels of x, "
            f"got shape {values.shape}"
        )
    return values


def _given_dtype(values) -> np.dtype | None:
    """The dtype of a per-channel argument as the caller gave it (gradients come back
    in it), before any widening; None for None."""
    if values is None:
        return None
    return values.dtype if isinstance(values, np.ndarray) else np.asarray(values).dtype


def _kernel_arrays(like: np.dtype, *arrays):
    """Per-channel arrays in one dtype the kernels are compiled for.

    The data's dtype when every array already has it, is native, contiguous
    and writeable (no copy: the kernel copies them into the float64
    workspace); float64 copies otherwise -- so each data dtype compiles at
    most two signatures.  None becomes a length-0 array (no affine).
    """
    ready = all(a is None or (a.dtype is like and a.flags.c_contiguous and a.flags.writeable)
                for a in arrays)
    if ready:
        return [_NO_PARAMETER[like] if a is None else a for a in arrays]
    # (also when ``like`` is float64: a big-endian or strided float64 array is copied)
    return [_NO_PARAMETER[_F64] if a is None else np.array(a, dtype=_F64) for a in arrays]


def _is_kernel_ready(a, like: np.dtype, n_channels: int) -> bool:
    """True for a per-channel array the kernels take as is (the common case, checked fast)."""
    return (type(a) is np.ndarray and a.dtype is like and a.ndim == 1
            and a.shape[0] == n_channels and a.flags.c_contiguous and a.flags.writeable)


def _parameters(gamma, beta, n_channels: int, like: np.dtype):
    """(weight, bias) for the kernels and the (gamma, beta) dtypes (None when absent).

    ``like`` is the compute dtype (:func:`_compute_dtype`): parameters already
    in it are passed uncopied.
    """
    if _is_kernel_ready(gamma, like, n_channels) and _is_kernel_ready(beta, like, n_channels):
        return gamma, beta, like, like
    gamma_dtype, beta_dtype = _given_dtype(gamma), _given_dtype(beta)
    gamma = _channel_array(gamma, "gamma", n_channels)
    beta = _channel_array(beta, "beta", n_channels)
    weight, bias = _kernel_arrays(like, gamma, beta)
    return weight, bias, gamma_dtype, beta_dtype


def _check_out(out, name: str, shape: tuple, dtype: np.dtype, *inputs) -> np.ndarray:
    """A validated ``out=`` buffer for data of kernel dtype ``dtype``, as the kernels see it."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    marked = type(out) is _BFloat16Bits
    if marked:
        out = out.view(np.ndarray)
        if dtype != _BF16_BITS or out.dtype != _BF16_BITS:
            raise TypeError(f"{name} must have dtype {_FORMAT_NAMES[dtype]}, got bfloat16")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if not (marked or _kernel_dtype(out.dtype) == dtype) or not out.dtype.isnative:
        raise TypeError(f"{name} must have dtype {_FORMAT_NAMES[dtype]}, got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for array in inputs:
        if np.may_share_memory(out, array):
            raise ValueError(f"{name} overlaps an input array; pass a separate buffer")
    return _kernel_view(out)


def _layout(x: np.ndarray, axis: int):
    """The (outer, C) or (outer, C, inner) view of a C-contiguous x, and whether it is rows."""
    shape = x.shape
    if x.ndim == 2 and axis == 1:  # (N, C): already the rows view
        return x, True
    n_channels = shape[axis]
    if axis == x.ndim - 1:  # channels-last: rows
        return x.reshape(x.size // n_channels, n_channels), True
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    if inner == 1:
        return x.reshape(outer, n_channels), True
    return x.reshape(outer, n_channels, inner), False


def _check_training_count(x: np.ndarray, n_channels: int) -> None:
    if x.size // n_channels < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )


def _raise_bad_statistics(status: int, mean_name: str, var_name: str) -> None:
    if status == BAD_MEAN:
        raise ValueError(f"{mean_name} must be finite (it holds NaN or Inf)")
    if status == BAD_VAR:
        raise ValueError(f"{var_name} must be non-negative and finite (it holds a negative "
                         f"value, NaN or Inf)")


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
    moments = np.empty((2, n_channels))
    launch("moments_rows" if rows else "moments_planes", x.size, view, moments[0], moments[1])
    return moments[0], moments[1]


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
    like = x.dtype if x.dtype is _F32 or x.dtype is _F64 else _compute_dtype(x.dtype)
    weight, bias, gamma_dtype, beta_dtype = _parameters(gamma, beta, n_channels, like)
    count = x.size // n_channels
    if count < 2:
        _check_training_count(x, n_channels)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given))
    view, rows = _layout(x, axis)
    stats = np.empty((N_STATS, n_channels))
    relu = relu is True or bool(relu)
    launch("train_forward_rows" if rows else "train_forward_planes", x.size,
           view, weight, bias, eps, relu, y if view is x else y.reshape(view.shape), stats)
    return _public(y, out), BatchNormContext(view, x.shape, axis, stats, gamma_dtype, beta_dtype,
                                        relu, True, count)


def _normalize_with(x, mean, var, gamma, beta, eps, axis, relu, out, mean_name, var_name):
    """Shared body of the functions that normalize with given statistics."""
    x_given = x
    x = _as_data(x, "x")
    axis = _normalize_axis(axis, x.ndim)
    n_channels = x.shape[axis]
    eps = _check_eps(eps)
    if mean is None or var is None:
        raise TypeError(f"{mean_name if mean is None else var_name} must be an array of shape "
                        f"({n_channels},), got None")
    like = x.dtype if x.dtype is _F32 or x.dtype is _F64 else _compute_dtype(x.dtype)
    if (_is_kernel_ready(mean, like, n_channels) and _is_kernel_ready(var, like, n_channels)
            and _is_kernel_ready(gamma, like, n_channels)
            and _is_kernel_ready(beta, like, n_channels)):
        weight, bias, gamma_dtype, beta_dtype = gamma, beta, like, like  # the fast path
    else:
        gamma_dtype, beta_dtype = _given_dtype(gamma), _given_dtype(beta)
        mean = _channel_array(mean, mean_name, n_channels)
        var = _channel_array(var, var_name, n_channels)
        gamma = _channel_array(gamma, "gamma", n_channels)
        beta = _channel_array(beta, "beta", n_channels)
        mean, var, weight, bias = _kernel_arrays(like, mean, var, gamma, beta)
    y = (np.empty(x.shape, x.dtype) if out is None
         else _check_out(out, "out", x.shape, x.dtype, x, x_given))
    view, rows = _layout(x, axis)
    stats = np.empty((N_STATS, n_channels))
    relu = relu is True or bool(relu)
    status = launch("normalize_rows" if rows else "normalize_planes", x.size,
                    view, mean, var, weight, bias, eps, relu,
                    y if view is x else y.reshape(view.shape), stats)
    _raise_bad_statistics(status, mean_name, var_name)
    return _public(y, out), view, axis, stats, gamma_dtype, beta_dtype, relu


def batch_norm_inference(x, running_mean, running_var, gamma=None, beta=None,
                         eps: float = 1e-5, axis: int = 1, relu: bool = False, out=None,
                         return_context: bool = False):
    """Inference-mode batch normalization with fixed statistics (one sweep).

    ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`` (then
    ReLU if ``relu``).  ``running_mean`` must be finite and ``running_var``
    finite and non-negative (ValueError otherwise, before anything is
    written).  With ``return_context=True`` returns ``(y, ctx)``;
    :func:`batch_norm_backward` then treats the statistics as constants
    (``dx = dy' * gamma * inv_std``).  Any number of values per channel,
    including 1, is accepted.
    """
    y, view, axis, stats, gamma_dtype, beta_dtype, relu = _normalize_with(
        x, running_mean, running_var, gamma, beta, eps, axis, relu, out,
        "running_mean", "running_var")
    if not return_context:
        return y
    return y, BatchNormContext(view, y.shape, axis, stats, gamma_dtype, beta_dtype, relu, False,
                               view.size // stats.shape[1])


def _check_backward_args(dy, ctx):
    if type(ctx) is not BatchNormContext:
        raise TypeError(
            f"ctx must be the BatchNormContext returned by a forward call, "
            f"got {type(ctx).__name__}"
        )
    dy = _as_data(dy, "dy")
    if dy.shape != ctx._shape:
        raise ValueError(f"dy must have the shape of x, {ctx._shape}, got {dy.shape}")
    if dy.dtype is not ctx._x_view.dtype and dy.dtype != ctx._x_view.dtype:
        raise TypeError(f"dy must have the dtype of x, {_FORMAT_NAMES[ctx._x_view.dtype]}, "
                        f"got {_FORMAT_NAMES[dy.dtype]}")
    return dy


def _grads_buffer(ctx, n_channels):
    """(2, C) buffer for (dgamma, dbeta) in the parameters' common dtype."""
    gamma_dtype, beta_dtype = ctx._gamma_dtype, ctx._beta_dtype
    dtype = gamma_dtype or beta_dtype or _F64
    if beta_dtype is not None and beta_dtype is not dtype and beta_dtype != dtype:
        dtype = _F64  # mixed parameter dtypes: convert each at the end
    if dtype is not _F32 and dtype is not _F64 and dtype not in _SUPPORTED:
        dtype = _F64  # 16-bit parameters: rounded once, at the end
    return np.empty((2, n_channels), dtype)


def _split_grads(ctx, grads):
    dgamma = dbeta = None
    if ctx._gamma_dtype is not None:
        dgamma = grads[0]
        if dgamma.dtype != ctx._gamma_dtype:
            dgamma = dgamma.astype(ctx._gamma_dtype)
    if ctx._beta_dtype is not None:
        dbeta = grads[1]
        if dbeta.dtype != ctx._beta_dtype:
            dbeta = dbeta.astype(ctx._beta_dtype)
    return dgamma, dbeta


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
    dy_given = dy
    dy = _check_backward_args(dy, ctx)
    view = ctx._x_view
    dx = (np.empty(ctx._shape, view.dtype) if out is None
          else _check_out(out, "out", ctx._shape, view.dtype, view, dy, dy_given))
    stats = ctx._stats
    grads = _grads_buffer(ctx, stats.shape[1])
    if ctx._count != view.size // stats.shape[1]:
        raise ValueError("ctx describes part of a larger batch (batch_norm_normalize): use "
                         "batch_norm_backward_reduce and batch_norm_backward_apply")
    if dy.shape != view.shape:
        dy = dy.reshape(view.shape)
        dx_view = dx.reshape(view.shape)
    else:
        dx_view = dx
    launch("backward_rows" if view.ndim == 2 else "backward_planes", view.size,
           view, dy, stats, ctx._relu, ctx._batch_stats, dx_view, grads)
    dgamma, dbeta = _split_grads(ctx, grads)
    return _public(dx, out), dgamma, dbeta


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
    x_data = _as_data(x, "x")
    n_channels = x_data.shape[_normalize_axis(axis, x_data.ndim)]
    count = _check_count(count, x_data.size // n_channels)
    y, view, axis, stats, gamma_dtype, beta_dtype, relu = _normalize_with(
        x, mean, var, gamma, beta, eps, axis, relu, out, "mean", "var")
    return y, BatchNormContext(view, y.shape, axis, stats, gamma_dtype, beta_dtype, relu, True,
                               count)


def batch_norm_backward_reduce(dy, ctx: BatchNormContext):
    """This part's ``(sum_dy, sum_dy_xc)``: ``sum(dy')`` and ``sum(dy' * (x - mean))``.

    float64 arrays of shape (C,), one sweep over ``x`` and ``dy`` (``dy'`` is
    ``dy`` masked by the fused ReLU).  Summed over every part of the batch,
    they give :func:`batch_norm_backward_apply` what it needs; this part's
    parameter gradients are ``dgamma = ctx.inv_std * sum_dy_xc`` and
    ``dbeta = sum_dy``.
    """
    dy = _check_backward_args(dy, ctx)
    view = ctx._x_view
    sums = np.empty((2, ctx._stats.shape[1]))
    launch("backward_reduce_rows" if view.ndim == 2 else "backward_reduce_planes", view.size,
           view, dy.reshape(view.shape), ctx._stats, ctx._relu, sums)
    return sums[0], sums[1]


def batch_norm_backward_apply(dy, ctx: BatchNormContext, sum_dy, sum_dy_xc, out=None):
    """``dx`` from the sums over the whole batch (see :func:`batch_norm_backward_reduce`).

    ``dx = weight*inv_std * (dy' - sum_dy/N - x_hat * inv_std*sum_dy_xc/N)`` with
    ``N = ctx.count``; one sweep.  Returns ``dx`` (shape and dtype of ``x``).
    """
    dy_given = dy
    dy = _check_backward_args(dy, ctx)
    view = ctx._x_view
    n_channels = ctx._stats.shape[1]
    sums = np.empty((2, n_channels))
    sums[0] = _channel_array(sum_dy, "sum_dy", n_channels)
    sums[1] = _channel_array(sum_dy_xc, "sum_dy_xc", n_channels)
    dx = (np.empty(ctx._shape, view.dtype) if out is None
          else _check_out(out, "out", ctx._shape, view.dtype, view, dy, dy_given))
    launch("backward_apply_rows" if view.ndim == 2 else "backward_apply_planes", view.size,
           view, dy.reshape(view.shape), ctx._stats, ctx._relu, ctx._batch_stats,
           np.float64(ctx._count), sums, dx.reshape(view.shape), np.empty((2, n_channels)))
    return _public(dx, out)
