"""Synchronized batch norm: statistics of the *global* batch, split over processes.

In data-parallel training each process holds a slice of the batch; batch norm
must still normalize with the statistics of the whole batch.  This module
does that on the CPU over MPI (mpi4py), and its core is engine-free: it talks
to a communicator through one method, ``allreduce_sum(float64 array) ->
float64 array`` (:class:`Communicator`), so ``fastbn.torch`` plugs
``torch.distributed`` (gloo) into the same code.

    from mpi4py import MPI
    from fastbn.distributed import SyncBatchNorm
    bn = SyncBatchNorm(64, comm=MPI.COMM_WORLD)   # BatchNorm's arguments, plus comm
    y = bn(x_local)                               # normalized with the global statistics
    dx_local = bn.backward(dy_local)

Combine: exact, three allreduces per training forward, one per backward
-------------------------------------------------------------------------
Every rank computes its local ``(n_i, mean_i, M2_i)`` with fastbn's one-sweep
statistics kernel (float64, pivot-shifted, so float32 data far from zero keeps
its digits).  Then:

1. a fixed-size *header* (``HEADER`` float64 values, independent of C): the
   rank count, a configuration fingerprint and its square (num_features,
   dtype, axis, relu, eps, ...), ``n_i``, and an error flag.  Because its size
   does not depend on C, ranks that disagree on the configuration still meet
   in this collective, see the disagreement (sum of squares != rank count x
   square of the mean) and all raise -- nobody is left waiting in a
   collective of another size.  The global count ``N = sum n_i`` also comes
   from here, so a global batch of one value per channel raises everywhere.
2. ``sum n_i * mean_i`` (C values) gives the global mean ``mu``;
3. ``sum M2_i + n_i * (mean_i - mu)**2`` (C values) gives ``M2``, hence the
   biased variance ``M2 / N``.

This is Chan et al.'s parallel combination taken around the global mean: no
cancellation (never ``E[x^2] - E[x]^2``), no second sweep over the data, and
it is exact to float64 rounding (variance relative error ~1e-15 against a
float64 two-pass on the global batch, for float32 data with mean 1e4, std 1).
Bytes per rank per training forward: ``8 * (HEADER + 2 C)``, independent of
the number of ranks (no allgather of every rank's statistics).  The backward
is one allreduce of ``[error flag, sum dy', sum dy' * (x - mu)]``:
``8 * (2 C + 1)`` bytes.  Decisions that depend on global values (NaN/Inf in
any rank's batch, a global batch of one) are taken after the collectives, on
identical numbers, so every rank raises the same exception and every rank's
state stays unchanged.

What is synchronized and what is not
------------------------------------
* Training forward: mean and variance over the global batch; running
  statistics are then updated identically on every rank (bitwise equal), with
  the unbiased variance over the global count.
* Backward: dx uses the global sums.  **Parameter gradients stay local**:
  ``grad_weight`` and ``grad_bias`` are this rank's contribution; sum (or
  average) them across ranks together with every other gradient of the
  model, as a data-parallel step does anyway (``examples/data_parallel.py``).
* Eval mode with running statistics: no communication at all.
* An empty local batch (shape ``(0, C, ...)``) is valid in every mode: the rank
  joins every collective, contributes nothing and gets an empty output.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .functional import (
    BatchNormContext,
    _as_data,
    _normalize_axis,
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_norm_normalize,
    batch_stats,
)
from .layer import BatchNorm
from .residual import _as_residual, batch_norm_add_relu_inference

__all__ = ["Communicator", "MPICommunicator", "SyncBatchNorm", "as_communicator",
           "global_moments", "sync_backward", "sync_batch_stats", "sync_forward",
           "RemoteRankError"]

#: Fingerprint entries exchanged in the header (padded with zeros).
FINGERPRINT_SIZE = 8
#: Header layout: [1 (rank count), fingerprint (8), fingerprint**2 (8), n_i, error flag].
HEADER = 2 + 2 * FINGERPRINT_SIZE + 1


class RemoteRankError(RuntimeError):
    """Raised on every rank that was fine when another rank failed in the same call."""


@runtime_checkable
class Communicator(Protocol):
    """What synchronized batch norm needs from a process group: one collective."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of a 1-D float64 array over all ranks (same length everywhere)."""
        ...


