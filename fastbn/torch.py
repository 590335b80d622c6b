"""fastbn inside PyTorch: drop-in ``BatchNorm{1,2,3}d``, ``convert(model)``, CPU ``SyncBatchNorm``.

    import fastbn.torch as fbt
    bn = fbt.BatchNorm2d(64)                    # same arguments as torch.nn.BatchNorm2d
    model = fbt.convert(model)                  # every torch.nn.BatchNorm{1,2,3}d, in place
    sbn = fbt.SyncBatchNorm(64)                 # CPU, torch.distributed (gloo)
    model = fbt.SyncBatchNorm.convert_sync_batchnorm(model)
    fused = fbt.fuse(model)                     # BN -> (add ->) ReLU chains fused (torch.fx)

The modules *are* ``torch.nn.BatchNorm*d`` (subclasses): ``isinstance``,
``state_dict`` keys, ``load_state_dict``, ``.to(dtype)``, ``train()``/``eval()``,
hooks and optimizers behave as usual; only the arithmetic changes.

Where fastbn runs: CPU float32/float64/bfloat16/float16 tensors that are
contiguous, or ``channels_last``/``channels_last_3d`` (mapped to fastbn's
``axis=-1`` through a zero-copy NumPy view), of at least :data:`TORCH_BELOW`
elements in eager mode.  16-bit data may come with float32 parameters and
running statistics (PyTorch's mixed type, what ``torch.autocast`` hands a batch
norm) or with 16-bit ones (a module made 16-bit with ``.to(torch.bfloat16)``:
they are widened to float32 for the kernels, exactly, and autograd casts the
gradients back); bfloat16 reaches the kernels as its int16 bits, so ml_dtypes
is not needed.  Anything else -- CUDA, other strides, other dtype mixes -- falls
back to ``torch.nn.BatchNorm*d.forward`` with identical semantics; so do small
eager inputs, where the Python glue around fastbn's kernels costs more than the
kernels save (their running statistics keep fastbn's guard, below).

Outputs are tensors allocated here and written by the kernels through ``out=``,
never views, so an in-place op after the batch norm (``nn.ReLU(inplace=True)``)
works in every layout.  Eager autograd goes through a ``torch.autograd.Function``;
``torch.library.custom_op`` (``fastbn::batch_norm`` and its backward) with fake
implementations serves ``torch.compile`` when :data:`COMPILE_WITH` is
``"fastbn"`` (by default a compiled module runs PyTorch's batch norm, which
inductor fuses).  Double backward is not supported (it raises, naming
``torch.nn.BatchNorm2d``).

Semantics are PyTorch's (momentum and ``momentum=None``, ``num_batches_tracked``,
unbiased running variance, ``track_running_stats=False``, ``affine=False``, the
batch-of-one error), with one deliberate difference: a training batch whose
statistics are not finite (it holds NaN or Inf) leaves the running statistics
untouched and warns once, instead of poisoning them for good
(PyTorch issue #90342).  The output is still NaN there, as in PyTorch.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from . import _config
from . import functional as _fn
from .functional import BatchNormContext

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert",
           "TorchDistributedCommunicator", "TORCH_BELOW", "COMPILE_WITH",
           "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d", "fuse"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: 16-bit data: parameters and running statistics float32 (PyTorch's "mixed type").
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
#: NumPy dtypes of the tensor dtypes NumPy has: outputs allocated by NumPy (huge pages).
_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


#: Eager-mode inputs with fewer elements than this run PyTorch's own batch norm
#: (running statistics still guarded against non-finite batches).  Below it a
#: Python ``autograd.Function`` and the tensor/NumPy glue (~100 us per
#: forward+backward) cost more than fastbn's kernels save.  Measured on 2 cores,
#: module forward + autograd backward through fastbn's path, against torch.nn
#: (several runs; mid sizes swing with torch's and Numba's thread pools):
#: BatchNorm1d (64, 256) 0.56-0.59x, (128, 512) 0.49-0.52x, (256, 512)
#: 0.60-0.61x, (256, 1024) 0.74-0.96x, (512, 1024) 1.03-1.56x; BatchNorm2d
#: (32, 64, 8, 8) 0.77-0.81x, (32, 64, 16, 16) 1.19-1.76x.  PyTorch's kernels
#: plus the guard: 0.78-0.84x at the small ones before the guard was cached
#: (:meth:`_FastBatchNormMixin._small_forward`).  ``torch.compile``: see
#: :data:`COMPILE_WITH`.
#: Raised from 2**18 to 2**20 on 2026-12-03, measured as in a model: a torch
#: convolution runs before every step (its OpenMP threads still spin when
#: fastbn's start).  BatchNorm2d forward+backward against torch.nn, two runs:
#: (32, 128, 8, 8) 0.82/0.84x, (32, 64, 16, 16) 0.89/0.92x, (32, 32, 32, 32)
#: 0.92/0.96x, (32, 64, 32, 32) 1.04/1.02x; the fused block (BatchNormReLU2d
#: with a residual) against eager at the same sizes: 0.82/0.80x, 0.88/1.46x,
#: 1.25/1.35x, 2.13/2.69x.  The threshold is where both are at least even.
#: ``FASTBN_TORCH_BELOW`` overrides it; 0 sends every input to fastbn.
TORCH_BELOW: int = _config.env_count("FASTBN_TORCH_BELOW", 1 << 20)
#: What a converted module runs under ``torch.compile``: ``"torch"`` (the default),
#: PyTorch's batch norm, which inductor fuses with its neighbours, with fastbn's guard of
#: the running statistics; or ``"fastbn"``, fastbn's kernels as one opaque custom op.
#: Measured on a CIFAR ResNet-18 training step (bench/torch_bench.py), see the docs.
#: ``FASTBN_TORCH_COMPILE`` sets it.
COMPILE_WITH: str = os.environ.get("FASTBN_TORCH_COMPILE", "torch").strip() or "torch"
_DOUBLE_BACKWARD = ("fastbn's batch norm does not support double backward (gradients of "
                    "gradients); use torch.nn.BatchNorm2d (or 1d/3d) for that model")


# ---------------------------------------------------------------------------
# Tensor <-> NumPy views (no copies)
# ---------------------------------------------------------------------------


def _fastbn_layout(x: torch.Tensor):
    """``(numpy view, axis)`` when fastbn can run on ``x`` without a copy, else None."""
    if x.device.type != "cpu" or x.dtype not in _FLOATS or x.dim() < 2 or x.numel() == 0:
        return None
    if x.is_contiguous():
        return "contiguous"
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last"
    return None


def _to_numpy(x: torch.Tensor, layout: str) -> tuple[np.ndarray, int]:
    x = x.detach()
    axis = 1
    if layout != "contiguous":
        x = x.permute(0, *range(2, x.dim()), 1)  # N, spatial..., C: contiguous for channels_last
        axis = -1
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, marked for fastbn
        return _fn._bfloat16_bits(x.view(torch.int16).numpy()), axis
    return x.numpy(), axis


def _memory_format(layout: str, ndim: int) -> torch.memory_format:
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _empty_output(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh tensor shaped and laid out like ``x`` (no view: see :func:`_from_numpy`)
    and the NumPy array it wraps, for a kernel's ``out=``.  NumPy allocates it: it asks
    for transparent huge pages on large arrays, which torch's CPU allocator does not,
    and the first touch of fresh 4 KiB pages cost a (32, 64, 56, 56) forward+backward
    25 % (measured: 15.6 ms with ``torch.empty_like``, 11.8 ms with ``np.empty``).
    16-bit outputs too: bfloat16 as int16 bits under a bfloat16 tensor."""
    shape = tuple(x.shape) if layout == "contiguous" else (x.shape[0], *x.shape[2:], x.shape[1])
    if x.dtype == torch.bfloat16:  # NumPy holds its bits; the tensor gets the dtype
        array = np.empty(shape, np.int16)
        return _from_numpy(array, layout, x.dim(), x.dtype), _fn._bfloat16_bits(array)
    array = np.empty(shape, _NUMPY_DTYPES.get(x.dtype, np.float16))
    return _from_numpy(array, layout, x.dim()), array


