"""``python -m fastbn info | warmup | bench``.

* ``info``   -- versions, CPU, threads, the threading layer in use, the compile
  cache (where, whether writable) and which kernel variants it holds.
* ``warmup`` -- compile (or load from the cache) every dtype/layout variant,
  so the first real call pays nothing; prints what came from the cache.
* ``bench``  -- a quick self-check of speed: fastbn against the NumPy
  reference on two shapes, medians of interleaved runs.  The full benchmark
  grid with every peer is ``make bench`` in the source tree.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

import fastbn
from fastbn import _config, _kernels, reference

#: The kernel entry points (each compiled once per dtype).
DRIVERS = (
    "train_forward_rows", "train_forward_planes",
    "inference_rows", "inference_planes",
    "backward_rows", "backward_planes",
    "moments_rows", "moments_planes",
)
DTYPES = (np.float32, np.float64)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_writable(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.access(path, os.W_OK)


def warmup(verbose: bool = True) -> dict:
    """Run every public operation once per dtype and layout; return cache statistics."""
    started = time.perf_counter()
    for dtype in DTYPES:
        for shape in ((4, 3), (2, 3, 5)):  # rows and planes layouts
            x = np.linspace(-1, 1, np.prod(shape), dtype=dtype).reshape(shape)
            gamma = np.ones(shape[1], dtype)
            y, ctx = fastbn.batch_norm_forward(x, gamma, gamma)
            fastbn.batch_norm_backward(y, ctx)
            fastbn.batch_norm_inference(x, ctx.mean, ctx.var, gamma, gamma)
            fastbn.batch_stats(x)
    elapsed = time.perf_counter() - started
    hits = misses = 0
    for name in DRIVERS:
        stats = getattr(_kernels, name).stats
        hits += sum(stats.cache_hits.values())
        misses += sum(stats.cache_misses.values())
    result = {"seconds": elapsed, "cache_hits": hits, "cache_misses": misses}
    if verbose:
        source = "loaded from the cache" if misses == 0 and hits else "compiled"
        print(f"warmup: {2 * len(DRIVERS)} kernel variants {source} in {elapsed:.2f} s "
              f"(cache hits {hits}, misses {misses}, cache {'on' if _config.CACHE else 'off'})")
    return result


def cached_variants() -> list[str]:
    """Kernel variants present in the on-disk cache (read from Numba's index files)."""
    found = []
    for name in DRIVERS:
        cache = getattr(getattr(_kernels, name), "_cache", None)
        cache_file = getattr(getattr(cache, "_impl", None), "_cache_file", None)
        cache_file = cache_file or getattr(cache, "_cache_file", None)
        try:
            overloads = cache_file._load_index()
        except Exception:
            continue
        for key in overloads:
            x_type = (key[0] if isinstance(key, tuple) else key)[0]
            readonly = "" if getattr(x_type, "mutable", True) else ", read-only"
            found.append(f"{name}[{x_type.dtype}, {x_type.ndim}-d{readonly}]")
    return sorted(set(found))


def info() -> None:
    import llvmlite
    import numba

    # The threading layer is known only after a parallel region ran.
    fastbn.batch_stats(np.ones((2, 2)))
    layer = _config.threading_layer()
    rows = [
        ("fastbn", fastbn.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("numba", numba.__version__),
        ("llvmlite", llvmlite.__version__),
        ("cpu", f"{_cpu_model()} ({os.cpu_count()} logical cores)"),
        ("numba threads", str(numba.get_num_threads())),
        ("threading layer", f"{layer} (requested: "
         f"{os.environ.get('NUMBA_THREADING_LAYER', 'tbb > omp > workqueue')})"),
        ("kernel launches", "serialized by a lock (workqueue is not thread-safe)"
         if layer == "workqueue" else "concurrent (thread-safe layer)"),
        ("compile cache", "on" if _config.CACHE else "off"),
        ("cache directory", f"{_config.CACHE_DIR} "
         f"({'writable' if _cache_writable(_config.CACHE_DIR) else 'not writable'})"),
        ("slow fallback", "ON (FASTBN_SLOW_FALLBACK)" if _config.SLOW_FALLBACK else "off"),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    variants = cached_variants()
    print(f"{'cached variants':<{width}}  {len(variants)}")
    for variant in variants:
        print(f"{'':<{width}}    {variant}")


def _time_pair(shape, repeats: int) -> tuple[float, float]:
    """Median ms of fastbn and of the NumPy reference (forward+backward), interleaved."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    gamma = np.ones(shape[1], np.float32)
    beta = np.zeros(shape[1], np.float32)
    y_buf, dx_buf = np.empty_like(x), np.empty_like(x)

    def run_fastbn():
        _, ctx = fastbn.batch_norm_forward(x, gamma, beta, out=y_buf)
        fastbn.batch_norm_backward(dy, ctx, out=dx_buf)

    def run_numpy():
        _, cache = reference.forward(x, gamma, beta)
        reference.backward(dy, cache)

    times = {run_fastbn: [], run_numpy: []}
    for fn in times:
        fn()  # compile / warm caches
    for _ in range(repeats):
        for fn, samples in times.items():
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return tuple(1e3 * float(np.median(samples)) for samples in times.values())


def bench(repeats: int = 9) -> None:
    print(f"{'shape (float32)':<20} {'fastbn ms':>10} {'numpy ms':>10} {'speed-up':>9}")
    for shape in ((1024, 4096), (32, 64, 56, 56)):
        fast, slow = _time_pair(shape, repeats)
        print(f"{str(shape):<20} {fast:>10.3f} {slow:>10.3f} {slow / fast:>8.1f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, threads, threading layer, compile cache")
    sub.add_parser("warmup", help="compile or load every kernel variant")
    bench_parser = sub.add_parser("bench", help="quick fastbn vs NumPy timing")
    bench_parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "warmup":
        warmup()
    else:
        bench(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
