"""Numba kernels for batch normalization: no validation, no Python objects.

Every input is seen as a C-contiguous ``(outer, C, inner)`` view (DESIGN.md §1)
with two memory patterns, one module each: :mod:`.rows` (``inner == 1``) and
:mod:`.planes` (``inner > 1``); :mod:`.plan` fixes the work split from the
shape alone and merges partials, :mod:`.elementwise` holds the inlined
per-element helpers, :mod:`.drivers` the entry points (one call per public
operation).

Each kernel is compiled twice from one Python function (:mod:`._build`):

* ``PARALLEL`` -- ``prange`` loops run on Numba's thread pool;
* ``SERIAL``   -- the same code with ``parallel=False``: no parallel region,
  hence no thread wake-up cost for small inputs, no dependence on the
  threading layer (thread- and fork-safe), and the same bits.

Accuracy.  Statistics are per-chunk sums of values shifted by a per-chunk
pivot (the chunk's first value), in float64, merged with Chan's formula.
Elementwise sweeps subtract the mean *before* scaling; in float32 the float64
mean is split into ``mean_hi + mean_lo`` and the sweep computes
``((x - mean_hi) - mean_lo) * scale + shift``.  ``x - mean_hi`` is exact when
``x`` is near the mean, so no digits are lost to cancellation even at
mean/std = 1e5, at float32 SIMD width.  Those sweeps are compiled without
fastmath, because reassociation would fold ``mean_hi + mean_lo`` back together.
"""

from __future__ import annotations

from .._config import harden_cache
from . import drivers, plan, planes, residual, rows, storage
from ._build import build_variant
from .drivers import (
    BAD_BATCH_STATS,
    BAD_MEAN,
    BAD_VAR,
    N_STATS,
    OK,
    OVERFLOW,
    update_running_stats,
)

_MODULES = (rows, planes, drivers, residual)

#: Dispatchers whose ``prange`` loops run in parallel.
PARALLEL = build_variant(_MODULES, parallel=True)
#: The same kernels compiled serially: small inputs and forked children.
SERIAL = build_variant(_MODULES, parallel=False)

harden_cache({name: getattr(module, name) for module in (plan, drivers, residual, storage)
              for name in dir(module)})

__all__ = [
    "BAD_BATCH_STATS", "BAD_MEAN", "BAD_VAR", "N_STATS", "OK", "OVERFLOW",
    "PARALLEL", "SERIAL", "update_running_stats",
]