def _from_numpy(array: np.ndarray, layout: str, ndim: int, dtype=None) -> torch.Tensor:
    """``array`` (fastbn's layout) as an N, C, spatial... tensor sharing its memory.  Never
    a view of another tensor: autograd refuses in-place ops on views made inside a
    custom Function (``nn.ReLU(inplace=True)`` after the batch norm, in channels_last),
    so channels-last gets its strides through ``set_`` on the array's storage instead
    of a permute."""
    tensor = torch.from_numpy(array)
    if layout == "contiguous" and dtype is None:
        return tensor
    order = (0, ndim - 1, *range(1, ndim - 1)) if layout != "contiguous" else range(ndim)
    # (``dtype``: bfloat16 over int16 bits -- same size, so the same strides)
    return torch.empty(0, dtype=dtype or tensor.dtype).set_(
        tensor.untyped_storage(), 0, [tensor.shape[i] for i in order],
        [tensor.stride(i) for i in order])


def _dy_to_numpy(dy: torch.Tensor, x: torch.Tensor, layout: str) -> np.ndarray:
    """The incoming gradient as NumPy in the forward input's layout (copied only when
    autograd hands it over in another memory format)."""
    return _to_numpy(dy.contiguous(memory_format=_memory_format(layout, x.dim())), layout)[0]


