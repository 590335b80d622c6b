"""STREAM triad (``a = b + s*c``) as a Numba ``prange`` kernel: the machine's memory roofline.

Arrays default to 2**25 float64 (256 MiB each, 8x a 32 MiB L3), initialised in
parallel (first touch by the same threads that later run the triad), and the
result is the best of several runs, in the STREAM convention of 24 bytes moved
per element (read b, read c, write a; write-allocate traffic not counted).
Uses Numba's thread count, so it is the ceiling fastbn's kernels can reach.

    python -m bench.bandwidth [--elements N] [--runs K]

:func:`stream_probe` is the same idea on a benchmark's own array: a parallel
``y = s*x + t`` over its bytes, which the CI performance gate times in the same
rounds as fastbn (the streaming speed the machine gives *right now*).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

DEFAULT_ELEMENTS = 1 << 25
DEFAULT_RUNS = 10


@njit(parallel=True, cache=True)
def _init(a, b, c):
    for i in prange(a.shape[0]):
        a[i] = 0.0
        b[i] = 1.0
        c[i] = 2.0


@njit(parallel=True, cache=True, fastmath=True)
def _triad(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(parallel=True, cache=True)
def _scale_shift(x, y, s, t):
    for i in prange(x.shape[0]):
        y[i] = x[i] * s + t


#: Bytes :func:`stream_probe` moves per byte of its array: it reads x and writes y.
STREAM_PROBE_BYTES = 2


def stream_probe(x: np.ndarray, out: np.ndarray | None = None) -> Callable[[], None]:
    """A zero-argument callable that streams ``x``'s bytes once through a parallel
    ``y = 1.5*x + 0.25`` (Numba ``prange``, Numba's threads, a fresh output).

    It moves ``STREAM_PROBE_BYTES * x.nbytes`` bytes and does nothing else, so
    timed in the same rounds as a memory-bound kernel on the same array it
    measures what the machine's threads and memory deliver at that moment: on a
    shared runner another process, a neighbour on the memory bus or the pages a
    process was given can make both 2x slower together, where a single-threaded
    peer slows far less.  float32 or float64 data (the kernel is compiled for
    the array's dtype).  ``out``: where y goes (x's size and dtype, contiguous);
    a fresh array by default.
    """
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype not in (np.float32, np.float64):
        raise TypeError(f"stream_probe needs float32 or float64 data, got {flat.dtype}")
    out = np.empty_like(flat) if out is None else out.reshape(-1)
    if out.dtype != flat.dtype or out.size != flat.size or not out.flags.c_contiguous:
        raise ValueError("stream_probe's out must be contiguous, with x's size and dtype")
    scale, shift = flat.dtype.type(1.5), flat.dtype.type(0.25)

    def probe() -> None:
        _scale_shift(flat, out, scale, shift)

    probe()  # compile (or load from cache), touch the output's pages
    if out[0] != flat[0] * scale + shift:
        raise RuntimeError("stream_probe produced a wrong result")
    return probe


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the largest CPU cache (Linux sysfs), or ``default`` when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for entry in base.glob("index*/size") if base.is_dir() else []:
        try:
            text = entry.read_text().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best or default


def stream_triad(elements: int = DEFAULT_ELEMENTS, runs: int = DEFAULT_RUNS) -> dict:
    """Measure STREAM triad bandwidth; returns ``{"gbps", "best_s", "times", ...}``.

    ``gbps`` is 1e9 bytes per second of the best run.
    """
    a = np.empty(elements)
    b = np.empty(elements)
    c = np.empty(elements)
    _init(a, b, c)
    _triad(a, b, c, 3.0)  # compile (or load from cache) and warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        _triad(a, b, c, 3.0)
        times.append(time.perf_counter() - t0)
    if not (a[0] == 7.0 and a[-1] == 7.0):
        raise RuntimeError("STREAM triad produced a wrong result")
    nbytes = 3 * a.nbytes
    best = min(times)
    return {
        "kernel": "a = b + s*c (numba prange, float64)",
        "elements": elements,
        "array_mib": a.nbytes / 2**20,
        "bytes_per_run": nbytes,
        "runs": runs,
        "threads": numba.get_num_threads(),
        "times": times,
        "best_s": best,
        "gbps": nbytes / best / 1e9,
        "median_gbps": nbytes / float(np.median(times)) / 1e9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=DEFAULT_ELEMENTS)
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    args = p.parse_args(argv)
    r = stream_triad(args.elements, args.runs)
    print(f"STREAM triad: {r['gbps']:.1f} GB/s best, {r['median_gbps']:.1f} GB/s median "
          f"({r['runs']} runs, 3 x {r['array_mib']:.0f} MiB arrays, {r['threads']} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
