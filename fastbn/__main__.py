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
import math
import os
import platform
import sys
import time

import numpy as np

import fastbn
from fastbn import _config, kernels, reference
from fastbn._launch import SMALL_PROBLEM

#: The kernel entry points called by fastbn.functional (each compiled per
#: dtype, per parameter dtype and for read-only inputs, in both variants).
DRIVERS = (
    "train_forward_rows", "train_forward_planes",
    "normalize_rows", "normalize_planes",
    "backward_rows", "backward_planes",
    "backward_reduce_rows", "backward_reduce_planes",
    "backward_apply_rows", "backward_apply_planes",
    "moments_rows", "moments_planes",
    "add_relu_train_rows", "add_relu_train_planes",
    "add_relu_normalize_rows", "add_relu_normalize_planes",
    "add_relu_backward_rows", "add_relu_backward_planes",
)
VARIANTS = {"parallel": kernels.PARALLEL, "serial": kernels.SERIAL}
DTYPES = (np.float32, np.float64, np.float16, "bfloat16")


def _dispatchers():
    """(label, dispatcher) of every driver in both variants, and the layer's update kernel."""
    for variant, namespace in VARIANTS.items():
        for name in DRIVERS:
            yield f"{name}/{variant}", getattr(namespace, name)
    yield "update_running_stats", kernels.update_running_stats


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


def _warm_calls(x: np.ndarray) -> None:
    """Every public operation on ``x`` (whose shape picks the layout and the variant)."""
    sixteen = x.dtype.itemsize == 2
    dtype = np.dtype(np.float32) if sixteen else x.dtype  # 16-bit data: float32 parameters
    n_channels = x.shape[1]
    gamma = np.ones(n_channels, dtype)
    y = np.empty_like(x)  # out=: keeps bfloat16's marked bits marked
    _, ctx = fastbn.batch_norm_forward(x, gamma, gamma, out=y)
    fastbn.batch_norm_backward(y, ctx, out=np.empty_like(x))
    mean, var = fastbn.batch_stats(x)
    # running statistics in the data's dtype (the layer) and in float64 (from batch_stats)
    fastbn.batch_norm_inference(x, mean.astype(dtype), var.astype(dtype), gamma, gamma,
                                out=np.empty_like(x))
    _, ctx = fastbn.batch_norm_inference(x, mean, var, gamma, gamma, return_context=True,
                                         out=np.empty_like(x))
    sums = fastbn.functional.batch_norm_backward_reduce(y, ctx)
    fastbn.functional.batch_norm_backward_apply(y, ctx, *sums, out=np.empty_like(x))
    # the fused residual block (the residual: x itself)
    y = np.empty_like(x)
    _, ctx = fastbn.batch_norm_add_relu_forward(x, x, gamma, gamma, out=y)
    fastbn.batch_norm_add_relu_backward(y, ctx, out=np.empty_like(x),
                                        out_residual=np.empty_like(x))
    fastbn.batch_norm_add_relu_inference(x, x, mean, var, gamma, gamma, out=np.empty_like(x))


def _warm_data(shape, dtype) -> np.ndarray:
    """Data of ``dtype`` ("bfloat16": its bits, marked for fastbn; no ml_dtypes needed)."""
    values = np.linspace(-1, 1, math.prod(shape), dtype=np.float32).reshape(shape)
    if dtype == "bfloat16":
        bits = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
        return fastbn.functional._bfloat16_bits(bits)
    return values.astype(dtype)


