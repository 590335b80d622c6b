"""Analytic gradients against central finite differences (float64, small shapes).

The loss is a random projection ``L = sum(y * w)``, so ``dL/dy = w`` is what
the backward receives.  Each derivative ``dL/dx[i]`` (and ``dL/dgamma[c]``,
``dL/dbeta[c]``) is estimated as ``(L(x + h e_i) - L(x - h e_i)) / 2h``; the
error measure is max-abs difference over max-abs finite-difference gradient.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbn
from fastbn import reference

H = 1e-5       # FD step: truncation ~H**2, rounding ~1e-16 / H, both << TOL
TOL = 1e-8     # observed errors are ~1e-10


def rel_err(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def central_difference(f, a, h=H):
    """Gradient of the scalar function ``f`` at ``a`` by central differences."""
    grad = np.empty_like(a)
    for i in range(a.size):
        plus, minus = a.copy(), a.copy()
        plus.flat[i] += h
        minus.flat[i] -= h
        grad.flat[i] = (f(plus) - f(minus)) / (2 * h)
    return grad


def channel_shape(ndim, axis, n):
    shape = [1] * ndim
    shape[axis % ndim] = n
    return tuple(shape)


def fd_gradients(forward, x, gamma, beta, w):
    """(dx, dgamma, dbeta) of sum(forward(x, gamma, beta) * w) by finite differences."""
    def loss(x_, g_, b_):
        return float(np.sum(forward(x_, g_, b_) * w))
    return (central_difference(lambda a: loss(a, gamma, beta), x),
            central_difference(lambda a: loss(x, a, beta), gamma),
            central_difference(lambda a: loss(x, gamma, a), beta))


def data(seed, shape, axis, relu, margin=0.02):
    """Float64 x, gamma, beta, w; with relu, no pre-activation within ``margin`` of 0.

    An FD step of 1e-5 moves a pre-activation by ~1e-4 at most, so the ReLU
    kink is never crossed and L is smooth at the point.
    """
    rng = np.random.default_rng(seed)
    n = shape[axis]
    for _ in range(1000):
        x = rng.standard_normal(shape) * 1.5 + rng.uniform(-2, 2, n).reshape(
            channel_shape(len(shape), axis, n))
        gamma = rng.uniform(0.5, 2, n) * rng.choice([-1.0, 1.0], n)
        beta = rng.uniform(-0.8, 0.8, n)
        w = rng.standard_normal(shape)
        if not relu:
            return x, gamma, beta, w
        pre, _ = reference.forward(x, gamma, beta, axis=axis)
        if np.min(np.abs(pre)) > margin and np.any(pre < 0) and np.any(pre > 0):
            return x, gamma, beta, w
    raise AssertionError("no data without pre-activations near 0")  # pragma: no cover


# eps = 0.5 for 2 values per channel: with a tiny eps, y = +-1 hardly depends on x.
GRAD_CASES = [
    ((6, 3), 1, 1e-5),
    ((5, 1), 1, 1e-5),
    ((2, 3), 1, 0.5),
    ((4, 3, 5), 1, 1e-5),
    ((3, 2, 3, 2), 1, 1e-3),
    ((3, 2, 3, 4), -1, 1e-5),
    ((3, 4, 5), 0, 1e-5),
]
GRAD_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a, _ in GRAD_CASES]


def _fastbn(x, gamma, beta, w, axis, relu, eps):
    _, ctx = fastbn.batch_norm_forward(x, gamma, beta, eps=eps, axis=axis, relu=relu)
    return fastbn.batch_norm_backward(w, ctx)


def _reference(x, gamma, beta, w, axis, relu, eps):
    _, cache = reference.forward(x, gamma, beta, eps=eps, axis=axis, relu=relu)
    return reference.backward(w, cache)


def _graph(x, gamma, beta, w, axis, relu, eps):
    _, tape = reference.graph_forward(x, gamma, beta, eps=eps, axis=axis, relu=relu)
    return reference.graph_backward(w, tape)


IMPLEMENTATIONS = {"fastbn": _fastbn, "reference": _reference, "graph": _graph}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(("shape", "axis", "eps"), GRAD_CASES, ids=GRAD_IDS)
def test_training_gradients_match_finite_differences(shape, axis, eps, relu, impl):
    x, gamma, beta, w = data(7, shape, axis, relu)

    def forward(x_, g_, b_):
        return fastbn.batch_norm_forward(x_, g_, b_, eps=eps, axis=axis, relu=relu)[0]

    fd = fd_gradients(forward, x, gamma, beta, w)
    analytic = IMPLEMENTATIONS[impl](x, gamma, beta, w, axis, relu, eps)
    for name, a, n in zip(("dx", "dgamma", "dbeta"), analytic, fd, strict=True):
        assert a.shape == n.shape
        err = rel_err(a, n)
        assert err <= TOL, f"{impl} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize(("shape", "axis"), [((6, 3), 1), ((1, 3), 1), ((3, 2, 3, 4), -1)])
def test_inference_gradients_match_finite_differences(shape, axis, relu):
    """Eval mode: running statistics are constants, dx = dy' * gamma * inv_std."""
    x, gamma, beta, w = data(11, shape, axis, relu=False)
    rng = np.random.default_rng(3)
    rm = rng.uniform(-1, 1, shape[axis])
    rv = rng.uniform(0.5, 3, shape[axis])
    if relu:  # keep pre-activations away from the kink
        pre = reference.inference(x, rm, rv, gamma, beta, axis=axis)
        x = np.where(np.abs(pre) < 0.02, x + 0.1 * np.sign(gamma).reshape(
            channel_shape(len(shape), axis, shape[axis])), x)
        pre = reference.inference(x, rm, rv, gamma, beta, axis=axis)
        assert np.min(np.abs(pre)) > 0.02 and np.any(pre < 0)

    def forward(x_, g_, b_):
        return fastbn.batch_norm_inference(x_, rm, rv, g_, b_, axis=axis, relu=relu)

    fd = fd_gradients(forward, x, gamma, beta, w)
    _, ctx = fastbn.batch_norm_inference(x, rm, rv, gamma, beta, axis=axis, relu=relu,
                                         return_context=True)
    analytic = fastbn.batch_norm_backward(w, ctx)
    for name, a, n in zip(("dx", "dgamma", "dbeta"), analytic, fd, strict=True):
        err = rel_err(a, n)
        assert err <= TOL, f"{name}: relative error {err:.2e}"


