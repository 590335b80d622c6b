"""Readable NumPy references: test oracles and benchmark baselines.

Three independent derivations of the same backward pass:

* :func:`forward` / :func:`backward` -- plain NumPy, the closed-form
  derivative exactly as written in the derivation.
* :func:`paper_backward` -- the chain of Ioffe & Szegedy (2015), Algorithm 1's
  backward: dL/dx_hat, then dL/dvar, then dL/dmean, then dL/dx (same cache as
  :func:`backward`).
* :func:`graph_forward` / :func:`graph_backward` -- a tiny staged computation
  graph in the spirit of micrograd: the forward keeps every intermediate node
  (mean, centred, square, variance, std, inverse, x_hat, scaled, shifted, relu)
  and the backward walks the nodes in reverse, applying one local derivative
  at a time.

Both work on any channel axis and compute in the dtype of ``x`` (float32 data
stays float32; NumPy's own pairwise summation is the only accuracy aid).
This module imports NumPy only.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["forward", "backward", "paper_backward", "graph_forward", "graph_backward",
           "Node"]


def _reduce_axes(ndim: int, axis: int) -> tuple:
    axis %= ndim
    return tuple(a for a in range(ndim) if a != axis)


def _per_channel_shape(ndim: int, axis: int, n_channels: int) -> tuple:
    shape = [1] * ndim
    shape[axis % ndim] = n_channels
    return tuple(shape)


def _params(x, gamma, beta, axis):
    """gamma/beta broadcast to x, in x's dtype (1 and 0 when None)."""
    n_channels = x.shape[axis]
    shape = _per_channel_shape(x.ndim, axis, n_channels)
    one = np.ones(n_channels, x.dtype) if gamma is None else np.asarray(gamma, x.dtype)
    zero = np.zeros(n_channels, x.dtype) if beta is None else np.asarray(beta, x.dtype)
    return one.reshape(shape), zero.reshape(shape)


# ---------------------------------------------------------------------------
# Plain NumPy, closed form
# ---------------------------------------------------------------------------


