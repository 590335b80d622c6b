"""Three derivations, one answer: the paper's chain (Ioffe & Szegedy, Algorithm 1's
backward), the closed form, the staged graph and fastbn's kernels agree in float64,
and a finite-difference check guards the paper form on its own."""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import reference

EPS = 1e-5


def _random_case(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 5))
    shape = tuple(int(s) for s in rng.integers(2, 7, ndim))
    axis = int(rng.integers(-ndim, ndim))
    n = shape[axis]
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)
    gamma = rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n)
    beta = rng.uniform(-1, 1, n)
    dy = rng.standard_normal(shape)
    return x, gamma, beta, dy, axis


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_paper_closed_graph_and_kernels_agree(seed, relu):
    x, gamma, beta, dy, axis = _random_case(seed)
    y, cache = reference.forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    _, tape = reference.graph_forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    _, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    paper = reference.paper_backward(dy, cache)
    others = {
        "closed form": reference.backward(dy, cache),
        "graph": reference.graph_backward(dy, tape),
        "fastbn": fastbn.batch_norm_backward(dy, ctx),
    }
    # dx's terms can be much larger than dx itself (they nearly cancel): compare
    # at the scale of the terms, as rounding does.
    dx_scale = float(np.max(np.abs(cache["gamma"] * cache["inv_std"] * dy))) + 1e-300
    for name, (dx, dgamma, dbeta) in others.items():
        assert np.max(np.abs(paper[0] - dx)) <= 1e-12 * dx_scale, name
        assert _rel(paper[1], dgamma) <= 1e-12, name
        assert _rel(paper[2], dbeta) <= 1e-12, name


def test_paper_backward_matches_finite_differences():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3, 2)) * 2 + 1
    gamma = rng.uniform(0.5, 2, 3)
    beta = rng.uniform(-1, 1, 3)
    weights = rng.standard_normal(x.shape)  # loss = sum(weights * y)

    def loss(x_, gamma_, beta_):
        return float(np.sum(weights * reference.forward(x_, gamma_, beta_, eps=EPS)[0]))

    _, cache = reference.forward(x, gamma, beta, eps=EPS)
    dx, dgamma, dbeta = reference.paper_backward(weights, cache)
    h = 1e-6
    for array, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        numeric = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + h
            up = loss(x, gamma, beta)
            array[index] = saved - h
            down = loss(x, gamma, beta)
            array[index] = saved
            numeric[index] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


def test_paper_backward_keeps_float32():
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    _, cache = reference.forward(x)
    dx, dgamma, dbeta = reference.paper_backward(np.ones_like(x), cache)
    assert dx.dtype == np.float32
