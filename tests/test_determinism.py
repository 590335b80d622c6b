"""Bitwise reproducibility: the same bits with 1 or 2 Numba threads, and on every call.

Reductions are split into chunks that depend on the shape only and merged in a
fixed order, so no result may depend on the thread count (DESIGN.md §3).
Comparisons are on the raw bytes (so -0.0 vs 0.0 or NaN payloads count too).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastbn
from fastbn import _launch

#: (shape, axis, dtype, relu): large rows, CNN-like planes, channels-last,
#: few huge planes (split inside the plane), a channel-block remainder.  All
#: have at least fastbn._launch.SMALL_PROBLEM elements: smaller problems always
#: run the serial kernels on the calling thread.
CASES = [
    ((1024, 4096), 1, np.float32, False),
    ((1024, 4096), 1, np.float32, True),
    ((8, 64, 56, 56), 1, np.float32, False),
    ((8, 64, 56, 56), 1, np.float32, True),
    ((8, 28, 28, 64), -1, np.float32, True),
    ((1, 4, 65536), 1, np.float64, False),
    ((1, 4, 65536), 1, np.float64, True),
    ((300, 2000), 1, np.float64, True),
    ((32768, 3), 1, np.float32, False),   # few channels, many row chunks
    ((64, 6, 300), 1, np.float64, False),
]
IDS = [f"{'x'.join(map(str, s))}-axis{a}-{np.dtype(d).name}{'-relu' if r else ''}"
       for s, a, d, r in CASES]


def make_inputs(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    n = shape[axis]
    x = (rng.standard_normal(shape, dtype=np.float32) * 3 + 5).astype(dtype, copy=False)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    gamma = rng.uniform(0.5, 2, n).astype(dtype)
    beta = rng.uniform(-1, 1, n).astype(dtype)
    return x, gamma, beta, dy


def run_all(x, gamma, beta, dy, axis, relu):
    """Every public output for these inputs, by name."""
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)
    mean, var = fastbn.batch_stats(x, axis=axis)
    y_eval, ctx_eval = fastbn.batch_norm_inference(x, mean, var + 0.5, gamma, beta, axis=axis,
                                                   relu=relu, return_context=True)
    dx_eval, dgamma_eval, dbeta_eval = fastbn.batch_norm_backward(dy, ctx_eval)
    return {"y": y, "mean": ctx.mean, "var": ctx.var, "inv_std": ctx.inv_std, "dx": dx,
            "dgamma": dgamma, "dbeta": dbeta, "stats_mean": mean, "stats_var": var,
            "y_eval": y_eval, "dx_eval": dx_eval, "dgamma_eval": dgamma_eval,
            "dbeta_eval": dbeta_eval}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, f"not bitwise identical: {differ}"


@pytest.mark.parametrize(("shape", "axis", "dtype", "relu"), CASES, ids=IDS)
def test_one_and_two_threads_give_identical_bits(num_threads, shape, axis, dtype, relu):
    assert np.prod(shape) >= _launch.SMALL_PROBLEM
    x, gamma, beta, dy = make_inputs(shape, axis, dtype)
    num_threads(2)
    two = run_all(x, gamma, beta, dy, axis, relu)
    num_threads(1)
    one = run_all(x, gamma, beta, dy, axis, relu)
    assert_bitwise_equal(one, two)
    # Sanity: the outputs are real results, not untouched buffers.
    assert np.all(np.isfinite(two["dx"])) and np.any(two["dx"] != 0)
    assert np.all(two["stats_var"] > 0)


@pytest.mark.parametrize(("shape", "axis", "dtype", "relu"), CASES, ids=IDS)
def test_serial_and_parallel_variants_give_identical_bits(monkeypatch, shape, axis, dtype,
                                                          relu):
    """Small inputs run the serial compilation of the same kernels: same bits."""
    x, gamma, beta, dy = make_inputs(shape, axis, dtype)
    parallel = run_all(x, gamma, beta, dy, axis, relu)
    monkeypatch.setattr(_launch, "SMALL_PROBLEM", x.size + 1)  # everything serial
    serial = run_all(x, gamma, beta, dy, axis, relu)
    assert_bitwise_equal(serial, parallel)


def test_thread_count_is_restored_by_fixture(num_threads):
    import numba

    num_threads(1)
    assert numba.get_num_threads() == 1


def test_repeated_calls_give_identical_bits(num_threads):
    """Races on shared accumulators would show up as run-to-run differences."""
    num_threads(2)
    x, gamma, beta, dy = make_inputs((512, 2048), 1, np.float32, seed=1)
    first = run_all(x, gamma, beta, dy, 1, True)
    for _ in range(3):
        assert_bitwise_equal(run_all(x, gamma, beta, dy, 1, True), first)
    x, gamma, beta, dy = make_inputs((4, 32, 64, 64), 1, np.float32, seed=2)
    first = run_all(x, gamma, beta, dy, 1, False)
    for _ in range(3):
        assert_bitwise_equal(run_all(x, gamma, beta, dy, 1, False), first)


def test_concurrent_python_threads_give_the_serial_results():
    """Two Python threads calling fastbn at once get exactly what serial calls get."""
    jobs = [make_inputs((256, 512), 1, np.float32, seed=3) + ((256, 512), 1),
            make_inputs((4, 16, 32, 32), 1, np.float64, seed=4) + ((4, 16, 32, 32), 1),
            make_inputs((8, 16, 16, 24), -1, np.float32, seed=5) + ((8, 16, 16, 24), -1)]
    expected = [run_all(x, g, b, dy, axis, True) for x, g, b, dy, _, axis in jobs]
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            x, g, b, dy, _, axis = jobs[k % len(jobs)]
            results[k] = [run_all(x, g, b, dy, axis, True) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 4
    for k, runs in results.items():
        for run in runs:
            assert_bitwise_equal(run, expected[k % len(jobs)])


def test_guard_thread_count_changes_a_naive_parallel_reduction(num_threads):
    """The harness can fail: a reduction chunked by the thread count differs with 1 and 2.

    A plain ``prange`` sum would not prove it: its chunks are the scheduler's, and on busy
    cores TBB may run them all on one thread, which gives the serial bits.  Here the
    partition is explicit -- ``get_num_threads()`` chunks, each summed serially, partials
    summed in order -- so the result depends on the thread count and on nothing else.
    That is the design fastbn avoids (its chunks depend on the shape only); the test shows
    that ``num_threads`` reaches the kernels, so equal bits above are not vacuous.
    """
    import numba
    from numba import njit, prange

    @njit(parallel=True)
    def sum_in_thread_count_chunks(a):
        k = numba.get_num_threads()
        step = (a.size + k - 1) // k
        partials = np.zeros(k, dtype=np.float32)
        for c in prange(k):
            s = np.float32(0)
            for i in range(c * step, min(a.size, (c + 1) * step)):
                s += a[i]
            partials[c] = s
        total = np.float32(0)
        for c in range(k):
            total += partials[c]
        return total

    a = np.random.default_rng(6).standard_normal(1 << 20).astype(np.float32) + 3
    half = a.size // 2
    serial = np.cumsum(a, dtype=np.float32)[-1]  # cumsum adds in order (no pairwise sum)
    halves = (np.cumsum(a[:half], dtype=np.float32)[-1]
              + np.cumsum(a[half:], dtype=np.float32)[-1])
    assert serial.tobytes() != halves.tobytes()  # the data tells the two partitions apart
    for _ in range(3):  # not a lucky draw of the scheduler: the same bits every time
        num_threads(1)
        assert np.float32(sum_in_thread_count_chunks(a)).tobytes() == serial.tobytes()
        num_threads(2)
        assert np.float32(sum_in_thread_count_chunks(a)).tobytes() == halves.tobytes()
