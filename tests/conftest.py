"""Shared pytest configuration for the fastbn test suite.

* A Hypothesis profile (``fastbn``) with a modest number of examples and no
  deadline: the CI machine has two shared cores and the first call of a kernel
  signature may compile.  Select another with ``HYPOTHESIS_PROFILE=thorough``.
* ``rng``: a seeded NumPy generator, a fresh one per test (reproducible).
* ``num_threads``: sets Numba's thread count for a test and restores it.
"""

from __future__ import annotations

import os

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
