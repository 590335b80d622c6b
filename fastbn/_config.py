"""Every Numba compilation flag and the threading-layer policy, in one place.

Kernels import their flags from here so that a change of policy (caching,
fastmath, a forced serial fallback for the performance gate) is one edit.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext

import numba

try:  # POSIX: inter-process lock around compile-cache reads and writes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


#: ``FASTBN_SLOW_FALLBACK=1`` compiles every kernel without ``parallel`` and
#: without fastmath.  It exists only so the CI performance gate can be shown to
#: go red on a real regression; never set it in production.
SLOW_FALLBACK: bool = _env_flag("FASTBN_SLOW_FALLBACK")

#: ``cache=True`` on every kernel: compiled machine code is written next to the
#: package or, when that directory is read-only, wherever Numba's own locators
#: find a writable place (``NUMBA_CACHE_DIR`` first, then the user-wide cache
#: directory).  When none is writable, caching is switched off instead of
#: failing at import.  ``FASTBN_NO_CACHE=1`` turns it off (to measure a cold
#: compile).  The slow fallback never caches: Numba's cache index does not
#: record the ``parallel``/``fastmath`` flags, so it would load (or poison)
#: the fast code.
CACHE_REQUESTED: bool = not (_env_flag("FASTBN_NO_CACHE") or SLOW_FALLBACK)

_KERNELS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels.py")


def _find_cache_dir() -> str | None:
    """The directory Numba will cache ``_kernels.py`` in, or None if none is writable.

    Uses Numba's own locator classes in Numba's own order, so the answer is
    the one Numba reaches when the kernels are decorated (each locator checks
    that its directory is writable).  If Numba's internals have moved, we
    cannot tell in advance and let Numba decide.
    """
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    locator_classes = getattr(impl, "_locator_classes", None)
    if locator_classes is None:  # pragma: no cover - Numba internals moved
        return "<decided by Numba>"

    def probe():  # only its file name matters to the locators
        pass

    for locator_class in locator_classes:
        try:
            locator = locator_class.from_function(probe, _KERNELS_FILE)
        except Exception:  # a broken locator must not break import
            locator = None
        if locator is not None:
            return locator.get_cache_path()
    return None


CACHE_DIR: str | None = _find_cache_dir() if CACHE_REQUESTED else None
CACHE: bool = CACHE_DIR is not None


def harden_cache(namespace: dict) -> None:
    """Make every cached dispatcher in ``namespace`` safe against a bad cache.

    Two failure modes of Numba's on-disk cache are handled:

    * Corruption.  Numba unpickles its index and data files without catching
      errors, so a truncated or garbled file (a full disk, a killed process)
      would raise on the first call.  A failed load is treated as a miss
      (Numba compiles and rewrites the entry); a failed save -- which
      re-reads the index -- removes the broken index and tries once more, then
      gives up silently: the kernel works, it is just not cached.
    * Races between processes.  A save reads the index, picks a free data
      file name and writes both; two processes saving different signatures at
      once can leave an index entry pointing at the other signature's machine
      code, which crashes when loaded.  Loads and saves therefore hold an
      exclusive ``flock`` on a lock file in the cache directory.
    """
    for dispatcher in namespace.values():
        cache = getattr(dispatcher, "_cache", None)
        if cache is None or not hasattr(cache, "load_overload"):
            continue
        _wrap_cache(cache)


class _CacheFileLock:
    """Exclusive inter-process lock on ``<cache dir>/fastbn-cache.lock`` (POSIX only)."""

    def __init__(self, directory: str | None):
        self._path = os.path.join(directory, "fastbn-cache.lock") if directory else None
        self._file = None

    def __enter__(self):
        if self._path is None or fcntl is None:
            return self
        try:
            self._file = open(self._path, "a")  # noqa: SIM115 - closed in __exit__
            fcntl.flock(self._file, fcntl.LOCK_EX)
        except OSError:  # cannot lock: proceed unlocked rather than fail
            self._close()
        return self

    def __exit__(self, *exc_info):
        self._close()

    def _close(self):
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


def _wrap_cache(cache) -> None:
    load_overload = cache.load_overload
    save_overload = cache.save_overload
    directory = getattr(cache, "cache_path", None) or CACHE_DIR

    def safe_load(sig, target_context):
        with _CacheFileLock(directory):
            try:
                return load_overload(sig, target_context)
            except Exception:
                return None

    def safe_save(sig, data):
        with _CacheFileLock(directory):
            try:
                return save_overload(sig, data)
            except Exception:
                index_path = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
                if index_path:
                    try:
                        os.remove(index_path)
                        return save_overload(sig, data)
                    except Exception:
                        return None
                return None

    cache.load_overload = safe_load
    cache.save_overload = safe_save


PARALLEL: bool = not SLOW_FALLBACK

#: Fastmath for *reductions over a contiguous plane* only.  A scalar
#: accumulator (``acc += v``) vectorizes only when LLVM may reassociate the sum.
#: The set deliberately omits ``nnan``/``ninf`` (NaN/Inf must propagate) and
#: ``afn``.  Reductions using it centre and accumulate in float64, where the
#: summation order changes the result by ~1e-16 relative; elementwise sweeps
#: that rely on float32 operation order (hi/lo centring) never use it.
REDUCTION_FASTMATH: set[str] | bool = (
    False if SLOW_FALLBACK else {"reassoc", "contract", "nsz", "arcp"}
)

# --------------------------------------------------------------------------
# Threading layer.
#
# Numba's ``workqueue`` layer is not thread-safe: two Python threads entering
# parallel regions at once abort the process.  We ask for a thread-safe layer
# first (tbb, then omp) unless the user chose one with NUMBA_THREADING_LAYER,
# and when the layer in use turns out to be ``workqueue`` every kernel launch
# is serialized through ``_launch_lock``.
# --------------------------------------------------------------------------
USER_CHOSE_LAYER: bool = "NUMBA_THREADING_LAYER" in os.environ
if not USER_CHOSE_LAYER:
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]

_launch_lock = threading.Lock()
_layer_in_use: str | None = None


def _current_layer() -> str | None:
    """The threading layer Numba actually loaded, or None before the first launch."""
    global _layer_in_use
    if _layer_in_use is None:
        try:
            _layer_in_use = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            return None
    return _layer_in_use


#: Below this many elements a kernel runs on the calling thread alone: waking
#: the thread team costs more than it saves (about 2 us per parallel region
#: here, and up to a scheduler quantum when the machine is busy).  Chunking
#: never depends on the thread count, so the results are the same bits.
SMALL_PROBLEM: int = 1 << 15


class _SingleThreadScope:
    """Run the enclosed kernel launch with one Numba thread (a per-thread setting)."""

    __slots__ = ("_lock", "_threads")

    def __init__(self, lock):
        self._lock = lock

    def __enter__(self):
        if self._lock is not None:
            self._lock.acquire()
        self._threads = numba.get_num_threads()
        numba.set_num_threads(1)

    def __exit__(self, *exc_info):
        numba.set_num_threads(self._threads)
        if self._lock is not None:
            self._lock.release()


_NO_GUARD = nullcontext()


def launch_guard(size: int = SMALL_PROBLEM):
    """Context manager held around every kernel launch on ``size`` elements.

    Takes a real lock when the threading layer is (or may turn out to be)
    ``workqueue``; before the first launch the layer is unknown, so the first
    launches take the lock.  Small problems run single-threaded.
    """
    layer = _current_layer()
    lock = _launch_lock if layer is None or layer == "workqueue" else None
    if size < SMALL_PROBLEM:
        return _SingleThreadScope(lock)
    return _NO_GUARD if lock is None else lock


def threading_layer() -> str | None:
    """Name of the Numba threading layer in use (None before the first kernel ran)."""
    return _current_layer()