class MPICommunicator:
    """:class:`Communicator` over an mpi4py communicator (buffer ``Allreduce``, no pickling)."""

    def __init__(self, comm=None):
        if comm is None:
            comm = _mpi().COMM_WORLD
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        send = np.ascontiguousarray(values, dtype=np.float64)
        result = np.empty_like(send)
        self.comm.Allreduce(send, result, op=_mpi().SUM)
        return result

    def __repr__(self) -> str:
        return f"MPICommunicator(rank {self.rank} of {self.size})"


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - exercised without mpi4py
        raise ImportError(
            "synchronized batch norm over MPI needs mpi4py: pip install 'fastbn[mpi]' "
            "(mpi4py and the mpich wheel), or pass comm= an object with "
            "allreduce_sum(float64 array)"
        ) from exc
    return MPI


def as_communicator(comm) -> Communicator:
    """``comm`` itself when it has ``allreduce_sum``; else an mpi4py communicator (None:
    ``MPI.COMM_WORLD``), wrapped in :class:`MPICommunicator`."""
    if comm is not None and callable(getattr(comm, "allreduce_sum", None)):
        return comm
    return MPICommunicator(comm)


# ---------------------------------------------------------------------------
# The engine-free core
# ---------------------------------------------------------------------------


def _fingerprint(values) -> np.ndarray:
    fingerprint = np.zeros(FINGERPRINT_SIZE)
    fingerprint[:len(values)] = values
    return fingerprint


def _exchange_header(communicator, fingerprint, local_count: int, error: BaseException | None):
    """The fixed-size first collective; returns the global count.  Raises on every rank
    when any rank failed or the ranks' configurations differ."""
    fingerprint = _fingerprint(fingerprint)
    header = np.concatenate([[1.0], fingerprint, fingerprint * fingerprint,
                             [float(local_count), 1.0 if error is not None else 0.0]])
    total = communicator.allreduce_sum(header)
    ranks = total[0]
    sums = total[1:1 + FINGERPRINT_SIZE]
    squares = total[1 + FINGERPRINT_SIZE:1 + 2 * FINGERPRINT_SIZE]
    if error is not None:
        raise error
    if total[-1] > 0:
        raise RemoteRankError(f"{int(total[-1])} other rank(s) failed in this synchronized "
                              "batch norm call; this rank's state is unchanged")
    if np.any(np.abs(squares * ranks - sums * sums) > 1e-9 * (1 + sums * sums)):
        raise ValueError(
            "synchronized batch norm: the ranks disagree on the layer configuration "
            "(num_features, dtype, axis, relu, eps, momentum or input rank); every rank must "
            f"build the same layer (this rank: {fingerprint[:6].tolist()})"
        )
    return int(round(total[-2]))


def global_moments(x, axis: int, communicator, fingerprint=(), error=None):
    """Global ``(mean, var, count)`` of the local slices ``x`` (float64, biased var).

    Three allreduces (header, sum of n_i*mean_i, sum of M2 around the global
    mean; see the module docstring).  ``x`` may be empty.  ``error`` is a
    local exception to raise after telling the other ranks (they raise
    :class:`RemoteRankError`).  A global batch with one value per channel
    raises ValueError on every rank.
    """
    n_channels = x.shape[axis] if error is None else int(fingerprint[0])
    local = 0 if error is not None else x.size // max(n_channels, 1)
    count = _exchange_header(communicator, fingerprint, local, error)
    if count < 2:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got a global batch of "
            f"{count} value(s) per channel"
        )
    if local:
        local_mean, local_var = batch_stats(x, axis)
    else:
        local_mean, local_var = np.zeros(n_channels), np.zeros(n_channels)
    mean = communicator.allreduce_sum(local * local_mean) / count
    deviation = local_mean - mean
    m2 = communicator.allreduce_sum(local * local_var + local * deviation * deviation)
    return mean, np.maximum(m2 / count, 0.0), count  # maximum keeps NaN


class _EmptyContext:
    """The backward context of a rank whose local batch is empty.

    ``collective``: whether its backward joins the collective (after a
    training forward) or is purely local (after an eval-mode forward).
    """

    def __init__(self, shape, n_channels, collective=True):
        self.shape = shape
        self.n_channels = n_channels
        self.collective = collective


