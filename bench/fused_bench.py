"""The fused residual block ``relu(bn(x) + residual)`` against its peers (training, float32).

    python -m bench.fused_bench                  # the two target shapes
    python -m bench.fused_bench --quick          # small shapes (a smoke run)
    python -m bench.fused_bench --no-compile     # skip torch.compile (slow to compile)

Forward + backward of the block (``dx``, ``dresidual``, ``dgamma``, ``dbeta``),
all on pre-allocated data, interleaved samples, medians of one run:

* ``fused``        ``fastbn.batch_norm_add_relu_forward`` / ``_backward`` with ``out=``;
* ``composition``  fastbn's own pieces op by op, all with ``out=`` buffers:
  ``batch_norm_forward``, ``np.add``, ``np.maximum``, the masked gradient
  (``np.greater`` into a bool buffer, ``np.multiply``), ``batch_norm_backward``;
* ``torch``        PyTorch eager: ``relu(F.batch_norm(x) + z)`` and autograd;
* ``compile``      the same function under ``torch.compile`` (inductor's C++).

With ``--bn-peers`` also batch norm alone (no residual, no ReLU): fastbn,
``torch.compile`` of ``F.batch_norm`` (forward + backward) and oneDNN's batch
norm (``torch.batch_norm`` on ``x.to_mkldnn()``, forward only: the mkldnn
tensor conversion is done once, outside the timing).

PyTorch runs with as many threads as Numba (``torch.set_num_threads``).
Speed-ups are medians of per-round ratios (each round times every peer once).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

import fastbn

from .cases import fmt_time, interleaved, paired_ratios

#: (label, shape, axis): the issue's target shapes.
SHAPES = [("NCHW (32, 64, 56, 56)", (32, 64, 56, 56), 1),
          ("NHWC (16, 28, 28, 128)", (16, 28, 28, 128), -1)]
QUICK_SHAPES = [("NCHW (8, 16, 28, 28)", (8, 16, 28, 28), 1),
                ("NHWC (8, 14, 14, 64)", (8, 14, 14, 64), -1)]
EPS = 1e-5


def make_data(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(2) + np.float32(1)
    r = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    gamma = rng.uniform(0.5, 2, c).astype(np.float32)
    beta = rng.uniform(-1, 1, c).astype(np.float32)
    return x, r, gamma, beta, dy


# ---------------------------------------------------------------------------
# Peers: each returns a zero-argument fwdbwd callable and an outputs() function
# giving (y, dx, dresidual, dgamma, dbeta) as NumPy arrays in the data's layout.
# ---------------------------------------------------------------------------


def fused_peer(x, r, gamma, beta, dy, axis):
    y, dx, dr = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def fwdbwd():
        _, ctx = fastbn.batch_norm_add_relu_forward(x, r, gamma, beta, EPS, axis, out=y)
        return fastbn.batch_norm_add_relu_backward(dy, ctx, out=dx, out_residual=dr)

    def outputs():
        _, _, dg, db = fwdbwd()
        return y, dx, dr, dg, db

    return fwdbwd, outputs


def composition_peer(x, r, gamma, beta, dy, axis):
    y, z, dz, dx = (np.empty_like(x) for _ in range(4))
    mask = np.empty(x.shape, np.bool_)

    def fwdbwd():
        _, ctx = fastbn.batch_norm_forward(x, gamma, beta, EPS, axis, out=y)
        np.add(y, r, out=z)
        np.maximum(z, 0, out=z)
        np.greater(z, 0, out=mask)
        np.multiply(dy, mask, out=dz)
        _, dg, db = fastbn.batch_norm_backward(dz, ctx, out=dx)
        return dx, dz, dg, db

    def outputs():
        _, _, dg, db = fwdbwd()
        return z, dx, dz, dg, db

    return fwdbwd, outputs


def _torch_tensors(torch, x, r, gamma, beta, dy, axis):
    """NCHW-shaped tensors sharing the arrays' memory (channels-last strides for axis=-1)."""
    def t(a, grad):
        tensor = torch.from_numpy(a).movedim(axis, 1)
        return tensor.detach().requires_grad_(True) if grad else tensor
    return (t(x, True), t(r, True), torch.from_numpy(gamma.copy()).requires_grad_(True),
            torch.from_numpy(beta.copy()).requires_grad_(True), t(dy, False))