def forward(x, gamma=None, beta=None, eps=1e-5, axis=1, relu=False):
    """Training-mode forward.  Returns ``(y, cache)`` for :func:`backward`."""
    x = np.asarray(x)
    axes = _reduce_axes(x.ndim, axis)
    g, b = _params(x, gamma, beta, axis)
    mean = x.mean(axis=axes, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(var + x.dtype.type(eps))
    x_hat = centred * inv_std
    y = g * x_hat + b
    if relu:
        y = np.maximum(y, 0)
    cache = dict(x_hat=x_hat, inv_std=inv_std, gamma=g, y=y, axes=axes, relu=relu,
                 mean=mean, var=var, centred=centred, count=x.size // x.shape[axis])
    return y, cache


def backward(dy, cache):
    """Closed form: ``dx = gamma*inv_std/N * (N*dy - sum(dy) - x_hat*sum(dy*x_hat))``."""
    dy = np.asarray(dy)
    axes = cache["axes"]
    if cache["relu"]:
        dy = dy * (cache["y"] > 0)
    x_hat = cache["x_hat"]
    n = cache["count"]
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
    dx = (cache["gamma"] * cache["inv_std"] / n) * (n * dy - dbeta - x_hat * dgamma)
    return dx, dgamma.ravel(), dbeta.ravel()


def paper_backward(dy, cache):
    """The backward pass as Ioffe & Szegedy (2015) derive it, one intermediate at a time.

    With ``x_hat = (x - mean) / sqrt(var + eps)`` and ``y = gamma * x_hat + beta``
    over a batch of ``m`` values per channel, the paper's chain rule reads::

        dL/dx_hat = dL/dy * gamma
        dL/dvar   = sum(dL/dx_hat * (x - mean)) * -1/2 * (var + eps)^(-3/2)
        dL/dmean  = sum(dL/dx_hat * -1/sqrt(var + eps)) + dL/dvar * sum(-2 (x - mean)) / m
        dL/dx     = dL/dx_hat / sqrt(var + eps) + dL/dvar * 2 (x - mean) / m + dL/dmean / m
        dL/dgamma = sum(dL/dy * x_hat)
        dL/dbeta  = sum(dL/dy)

    (sums over every axis but the channel axis).  The term ``sum(-2 (x - mean))``
    is zero in exact arithmetic; it is kept, as in the paper.  Same signature
    and result as :func:`backward`: ``(dx, dgamma, dbeta)`` from the cache of
    :func:`forward`.
    """
    dy = np.asarray(dy)
    axes = cache["axes"]
    if cache["relu"]:  # the fused ReLU first: its gradient passes where y > 0
        dy = dy * (cache["y"] > 0)
    x_hat, inv_std, gamma = cache["x_hat"], cache["inv_std"], cache["gamma"]
    centred = cache["centred"]  # x - mean
    m = cache["count"]

    dx_hat = dy * gamma
    dvar = (dx_hat * centred).sum(axis=axes, keepdims=True) * (-0.5 * inv_std**3)
    dmean = ((dx_hat * -inv_std).sum(axis=axes, keepdims=True)
             + dvar * (-2 * centred).sum(axis=axes, keepdims=True) / m)
    dx = dx_hat * inv_std + dvar * 2 * centred / m + dmean / m
    dgamma = (dy * x_hat).sum(axis=axes, keepdims=True)
    dbeta = dy.sum(axis=axes, keepdims=True)
    return dx, dgamma.ravel(), dbeta.ravel()


def inference(x, running_mean, running_var, gamma=None, beta=None, eps=1e-5, axis=1,
              relu=False):
    """Eval-mode forward with fixed statistics."""
    x = np.asarray(x)
    shape = _per_channel_shape(x.ndim, axis, x.shape[axis])
    g, b = _params(x, gamma, beta, axis)
    mean = np.asarray(running_mean, x.dtype).reshape(shape)
    var = np.asarray(running_var, x.dtype).reshape(shape)
    y = (x - mean) / np.sqrt(var + x.dtype.type(eps)) * g + b
    return np.maximum(y, 0) if relu else y


# ---------------------------------------------------------------------------
# Graph-based (staged) backprop
# ---------------------------------------------------------------------------


class Node:
    """A value in the computation graph, its parents and how to push a gradient to them.

    ``backward_fn(grad)`` returns one gradient per parent, already reduced to
    the parent's shape.
    """

    def __init__(self, value, parents=(), backward_fn=None, name=""):
        self.value = value
        self.parents = parents
        self.backward_fn = backward_fn
        self.name = name
        self.grad = None

    def __repr__(self):
        return f"Node({self.name}, shape={np.shape(self.value)})"


def _unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which a value of ``shape`` was broadcast."""
    pairs = enumerate(zip(grad.shape, shape, strict=True))
    axes = tuple(i for i, (g, s) in pairs if s == 1 and g != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _add(a, b, name):
    return Node(a.value + b.value, (a, b),
                lambda g: (_unbroadcast(g, a.value.shape), _unbroadcast(g, b.value.shape)), name)


def _sub(a, b, name):
    return Node(a.value - b.value, (a, b),
                lambda g: (_unbroadcast(g, a.value.shape), -_unbroadcast(g, b.value.shape)), name)


def _mul(a, b, name):
    return Node(a.value * b.value, (a, b),
                lambda g: (_unbroadcast(g * b.value, a.value.shape),
                           _unbroadcast(g * a.value, b.value.shape)), name)


def _mean(a, axes, name):
    n = math.prod(a.value.shape[i] for i in axes)  # a Python int: keeps float32 float32
    value = a.value.mean(axis=axes, keepdims=True)
    return Node(value, (a,), lambda g: (np.broadcast_to(g / n, a.value.shape),), name)


def _square(a, name):
    return Node(a.value * a.value, (a,), lambda g: (2 * g * a.value,), name)


def _add_const(a, const, name):
    return Node(a.value + const, (a,), lambda g: (g,), name)


def _sqrt(a, name):
    value = np.sqrt(a.value)
    return Node(value, (a,), lambda g: (g / (2 * value),), name)


def _reciprocal(a, name):
    value = 1 / a.value
    return Node(value, (a,), lambda g: (-g * value * value,), name)


def _relu(a, name):
    value = np.maximum(a.value, 0)
    return Node(value, (a,), lambda g: (g * (a.value > 0),), name)


def graph_forward(x, gamma=None, beta=None, eps=1e-5, axis=1, relu=False):
    """Training-mode forward as a staged graph.  Returns ``(y, tape)``.

    ``tape`` lists the nodes in the order they were created (a topological
    order), ending with the output node.
    """
    x = np.asarray(x)
    axes = _reduce_axes(x.ndim, axis)
    g, b = _params(x, gamma, beta, axis)
    x_node, g_node, b_node = Node(x, name="x"), Node(g, name="gamma"), Node(b, name="beta")
    mean = _mean(x_node, axes, "mean")
    centred = _sub(x_node, mean, "centred")
    square = _square(centred, "square")
    var = _mean(square, axes, "var")
    var_eps = _add_const(var, x.dtype.type(eps), "var_eps")
    std = _sqrt(var_eps, "std")
    inv_std = _reciprocal(std, "inv_std")
    x_hat = _mul(centred, inv_std, "x_hat")
    scaled = _mul(x_hat, g_node, "scaled")
    shifted = _add(scaled, b_node, "shifted")
    tape = [x_node, g_node, b_node, mean, centred, square, var, var_eps, std, inv_std,
            x_hat, scaled, shifted]
    if relu:
        tape.append(_relu(shifted, "relu"))
    return tape[-1].value, tape


def graph_backward(dy, tape):
    """Walk the tape backwards, one local derivative per node: ``(dx, dgamma, dbeta)``."""
    for node in tape:
        node.grad = None
    tape[-1].grad = np.asarray(dy)
    for node in reversed(tape):
        if node.grad is None or node.backward_fn is None:
            continue
        for parent, grad in zip(node.parents, node.backward_fn(node.grad), strict=True):
            parent.grad = grad if parent.grad is None else parent.grad + grad
    x_node, g_node, b_node = tape[0], tape[1], tape[2]
    return x_node.grad, g_node.grad.ravel(), b_node.grad.ravel()
