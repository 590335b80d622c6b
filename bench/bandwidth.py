"""STREAM triad (``a = b + s*c``) as a Numba ``prange`` kernel: the machine's memory roofline.

Arrays default to 2**25 float64 (256 MiB each, 8x a 32 MiB L3), initialised in
parallel (first touch by the same threads that later run the triad), and the
result is the best of several runs, in the STREAM convention of 24 bytes moved
per element (read b, read c, write a; write-allocate traffic not counted).
Uses Numba's thread count, so it is the ceiling fastbn's kernels can reach.

    python -m bench.bandwidth [--elements N] [--runs K]
"""

from __future__ import annotations

import argparse
import time
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
