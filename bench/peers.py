"""Implementations compared in the benchmarks ("peers"), all on the same pre-allocated data.

Every peer is built from a :class:`bench.cases.CaseData` and exposes zero-argument
callables, so the timer measures the operation and nothing else:

* ``fwdbwd()``    training forward followed by the backward pass (dx, dgamma, dbeta);
* ``forward()``   training forward only;
* ``backward()``  backward only, against state from one forward made at construction
  (``None`` where a peer cannot separate it cheaply);
* ``inference()`` eval-mode forward with running statistics (``None`` if unsupported).

``outputs()`` runs one forward+backward and returns NumPy arrays ``(y, dx,
dgamma, dbeta)`` for correctness checks.

Peers: ``fastbn`` (with ``out=`` buffers), ``numpy`` (closed-form reference),
``graph`` (NumPy forward + staged graph backward), and when installed
``torch`` (``torch.nn.functional.batch_norm`` + autograd, ``torch.set_num_threads``
equal to Numba's thread count), ``jax`` (``jax.jit`` of forward and of ``jax.vjp``,
``block_until_ready``; compiled by a warm-up call at construction) and
``autograd`` (HIPS autograd ``make_vjp``).  A peer that is not installed is
reported by :func:`peer_status` as skipped, never as a failure.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable

import numpy as np

from .cases import SIXTEEN_BIT, CaseData

__all__ = ["PEER_NAMES", "DEFAULT_PEERS", "peer_status", "make_peer", "Peer", "available_peers",
           "exact_outputs", "output_errors", "check_peer"]

OPS = ("fwdbwd", "forward", "backward", "inference")


class Peer:
    name = "?"
    description = ""
    fwdbwd: Callable[[], object]
    forward: Callable[[], object]
    backward: Callable[[], object] | None = None
    inference: Callable[[], object] | None = None

    def __init__(self, data: CaseData):
        self.data = data
        self.case = data.case
        self.axis = data.case.axis % len(data.case.shape)

    def op(self, name: str) -> Callable[[], object] | None:
        return getattr(self, name, None)

    def outputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# fastbn
# ---------------------------------------------------------------------------


class FastbnPeer(Peer):
    name = "fastbn"
    description = "fastbn (Numba kernels, out= buffers)"

    def __init__(self, data: CaseData):
        super().__init__(data)
        import fastbn

        self._fb = fastbn
        d, c = data, data.case
        self.y = np.empty_like(d.x)
        self.dx = np.empty_like(d.x)
        self.y2 = np.empty_like(d.x)
        x, g, b, dy, eps, axis = d.x, d.gamma, d.beta, d.dy, c.eps, c.axis
        fwd, bwd, inf = fastbn.batch_norm_forward, fastbn.batch_norm_backward, \
            fastbn.batch_norm_inference
        y, dx, y2 = self.y, self.dx, self.y2
        rm, rv = d.running_mean, d.running_var

        def forward():
            return fwd(x, g, b, eps, axis, out=y)

        def fwdbwd():
            _, ctx = fwd(x, g, b, eps, axis, out=y)
            return bwd(dy, ctx, out=dx)

        # Backward against a context made once, from a separate output buffer.
        _, ctx0 = fwd(x, g, b, eps, axis, out=y2)

        def backward():
            return bwd(dy, ctx0, out=dx)

        def inference():
            return inf(x, rm, rv, g, b, eps, axis, out=y2)

        self.forward, self.fwdbwd, self.backward, self.inference = \
            forward, fwdbwd, backward, inference

    def outputs(self):
        _, ctx = self._fb.batch_norm_forward(self.data.x, self.data.gamma, self.data.beta,
                                             self.case.eps, self.case.axis, out=self.y)
        dx, dg, db = self._fb.batch_norm_backward(self.data.dy, ctx, out=self.dx)
        return self.y, dx, dg, db


class FastbnFloat32Peer(FastbnPeer):
    """fastbn on float32 data of the same values as a 16-bit case: 16-bit storage's
    speed-up over fastbn's own float32, timed interleaved in the same run."""

    name = "fastbn_f32"
    description = "fastbn on float32 copies of a 16-bit case's data"

    def __init__(self, data: CaseData):
        if data.case.dtype not in SIXTEEN_BIT:
            raise TypeError("fastbn_f32 only runs beside 16-bit cases")
        widened = dataclasses.replace(data, x=data.x.astype(np.float32),
                                      dy=data.dy.astype(np.float32))
        super().__init__(widened)
        self.data = data  # accuracy is checked against the case's own (16-bit) values


