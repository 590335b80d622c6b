"""Hammer fastbn from many Python threads; compare with serial results bit for bit.

Run as a script (in a subprocess, so that an abort of the process is a test
failure rather than a lost test session).  Prints the threading layer used and
exits non-zero on any mismatch.
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

import fastbn
from fastbn import _config

N_THREADS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
CALLS_PER_THREAD = int(sys.argv[2]) if len(sys.argv) > 2 else 200

CASES = [  # (shape, axis, relu, dtype)
    ((64, 256), 1, False, np.float32),
    ((32, 96), 1, True, np.float64),
    ((8, 16, 24, 24), 1, False, np.float32),  # >= 65536 elements: parallel kernels
    ((4, 12, 300), 1, True, np.float32),
    ((12, 16, 16, 24), -1, False, np.float64),  # parallel as well
]


def make_inputs(index):
    shape, axis, relu, dtype = CASES[index]
    rng = np.random.default_rng(index)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    n_channels = shape[axis]
    gamma = rng.standard_normal(n_channels).astype(dtype)
    beta = rng.standard_normal(n_channels).astype(dtype)
    return x, dy, gamma, beta, axis, relu


INPUTS = [make_inputs(i) for i in range(len(CASES))]


def compute(index):
    x, dy, gamma, beta, axis, relu = INPUTS[index]
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    y_eval = fastbn.batch_norm_inference(x, ctx.mean, ctx.var, gamma, beta, axis=axis)
    mean, var = fastbn.batch_stats(x, axis=axis)
    return (y, ctx.mean, ctx.var, dx, dgamma, dbeta, y_eval, mean, var)


def main():
    expected = [compute(i) for i in range(len(CASES))]  # serial, main thread

    def worker(seed):
        order = np.random.default_rng(seed).integers(0, len(CASES), CALLS_PER_THREAD)
        bad = 0
        for index in order:
            got = compute(int(index))
            bad += not all(np.array_equal(a, b) for a, b in zip(got, expected[index], strict=True))
        return bad

    with ThreadPoolExecutor(N_THREADS) as pool:
        mismatches = sum(pool.map(worker, range(N_THREADS)))
    calls = N_THREADS * CALLS_PER_THREAD
    print(f"layer={numba.threading_layer()} guard={_config.threading_layer()} "
          f"calls={calls} mismatches={mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
