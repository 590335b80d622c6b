"""Data-parallel training over MPI: the MLP of examples/mlp.py on 2+ processes.

Each process (rank) takes its slice of every global minibatch.  The batch norm
is a :class:`fastbn.distributed.SyncBatchNorm`, so it normalizes with the
statistics of the *global* minibatch; every gradient -- the affine layers' and
the batch norm's own ``grad_weight``/``grad_bias``, which are per-rank
contributions -- is summed over the ranks with one allreduce before the SGD
step.  The result is the same training as one process on the whole batch
(``tests/mpi/test_data_parallel.py`` checks the parameters to 1e-10).

    mpiexec -n 4 python examples/data_parallel.py
    mpiexec -n 8 -f hostfile python examples/data_parallel.py   # across machines (MPICH)

Needs mpi4py (``pip install -e '.[mpi]'`` brings mpi4py and MPICH's wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlp import MLP, make_problem, softmax_cross_entropy  # noqa: E402

from fastbn.distributed import SyncBatchNorm  # noqa: E402


def rank_slice(batch_size: int, rank: int, size: int) -> slice:
    """This rank's rows of a global minibatch (uneven when size does not divide it)."""
    bounds = np.linspace(0, batch_size, size + 1).round().astype(int)
    return slice(bounds[rank], bounds[rank + 1])


def make_model(n_in: int, n_hidden: int, n_classes: int, comm) -> MLP:
    model = MLP(n_in, n_hidden, n_classes)  # same seed: the same initial weights everywhere
    if comm is not None:  # swap the layer for its synchronized twin (same initial state)
        model.bn = SyncBatchNorm(n_hidden, relu=True, dtype=model.W1.dtype, comm=comm)
    return model


def allreduce_gradients(model: MLP, comm) -> None:
    """Sum every gradient over the ranks, in place, with one collective."""
    from mpi4py import MPI

    grads = model.gradients()
    flat = np.concatenate([g.ravel() for g in grads])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    offset = 0
    for g in grads:
        g[...] = flat[offset:offset + g.size].reshape(g.shape)
        offset += g.size


def train(comm=None, steps: int = 100, batch_size: int = 48, lr: float = 0.3, seed: int = 0,
          log_every: int = 0) -> MLP:
    """SGD on global minibatches; ``comm=None`` is the single-process reference."""
    x, labels = make_problem()
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    model = make_model(x.shape[1], 32, int(labels.max()) + 1, comm)
    rng = np.random.default_rng(seed)  # same on every rank: the same global minibatches
    local = rank_slice(batch_size, rank, size)
    for step in range(steps):
        idx = rng.choice(x.shape[0], batch_size, replace=False)[local]
        logits = model.forward(x[idx])
        # The loss is the mean over the GLOBAL minibatch: scale by local/global rows.
        loss, dlogits = softmax_cross_entropy(logits, labels[idx]) if len(idx) else (0.0, logits)
        weight = len(idx) / batch_size
        model.backward(dlogits * weight)
        if comm is not None:
            allreduce_gradients(model, comm)
            loss = comm.allreduce(loss * weight)
        model.sgd_step(lr)
        if log_every and step % log_every == 0 and rank == 0:
            print(f"step {step:4d}  loss {loss:.4f}  ({size} ranks)")
    return model


def main() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    model = train(comm, steps=200, log_every=25)
    model.eval()  # running statistics: identical on every rank, no communication
    x, labels = make_problem()
    accuracy = (model.forward(x).argmax(axis=1) == labels).mean()
    if comm.Get_rank() == 0:
        print(f"accuracy after training on {comm.Get_size()} ranks (eval mode): {accuracy:.3f}")


if __name__ == "__main__":
    main()
