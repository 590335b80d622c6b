"""pytest-benchmark: eval-mode forward with running statistics, grouped by
operation | shape | dtype, checked against a float64 NumPy evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from bench.conftest import CASES, case_id
from bench.peers import TOLERANCE

INFERENCE_PEERS = ("fastbn", "numpy", "torch", "jax")


def _exact_inference(data):
    from fastbn import reference as ref

    d, c = data, data.case
    as64 = lambda a: np.asarray(a, np.float64)
    return ref.inference(as64(d.x), as64(d.running_mean), as64(d.running_var), as64(d.gamma),
                         as64(d.beta), c.eps, c.axis)


@pytest.mark.parametrize("peer_name", INFERENCE_PEERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inference(benchmark, build, case, peer_name):
    peer, data, _ = build(case, peer_name, "inference")
    y = benchmark(peer.inference)
    y = np.asarray(y.detach() if hasattr(y, "detach") else y)
    if peer_name == "torch":
        y = np.moveaxis(y, 1, case.axis)
    exact = _exact_inference(data)
    assert np.max(np.abs(y - exact)) / np.max(np.abs(exact)) <= TOLERANCE[case.dtype]
