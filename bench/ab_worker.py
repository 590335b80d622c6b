"""A/B timing worker: imports only NumPy and fastbn's public API, times one case on request.

Started by :mod:`bench.perf_compare` as ``python -c <this file's source>`` with
the working directory and ``PYTHONPATH`` set to one source tree (the base
revision's worktree, or the current tree), so the same driver code times any
revision of fastbn, including revisions that have no ``bench`` package.

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout
(replies start with ``@@ab ``, so stray prints from the library cannot be taken
for a reply).

    {"cmd": "setup", "case": {"shape": [...], "dtype": "float32", "axis": 1, "eps": 1e-5},
     "op": "fwdbwd", "seed": 0}                      -> {"single_s": ...}
    {"cmd": "time", "number": k}                       -> {"t": seconds per call}
    {"cmd": "quit"}
"""

import gc
import json
import sys
import time
import traceback

PREFIX = "@@ab "


def reply(obj):
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def make_data(shape, dtype, axis, seed):
    """Same recipe as bench.cases.make_data (kept here: the worker must not import bench)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype).type
    c = shape[axis]
    x = rng.standard_normal(shape, dtype=dt)
    x *= dt(2.0)
    x += dt(0.5)
    dy = rng.standard_normal(shape, dtype=dt)
    gamma = rng.uniform(0.5, 1.5, c).astype(dt)
    beta = rng.standard_normal(c).astype(dt)
    running_mean = (rng.standard_normal(c) * 0.1 + 0.5).astype(dt)
    running_var = rng.uniform(3.0, 5.0, c).astype(dt)
    return x, gamma, beta, dy, running_mean, running_var


def _call(fn, *args, out=None, **kwargs):
    """Call with out= when the revision supports it, without otherwise."""
    if out is not None:
        try:
            return fn(*args, out=out, **kwargs)
        except TypeError as exc:
            if "out" not in str(exc):
                raise
    return fn(*args, **kwargs)


def build(fastbn, case, op, seed):
    import numpy as np

    shape, dtype = tuple(case["shape"]), case["dtype"]
    axis, eps = int(case.get("axis", 1)), float(case.get("eps", 1e-5))
    x, g, b, dy, rm, rv = make_data(shape, dtype, axis, seed)
    y, dx = np.empty_like(x), np.empty_like(x)
    fwd, bwd = fastbn.batch_norm_forward, fastbn.batch_norm_backward
    if op == "forward":
        return lambda: _call(fwd, x, g, b, eps=eps, axis=axis, out=y)
    if op == "fwdbwd":
        def fwdbwd():
            _, ctx = _call(fwd, x, g, b, eps=eps, axis=axis, out=y)
            return _call(bwd, dy, ctx, out=dx)
        return fwdbwd
    if op == "backward":
        _, ctx0 = _call(fwd, x, g, b, eps=eps, axis=axis, out=np.empty_like(x))
        return lambda: _call(bwd, dy, ctx0, out=dx)
    if op == "inference":
        inf = fastbn.batch_norm_inference
        return lambda: _call(inf, x, rm, rv, g, b, eps=eps, axis=axis, out=y)
    raise ValueError(f"unknown op {op!r}")


def main():
    import os

    root = os.path.realpath(os.environ.get("FASTBN_AB_ROOT", os.getcwd()))
    try:
        import fastbn
    except Exception as exc:
        reply({"error": f"cannot import fastbn from {root}: {exc.__class__.__name__}: {exc}"})
        return 0
    found = os.path.realpath(getattr(fastbn, "__file__", None) or "?")
    if not found.startswith(root + os.sep):
        # e.g. an editable install elsewhere answered the import: not this tree's fastbn
        reply({"error": f"no fastbn package in {root} (the import found {found})"})
        return 0
    reply({"ready": True, "version": getattr(fastbn, "__version__", "?"),
           "file": getattr(fastbn, "__file__", "?")})
    fn = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
            cmd = msg["cmd"]
            if cmd == "quit":
                break
            if cmd == "setup":
                fn = None
                fn = build(fastbn, msg["case"], msg["op"], int(msg.get("seed", 0)))
                fn()  # compile / warm up
                fn()
                t0 = time.perf_counter()
                fn()
                reply({"single_s": time.perf_counter() - t0})
            elif cmd == "time":
                number = int(msg["number"])
                gc.disable()
                try:
                    t0 = time.perf_counter()
                    for _ in range(number):
                        fn()
                    t = (time.perf_counter() - t0) / number
                finally:
                    gc.enable()
                reply({"t": t})
            else:
                reply({"error": f"unknown command {cmd!r}"})
        except Exception as exc:
            reply({"error": f"{exc.__class__.__name__}: {exc}",
                   "traceback": traceback.format_exc()[-2000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