def _parameter(t):
    """A parameter or running statistic as NumPy; 16-bit ones (a module made 16-bit with
    ``.to(torch.bfloat16)``) widened to float32, which holds them exactly."""
    if t is None:
        return None
    t = t.detach()
    return (t.float() if t.dtype in _SIXTEEN_BIT else t).numpy()


# ---------------------------------------------------------------------------
# The custom ops: forward (training statistics) and its backward
# ---------------------------------------------------------------------------


def _forward_impl(x, weight, bias, eps):
    """Training-mode batch norm: ``(y, stats)``, stats the float64 (5, C) workspace."""
    layout = _fastbn_layout(x)
    array, axis = _to_numpy(x, layout)
    y, out = _empty_output(x, layout)
    _, ctx = _fn.batch_norm_forward(array, _parameter(weight), _parameter(bias), eps=eps,
                                    axis=axis, out=out)
    return y, torch.from_numpy(ctx._stats)


@torch.library.custom_op("fastbn::batch_norm", mutates_args=())
def _batch_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode batch norm as one opaque op for torch.compile: ``(y, stats)``."""
    return _forward_impl(x, weight, bias, eps)


@_batch_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x), x.new_empty((5, x.shape[1]), dtype=torch.float64)


def _backward_impl(dy, x, stats, has_weight, has_bias):
    """``(dx, dweight, dbias)`` from the forward's input and statistics (two sweeps)."""
    layout = _fastbn_layout(x)
    array, axis = _to_numpy(x, layout)
    dy_array = _dy_to_numpy(dy, x, layout)
    stats_array = stats.numpy()
    n_channels = stats_array.shape[1]
    # gradients of the parameters in the compute dtype (float32 for 16-bit data);
    # autograd casts them to the parameters' own dtype
    dtype = np.dtype(np.float32) if x.dtype in _SIXTEEN_BIT else array.dtype
    axis %= array.ndim
    view, _ = _fn._layout(_fn._as_data(array, "x"), axis)
    # The context of the forward call, rebuilt from its saved workspace: no sweep.
    ctx = BatchNormContext(view, array.shape, axis, stats_array,
                           dtype if has_weight else None, dtype if has_bias else None,
                           False, True, array.size // n_channels)
    dx, out = _empty_output(x, layout)
    _, dgamma, dbeta = _fn.batch_norm_backward(dy_array, ctx, out=out)

    def as_tensor(grad):  # outputs must not alias each other: fresh zeros when absent
        if grad is None:
            return torch.zeros(n_channels, dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
        return torch.from_numpy(grad)

    return dx, as_tensor(dgamma), as_tensor(dbeta)


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, stats: torch.Tensor,
                            has_weight: bool, has_bias: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward as one opaque op (torch.compile)."""
    return _backward_impl(dy, x, stats, has_weight, has_bias)


@_batch_norm_backward_op.register_fake
def _(dy, x, stats, has_weight, has_bias):
    n_channels = x.shape[1]
    return (torch.empty_like(x), x.new_empty(n_channels), x.new_empty(n_channels))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, stats = output
    ctx.save_for_backward(x, stats)
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dstats):
    x, stats = ctx.saved_tensors
    dx, dweight, dbias = _batch_norm_backward_op(dy, x, stats, ctx.has_weight, ctx.has_bias)
    return (dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None)


torch.library.register_autograd("fastbn::batch_norm", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


def _backward_setup(ctx, inputs, output):
    pass


torch.library.register_autograd("fastbn::batch_norm_backward", _no_double_backward,
                                setup_context=_backward_setup)


class _EagerBatchNorm(torch.autograd.Function):
    """The same forward and backward for eager mode, where a custom op's dispatch costs
    ~35 us per call (measured at (64, 256): op 56 us vs 23 us for the work itself)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, stats = _forward_impl(x, weight, bias, eps)
        ctx.save_for_backward(x, stats)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):
        if torch.is_grad_enabled():  # create_graph=True: a double backward is coming
            raise RuntimeError(_DOUBLE_BACKWARD)
        x, stats = ctx.saved_tensors
        dx, dweight, dbias = _backward_impl(dy, x, stats, ctx.has_weight, ctx.has_bias)
        return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None


def _batch_norm(x, weight, bias, eps):
    if torch.compiler.is_compiling():
        return torch.ops.fastbn.batch_norm(x, weight, bias, eps)
    return _EagerBatchNorm.apply(x, weight, bias, eps)


# ---------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------


_KEPT, _RESTORED, _LEFT = 0, 1, 2


@njit(cache=_config.CACHE, nogil=True)
def _guard_running_stats(mean, var, mean_before, var_before, num_batches_tracked):
    """After PyTorch updated ``mean``/``var`` (C values): finite, they become the backup
    for the next step and the batch is counted (_KEPT); non-finite from finite backups,
    the backups come back, uncounted (_RESTORED); backups already non-finite (a loaded
    NaN state): left as PyTorch made them, counted, the backup follows (_LEFT).  One
    call per step: see ``_small_forward``."""
    for c in range(mean.size):
        if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
            for k in range(mean.size):
                if not (np.isfinite(mean_before[k]) and np.isfinite(var_before[k])):
                    mean_before[:] = mean
                    var_before[:] = var
                    num_batches_tracked[0] += 1
                    return _LEFT
            mean[:] = mean_before
            var[:] = var_before
            return _RESTORED
    mean_before[:] = mean
    var_before[:] = var
    num_batches_tracked[0] += 1
    return _KEPT


_config.harden_cache({"_guard_running_stats": _guard_running_stats})

def _warn_nonfinite(stacklevel: int) -> None:
    """Once per process: a training batch's statistics were not finite."""
    if not _FastBatchNormMixin._warned_nonfinite:
        _FastBatchNormMixin._warned_nonfinite = True
        warnings.warn("fastbn: a training batch had non-finite statistics (NaN or Inf); "
                      "running statistics were left unchanged (torch.nn would have made "
                      "them NaN)", RuntimeWarning, stacklevel=stacklevel)


def _parameters_fit(weight, x: torch.Tensor) -> bool:
    """fastbn runs parameters of the data's dtype, and float32 or 16-bit parameters
    with 16-bit data (PyTorch's mixed type; what autocast and ``.to(bfloat16)`` make)."""
    if weight is None or weight.dtype == x.dtype:
        return True
    return x.dtype in _SIXTEEN_BIT and weight.dtype in (torch.float32, *_SIXTEEN_BIT)


class _FastBatchNormMixin:
    """The forward shared by the three modules (``self`` is a torch.nn.BatchNorm*d)."""

    _warned_nonfinite = False

    def _use_batch_stats(self) -> bool:
        return self.training or self.running_mean is None


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        if x.numel() < TORCH_BELOW:
            return self._small_forward(x)  # first: every microsecond counts there
        return self._fastbn_forward(x)

    def _fastbn_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        layout = _fastbn_layout(x)
        if layout is None or not _parameters_fit(self.weight, x):
            return super().forward(x)  # CUDA, odd strides, mismatched dtypes: PyTorch's own
        if not self._use_batch_stats():
            return self._inference(x, layout)
        if x.numel() // x.shape[1] < 2:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{x.size()}")
        y, stats = _batch_norm(x, self.weight, self.bias, float(self.eps))
        if self.training and self.track_running_stats:
            self._update_running_stats(stats, x.numel() // x.shape[1])
        return y

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Under ``torch.compile``: by default PyTorch's forward, which inductor decomposes
        and fuses with the convolutions, ReLUs and adds around it (fastbn's op is opaque to
        it: a CIFAR ResNet-18 step trained at 0.90x compile(torch.nn) through it), plus the
        finite guard as branch-free tensor ops on C values (fused into a tiny kernel).  No
        warning here: a traced graph cannot warn on a tensor's value."""
        if COMPILE_WITH == "fastbn":
            return self._fastbn_forward(x)
        if not (self.training and self.track_running_stats and self.running_mean is not None
                and self.num_batches_tracked is not None):
            return super().forward(x)
        self._check_input_dim(x)
        # torch.nn's forward, except that F.batch_norm updates copies of the running
        # statistics: it saves the ones it is given for its backward, so writing the
        # buffers themselves after it would fail autograd's version check.
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
            else self.momentum
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        # Keep the update unless it made finite statistics non-finite (as _small_forward).
        keep = (torch.isfinite(mean).all() & torch.isfinite(var).all()) \
            | ~(torch.isfinite(self.running_mean).all() & torch.isfinite(self.running_var).all())
        self.running_mean.copy_(torch.where(keep, mean, self.running_mean))
        self.running_var.copy_(torch.where(keep, var, self.running_var))
        self.num_batches_tracked.sub_((~keep).to(self.num_batches_tracked.dtype))
        return y

    def _small_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PyTorch's own batch norm, for inputs too small for the glue to pay; a training
        batch that leaves the running statistics non-finite is undone (fastbn's one
        deliberate difference holds at every size).

        Measured in a training loop on 2 cores, every NumPy or Numba call after torch's
        ops costs 5-12 us (ten times its isolated cost) and so does a module attribute
        or a small torch op, against ~160 us for a (64, 256) forward+backward.  So the
        training step here is torch.nn's forward without its Python overhead
        (``torch.batch_norm`` with the same arguments: the same kernels and bits) plus
        one Numba call, :func:`_guard_running_stats`, which checks PyTorch's update,
        keeps it as the backup for the next step or restores the backup, and counts the
        batch.  The backup is trusted while the buffers' version counters say nobody
        else wrote them (it is refreshed otherwise); writes the counters do not see
        (through ``.data`` or a NumPy view) are not seen by it either."""
        if not (self.training and self.track_running_stats) or type(x) is not torch.Tensor:
            return super().forward(x)
        guard = self._guard_state()
        if guard is None:
            return self._small_forward_torch_guard(x)
        self._check_input_dim(x)
        shape = x.shape
        if shape[0] * math.prod(shape[2:]) == 1:  # F.batch_norm's check, same message
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {shape}")
        mean, var, _, _, arrays, versions = guard
        if mean._version != versions[0] or var._version != versions[1]:
            arrays[2][...] = arrays[0]  # written since our last step: a fresh backup
            arrays[3][...] = arrays[1]
        momentum = self.momentum
        factor = momentum if momentum is not None else 1.0 / float(arrays[4][0] + 1)
        params = self._parameters
        y = torch.batch_norm(x, params.get("weight"), params.get("bias"), mean, var, True,
                             factor, self.eps, torch.backends.cudnn.enabled)
        status = _guard_running_stats(*arrays)
        versions[0], versions[1] = mean._version, var._version
        if status == _RESTORED:
            _warn_nonfinite(stacklevel=6)  # the line that called the module
        return y

    def _small_forward_torch_guard(self, x: torch.Tensor) -> torch.Tensor:
        """The guard with torch ops (running statistics NumPy/Numba cannot take: not on
        the CPU, half precision).  Writes through ``.data``: F.batch_norm saved the
        buffers for its backward, and a tracked in-place write would fail its check."""
        mean, var = self.running_mean, self.running_var
        if mean is None or var is None or self.num_batches_tracked is None:
            return super().forward(x)
        mean_before, var_before = mean.clone(), var.clone()
        y = super().forward(x)
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()) and bool(
                torch.isfinite(mean_before).all() & torch.isfinite(var_before).all()):
            mean.data.copy_(mean_before)
            var.data.copy_(var_before)
            self.num_batches_tracked.sub_(1)
            _warn_nonfinite(stacklevel=7)  # the line that called the module
        return y

    def _guard_state(self):
        """``[running_mean, running_var, the buffers' data pointers, None, (mean, var,
        backup_mean, backup_var, num_batches_tracked) as NumPy arrays, [the buffers'
        versions after our last step]]``, the arrays of the buffers zero-copy views; None
        where the guard cannot use them (not CPU, not float32/float64).  Cached on the
        module, rebuilt when a buffer is replaced (``.to()``) or its memory moves
        (``.data =``, ``set_``).  Never pickled or deep-copied (``__getstate__``)."""
        buffers = self._buffers
        mean, var = buffers["running_mean"], buffers["running_var"]
        tracked = buffers.get("num_batches_tracked")
        cached = self.__dict__.get("_fastbn_guard")
        if (cached is not None and cached[0] is mean and cached[1] is var
                and cached[2] == (mean.data_ptr(), var.data_ptr(), tracked.data_ptr())):
            return cached if cached[4] is not None else None
        arrays = None
        if (mean is not None and var is not None and tracked is not None
                and mean.device.type == var.device.type == tracked.device.type == "cpu"
                and mean.dtype in _NUMPY_DTYPES and var.dtype == mean.dtype
                and tracked.dtype == torch.long and not tracked.requires_grad):
            mean_array, var_array = mean.detach().numpy(), var.detach().numpy()
            arrays = (mean_array, var_array, mean_array.copy(), var_array.copy(),
                      tracked.view(1).numpy())
        pointers = tuple(t.data_ptr() if t is not None else 0 for t in (mean, var, tracked))
        cached = [mean, var, pointers, None, arrays,
                  [getattr(mean, "_version", 0), getattr(var, "_version", 0)]]
        self.__dict__["_fastbn_guard"] = cached
        return cached if arrays is not None else None

    def __getstate__(self):
        # The guard's cache holds NumPy views of this module's buffers: never pickle or
        # deep-copy it (a copy would be a cache of arrays no longer sharing the memory).
        state = super().__getstate__()
        if "_fastbn_guard" in state:
            state = dict(state)
            del state["_fastbn_guard"]
        return state

    def _inference(self, x, layout):
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)  # eval-mode gradients: PyTorch's path
        array, axis = _to_numpy(x, layout)
        y, out = _empty_output(x, layout)
        _fn.batch_norm_inference(array, _parameter(self.running_mean),
                                 _parameter(self.running_var), _parameter(self.weight),
                                 _parameter(self.bias), eps=float(self.eps), axis=axis, out=out)
        return y

    @torch.no_grad()
    def _update_running_stats(self, stats: torch.Tensor, count: int) -> None:
        """PyTorch's update (float64 arithmetic), skipped when the batch statistics are not
        finite.  Branch-free on tensor values, so torch.compile traces it whole."""
        if not torch.compiler.is_compiling() and self._update_in_numpy(stats, count):
            return
        mean, var = stats[0], stats[1]
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if not torch.compiler.is_compiling() and not bool(finite):
            _warn_nonfinite(stacklevel=7)  # the line that called the module
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / self.num_batches_tracked.double().clamp(min=1)
        else:
            factor = self.momentum
        old_mean, old_var = self.running_mean.double(), self.running_var.double()
        new_mean = (1 - factor) * old_mean + factor * mean
        new_var = (1 - factor) * old_var + factor * (var * (count / (count - 1)))
        self.running_mean.copy_(torch.where(finite, new_mean, old_mean))
        self.running_var.copy_(torch.where(finite, new_var, old_var))


    def _update_in_numpy(self, stats: torch.Tensor, count: int) -> bool:
        """Eager fast path: fastbn's update kernel on zero-copy views of the buffers (one
        call instead of a dozen small torch ops).  False when it does not apply."""
        buffers = (self.running_mean, self.running_var)
        if any(b.device.type != "cpu" or b.dtype not in (torch.float32, torch.float64)
               or not b.is_contiguous()
               for b in buffers) or stats.dtype != torch.float64:
            return False
        from .kernels import BAD_BATCH_STATS, update_running_stats

        tracked = int(self.num_batches_tracked)
        factor = 1.0 / (tracked + 1) if self.momentum is None else float(self.momentum)
        status = update_running_stats(stats.numpy(), float(count), factor,
                                      self.running_mean.detach().numpy(),
                                      self.running_var.detach().numpy())
        if status == BAD_BATCH_STATS:
            _warn_nonfinite(stacklevel=8)  # the line that called the module
            return True
        if status != 0:  # overflow of the buffers' dtype: let the torch path decide
            return False
        self.num_batches_tracked.add_(1)
        return True


class BatchNorm1d(_FastBatchNormMixin, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by fastbn on CPU float32/float64 tensors."""