def warmup(verbose: bool = True, dtypes=None) -> dict:
    """Compile (or load) every kernel variant a training or inference loop can reach.

    Both layouts, every data dtype (``dtypes``: a subset of the names
    ``float32``, ``float64``, ``float16``, ``bfloat16``; default all), the
    serial variant (small inputs) and the parallel one, and the layer's
    running-statistics update.  Read-only inputs are called too: they reach
    the kernels through a writeable alias, so they need no compilation of
    their own (a cached run shows no misses).  Returns cache statistics.
    """
    started = time.perf_counter()
    large = SMALL_PROBLEM
    for dtype in _selected_dtypes(dtypes):
        for shape in ((4, 3), (2, 3, 5), (large // 4, 4), (2, 4, large // 8)):
            x = _warm_data(shape, dtype)
            _warm_calls(x)
            x.flags.writeable = False
            _warm_calls(x)
        if dtype in (np.float32, np.float64):
            layer = fastbn.BatchNorm(3, dtype=dtype)
            layer(np.linspace(-1, 1, 12, dtype=dtype).reshape(4, 3))
    elapsed = time.perf_counter() - started
    hits = misses = 0
    for _, dispatcher in _dispatchers():
        hits += sum(dispatcher.stats.cache_hits.values())
        misses += sum(dispatcher.stats.cache_misses.values())
    result = {"seconds": elapsed, "cache_hits": hits, "cache_misses": misses}
    if verbose:
        source = "loaded from the cache" if misses == 0 and hits else "compiled"
        print(f"warmup: {hits + misses} kernel variants {source} in {elapsed:.2f} s "
              f"(cache hits {hits}, misses {misses}, cache {'on' if _config.CACHE else 'off'})")
    return result


def _selected_dtypes(names) -> list:
    """DTYPES, or those named in ``names`` (an iterable of names, or a comma list)."""
    by_name = {np.dtype(d).name if d != "bfloat16" else d: d for d in DTYPES}
    if names is None:
        return list(DTYPES)
    if isinstance(names, str):
        names = [name for name in names.split(",") if name.strip()]
    chosen = []
    for name in names:
        key = name if name == "bfloat16" or not isinstance(name, str) else name.strip()
        key = key if isinstance(key, str) else np.dtype(key).name
        if key not in by_name:
            raise ValueError(f"unknown dtype {key!r} for warmup; choose from "
                             f"{', '.join(by_name)}")
        chosen.append(by_name[key])
    return chosen


def cached_variants() -> list[str]:
    """Kernel variants present in the on-disk cache (read from Numba's index files)."""
    found = []
    for label, dispatcher in _dispatchers():
        cache = getattr(dispatcher, "_cache", None)
        cache_file = getattr(getattr(cache, "_impl", None), "_cache_file", None)
        cache_file = cache_file or getattr(cache, "_cache_file", None)
        try:
            overloads = cache_file._load_index()
        except Exception:
            continue
        for key in overloads:
            x_type = (key[0] if isinstance(key, tuple) else key)[0]
            readonly = "" if getattr(x_type, "mutable", True) else ", read-only"
            found.append(f"{label}[{x_type.dtype}, {x_type.ndim}-d{readonly}]")
    return sorted(set(found))


def info() -> None:
    import llvmlite
    import numba

    # The threading layer is known only after a parallel region ran.
    fastbn.batch_stats(np.ones((SMALL_PROBLEM, 2)))
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
         f"{os.environ.get('NUMBA_THREADING_LAYER', '').strip() or 'tbb > omp > workqueue'})"),
        ("layer safety", "thread-safe: {}, fork-safe: {}".format(
            *("yes" if safe else "no" for safe in _config.layer_safety(layer)))),
        ("tbb library", _config.TBB_LIBRARY or f"not loaded ({_config.TBB_PRELOAD_ERROR})"),
        ("kernel launches", "serialized by a lock (workqueue is not thread-safe)"
         if layer == "workqueue" else "concurrent (thread-safe layer)"),
        ("after fork()", "serial kernels in the child (GNU OpenMP cannot run there)"
         if not _config.layer_safety(layer)[1] else "parallel kernels (fork-safe layer)"),
        ("small inputs", f"< {SMALL_PROBLEM} elements run serial kernels on the calling thread"),
        ("compile cache", "on" if _config.CACHE else "off"),
        ("cache directory", f"{_config.CACHE_DIR} "
         f"({'writable' if _cache_writable(_config.CACHE_DIR) else 'not writable'})"),
        ("slow fallback", "ON (FASTBN_SLOW_FALLBACK)" if _config.SLOW_FALLBACK else "off"),
        ("float16 conversion", "the CPU's instructions (F16C or native)" if _config.F16_HARDWARE
         else "exact integer code (" + ("FASTBN_SOFTWARE_F16" if _config.SOFTWARE_F16
                                        else "no F16C on the compile target") + ")"),
        ("data dtypes", "float32, float64, float16, bfloat16 (parameters float32/float64)"),
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
    warmup_parser = sub.add_parser("warmup", help="compile or load every kernel variant")
    warmup_parser.add_argument("--dtypes", default=None,
                               help="comma-separated data dtypes to warm (default: "
                                    "float32,float64,float16,bfloat16)")
    bench_parser = sub.add_parser("bench", help="quick fastbn vs NumPy timing")
    bench_parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "warmup":
        try:
            dtypes = _selected_dtypes(args.dtypes)
        except ValueError as exc:
            parser.error(str(exc))
        warmup(dtypes=dtypes)
    else:
        bench(args.repeats)
    return 0


def _run_cli(argv=None) -> int:
    """main(), but a reader that closes the pipe early (``| head``) ends it quietly."""
    try:
        code = main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the flush at
        # interpreter exit does not raise a second time, and exit non-zero.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run_cli())
