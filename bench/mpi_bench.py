"""Synchronized batch norm over MPI: what the collectives cost (``make bench-mpi``).

Run under MPI, e.g. ``mpiexec -n 3 python -m bench.mpi_bench``.  Per rank and
case it times one training forward+backward of ``SyncBatchNorm`` against the
unsynchronized ``BatchNorm`` on the same local slice (medians of interleaved
samples, barriers around each sample), the share of the synchronized step spent
inside ``allreduce_sum`` (wall time in the collective, which includes waiting
for the slowest rank), and the bytes each rank sends per step.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CASES = [((256, 1024), 1), ((32, 64, 28, 28), 1)]


class TimedCommunicator:
    """Wraps a Communicator: counts calls, bytes sent and time inside the collective."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self):
        self.calls = 0
        self.bytes = 0
        self.seconds = 0.0

    def allreduce_sum(self, values):
        start = time.perf_counter()
        result = self.inner.allreduce_sum(values)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += values.nbytes
        return result


def main(argv=None) -> int:
    from mpi4py import MPI

    import fastbn
    from fastbn.distributed import MPICommunicator, SyncBatchNorm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rows = []
    for shape, axis in CASES:
        rng = np.random.default_rng(rank)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        timed = TimedCommunicator(MPICommunicator(comm))
        sync = SyncBatchNorm(shape[axis], axis=axis, comm=timed)
        local = fastbn.BatchNorm(shape[axis], axis=axis)

        def step(layer, x=x, dy=dy):
            layer(x)
            layer.backward(dy)

        for layer in (sync, local):  # compile / warm up
            step(layer)
        samples = {"sync": [], "local": [], "in_collectives": []}
        for _ in range(args.repeats):
            for name, layer in (("sync", sync), ("local", local)):
                comm.Barrier()
                timed.reset()
                start = time.perf_counter()
                step(layer)
                samples[name].append(time.perf_counter() - start)
                if name == "sync":
                    samples["in_collectives"].append(timed.seconds)
                    calls, sent = timed.calls, timed.bytes
        med = {k: float(np.median(v)) for k, v in samples.items()}
        med = {k: comm.allreduce(v, op=MPI.MAX) for k, v in med.items()}  # slowest rank
        rows.append((shape, med, calls, sent))
    if rank == 0:
        print(f"synchronized batch norm, {size} rank(s), float32, per-rank shapes; "
              f"medians of {args.repeats}, slowest rank")
        print(f"{'per-rank shape':<20} {'BatchNorm':>10} {'SyncBN':>10} {'overhead':>9} "
              f"{'in allreduce':>13} {'collectives':>11} {'bytes/rank':>10}")
        for shape, med, calls, sent in rows:
            print(f"{str(shape):<20} {med['local'] * 1e6:>8.0f}us {med['sync'] * 1e6:>8.0f}us "
                  f"{med['sync'] / med['local']:>8.2f}x "
                  f"{100 * med['in_collectives'] / med['sync']:>12.0f}% {calls:>11d} "
                  f"{sent:>10d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
