"""Every Numba compilation flag and the threading-layer policy, in one place.

Kernels import their flags from here so that a change of policy (caching,
fastmath, a forced serial fallback for the performance gate) is one edit.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext

import numba


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


#: ``FASTBN_SLOW_FALLBACK=1`` compiles every kernel without ``parallel`` and
#: without fastmath.  It exists only so the CI performance gate can be shown to
#: go red on a real regression; never set it in production.
SLOW_FALLBACK: bool = _env_flag("FASTBN_SLOW_FALLBACK")

#: ``cache=True`` on every kernel: compiled machine code is written next to the
#: package (or, when that directory is read-only, to Numba's user-wide cache
#: directory, or ``NUMBA_CACHE_DIR``), so later processes skip the multi-second
#: compile.  ``FASTBN_NO_CACHE=1`` turns it off (used to measure a cold compile).
#: The slow fallback never caches: Numba's cache index does not record the
#: ``parallel``/``fastmath`` flags, so it would load (or poison) the fast code.
CACHE: bool = not (_env_flag("FASTBN_NO_CACHE") or SLOW_FALLBACK)

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


def launch_guard():
    """Context manager held around every kernel launch.

    A real lock when the layer is (or may turn out to be) ``workqueue``, a
    no-op otherwise.  Before the first launch the layer is unknown, so the
    first launches take the lock.
    """
    layer = _current_layer()
    if layer is None or layer == "workqueue":
        return _launch_lock
    return nullcontext()


def threading_layer() -> str | None:
    """Name of the Numba threading layer in use (None before the first kernel ran)."""
    return _current_layer()