def sync_forward(x, weight, bias, eps: float, axis: int, relu: bool, communicator,
                 fingerprint=(), error=None):
    """Training-mode forward over the global batch: ``(y, ctx, mean, var, count)``.

    ``ctx`` goes to :func:`sync_backward`.  Every rank gets the same float64
    ``mean``, biased ``var`` and global ``count``.  NaN/Inf anywhere in the
    global batch raises FloatingPointError on every rank before any output
    is made.
    """
    mean, var, count = global_moments(x, axis, communicator, fingerprint, error)
    bad = ~(np.isfinite(mean) & np.isfinite(var))
    if bad.any():
        channels = np.flatnonzero(bad)
        raise FloatingPointError(
            f"non-finite global batch statistics (some rank's batch holds NaN or Inf) in "
            f"channel(s) {', '.join(map(str, channels[:10]))}"
            f"{' and more' if channels.size > 10 else ''}; every rank's state was left unchanged"
        )
    if x.size == 0:
        return np.empty(x.shape, x.dtype), _EmptyContext(x.shape, mean.shape[0]), mean, var, count
    y, ctx = batch_norm_normalize(x, mean, var, count, weight, bias, eps=eps, axis=axis,
                                  relu=relu)
    return y, ctx, mean, var, count


def sync_backward(dy, ctx, communicator, error=None):
    """``(dx, local_sum_dy, local_sum_dy_xc)``: dx from the global sums (one allreduce).

    This rank's parameter gradients are ``dgamma = ctx.inv_std * local_sum_dy_xc``
    and ``dbeta = local_sum_dy`` (zero on an empty rank).
    """
    n_channels = ctx.n_channels if isinstance(ctx, _EmptyContext) else ctx.mean.shape[0]
    local_sums = np.zeros((2, n_channels))
    if error is None:
        try:
            if isinstance(ctx, _EmptyContext):
                dy = np.asarray(dy)
                if dy.shape != ctx.shape:
                    raise ValueError(f"dy must have the shape of x, {ctx.shape}, got {dy.shape}")
            else:
                local_sums[0], local_sums[1] = batch_norm_backward_reduce(dy, ctx)
        except Exception as exc:  # tell the others before raising
            error = exc
    message = np.concatenate([[1.0 if error is not None else 0.0], local_sums.ravel()])
    total = communicator.allreduce_sum(message)
    if error is not None:
        raise error
    if total[0] > 0:
        raise RemoteRankError(f"{int(total[0])} other rank(s) failed in this synchronized "
                              "batch norm backward; this rank's state is unchanged")
    global_sums = total[1:].reshape(2, n_channels)
    if isinstance(ctx, _EmptyContext):
        dx = np.empty(ctx.shape, np.asarray(dy).dtype)
    else:
        dx = batch_norm_backward_apply(dy, ctx, global_sums[0], global_sums[1])
    return dx, local_sums[0], local_sums[1]