def _block(torch):
    import torch.nn.functional as F  # noqa: N812

    def block(x, r, g, b):
        return torch.relu(F.batch_norm(x, None, None, g, b, True, 0.0, EPS) + r)

    return block


def _torch_peer(torch, fn, x, r, gamma, beta, dy, axis):
    xt, rt, gt, bt, dyt = _torch_tensors(torch, x, r, gamma, beta, dy, axis)
    grad = torch.autograd.grad

    def fwdbwd():
        y = fn(xt, rt, gt, bt)
        return y, grad(y, (xt, rt, gt, bt), dyt)

    def outputs():
        y, (dx, dr, dg, db) = fwdbwd()
        back = [a.detach().movedim(1, axis).numpy() for a in (y, dx, dr)]
        return (*back, dg.numpy(), db.numpy())

    return fwdbwd, outputs


def torch_peer(x, r, gamma, beta, dy, axis):
    import torch

    return _torch_peer(torch, _block(torch), x, r, gamma, beta, dy, axis)


def compile_peer(x, r, gamma, beta, dy, axis):
    import torch

    fwdbwd, outputs = _torch_peer(torch, torch.compile(_block(torch)), x, r, gamma, beta, dy,
                                  axis)
    fwdbwd()  # compile (forward and backward graphs) outside the timing
    return fwdbwd, outputs


PEERS = {"fused": fused_peer, "composition": composition_peer, "torch": torch_peer,
         "compile": compile_peer}


# ---------------------------------------------------------------------------
# Batch norm alone: fastbn, torch.compile, oneDNN
# ---------------------------------------------------------------------------


def bn_alone_callables(torch, x, gamma, beta, dy, axis, compile_too=True):
    """{name: callable}: training forward+backward ("fb") and forward ("f") of batch norm."""
    import torch.nn.functional as F  # noqa: N812

    y, dx = np.empty_like(x), np.empty_like(x)

    def fastbn_fb():
        _, ctx = fastbn.batch_norm_forward(x, gamma, beta, EPS, axis, out=y)
        return fastbn.batch_norm_backward(dy, ctx, out=dx)

    def fastbn_f():
        return fastbn.batch_norm_forward(x, gamma, beta, EPS, axis, out=y)

    xt = torch.from_numpy(x).movedim(axis, 1).detach().requires_grad_(True)
    dyt = torch.from_numpy(dy).movedim(axis, 1)
    gt = torch.from_numpy(gamma.copy()).requires_grad_(True)
    bt = torch.from_numpy(beta.copy()).requires_grad_(True)

    def bn(x_, g, b):
        return F.batch_norm(x_, None, None, g, b, True, 0.0, EPS)

    fns = {"fastbn fwd+bwd": fastbn_fb, "fastbn fwd": fastbn_f}

    def eager_fb():
        out = bn(xt, gt, bt)
        return torch.autograd.grad(out, (xt, gt, bt), dyt)

    def eager_f():
        with torch.no_grad():
            return bn(xt, gt, bt)

    fns["torch fwd+bwd"] = eager_fb
    fns["torch fwd"] = eager_f
    if compile_too:
        compiled = torch.compile(bn)

        def compile_fb():
            out = compiled(xt, gt, bt)
            return torch.autograd.grad(out, (xt, gt, bt), dyt)

        compile_fb()
        fns["compile fwd+bwd"] = compile_fb
    if axis == 1 and torch.backends.mkldnn.is_available():
        # oneDNN: a blocked-format mkldnn tensor, converted once outside the timing.
        xm = torch.from_numpy(x).to_mkldnn()
        gm, bm = gt.detach(), bt.detach()
        rm, rv = torch.zeros_like(gm), torch.ones_like(gm)

        def onednn_f():
            with torch.no_grad():
                return torch.batch_norm(xm, gm, bm, rm, rv, True, 0.0, EPS, False)

        try:
            onednn_f()
            fns["oneDNN fwd"] = onednn_f
        except RuntimeError as exc:  # not every build has the mkldnn batch norm
            print(f"  oneDNN batch norm unavailable: {exc}", file=sys.stderr)
    return fns


