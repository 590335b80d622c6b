"""Which compiled variant runs a kernel, and the guards around a parallel launch.

* Inputs below :data:`SMALL_PROBLEM` elements run the *serial* variant on the
  calling thread: waking the thread team costs more than it saves there
  (about 2 us per parallel region here, up to a scheduler quantum on a busy
  machine), and after a parallel region GNU OpenMP's workers spin for a while,
  stealing the CPU from whatever the caller runs next (a matmul, a PyTorch op).
* The ``workqueue`` threading layer is not thread-safe (two Python threads in
  parallel regions at once abort the process), so while the layer is unknown
  or is ``workqueue``, parallel launches are serialized through a lock.
* Fork safety.  GNU OpenMP cannot run parallel regions in a child forked
  from a process that already used it: libgomp's threads do not exist in the
  child, and Numba terminates the child ("fork() called from a process
  already using GNU OpenMP, this is unsafe"), which leaves a
  ``multiprocessing`` pool waiting forever.  An ``os.register_at_fork`` hook
  marks such children, and every launch in them runs the serial variant
  (warning once).  The results are the same bits.

Both variants chunk the work by shape alone, so the choice never changes the results.
"""

from __future__ import annotations

import os
import warnings

from . import _config
from .kernels import PARALLEL, SERIAL

#: Below this many elements a kernel runs serially on the calling thread.
#: 65536 is where the parallel variant starts to win on 2 cores here (rows
#: (128, 512): serial 28 us, parallel 31 us per forward; (256, 512): 50 vs 39).
#: ``FASTBN_SERIAL_BELOW`` overrides it (0 disables the serial path: the perf
#: gate uses that to show its small-call case going red).
SMALL_PROBLEM: int = _config.env_count("FASTBN_SERIAL_BELOW", 1 << 16)

__all__ = ["SMALL_PROBLEM", "launch", "forked_serial_only"]

#: Set in a forked child whose parent ran parallel kernels on a fork-unsafe layer.
_forked_serial: bool = False
#: Launches that ran serially only because of that (read by the tests).
forced_serial_launches: int = 0
_warned: bool = False

FORK_WARNING = (
    "fastbn: this process was forked from one that had run parallel kernels on GNU OpenMP "
    "(Numba's 'omp' threading layer), which cannot run parallel regions in a forked child; "
    "fastbn runs its serial kernels here (same results, one core). For parallel kernels in "
    "worker processes use the 'spawn' or 'forkserver' start method, or the fork-safe 'tbb' "
    "layer (pip install tbb; it is fastbn's default where it loads)."
)


def forked_serial_only() -> bool:
    """True in a forked child that must not start parallel regions (see the module doc)."""
    return _forked_serial


def _after_fork_in_child() -> None:
    global _forked_serial, _warned
    if _config.parallel_regions_fork_unsafe():
        _forked_serial = True
        _warned = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _parallel_lock():
    """The lock parallel launches must hold now, or None when the layer is thread-safe."""
    layer = _config._current_layer()
    return _config._launch_lock if layer is None or layer == "workqueue" else None


def _launch_in_forked_child(name: str, args: tuple):
    global forced_serial_launches, _warned
    forced_serial_launches += 1
    if not _warned:
        _warned = True
        warnings.warn(FORK_WARNING, RuntimeWarning, stacklevel=4)
    return getattr(SERIAL, name)(*args)


def launch(name: str, size: int, *args):
    """Call kernel driver ``name`` on an input of ``size`` elements; returns its result."""
    if size < SMALL_PROBLEM:
        return getattr(SERIAL, name)(*args)
    if _forked_serial:
        return _launch_in_forked_child(name, args)
    lock = _parallel_lock()
    if lock is None:
        return getattr(PARALLEL, name)(*args)
    with lock:
        return getattr(PARALLEL, name)(*args)