def sync_batch_stats(x_local, comm=None, axis: int = 1):
    """Global ``(mean, var, count)`` over every rank's ``x_local``: float64, biased variance.

    ``comm``: an mpi4py communicator (None: ``MPI.COMM_WORLD``) or any object
    with ``allreduce_sum``.  Every rank must call it.  ``x_local`` may be empty.
    """
    communicator = as_communicator(comm)
    x_local = np.asarray(x_local)
    axis = _normalize_axis(axis, x_local.ndim)
    fingerprint = (x_local.shape[axis], x_local.ndim, axis)
    mean, var, count = global_moments(x_local, axis, communicator, fingerprint)
    return mean, var, count


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """:class:`fastbn.BatchNorm` whose training statistics are those of the global batch.

    Same arguments as :class:`~fastbn.BatchNorm`, plus ``comm``: an mpi4py
    communicator (default ``MPI.COMM_WORLD``, imported when first needed) or
    any object with ``allreduce_sum(float64 array)``.  Every rank of the
    communicator must make the same calls in the same order (forward and
    backward are collective in training mode; eval mode with running
    statistics is local).  ``grad_weight``/``grad_bias`` hold this rank's
    contribution: sum them across ranks with the other gradients.  See the
    module docstring for the combine, its cost and its failure behaviour.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, relu=False, dtype=np.float32, comm=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, relu=relu,
                         dtype=dtype)
        self._comm = comm
        self._communicator = None
        self._sync_ctx = None
        self._residual_y = None  # after a training forward with residual=: its output

    @property
    def communicator(self) -> Communicator:
        """The :class:`Communicator` in use (created on first use)."""
        if self._communicator is None:
            self._communicator = as_communicator(self._comm)
        return self._communicator

    def _fingerprint(self, ndim: int) -> tuple:
        momentum = -1.0 if self._momentum is None else self._momentum
        return (self._num_features, self._dtype.itemsize, self._axis % max(ndim, 1), ndim,
                float(self._relu), self._eps * 1e5, momentum, float(self._affine))

    def forward(self, x, residual=None) -> np.ndarray:
        """Normalize the local slice ``x`` (see :meth:`fastbn.BatchNorm.forward`).

        Training mode (or ``track_running_stats=False``): collective, global
        statistics.  Eval mode with running statistics: local, no communication.

        ``residual`` (``relu=True`` layers): ``y = max(bn(x) + residual, 0)``
        with the global statistics, and :meth:`backward` returns ``(dx,
        dresidual)``.  In training mode this is not one fused kernel: the
        global normalize is followed by the block's inference sweep with the
        same statistics (one more read of ``x``; the same bits as the fused
        kernel in float32/float64, one rounding in 16-bit), and the backward
        masks ``dy`` with ``y > 0`` before the collective backward.
        """
        if not (self.training or not self._track_running_stats):
            x = self._check_input(x)
            self._sync_ctx = None
            if x.size == 0:
                if residual is not None:
                    self._check_residual(x, residual)
                self._ctx = None
                self._sync_ctx = _EmptyContext(x.shape, self._num_features, collective=False)
                y = np.empty(x.shape, x.dtype)
                self._residual_y = y if residual is not None else None
                return y
            y = super().forward(x) if residual is None else super().forward(x, residual)
            self._residual_y = None  # the backward is BatchNorm's
            return y
        communicator = self.communicator
        error = None
        try:
            x = self._check_input(x)
            ndim = x.ndim
            if residual is not None:
                self._check_residual(x, residual)
        except Exception as exc:  # still join the header collective, then raise
            error, ndim = exc, getattr(x, "ndim", 0)
        fingerprint = self._fingerprint(ndim)
        axis = self._axis % max(ndim, 1)
        relu = self._relu and residual is None  # with a residual: added, then the ReLU
        y, ctx, mean, var, count = sync_forward(x, self.weight, self.bias, self._eps, axis,
                                                relu, communicator, fingerprint, error)
        if residual is not None and x.size:
            batch_norm_add_relu_inference(x, residual, mean, var, self.weight, self.bias,
                                          eps=self._eps, axis=axis, out=y)
        if self.training and self._track_running_stats:
            stats = np.empty((5, self._num_features))
            stats[0], stats[1] = mean, var
            self._update_running_stats(stats, count)
        self._sync_ctx = ctx
        self._ctx = None
        self._residual_y = y if residual is not None else None
        return y

    def _check_residual(self, x, residual) -> None:
        """Raise unless ``residual`` fits ``x`` and the layer (before any collective)."""
        self._require_relu_for_residual()
        if x.size:
            _as_residual(residual, _as_data(x, "x"))
            return
        residual = np.asarray(residual)  # an empty slice: only its shape and dtype to check
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must have the shape and dtype of x, {x.shape} "
                             f"{x.dtype}, got {residual.shape} {residual.dtype}")

    def backward(self, dy) -> np.ndarray:
        """dx for this rank's slice; collective after a training forward.

        ``grad_weight``/``grad_bias`` receive this rank's contribution (local sums).
        """
        if self._sync_ctx is None:
            return super().backward(dy)
        if self._residual_y is not None:  # dresidual = dy' = where(y > 0, dy, 0)
            y = self._residual_y
            dy = np.asarray(dy)
            if dy.shape != y.shape:
                raise ValueError(f"dy must have the shape of x, {y.shape}, got {dy.shape}")
            dresidual = np.where(y > 0, dy, np.zeros((), dy.dtype))
            return self._sync_backward(dresidual), dresidual
        return self._sync_backward(dy)

    def _sync_backward(self, dy) -> np.ndarray:
        ctx = self._sync_ctx
        if isinstance(ctx, _EmptyContext) and not ctx.collective:
            dy = np.asarray(dy)
            if dy.shape != ctx.shape:
                raise ValueError(f"dy must have the shape of x, {ctx.shape}, got {dy.shape}")
            if self._affine:
                self.grad_weight.fill(0)
                self.grad_bias.fill(0)
            return np.empty(ctx.shape, dy.dtype)
        dx, sum_dy, sum_dy_xc = sync_backward(dy, ctx, self.communicator)
        if self._affine:
            if isinstance(ctx, BatchNormContext):
                self.grad_weight[...] = ctx.inv_std * sum_dy_xc
            else:
                self.grad_weight.fill(0)
            self.grad_bias[...] = sum_dy
        return dx

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", comm={self._comm!r})"