# ---------------------------------------------------------------------------


def check_outputs(results: dict) -> None:
    """Every peer's (y, dx, dr, dgamma, dbeta) against the fused block's."""
    ref = results["fused"]
    for name, got in results.items():
        for what, a, b in zip(("y", "dx", "dresidual", "dgamma", "dbeta"), got, ref,
                              strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
            if not err < 1e-3:
                raise AssertionError(f"{name}: {what} differs from the fused block's "
                                     f"(relative error {err:.2e})")


def run(shapes, peers, repeats, bn_peers=False, compile_bn=True) -> list[dict]:
    import numba

    threads = numba.get_num_threads()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
        skipped = [p for p in peers if p in ("torch", "compile")]
        if skipped:
            print(f"torch not installed: {', '.join(skipped)} skipped")
        peers = [p for p in peers if p not in ("torch", "compile")]
    print(f"threads: {threads} (Numba and torch); float32; medians of interleaved samples")
    rows = []
    for label, shape, axis in shapes:
        x, r, gamma, beta, dy = make_data(shape, axis)
        built = {name: PEERS[name](x, r, gamma, beta, dy, axis) for name in peers}
        check_outputs({name: outputs() for name, (_, outputs) in built.items()})
        timed = interleaved({name: fwdbwd for name, (fwdbwd, _) in built.items()}, repeats)
        fused = timed["fused"]["times"]
        print(f"\n{label}: forward + backward of relu(bn(x) + z)")
        print(f"  {'peer':<12} {'median':>10} {'fused speed-up':>15}")
        for name in peers:
            t = timed[name]
            ratio = float(np.median(paired_ratios(t["times"], fused)))
            print(f"  {name:<12} {fmt_time(t['median']):>10} {ratio:>14.2f}x")
            rows.append({"shape": list(shape), "axis": axis, "peer": name, "op": "block fwd+bwd",
                         "median_s": t["median"], "fused_speedup": ratio})
        if bn_peers and torch is not None:
            fns = bn_alone_callables(torch, x, gamma, beta, dy, axis, compile_bn)
            timed = interleaved(fns, repeats)
            print(f"{label}: batch norm alone")
            for name, t in timed.items():
                base = "fastbn fwd+bwd" if "bwd" in name else "fastbn fwd"
                ratio = float(np.median(paired_ratios(t["times"], timed[base]["times"])))
                print(f"  {name:<16} {fmt_time(t['median']):>10}   {ratio:5.2f}x fastbn's time")
                rows.append({"shape": list(shape), "axis": axis, "peer": name, "op": "bn alone",
                             "median_s": t["median"], "fastbn_speedup": ratio})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fused_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile peers")
    parser.add_argument("--bn-peers", action="store_true",
                        help="also batch norm alone: fastbn, torch.compile, oneDNN")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated subset of {','.join(PEERS)} (fused always runs)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    wanted = {"fused", *args.peers.split(",")}
    unknown = wanted - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(sorted(unknown))}")
    peers = [p for p in PEERS if p in wanted and not (args.no_compile and p == "compile")]
    rows = run(QUICK_SHAPES if args.quick else SHAPES, peers, args.repeats, args.bn_peers,
               not args.no_compile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                        for k, v in row.items()} for row in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
