"""Worker processes after the parent ran fastbn's parallel kernels: results, no hang.

Usage: python fork_pool.py CONTEXT [--no-guard]

CONTEXT is a multiprocessing start method (fork, forkserver, spawn) or
``os.fork`` (a bare fork; the child reports through a pipe).  The parent runs
the parallel kernels first, then each worker computes the same batch norms;
the script prints the threading layer, whether the workers' results equal the
parent's bitwise, and how many launches the workers ran serially because of
the fork guard.  ``--no-guard`` disables the guard (to show it is needed).
"""

import multiprocessing as mp
import os
import pickle
import sys
import warnings

import numba
import numpy as np

import fastbn
from fastbn import _launch

SHAPES = [((256, 512), 1), ((8, 16, 32, 32), 1), ((8, 32, 32, 16), -1)]  # all parallel-sized


def compute(i):
    """Forward, backward and the layer on input i; (results, forced serial launches, warnings)."""
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape, axis in SHAPES:
            rng = np.random.default_rng(i)
            x = (rng.standard_normal(shape) * (i + 1)).astype(np.float32)
            y, ctx = fastbn.batch_norm_forward(x, axis=axis)
            dx, _, _ = fastbn.batch_norm_backward(y * y, ctx)
            layer = fastbn.BatchNorm(shape[axis], axis=axis)
            results += [y, dx, layer(x), layer.running_var.copy()]
    fork_warnings = sum("forked" in str(w.message) for w in caught)
    return results, _launch.forced_serial_launches, fork_warnings


def main():
    context = sys.argv[1]
    if "--no-guard" in sys.argv:
        os.register_at_fork(after_in_child=lambda: setattr(_launch, "_forked_serial", False))
    parent = [compute(i)[0] for i in range(4)]  # the parent uses the parallel kernels
    layer = numba.threading_layer()
    if context == "os.fork":
        outputs = []
        for i in range(2):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # child
                os.close(read_end)
                with os.fdopen(write_end, "wb") as pipe:
                    pickle.dump(compute(i), pipe)
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                data = pipe.read()
            _, status = os.waitpid(pid, 0)
            if not data or os.waitstatus_to_exitcode(status) != 0:
                print(f"child {i} failed: exit {os.waitstatus_to_exitcode(status)}")
                return 1
            outputs.append(pickle.loads(data))
    else:
        with mp.get_context(context).Pool(2) as pool:
            outputs = pool.map(compute, range(len(parent)))
    parent = parent[:len(outputs)]  # os.fork runs fewer workers
    equal = all(
        len(out[0]) == len(ref)
        and all(np.array_equal(a, b) for a, b in zip(out[0], ref, strict=True))
        for out, ref in zip(outputs, parent, strict=True)
    )
    serial = sum(out[1] for out in outputs)
    warned = sum(out[2] for out in outputs)
    print(f"layer={layer} context={context} workers={len(outputs)} equal={equal} "
          f"forced_serial={serial} fork_warnings={warned}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