def test_without_affine_parameters(rng):
    x, _, _, w = data(5, (5, 4, 3), 1, relu=False)
    _, ctx = fastbn.batch_norm_forward(x)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(w, ctx)
    assert dgamma is None and dbeta is None
    fd = central_difference(lambda a: float(np.sum(fastbn.batch_norm_forward(a)[0] * w)), x)
    assert rel_err(dx, fd) <= TOL


# ---------------------------------------------------------------------------
# A guard that the check can fail: a wrong closed form seen in the wild
# ---------------------------------------------------------------------------


def test_finite_differences_reject_the_printed_snippet():
    """The printed snippet

        dh = (1./N)*gamma*(var+eps)**(-1./2.)*(N*dy - np.sum(dy*(h-mu),axis=0)
             *(var+eps)**(-1.0)*np.sum(dy*(h-mu),axis=0))

    drops the ``-sum(dy)`` term and multiplies ``sum(dy*(h-mu))`` by itself
    instead of by ``(h-mu)``.  The same finite-difference check that fastbn
    passes must reject it, while the correct closed form passes.
    """
    rng = np.random.default_rng(0)
    N, C, eps = 8, 3, 1e-5
    h = rng.standard_normal((N, C)) * 2 + 1
    gamma = rng.uniform(0.5, 2, C)
    beta = rng.uniform(-1, 1, C)
    dy = rng.standard_normal((N, C))  # L = sum(y * dy)

    def forward(h_, g_, b_):
        mu_ = h_.mean(axis=0)
        var_ = h_.var(axis=0)
        return g_ * (h_ - mu_) / np.sqrt(var_ + eps) + b_

    fd_dh = fd_gradients(forward, h, gamma, beta, dy)[0]

    mu = h.mean(axis=0)
    var = h.var(axis=0)
    dh_snippet = (1./N)*gamma*(var+eps)**(-1./2.)*(N*dy - np.sum(dy*(h-mu),axis=0)*(var+eps)**(-1.0)*np.sum(dy*(h-mu),axis=0))  # noqa: E501
    dh_correct = (1./N)*gamma*(var+eps)**(-1./2.)*(N*dy - np.sum(dy,axis=0) - (h-mu)*(var+eps)**(-1.0)*np.sum(dy*(h-mu),axis=0))  # noqa: E501

    assert rel_err(dh_correct, fd_dh) <= TOL
    assert rel_err(dh_snippet, fd_dh) > 100 * TOL  # rejected, by far
    _, ctx = fastbn.batch_norm_forward(h, gamma, beta, eps=eps, axis=1)
    dx, _, _ = fastbn.batch_norm_backward(dy, ctx)
    assert rel_err(dx, fd_dh) <= TOL
    # Not a shape accident: the snippet even has the right shape.
    assert dh_snippet.shape == dx.shape


def test_finite_differences_reject_a_subtly_wrong_gradient():
    """Dropping only the variance path (a classic bug) is caught too."""
    x, gamma, beta, w = data(2, (6, 3), 1, relu=False)
    _, cache = reference.forward(x, gamma, beta)
    n, x_hat, inv_std = cache["count"], cache["x_hat"], cache["inv_std"]
    dx_no_var_path = gamma * inv_std / n * (n * w - w.sum(axis=0))
    fd = fd_gradients(lambda a, g, b: reference.forward(a, g, b)[0], x, gamma, beta, w)[0]
    assert rel_err(dx_no_var_path, fd) > 100 * TOL
    dx_full = gamma * inv_std / n * (n * w - w.sum(axis=0) - x_hat * (w * x_hat).sum(axis=0))
    assert rel_err(dx_full, fd) <= TOL
