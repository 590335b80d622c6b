"""What the threading layer costs: fastbn on the ``make bench`` grid under omp, tbb, ...

Numba picks its threading layer once per process, so every layer is timed in
its own worker process (``NUMBA_THREADING_LAYER=<layer>``), and the layers take
turns over ``--runs`` rounds (omp, tbb, omp, tbb, ...) so that a slow minute on
a shared machine does not land on one layer only.  Per case and operation the
table shows each layer's median over the rounds (every round's number is itself
the median of ``--repeats`` samples) and its ratio to the first layer; the
"spread" column is the largest/smallest round of that layer, the noise to read
the ratios against.  Not run in parallel with anything else: on 2 cores the
two layers must not share the machine.

    python -m bench.threading_layers                         # omp vs tbb, float32, 3 rounds
    python -m bench.threading_layers --layers omp,tbb,workqueue --dtypes float32,float64
    python -m bench.threading_layers --shapes "256x1024 32x56x56x64:-1" --runs 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .cases import FULL_SHAPES, Case, calibrate_number, fmt_time, make_data, parse_shapes

ROOT = Path(__file__).resolve().parent.parent
OPS = ("fwdbwd", "forward", "backward", "inference")
PREFIX = "@@layers "


def _worker(shapes, dtypes, ops, repeats: int) -> dict:
    """Time every case in this process (whatever layer Numba loads here)."""
    import numba

    import fastbn

    from .peers import FastbnPeer

    # One launch big enough for the parallel variant, so Numba loads its layer now.
    fastbn.batch_norm_forward(np.ones((512, 512), np.float32))
    results = {}
    for shape, axis in shapes:
        for dtype in dtypes:
            case = Case(shape, dtype, axis=axis)
            peer = FastbnPeer(make_data(case))
            for op in ops:
                fn = peer.op(op)
                number, _ = calibrate_number(fn, target_s=0.02)
                samples = []
                gc.disable()
                try:
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for _ in range(number):
                            fn()
                        samples.append((time.perf_counter() - t0) / number)
                finally:
                    gc.enable()
                results[f"{case.label}|{op}"] = float(np.median(samples))
    return {"layer": numba.threading_layer(), "results": results}


def _run_worker(layer: str, argv: list[str], timeout: float) -> dict:
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "bench.threading_layers", "--worker", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " / ".join(tail) or f"exit code {proc.returncode}"}


def table(layers: list[str], rounds: dict[str, list[dict]]) -> str:
    """Markdown: per case and op, each layer's median over rounds and its ratio to the first."""
    first = layers[0]
    keys = list(rounds[first][0])
    head = ["case", "op"]
    for layer in layers:
        head += [layer] if layer == first else [layer, f"{layer}/{first}"]
    head.append("spread " + " / ".join(layers))
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    ratios = {layer: [] for layer in layers[1:]}
    for key in keys:
        label, op = key.split("|")
        per = {layer: [r[key] for r in rounds[layer]] for layer in layers}
        med = {layer: statistics.median(v) for layer, v in per.items()}
        row = [label, op]
        for layer in layers:
            row.append(fmt_time(med[layer]))
            if layer != first:
                ratio = med[layer] / med[first]
                ratios[layer].append(ratio)
                row.append(f"{ratio:.2f}")
        row.append(" / ".join(f"{max(v) / min(v):.2f}" for v in per.values()))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for layer, r in ratios.items():
        lines.append(f"{layer}/{first} (time ratio, > 1 means {layer} is slower): min "
                     f"{min(r):.2f}, median {statistics.median(r):.2f}, max {max(r):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threading_layers",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--layers", default="omp,tbb", help="comma-separated (default omp,tbb)")
    p.add_argument("--shapes", help="as bench.cli's --shapes (default: make bench's grid)")
    p.add_argument("--dtypes", default="float32", help="comma-separated (default float32)")
    p.add_argument("--ops", default=",".join(OPS), help=f"subset of {','.join(OPS)}")
    p.add_argument("--runs", type=int, default=3, help="rounds of all layers (default 3)")
    p.add_argument("--repeats", type=int, default=11, help="samples per case and op (default 11)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    p.add_argument("--markdown", help="also write the table here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = parse_shapes(args.shapes) if args.shapes else FULL_SHAPES
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if unknown := [o for o in ops if o not in OPS]:
        p.error(f"unknown op(s): {', '.join(unknown)}")
    if args.worker:
        print(PREFIX + json.dumps(_worker(shapes, dtypes, ops, args.repeats)), flush=True)
        return 0
    if args.runs < 1:
        p.error("--runs must be at least 1")
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    worker_argv = ["--dtypes", args.dtypes, "--ops", args.ops, "--repeats", str(args.repeats)]
    if args.shapes:
        worker_argv += ["--shapes", args.shapes]
    rounds: dict[str, list[dict]] = {layer: [] for layer in layers}
    for i in range(args.runs):
        for layer in list(rounds):
            t0 = time.perf_counter()
            got = _run_worker(layer, worker_argv, args.timeout)
            if "error" in got or got.get("layer") != layer:
                why = got.get("error") or f"Numba loaded {got.get('layer')!r} instead"
                print(f"threading-layers: {layer} skipped ({why})", flush=True)
                del rounds[layer]
                continue
            rounds[layer].append(got["results"])
            print(f"threading-layers: round {i + 1}/{args.runs} {layer} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    done = [layer for layer in layers if layer in rounds]
    if len(done) < 2:
        print("threading-layers: fewer than two layers ran; nothing to compare")
        return 1
    text = table(done, rounds)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
