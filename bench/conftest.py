"""Shared fixtures of the pytest-benchmark suites in ``bench/bench_*.py``.

In ``make test`` (``--benchmark-disable``) every benchmark body runs once as
an ordinary test and checks its result, on small shapes only; the large shapes
run when benchmarking is enabled::

    .venv/bin/python -m pytest bench/ --benchmark-enable --benchmark-only
"""

from __future__ import annotations

import functools

import pytest

from bench.cases import Case, make_data
from bench.peers import exact_outputs, make_peer, peer_status

#: Always run (as tests in ``make test``, and as benchmarks).
SMALL_CASES = [
    Case((64, 128), "float32"),
    Case((64, 128), "float64"),
    Case((4, 8, 12, 12), "float32"),
    Case((4, 6, 6, 16), "float32", axis=-1),
]
#: Run only with ``--benchmark-enable`` (the sizes the issue asks for).
LARGE_CASES = [
    Case((1024, 4096), "float32"),
    Case((32, 64, 56, 56), "float32"),
    Case((32, 56, 56, 64), "float32", axis=-1),
    Case((1024, 4096), "float64"),
]
CASES = SMALL_CASES + LARGE_CASES


def case_id(case: Case) -> str:
    return f"{case.shape_str}-{case.dtype}"


@functools.lru_cache(maxsize=2)
def case_data(case: Case):
    data = make_data(case, seed=0)
    return data, exact_outputs(data)


@pytest.fixture
def build(benchmark):
    """``build(case, peer_name, op_group)`` -> (peer, data, exact); skips what cannot run here."""

    def _build(case: Case, peer_name: str, op: str):
        if case in LARGE_CASES and benchmark.disabled:
            pytest.skip("large shape: runs with --benchmark-enable")
        available, why = peer_status(peer_name)
        if not available:
            pytest.skip(f"peer {peer_name} not available: {why}")
        data, exact = case_data(case)
        benchmark.group = f"{op} | {case.shape_str} | {case.dtype}"
        benchmark.extra_info.update(peer=peer_name, shape=list(case.shape), dtype=case.dtype,
                                    axis=case.axis)
        return make_peer(peer_name, data), data, exact

    return _build
