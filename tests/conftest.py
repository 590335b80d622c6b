"""Shared pytest configuration for the fastbn test suite.

* A Hypothesis profile (``fastbn``) with a modest number of examples and no
  deadline: the CI machine has two shared cores and the first call of a kernel
  signature may compile.  Select another with ``HYPOTHESIS_PROFILE=thorough``.
* ``rng``: a seeded NumPy generator, a fresh one per test (reproducible).
* ``num_threads``: sets Numba's thread count for a test and restores it.
* In a run in one process (``pytest`` without ``-n``), before the first test
  ``python -m fastbn warmup`` compiles the kernels into the on-disk cache in
  two processes at once (float32/float64 and the 16-bit formats), so the tests
  load them instead of compiling each signature on first use, one at a time
  (a cold CI run: 834 s with it, 985 s without).  Under pytest-xdist
  (``make test``) it is skipped: the workers compile what their tests use on
  all cores, and that was faster still (491 s cold on two cores), as warmup
  also compiles variants no test calls.  ``FASTBN_TEST_PRECOMPILE=0`` turns it
  off; without a writable cache it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fastbn",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("fastbn"), max_examples=500)
# CI: the same examples on every run, so a red CI means a regression, not a new
# random draw (explore with the default or "thorough" profile locally).
settings.register_profile("ci", parent=settings.get_profile("fastbn"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "fastbn")
)


#: dtype groups warmed in parallel (the 16-bit kernels take longer to compile)
_PRECOMPILE_GROUPS = ("float32,float64", "float16,bfloat16")


def pytest_sessionstart(session):
    if os.environ.get("FASTBN_TEST_PRECOMPILE", "1").strip() == "0":
        return
    distributed = getattr(session.config.option, "dist", "no") != "no"  # pytest-xdist
    if distributed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # its workers compile in parallel themselves
    from fastbn import _config

    if not _config.CACHE:
        return
    groups = _PRECOMPILE_GROUPS if (os.cpu_count() or 1) > 1 else (",".join(_PRECOMPILE_GROUPS),)
    started = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, "-m", "fastbn", "warmup", "--dtypes", group],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for group in groups]
    failed = []
    for worker in workers:
        try:
            _, errors = worker.communicate(timeout=1200)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
            failed.append("timed out")
            continue
        if worker.returncode:  # not fatal: the tests then compile what they use
            failed.append(errors.strip().splitlines()[-1] if errors.strip() else "failed")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        status = f"; failed: {'; '.join(failed)}" if failed else ""
        reporter.write_line(f"fastbn: kernels compiled into the cache in "
                            f"{time.perf_counter() - started:.0f} s{status}")


@pytest.fixture
def rng():
    return np.random.default_rng(20240531)


@pytest.fixture
def num_threads():
    """Call ``num_threads(k)`` to run the rest of the test with ``k`` Numba threads."""
    before = numba.get_num_threads()

    def set_threads(k: int) -> None:
        if k > numba.config.NUMBA_NUM_THREADS:
            pytest.skip(f"needs {k} Numba threads, NUMBA_NUM_THREADS is "
                        f"{numba.config.NUMBA_NUM_THREADS}")
        numba.set_num_threads(k)

    yield set_threads
    numba.set_num_threads(before)
