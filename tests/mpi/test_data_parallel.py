"""examples/data_parallel.py reaches the parameters of single-process training."""

import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import data_parallel  # noqa: E402


def test_data_parallel_training_equals_single_process():
    comm = MPI.COMM_WORLD
    parallel = data_parallel.train(comm, steps=30)
    single = data_parallel.train(None, steps=30)
    for p, q in zip(parallel.parameters(), single.parameters(), strict=True):
        assert np.max(np.abs(p - q)) <= 1e-10 * max(1.0, np.max(np.abs(q)))
    np.testing.assert_allclose(parallel.bn.running_mean, single.bn.running_mean, rtol=1e-10)
    np.testing.assert_allclose(parallel.bn.running_var, single.bn.running_var, rtol=1e-10)
    # every rank holds the same model
    digests = comm.allgather(np.concatenate([p.ravel() for p in parallel.parameters()]).tobytes())
    assert all(d == digests[0] for d in digests)
