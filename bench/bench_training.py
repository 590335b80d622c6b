"""pytest-benchmark: training forward+backward and forward only, every peer, grouped by
operation | shape | dtype.  Each benchmark also checks the peer's result against a
float64 NumPy reference, so in ``make test`` these are real tests."""

from __future__ import annotations

import numpy as np
import pytest

from bench.conftest import CASES, case_id
from bench.peers import DEFAULT_PEERS as PEER_NAMES
from bench.peers import TOLERANCE, output_errors


@pytest.mark.parametrize("peer_name", PEER_NAMES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(benchmark, build, case, peer_name):
    peer, _, exact = build(case, peer_name, "fwd+bwd")
    benchmark(peer.fwdbwd)
    errors = output_errors(peer.outputs(), exact)
    assert max(errors.values()) <= TOLERANCE[case.dtype], errors


@pytest.mark.parametrize("peer_name", PEER_NAMES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward(benchmark, build, case, peer_name):
    peer, _, exact = build(case, peer_name, "forward")
    result = benchmark(peer.forward)
    y = result[0] if isinstance(result, tuple) else result
    y = np.asarray(y.detach() if hasattr(y, "detach") else y)
    if peer_name == "torch":
        y = np.moveaxis(y, 1, case.axis)
    err = np.max(np.abs(y - exact[0])) / np.max(np.abs(exact[0]))
    assert err <= TOLERANCE[case.dtype]


@pytest.mark.parametrize("peer_name", [p for p in PEER_NAMES if p not in ("jax",)])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward(benchmark, build, case, peer_name):
    """Backward only, against one forward made when the peer was built."""
    peer, _, exact = build(case, peer_name, "backward")
    result = benchmark(peer.backward)
    dx = result[0]
    dx = np.asarray(dx.detach() if hasattr(dx, "detach") else dx)
    if peer_name == "torch":
        dx = np.moveaxis(dx, 1, case.axis)
    err = np.max(np.abs(dx - exact[1])) / np.max(np.abs(exact[1]))
    assert err <= TOLERANCE[case.dtype]
