"""Compile every kernel twice -- a parallel and a serial dispatcher from one Python function.

A ``prange`` loop compiled with ``parallel=False`` is a plain ``range`` loop, so
the serial variant runs on the calling thread with no thread-team wake-up and
no dependence on the threading layer.  It is what small inputs use (the
parallel region's fixed cost exceeds the arithmetic there) and what a forked
child of a fork-unsafe (GNU OpenMP) parent must use.  Chunking never depends
on the thread count, so both variants give the same bits.

Mechanics.  Kernel functions are written once, as plain Python functions
marked with :func:`kernel`.  :func:`build_variant` copies each marked function
with a private globals dictionary in which every other marked function is
replaced by *this variant's* dispatcher, so a serial driver calls serial
sweeps.  Each copy gets its own ``__qualname__`` suffix: Numba names cache
files after the qualified name and does not record ``parallel`` in its cache
index, so the two variants must not share files.
"""

from __future__ import annotations

import types

from numba import njit

from .._config import CACHE, PARALLEL, harden_cache

#: plain function -> its compilation flags (``parallel`` is set per variant)
_REGISTRY: dict = {}


def kernel(parallel: bool = False, fastmath=False):
    """Mark a function as a kernel compiled in both variants.

    ``parallel=True`` marks a function with ``prange`` loops: parallel in the
    parallel variant, serial in the serial one.  Functions that only call
    other kernels (drivers) need ``parallel=False``: the loops they call carry
    their own flags.
    """

    def mark(function):
        _REGISTRY[function] = {"parallel": parallel, "fastmath": fastmath}
        return function

    return mark


def build_variant(modules, parallel: bool) -> types.SimpleNamespace:
    """One dispatcher per marked function of ``modules``, all of one variant."""
    suffix = "" if parallel else "__serial"
    dispatchers = {}
    copies_globals = {}
    for module in modules:
        module_globals = dict(vars(module))  # filled with this variant's dispatchers below
        copies_globals[module.__name__] = module_globals
        for function, flags in _REGISTRY.items():
            if function.__module__ != module.__name__:
                continue
            copy = types.FunctionType(function.__code__, module_globals, function.__name__,
                                      function.__defaults__, function.__closure__)
            copy.__qualname__ = function.__qualname__ + suffix
            copy.__module__ = function.__module__
            copy.__doc__ = function.__doc__
            dispatchers[function] = njit(
                cache=CACHE,
                nogil=True,
                parallel=bool(flags["parallel"] and parallel and PARALLEL),
                fastmath=flags["fastmath"],
            )(copy)
    by_name = {function.__name__: dispatcher for function, dispatcher in dispatchers.items()}
    for module_globals in copies_globals.values():
        for name, value in list(module_globals.items()):
            if isinstance(value, types.FunctionType) and value in dispatchers:
                module_globals[name] = dispatchers[value]
    harden_cache(by_name)
    return types.SimpleNamespace(**by_name)