def _refuse_sixteen_bit(peer: Peer) -> None:
    if peer.case.dtype in SIXTEEN_BIT:
        raise TypeError(f"the {peer.name} peer computes in the data's dtype; "
                        f"no {peer.case.dtype} version")


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------


class _ReferencePeer(Peer):
    """A ``fastbn.reference`` forward/backward pair: ``fwd(x, ...) -> (y, state)``,
    ``bwd(dy, state) -> (dx, dgamma, dbeta)``."""

    def _bind(self, fwd, bwd) -> None:
        _refuse_sixteen_bit(self)
        d, c = self.data, self.case
        x, g, b, dy, eps, axis = d.x, d.gamma, d.beta, d.dy, c.eps, c.axis

        def forward():
            return fwd(x, g, b, eps, axis)

        def fwdbwd():
            _, state = fwd(x, g, b, eps, axis)
            return bwd(dy, state)

        _, state0 = fwd(x, g, b, eps, axis)

        def backward():
            return bwd(dy, state0)

        self.forward, self.fwdbwd, self.backward = forward, fwdbwd, backward
        self._fwd, self._bwd = fwd, bwd

    def outputs(self):
        d, c = self.data, self.case
        y, state = self._fwd(d.x, d.gamma, d.beta, c.eps, c.axis)
        return (y, *self._bwd(d.dy, state))


class NumpyPeer(_ReferencePeer):
    name = "numpy"
    description = "NumPy reference (closed-form backward)"

    def __init__(self, data: CaseData):
        super().__init__(data)
        from fastbn import reference as ref

        self._bind(ref.forward, ref.backward)
        d, c = data, data.case

        def inference():
            return ref.inference(d.x, d.running_mean, d.running_var, d.gamma, d.beta, c.eps,
                                 c.axis)

        self.inference = inference


class GraphPeer(_ReferencePeer):
    name = "graph"
    description = "NumPy forward + staged graph backward"

    def __init__(self, data: CaseData):
        super().__init__(data)
        from fastbn import reference as ref

        self._bind(ref.graph_forward, ref.graph_backward)
        self.inference = None  # the graph is a training-mode construction only


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


class TorchPeer(Peer):
    name = "torch"
    description = "PyTorch CPU: F.batch_norm + autograd"

    def __init__(self, data: CaseData):
        super().__init__(data)
        import torch
        import torch.nn.functional as F  # noqa: N812

        self._torch = torch
        torch.set_num_threads(_numba_threads())
        d, c = data, data.case
        # Channels-last input becomes an NCHW-shaped view with channels_last
        # strides (no copy): PyTorch's own fast path for that memory format.
        self.xt = _tensor(torch, d.x).movedim(self.axis, 1).detach().requires_grad_(True)
        self.dyt = _tensor(torch, d.dy).movedim(self.axis, 1)
        self.gt = torch.from_numpy(d.gamma.copy()).requires_grad_(True)
        self.bt = torch.from_numpy(d.beta.copy()).requires_grad_(True)
        self.rm = torch.from_numpy(d.running_mean.copy())
        self.rv = torch.from_numpy(d.running_var.copy())
        xt, dyt, gt, bt, rm, rv, eps = self.xt, self.dyt, self.gt, self.bt, self.rm, self.rv, c.eps
        grad, bn, no_grad = torch.autograd.grad, F.batch_norm, torch.no_grad

        def forward():
            with no_grad():
                return bn(xt, None, None, gt, bt, True, 0.0, eps)

        def fwdbwd():
            y = bn(xt, None, None, gt, bt, True, 0.0, eps)
            return y, grad(y, (xt, gt, bt), dyt)

        y0 = bn(xt, None, None, gt, bt, True, 0.0, eps)

        def backward():
            return grad(y0, (xt, gt, bt), dyt, retain_graph=True)

        def inference():
            with no_grad():
                return bn(xt, rm, rv, gt, bt, False, 0.0, eps)

        self.forward, self.fwdbwd, self.backward, self.inference = \
            forward, fwdbwd, backward, inference

    def outputs(self):
        y, (dx, dg, db) = self.fwdbwd()
        ax = self.axis
        wide = lambda t: (t.float() if t.dtype == self._torch.bfloat16 else t).numpy()
        return (wide(y.detach().movedim(1, ax)), wide(dx.movedim(1, ax)), dg.numpy(), db.numpy())


