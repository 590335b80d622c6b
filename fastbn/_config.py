"""Every Numba compilation flag and the threading-layer policy, in one place.

Kernels import their flags from here so that a change of policy (caching,
fastmath, a forced serial fallback for the performance gate) is one edit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
import threading
import warnings

import numba

try:  # POSIX: inter-process lock around compile-cache reads and writes
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def env_count(name: str, default: int) -> int:
    """A non-negative integer setting from the environment (an element count);
    ``default`` when unset or blank, and with a warning when not an integer."""
    text = os.environ.get(name, "").strip()
    try:
        return max(0, int(text)) if text else default
    except ValueError:
        warnings.warn(f"{name}={text!r} is not an integer; using {default}",
                      RuntimeWarning, stacklevel=2)  # the line that reads the setting
        return default


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
#: ``FASTBN_SOFTWARE_F16=1`` converts float16 with exact integer code even where
#: the CPU has F16C: the path CPUs without F16C take (see :data:`F16_HARDWARE`),
#: forced so that it can be tested on any machine.  It never caches: Numba's
#: cache index does not record the choice, so it would load the F16C code.
SOFTWARE_F16: bool = _env_flag("FASTBN_SOFTWARE_F16")

CACHE_REQUESTED: bool = not (_env_flag("FASTBN_NO_CACHE") or SLOW_FALLBACK or SOFTWARE_F16)

_KERNELS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "drivers.py")


def _find_cache_dir() -> str | None:
    """The directory Numba will cache ``kernels/*.py`` in, or None if none is writable.

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
    * Stale entries.  Numba keys an entry on the stamp (mtime, size) of the
      file that defines the function, but kernels inline helpers from other
      files (``storage``, ``elementwise``, ``plan``): after an edit or an
      upgrade that touches only a helper's file, Numba would load machine code
      built from the old helper -- and the parallel and serial variants of one
      kernel could then disagree bit for bit.  The stamp is extended with a
      digest of every source the kernels are built from
      (:func:`kernel_sources_digest`), so any such change recompiles them all.
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
        if getattr(cache, "_fastbn_hardened", False):  # a dispatcher seen under two names:
            continue  # wrapping twice would take the (non-reentrant) flock twice
        _wrap_cache(cache)
        cache._fastbn_hardened = True


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


@functools.cache
def kernel_sources_digest() -> str:
    """SHA-256 of the sources every cached kernel may be built from: ``kernels/*.py``
    and this module (the flags), read once per process."""
    package = os.path.dirname(os.path.abspath(__file__))
    kernels = os.path.join(package, "kernels")
    names = sorted(os.path.join(kernels, name) for name in os.listdir(kernels)
                   if name.endswith(".py"))
    digest = hashlib.sha256()
    for path in [*names, os.path.join(package, "_config.py")]:
        digest.update(os.path.basename(path).encode())
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:  # a missing file changes the digest too
            digest.update(b"<missing>")
    return digest.hexdigest()


def _wrap_cache(cache) -> None:
    cache_file = getattr(cache, "_cache_file", None)
    stamp = getattr(cache_file, "_source_stamp", None)
    if stamp is not None and not (isinstance(stamp, tuple) and len(stamp) == 3
                                  and stamp[0] == "fastbn"):
        # Compared for equality with the stamp saved in the index (see harden_cache).
        cache_file._source_stamp = ("fastbn", stamp, kernel_sources_digest())
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


def _target_has_f16_instructions() -> bool:
    """Whether the code Numba compiles may use hardware half <-> float conversions.

    Numba compiles for ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` when set (an
    empty feature list for ``generic``), else for the host; this reads the
    same settings the same way.  On x86 the instructions are F16C's; AArch64
    has them in the base ISA.  Anywhere else LLVM may lower the conversion to
    a runtime-library call that Numba's JIT does not resolve (a crash at the
    first call, not a compile error), so the integer code is used.
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    features = numba.config.CPU_FEATURES
    if features is None:
        from numba.core.codegen import get_host_cpu_features

        features = get_host_cpu_features()
    return "+f16c" in str(features).split(",")


#: True when float16 data is converted with the CPU's instructions (F16C);
#: False on targets without them, or with ``FASTBN_SOFTWARE_F16=1``.
F16_HARDWARE: bool = not SOFTWARE_F16 and _target_has_f16_instructions()

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
# Numba's layers differ in safety (Numba's docs, and tests/test_fork.py here):
#
#   tbb        thread-safe, fork-safe
#   omp        thread-safe; GNU OpenMP is NOT fork-safe: a child forked after
#              the parent ran a parallel region is terminated when it starts one
#   workqueue  NOT thread-safe (concurrent parallel regions abort the process);
#              fork-safe
#
# So the default is tbb, then omp, then workqueue, unless the user chose one
# with NUMBA_THREADING_LAYER.  pip's ``tbb`` wheel (a dependency of fastbn on
# the platforms that have it) puts libtbb in ``<prefix>/lib``, where the
# dynamic loader does not look, so Numba's tbb layer would fail to load
# without LD_LIBRARY_PATH; we load the wheel's libtbb ourselves, by path and
# with RTLD_GLOBAL, before Numba picks its layer (at the first parallel
# launch), and Numba's layer then links against the library already loaded.
# Under workqueue every parallel launch is serialized through a lock; in a
# forked child of a GNU OpenMP parent every launch runs serially (_launch.py).
# --------------------------------------------------------------------------
USER_CHOSE_LAYER: bool = bool(os.environ.get("NUMBA_THREADING_LAYER", "").strip())
if not USER_CHOSE_LAYER:
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]
    if not str(numba.config.THREADING_LAYER).strip():
        # An empty NUMBA_THREADING_LAYER= (a script's ``${LAYER:-}``) means no
        # choice; Numba itself would reject '' at the first parallel launch.
        numba.config.THREADING_LAYER = "default"

_TBB_SONAME = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib"}.get(sys.platform)


def _tbb_library_candidates() -> list[str]:
    """Where the tbb wheel may have put libtbb: <prefix>/lib, or as its metadata says."""
    if _TBB_SONAME is None:  # Windows: the wheel's DLL sits on the search path already
        return []
    candidates = [os.path.join(prefix, "lib", _TBB_SONAME)
                  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix))]
    try:
        from importlib import metadata

        for file in metadata.files("tbb") or ():
            if file.name == _TBB_SONAME:
                candidates.append(os.path.normpath(str(file.locate())))
    except Exception:  # tbb not installed, or odd metadata: nothing more to try
        pass
    return list(dict.fromkeys(candidates))


def _preload_tbb() -> tuple[str | None, str | None]:
    """(path of the libtbb loaded, or None; why not, or None)."""
    requested = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if requested not in ("", "default", "tbb", "safe", "threadsafe", "forksafe"):
        return None, f"not needed: NUMBA_THREADING_LAYER={requested}"
    candidates = [path for path in _tbb_library_candidates() if os.path.exists(path)]
    if not candidates:
        return None, "the tbb package is not installed (pip install tbb)"
    errors = []
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return path, None
        except OSError as exc:
            errors.append(f"{path}: {exc}")
    return None, "; ".join(errors)


TBB_LIBRARY, TBB_PRELOAD_ERROR = _preload_tbb()

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


def threading_layer() -> str | None:
    """Name of the Numba threading layer in use (None before the first parallel kernel ran)."""
    return _current_layer()


def _openmp_vendor() -> str:
    try:
        from numba.np.ufunc import omppool

        return str(omppool.openmp_vendor)
    except Exception:  # pragma: no cover - no omp layer built
        return "unknown"


def layer_safety(layer: str | None) -> tuple[bool, bool]:
    """(thread_safe, fork_safe) of a Numba threading layer as loaded here."""
    if layer == "tbb":
        return True, True
    if layer == "omp":
        return True, _openmp_vendor() == "Intel"  # GNU OpenMP kills forked children
    if layer == "workqueue":
        return False, True
    return False, False


def parallel_regions_fork_unsafe() -> bool:
    """True once this process ran a parallel region on a layer a forked child cannot use."""
    layer = _current_layer()
    return layer is not None and not layer_safety(layer)[1]