class BatchNorm2d(_FastBatchNormMixin, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by fastbn on CPU float32/float64 tensors."""


class BatchNorm3d(_FastBatchNormMixin, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by fastbn on CPU float32/float64 tensors."""


_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Make every exact ``torch.nn.BatchNorm{1,2,3}d`` of ``model`` a fastbn module, in place.

    The modules keep their identity, ``Parameter`` and buffer objects, hooks
    and state (only their class changes), so an optimizer built before the
    conversion keeps working.  Subclasses (and ``SyncBatchNorm``) are left
    alone.  Returns ``model``.
    """
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model


# ---------------------------------------------------------------------------
# SyncBatchNorm over torch.distributed (gloo), on fastbn.distributed's core
# ---------------------------------------------------------------------------


class TorchDistributedCommunicator:
    """:class:`fastbn.distributed.Communicator` over a ``torch.distributed`` process group."""

    def __init__(self, process_group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.array(values, dtype=np.float64))
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self.group)
        return tensor.numpy()


class _SyncFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module):
        from .distributed import sync_forward

        layout = _fastbn_layout(x) if x.numel() else "contiguous"
        array, axis = _to_numpy(x, layout)
        fingerprint = (module.num_features, x.element_size(), x.dim(), float(module.eps) * 1e5)
        y, fctx, mean, var, count = sync_forward(
            array, _parameter(weight), _parameter(bias), float(module.eps),
            axis % max(array.ndim, 1), False, module._communicator(), fingerprint)
        ctx.fctx, ctx.layout, ctx.module, ctx.ndim = fctx, layout, module, x.dim()
        ctx.grad_dtype = weight.dtype if weight is not None else torch.float32
        module._last_global = (mean, var, count)
        return _sync_output(y, layout, x)

    @staticmethod
    def backward(ctx, dy):
        from .distributed import sync_backward

        fctx = ctx.fctx
        dy = dy.contiguous(memory_format=_memory_format(ctx.layout, ctx.ndim))
        dy_array, _ = _to_numpy(dy, ctx.layout)
        dx, sum_dy, sum_dy_xc = sync_backward(dy_array, fctx, ctx.module._communicator())
        dx = _sync_output(dx, ctx.layout, dy)
        inv_std = fctx.inv_std if isinstance(fctx, BatchNormContext) else 0.0
        dweight = torch.from_numpy(inv_std * sum_dy_xc).to(ctx.grad_dtype)
        dbias = torch.from_numpy(sum_dy).to(ctx.grad_dtype)
        return dx, dweight, dbias, None


def _sync_output(array: np.ndarray, layout: str, like: torch.Tensor) -> torch.Tensor:
    """A kernel's output (fastbn's layout) as a tensor shaped and laid out like ``like``;
    bfloat16 bits are copied into a fresh bfloat16 tensor (a dtype view would be a view
    made inside the Function, which in-place ops after it refuse)."""
    if like.dtype != torch.bfloat16:
        return _from_numpy(array, layout, like.dim()) if like.numel() else \
            torch.from_numpy(array)
    tensor = torch.empty_like(like, memory_format=_memory_format(layout, like.dim()))
    _to_numpy(tensor, layout)[0][...] = array.view(np.int16)
    return tensor


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    """Exact global-batch statistics over a ``torch.distributed`` group, on the CPU.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one computes with
    fastbn's communicator-agnostic core (:mod:`fastbn.distributed`) through a
    gloo ``all_reduce`` adapter.  Same arguments as ``torch.nn.SyncBatchNorm``.
    Parameter gradients are exact for the global loss once DDP (or you)
    all-reduce them like every other gradient: each rank contributes its
    local sums, as in PyTorch.  Eval mode with running statistics is local.
    """

    _update_running_stats = _FastBatchNormMixin._update_running_stats
    _update_in_numpy = _FastBatchNormMixin._update_in_numpy

    def _communicator(self):
        if getattr(self, "_fastbn_comm", None) is None:
            self._fastbn_comm = TorchDistributedCommunicator(self.process_group)
        return self._fastbn_comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        import torch.distributed as dist

        use_batch_stats = self.training or self.running_mean is None
        if (not use_batch_stats or not (dist.is_available() and dist.is_initialized())
                or x.device.type != "cpu" or x.dtype not in _FLOATS
                or (x.numel() and _fastbn_layout(x) is None)):
            if not use_batch_stats and x.device.type == "cpu":
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                    self.bias, False, 0.0, self.eps)
            return super().forward(x)
        y = _SyncFunction.apply(x, self.weight, self.bias, self)
        if self.training and self.track_running_stats:
            mean, var, count = self._last_global
            stats = torch.from_numpy(np.stack([mean, var]))
            self._update_running_stats(stats, count)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every ``torch.nn.BatchNorm*d`` (and fastbn's) of ``module`` as this class."""
        converted = module
        if isinstance(module, (BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d)):
            # A SyncBatchNorm in its place would drop the fused ReLU (and the residual).
            raise ValueError(f"{type(module).__name__} (made by fastbn.torch.fuse) cannot be "
                             f"converted to SyncBatchNorm: call convert_sync_batchnorm on the "
                             f"model first, then fuse() (SyncBatchNorm is left unfused)")
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
                module, torch.nn.SyncBatchNorm):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


# fuse(model) (torch.fx) and the fused BatchNormReLU*d modules live in their own module,
# which builds on the names above.
from ._torch_fuse import BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, fuse  # noqa: E402
