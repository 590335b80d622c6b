"""SyncBatchNorm over MPI equals BatchNorm on the concatenated global batch.

Every rank draws the same global batch from one seed, keeps its slice, and
compares against the single-process layer on the whole batch, over several
SGD steps.  Run by tests/test_mpi.py under ``mpiexec -n 2`` and ``-n 3``.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import fastbn
from fastbn.distributed import (
    MPICommunicator,
    RemoteRankError,
    SyncBatchNorm,
    sync_batch_stats,
)

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()

#: rows per rank: uneven (1, 5, 64 on three ranks) and with an empty rank
SPLITS = {
    "uneven": {2: [5, 64], 3: [1, 5, 64]},
    "empty-rank": {2: [0, 12], 3: [7, 0, 9]},
}
LAYOUTS = {  # name: (shape after the batch axis, channel axis)
    "NC": ((6,), 1),
    "NCHW": ((4, 3, 5), 1),
    "NHWC": ((3, 5, 4), -1),
}
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}


def _local_slice(rows):
    start = sum(rows[:RANK])
    return slice(start, start + rows[RANK])


def _close(a, b, tol):
    scale = max(float(np.max(np.abs(b))), 1.0) if b.size else 1.0
    return a.shape == b.shape and (a.size == 0 or float(np.max(np.abs(a - b))) <= tol * scale)


def _all_ranks_agree(value: bool) -> bool:
    return all(COMM.allgather(bool(value)))


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum, relu, residual",
                         [(0.1, False, False), (None, True, False), (0.1, True, True)])
def test_matches_single_process_over_sgd_steps(split, layout, dtype, momentum, relu, residual):
    rows = SPLITS[split][SIZE]
    tail, axis = LAYOUTS[layout]
    n_channels = tail[axis] if axis != 1 else tail[0]
    local = _local_slice(rows)
    sync = SyncBatchNorm(n_channels, comm=COMM, momentum=momentum, axis=axis, relu=relu,
                         dtype=dtype)
    whole = fastbn.BatchNorm(n_channels, momentum=momentum, axis=axis, relu=relu, dtype=dtype)
    rng = np.random.default_rng(123)
    tol = TOLERANCE[dtype]
    ok = True
    for step in range(3):
        x = (rng.standard_normal((sum(rows), *tail)) * 2 + step).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        if residual:  # the fused block: max(bn(x) + z, 0), backward (dx, dz)
            z = rng.standard_normal(x.shape).astype(dtype)
            y_local = sync(x[local], residual=z[local])
            y_whole = whole(x, residual=z)
            dx_local, dz_local = sync.backward(dy[local])
            dx_whole, dz_whole = whole.backward(dy)
            ok &= np.array_equal(dz_local, dz_whole[local])
        else:
            y_local = sync(x[local])
            y_whole = whole(x)
            dx_local = sync.backward(dy[local])
            dx_whole = whole.backward(dy)
        grad_w = COMM.allreduce(sync.grad_weight.astype(np.float64), op=MPI.SUM)
        grad_b = COMM.allreduce(sync.grad_bias.astype(np.float64), op=MPI.SUM)
        ok &= _close(y_local, y_whole[local], tol)
        ok &= _close(dx_local, dx_whole[local], tol)
        ok &= _close(grad_w, whole.grad_weight.astype(np.float64), tol)
        ok &= _close(grad_b, whole.grad_bias.astype(np.float64), tol)
        ok &= _close(sync.running_mean, whole.running_mean, tol)
        ok &= _close(sync.running_var, whole.running_var, tol)
        ok &= sync.num_batches_tracked == whole.num_batches_tracked == step + 1
        for p, g in ((sync.weight, grad_w), (sync.bias, grad_b)):  # a data-parallel SGD step
            p -= (0.1 * g).astype(dtype)
        for p, g in zip(whole.parameters(), whole.gradients(), strict=True):
            p -= 0.1 * g
    # Running statistics: bitwise identical on every rank.
    states = COMM.allgather((sync.running_mean.tobytes(), sync.running_var.tobytes(),
                             sync.num_batches_tracked))
    assert all(state == states[0] for state in states)
    assert _all_ranks_agree(ok)
    sync.eval()
    whole.eval()
    x = rng.standard_normal((sum(rows), *tail)).astype(dtype)
    assert _all_ranks_agree(_close(sync(x[local]), whole(x)[local], tol))


def test_sync_batch_stats_exact_far_from_zero():
    rows = SPLITS["uneven"][SIZE]
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((sum(rows), 8))).astype(np.float32)
    mean, var, count = sync_batch_stats(x[_local_slice(rows)], COMM, axis=1)
    x64 = x.astype(np.float64)
    exact_mean = x64.mean(axis=0)
    exact_var = ((x64 - exact_mean) ** 2).mean(axis=0)  # two-pass, float64
    assert count == sum(rows)
    assert mean.dtype == var.dtype == np.float64
    assert np.max(np.abs(var - exact_var) / exact_var) <= 1e-9
    assert np.max(np.abs(mean - exact_mean) / exact_mean) <= 1e-12


def test_global_batch_of_one_raises_on_every_rank():
    layer = SyncBatchNorm(3, comm=COMM, dtype=np.float64)
    rows = 1 if RANK == 0 else 0
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(np.ones((rows, 3)))
    assert layer.num_batches_tracked == 0


def test_nan_on_one_rank_raises_everywhere_and_changes_nothing():
    layer = SyncBatchNorm(4, comm=COMM, dtype=np.float64)
    x = np.random.default_rng(RANK).standard_normal((6, 4))
    layer(x)
    before = (layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked)
    bad = x.copy()
    if RANK == SIZE - 1:
        bad[2, 1] = np.nan
    with pytest.raises(FloatingPointError, match="channel"):
        layer(bad)
    assert np.array_equal(layer.running_mean, before[0])
    assert np.array_equal(layer.running_var, before[1])
    assert layer.num_batches_tracked == before[2]
    layer.backward(np.ones_like(x))  # the previous forward's context still works


def test_mismatched_configuration_raises_on_every_rank():
    n_channels = 5 if RANK == 0 else 4
    layer = SyncBatchNorm(n_channels, comm=COMM, dtype=np.float64)
    with pytest.raises(ValueError, match="disagree on the layer configuration"):
        layer(np.ones((3, n_channels)))
    dtype = np.float32 if RANK == 0 else np.float64
    layer = SyncBatchNorm(4, comm=COMM, dtype=dtype)
    with pytest.raises(ValueError, match="disagree"):
        layer(np.ones((3, 4), dtype))


def test_bad_input_on_one_rank_raises_there_and_remote_error_elsewhere():
    layer = SyncBatchNorm(4, comm=COMM, dtype=np.float64)
    x = np.ones((3, 4), np.float32 if RANK == 0 else np.float64)  # wrong dtype on rank 0
    expected = TypeError if RANK == 0 else RemoteRankError
    with pytest.raises(expected):
        layer(x)
    assert layer.num_batches_tracked == 0
    # And in the backward: a wrong dy shape on the last rank.
    x = np.random.default_rng(RANK).standard_normal((3, 4))
    layer(x)
    dy = np.ones((2, 4)) if RANK == SIZE - 1 else np.ones((3, 4))
    with pytest.raises(ValueError if RANK == SIZE - 1 else RemoteRankError):
        layer.backward(dy)


class CountingCommunicator(MPICommunicator):
    calls = 0

    def allreduce_sum(self, values):
        CountingCommunicator.calls += 1
        return super().allreduce_sum(values)


def test_collectives_per_step_and_eval_is_local():
    layer = SyncBatchNorm(4, comm=CountingCommunicator(COMM), dtype=np.float64)
    x = np.random.default_rng(RANK).standard_normal((5, 4))
    CountingCommunicator.calls = 0
    layer(x)
    assert CountingCommunicator.calls == 3  # header, sum of n*mean, sum of M2
    layer.backward(x)
    assert CountingCommunicator.calls == 4  # one more for the backward
    layer.eval()
    layer(x)
    layer.backward(x)
    layer(np.empty((0, 4)))
    layer.backward(np.empty((0, 4)))
    assert CountingCommunicator.calls == 4  # eval mode with running statistics: local


def test_mpi_import_is_lazy_and_comm_defaults_to_world():
    layer = SyncBatchNorm(2, dtype=np.float64)
    assert layer.communicator.size == SIZE
