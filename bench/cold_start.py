"""Cold start: ``import fastbn`` plus the first forward+backward, in fresh subprocesses.

Three situations, each in a new interpreter (interpreter start-up and
``import numpy`` are outside the measured span; the subprocess's whole wall
time is recorded too):

* ``warm cache``  -- a Numba cache directory that an earlier process filled:
  what every run after the first one on a machine sees.
* ``empty cache`` -- ``NUMBA_CACHE_DIR`` pointed at a new empty directory.
  Numba consults ``NUMBA_CACHE_DIR`` *before* the in-tree ``__pycache__``
  (its ``_UserProvidedCacheLocator`` comes first), so the package's own cache
  is bypassed and every kernel is compiled, then written to that directory.
* ``no cache``    -- ``FASTBN_NO_CACHE=1``: compiled, nothing read or written.

The warm case uses its own temporary ``NUMBA_CACHE_DIR`` filled by the
empty-cache run, so the measurement never depends on (or disturbs) whatever
the source tree's ``__pycache__`` holds.

    python -m bench.cold_start [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
import numpy as np
shape = tuple(json.loads(sys.argv[1])); axis = int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.standard_normal(shape).astype(np.float32)
dy = rng.standard_normal(shape).astype(np.float32)
c = shape[axis]
g = np.ones(c, np.float32); b = np.zeros(c, np.float32)
t0 = time.perf_counter()
import fastbn
t1 = time.perf_counter()
y, ctx = fastbn.batch_norm_forward(x, g, b, axis=axis)
dx, dg, db = fastbn.batch_norm_backward(dy, ctx)
t2 = time.perf_counter()
assert np.isfinite(dx).all()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "total_s": t2 - t0,
                  "fastbn_file": fastbn.__file__}))
"""

#: The first call's shape: a small channels-first batch (planes kernels).
DEFAULT_SHAPE = (8, 16, 8, 8)


def _run_child(env_extra: dict[str, str], shape=DEFAULT_SHAPE, axis: int = 1,
               cwd: Path = ROOT, timeout: float = 300) -> dict:
    env = dict(os.environ)
    for key in ("NUMBA_CACHE_DIR", "FASTBN_NO_CACHE", "FASTBN_SLOW_FALLBACK"):
        env.pop(key, None)
    env.update(env_extra)
    pythonpath = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(list(shape)), str(axis)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    return result


def _summary(runs: list[dict]) -> dict:
    return {
        "runs": runs,
        "import_s": statistics.median(r["import_s"] for r in runs),
        "first_call_s": statistics.median(r["first_call_s"] for r in runs),
        "total_s": statistics.median(r["total_s"] for r in runs),
        "process_wall_s": statistics.median(r["process_wall_s"] for r in runs),
    }


def measure_cold_start(runs: int = 3, shape=DEFAULT_SHAPE, axis: int = 1,
                       include_no_cache: bool = True) -> dict:
    """``{"warm_cache": {...}, "empty_cache": {...}, "no_cache": {...}}``, medians over runs.

    Empty-cache runs each use a fresh directory (so each one compiles); warm
    runs reuse the directory the first empty-cache run filled.
    """
    with tempfile.TemporaryDirectory(prefix="fastbn-cold-") as tmp:
        tmp = Path(tmp)
        empty = []
        n_empty = max(1, min(runs, 2))  # compiling is slow; two samples are plenty
        for i in range(n_empty):
            d = tmp / f"empty{i}"
            d.mkdir()
            empty.append(_run_child({"NUMBA_CACHE_DIR": str(d)}, shape, axis))
        filled = tmp / "empty0"
        warm = [_run_child({"NUMBA_CACHE_DIR": str(filled)}, shape, axis) for _ in range(runs)]
        result = {
            "shape": list(shape), "axis": axis, "dtype": "float32",
            "what": "import fastbn + first batch_norm_forward + batch_norm_backward, "
                    "in a fresh interpreter (interpreter start and import numpy excluded)",
            "warm_cache": _summary(warm),
            "empty_cache": _summary(empty),
        }
        if include_no_cache:
            result["no_cache"] = _summary([_run_child({"FASTBN_NO_CACHE": "1"}, shape, axis)])
    return result


def format_cold_start(r: dict) -> list[str]:
    lines = []
    names = {"warm_cache": "warm compile cache", "empty_cache": "empty cache (compile + write)",
             "no_cache": "no cache (FASTBN_NO_CACHE=1)"}
    for key, name in names.items():
        if key in r:
            s = r[key]
            lines.append(f"{name:32s} import {s['import_s']:6.2f} s + first fwd+bwd "
                         f"{s['first_call_s']:6.2f} s = {s['total_s']:6.2f} s "
                         f"(whole process {s['process_wall_s']:.2f} s)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-no-cache", action="store_true", help="skip the FASTBN_NO_CACHE=1 run")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    r = measure_cold_start(args.runs, include_no_cache=not args.no_no_cache)
    print("\n".join(format_cold_start(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