def _tensor(torch, a: np.ndarray):
    """A zero-copy tensor of ``a``; bfloat16 (ml_dtypes) through its int16 bits."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------


def _bn_expr(xnp, x, g, b, eps, axis):
    """Batch norm written with an array namespace (jax.numpy or autograd.numpy)."""
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mean = xnp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = xnp.mean(centred * centred, axis=axes, keepdims=True)
    return centred / xnp.sqrt(var + eps) * xnp.reshape(g, shape) + xnp.reshape(b, shape)


class JaxPeer(Peer):
    name = "jax"
    description = "JAX CPU: jit(forward), jit(vjp)"

    def __init__(self, data: CaseData):
        super().__init__(data)
        import jax

        # float64 cases need x64; enabling it once for every case keeps float32
        # programs identical whatever order cases run in.
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        d, c, axis = data, data.case, self.axis
        if c.dtype in SIXTEEN_BIT:
            # jnp promotes bf16 * f32 to f32: give the parameters the data's format so
            # the output stays 16-bit (XLA accumulates the means in float32).
            eps = np.float32(c.eps)
            f = lambda x, g, b: _bn_expr(jnp, x, g.astype(x.dtype), b.astype(x.dtype), eps,
                                         axis)
        else:
            eps = np.dtype(c.dtype).type(c.eps)
            f = lambda x, g, b: _bn_expr(jnp, x, g, b, eps, axis)

        def train(x, g, b, dy):
            y, vjp = jax.vjp(f, x, g, b)
            return y, vjp(dy)

        def infer(x, rm, rv, g, b):
            shape = [1] * x.ndim
            shape[axis] = x.shape[axis]
            r = lambda v: jnp.reshape(v, shape)
            return (x - r(rm)) / jnp.sqrt(r(rv) + eps) * r(g) + r(b)

        put = jax.device_put
        self.args = [put(a) for a in (d.x, d.gamma, d.beta, d.dy)]
        rm, rv = put(d.running_mean), put(d.running_var)
        x, g, b, dy = self.args
        jf, jt, ji = jax.jit(f), jax.jit(train), jax.jit(infer)
        ready = jax.block_until_ready

        def forward():
            return ready(jf(x, g, b))

        def fwdbwd():
            return ready(jt(x, g, b, dy))

        def inference():
            return ready(ji(x, rm, rv, g, b))

        # Compile now, so compile time never lands in a timed sample.
        forward()
        fwdbwd()
        inference()
        self.forward, self.fwdbwd, self.inference = forward, fwdbwd, inference
        self.backward = None  # a jitted vjp recomputes the forward; not separable

    def outputs(self):
        y, (dx, dg, db) = self.fwdbwd()
        return tuple(np.asarray(a) for a in (y, dx, dg, db))


# ---------------------------------------------------------------------------
# HIPS autograd
# ---------------------------------------------------------------------------


class AutogradPeer(Peer):
    name = "autograd"
    description = "HIPS autograd: make_vjp"

    def __init__(self, data: CaseData):
        super().__init__(data)
        _refuse_sixteen_bit(self)
        import autograd
        import autograd.numpy as anp

        d, c, axis = data, data.case, self.axis
        eps = np.dtype(c.dtype).type(c.eps)
        f = lambda p: _bn_expr(anp, p[0], p[1], p[2], eps, axis)
        params = (d.x, d.gamma, d.beta)
        dy = d.dy
        make_vjp = autograd.make_vjp

        def forward():
            return f(params)

        def fwdbwd():
            vjp, y = make_vjp(f)(params)
            return y, vjp(dy)

        vjp0, _ = make_vjp(f)(params)

        def backward():
            return vjp0(dy)

        self.forward, self.fwdbwd, self.backward = forward, fwdbwd, backward
        self.inference = None

    def outputs(self):
        y, (dx, dg, db) = self.fwdbwd()
        return y, dx, dg, db


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

_PEERS: dict[str, tuple[type[Peer], str | None]] = {
    "fastbn": (FastbnPeer, None),
    "numpy": (NumpyPeer, None),
    "graph": (GraphPeer, None),
    "torch": (TorchPeer, "torch"),
    "jax": (JaxPeer, "jax"),
    "autograd": (AutogradPeer, "autograd"),
    # not a default: the CLI adds it beside fastbn on 16-bit cases
    "fastbn_f32": (FastbnFloat32Peer, None),
}
PEER_NAMES = tuple(_PEERS)
DEFAULT_PEERS = tuple(name for name in PEER_NAMES if name != "fastbn_f32")


def peer_status(name: str) -> tuple[bool, str]:
    """(available, version-or-reason).  Only looks for the module; imports it to read a version."""
    if name not in _PEERS:
        raise KeyError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")
    module = _PEERS[name][1] or "numpy"
    if importlib.util.find_spec(module) is None:
        return False, f"{module} is not installed"
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # an installed but broken package is a skip, not a crash
        return False, f"{module} failed to import: {exc.__class__.__name__}: {exc}"
    if name == "fastbn":
        import fastbn

        return True, getattr(fastbn, "__version__", "?")
    return True, getattr(mod, "__version__", "?")


def available_peers(names=DEFAULT_PEERS) -> tuple[list[str], dict[str, str]]:
    """(available names in order, {skipped name: reason})."""
    ok, skipped = [], {}
    for name in names:
        available, info = peer_status(name)
        if available:
            ok.append(name)
        else:
            skipped[name] = info
    return ok, skipped


def make_peer(name: str, data: CaseData) -> Peer:
    return _PEERS[name][0](data)


# ---------------------------------------------------------------------------
# Correctness of a peer's outputs
# ---------------------------------------------------------------------------

#: Largest error accepted, relative to the largest magnitude of the exact value.
TOLERANCE = {"float32": 2e-4, "float64": 1e-10, "float16": 4e-3, "bfloat16": 3e-2}
OUTPUT_NAMES = ("y", "dx", "dgamma", "dbeta")


def exact_outputs(data: CaseData) -> tuple[np.ndarray, ...]:
    """(y, dx, dgamma, dbeta) of the case's own data, computed in float64 by the NumPy reference."""
    from fastbn import reference as ref

    d, c = data, data.case
    as64 = lambda a: np.asarray(a, np.float64)
    y, cache = ref.forward(as64(d.x), as64(d.gamma), as64(d.beta), c.eps, c.axis)
    return (y, *ref.backward(as64(d.dy), cache))


def output_errors(outputs, exact) -> dict[str, float]:
    """{name: max |out - exact| / max |exact|} for y, dx, dgamma, dbeta."""
    errors = {}
    for name, out, ref in zip(OUTPUT_NAMES, outputs, exact, strict=True):
        out = np.asarray(out, np.float64).reshape(ref.shape)
        errors[name] = float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-300))
    return errors


def check_peer(peer: Peer, exact=None) -> dict[str, float]:
    """Raise AssertionError unless the peer's outputs match the float64 reference; return errors."""
    exact = exact_outputs(peer.data) if exact is None else exact
    errors = output_errors(peer.outputs(), exact)
    tol = TOLERANCE[peer.case.dtype]
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise AssertionError(
            f"{peer.name} on {peer.case.label}: relative error "
            + ", ".join(f"{k}={v:.2e}" for k, v in bad.items()) + f" exceeds {tol:g}")
    return errors
