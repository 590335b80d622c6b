"""``make bench``: time fastbn against every installed peer over a grid of shapes and dtypes.

For every case (shape x dtype) the peers are timed interleaved (A B C C B A
A B C ...) and the median of the samples is reported.  Prints

* fastbn's own times (forward, backward, forward+backward, inference) with
  its effective bandwidth (bytes that must move / time) and that bandwidth as
  a percentage of the STREAM triad measured at the start of the same run;
* per operation, each peer's median time and fastbn's speed-up over it;
* cold-start times (fresh interpreters, warm and empty compile cache);

and writes everything (machine, versions, thread count, threading layer,
every sample) to JSON plus a PNG chart under ``bench/results/``.

    python -m bench.cli                 # the full grid (what `make bench` runs)
    python -m bench.cli --quick         # small grid, few repeats (about a minute)
    python -m bench.cli --shapes "1024x4096 32x56x56x64:-1" --dtypes float32 --peers fastbn,torch
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import report
from .cases import (
    FULL_SHAPES,
    QUICK_SHAPES,
    SIXTEEN_BIT,
    Case,
    bytes_moved,
    fmt_time,
    interleaved,
    make_data,
    parse_shapes,
)
from .peers import DEFAULT_PEERS, PEER_NAMES, available_peers, check_peer, make_peer

RESULTS = Path(__file__).resolve().parent / "results"
ALL_OPS = ("fwdbwd", "forward", "backward", "inference")
SHORT = {"fwdbwd": "fwd+bwd", "forward": "fwd", "backward": "bwd", "inference": "infer"}
OP_TITLES = {"fwdbwd": "forward+backward", "forward": "forward only",
             "backward": "backward only", "inference": "inference (eval forward)"}

#: The project's performance targets (informational: printed, never enforced here).
#: (case id, op, peer or "stream", minimum speed-up or % of STREAM)
TARGETS = [
    ("fc-1024x4096-f32", "fwdbwd", "numpy", 5.0),
    ("fc-1024x4096-f32", "fwdbwd", "torch", 1.5),
    ("nchw-32x64x56x56-f32", "fwdbwd", "torch", 2.0),
    # small calls (issue 8): per-call cost decides
    *[(f"fc-{shape}-f32", op, peer, target)
      for shape in ("100x100", "32x256", "64x512")
      for op, peer, target in (("fwdbwd", "numpy", 3.0), ("fwdbwd", "torch", 3.0),
                               ("forward", "torch", 1.5), ("backward", "torch", 1.5))],
    ("fc-4x8-f32", "fwdbwd", "time_us", 12.0),  # the fixed cost of a pair, at most
    # the roofline, on bytes that must move
    ("fc-8192x4096-f32", "forward", "stream", 85.0),
    ("fc-8192x4096-f32", "backward", "stream", 85.0),
    ("nhwc-32x56x56x64-f32", "forward", "stream", 85.0),
    ("nhwc-32x56x56x64-f32", "backward", "stream", 85.0),
]
#: No operation slower than PyTorch: every case and op at least this ratio,
#: and forward+backward at least FWDBWD_MIN_LARGE on inputs of >= 1 MiB.
TORCH_MIN = 1.1
FWDBWD_MIN_LARGE = 2.0
#: 16-bit data: forward+backward at least this over PyTorch in the same format, and
#: every operation at least SIXTEEN_BIT_OWN_MIN over fastbn's own float32 on inputs of
#: at least SIXTEEN_BIT_LARGE_BYTES of 16-bit data (no slower than float32 below).
SIXTEEN_BIT_TORCH_FWDBWD_MIN = 1.5
SIXTEEN_BIT_OWN_MIN = 1.8
SIXTEEN_BIT_LARGE_BYTES = 8 * 2**20


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.cli", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true",
                   help="small grid (4 shapes, float32), 5 repeats, 1 cold-start run")
    p.add_argument("--repeats", type=int, help="samples per peer and operation (default 15, "
                   "quick 5); slow peers stop early once they used --budget seconds")
    p.add_argument("--min-repeats", type=int, default=3,
                   help="samples every peer gets whatever its budget (default 3)")
    p.add_argument("--budget", type=float, default=3.0,
                   help="seconds of timed calls per peer, case and operation after which a "
                        "slow peer stops sampling (default 3)")
    p.add_argument("--shapes", help="e.g. '32x256 1024x4096 32x64x56x56 32x56x56x64:-1' "
                   "(':AXIS' sets the channel axis; default 1)")
    p.add_argument("--dtypes", help="comma-separated subset of float32,float64,float16,"
                   "bfloat16 (the default; quick: float32).  16-bit cases use float32 "
                   "parameters and add fastbn on float32 copies (fastbn_f32) for the "
                   "speed-up over fastbn's own float32")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                   help=f"comma-separated subset of {','.join(PEER_NAMES)} (fastbn is always "
                        "included; missing packages are skipped)")
    p.add_argument("--ops", default="fwdbwd,forward,backward,inference",
                   help=f"comma-separated subset of {','.join(ALL_OPS)}")
    p.add_argument("--json", default=str(RESULTS / "latest.json"), help="JSON output path")
    p.add_argument("--png", default=str(RESULTS / "latest.png"), help="PNG chart path")
    p.add_argument("--markdown", default=str(RESULTS / "latest.md"),
                   help="Markdown tables path (paste into README)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the cold-start runs")
    p.add_argument("--cold-start-runs", type=int, help="warm-cache runs (default 3, quick 1)")
    p.add_argument("--stream-elements", type=int, default=1 << 25,
                   help="STREAM array length in float64 elements (default 2**25 = 256 MiB)")
    p.add_argument("--check-peers", action="store_true",
                   help="also check every peer's outputs against the float64 reference "
                        "(fastbn is always checked)")
    p.add_argument("--plain", action="store_true", help="no rich output, plain text tables")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 15)
    if args.shapes:
        args.shape_list = parse_shapes(args.shapes)
    else:
        args.shape_list = QUICK_SHAPES if args.quick else FULL_SHAPES
    default_dtypes = "float32" if args.quick else "float32,float64,float16,bfloat16"
    args.dtype_list = [d.strip() for d in (args.dtypes or default_dtypes).split(",") if d.strip()]
    if "bfloat16" in args.dtype_list and importlib.util.find_spec("ml_dtypes") is None:
        if args.dtypes:
            p.error("bfloat16 needs ml_dtypes (pip install ml_dtypes, or the bench extra)")
        print("bench: ml_dtypes is not installed; bfloat16 cases skipped", file=sys.stderr)
        args.dtype_list.remove("bfloat16")
    args.peer_list = [p.strip() for p in args.peers.split(",") if p.strip()]
    for name in args.peer_list:
        if name not in PEER_NAMES:
            p.error(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")
    if "fastbn" not in args.peer_list:
        args.peer_list.insert(0, "fastbn")
    args.op_list = [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in args.op_list:
        if op not in ALL_OPS:
            p.error(f"unknown op {op!r}; choose from {', '.join(ALL_OPS)}")
    args.cold_start_runs = args.cold_start_runs or (1 if args.quick else 3)
    return args


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


class _Progress:
    """rich progress bar, else tqdm, else one line per step on stderr."""

    def __init__(self, total: int, plain: bool):
        self.total, self.done, self._impl, self._task = total, 0, None, None
        if not plain:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._impl = Progress(TextColumn("{task.description:<48}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TimeRemainingColumn(), transient=False)
                self._kind = "rich"
            except ImportError:
                try:
                    from tqdm import tqdm

                    self._impl = tqdm(total=total, file=sys.stderr)
                    self._kind = "tqdm"
                except ImportError:
                    pass

    def __enter__(self):
        if self._impl is not None and self._kind == "rich":
            self._impl.start()
            self._task = self._impl.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._impl is not None:
            if self._kind == "rich":
                self._impl.stop()
            else:
                self._impl.close()

    def describe(self, text: str) -> None:
        if self._impl is None:
            print(f"[{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)
        elif self._kind == "rich":
            self._impl.update(self._task, description=text)
        else:
            self._impl.set_description(text)

    def advance(self) -> None:
        self.done += 1
        if self._impl is not None:
            if self._kind == "rich":
                self._impl.advance(self._task)
            else:
                self._impl.update(1)

    def log(self, text: str) -> None:
        if self._impl is not None and self._kind == "rich":
            self._impl.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def _quiet_numpy():
    with np.errstate(all="ignore"):
        yield


# ---------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------


def run_case(case: Case, peer_names: list[str], ops: list[str], repeats: int, min_repeats: int,
             budget: float, check_peers: bool, progress: _Progress) -> dict:
    data = make_data(case, seed=0)
    peers, errors = {}, {}
    if case.dtype in SIXTEEN_BIT and "fastbn" in peer_names:
        peer_names = [*peer_names, "fastbn_f32"]  # the speed-up over fastbn's own float32
    for name in peer_names:
        try:
            peers[name] = make_peer(name, data)
        except Exception as exc:  # a peer that cannot run this case is reported, not fatal
            errors[name] = f"{exc.__class__.__name__}: {exc}"
            progress.log(f"  {name} skipped on {case.label}: {errors[name]}")
    accuracy = {}
    for name, peer in peers.items():
        if name == "fastbn" or check_peers:
            accuracy[name] = check_peer(peer)
    out = {"case": case.to_dict(), "bytes": case.nbytes, "timings": {}, "peer_errors": errors,
           "accuracy": accuracy}
    for op in ops:
        progress.describe(f"{case.label} {OP_TITLES[op]}")
        fns = {n: p.op(op) for n, p in peers.items() if p.op(op) is not None}
        if "fastbn" in fns:
            # Budget limits only the other peers: fastbn always gets every repeat.
            budgets = {n: (None if n == "fastbn" else budget) for n in fns}
            with _quiet_numpy():
                out["timings"][op] = interleaved(fns, repeats, min_repeats=min_repeats,
                                                 budget_s=budgets, target_s=0.005)
        progress.advance()
    del peers, data
    gc.collect()
    return out


def derive(case_result: dict, stream_gbps: float | None, llc_bytes: int | None = None) -> None:
    """Add speed-ups, GB/s and % of STREAM to one case's result, in place.

    ``in_cache`` marks cases whose four arrays (x, y, dy, dx) fit in the last
    level cache: their "bandwidth" is cache bandwidth and may exceed STREAM.
    """
    case = Case.from_dict(case_result["case"])
    case_result["in_cache"] = bool(llc_bytes and 4 * case.nbytes <= llc_bytes)
    speedup, gbps, pct = {}, {}, {}
    for op, timing in case_result["timings"].items():
        fast = timing.get("fastbn", {}).get("median", math.nan)
        speedup[op] = {peer: t["median"] / fast for peer, t in timing.items() if peer != "fastbn"}
        if math.isfinite(fast):
            gbps[op] = bytes_moved(case, op) / fast / 1e9
            if stream_gbps:
                pct[op] = 100.0 * gbps[op] / stream_gbps
    case_result.update(speedup=speedup, gbps=gbps, pct_stream=pct)


def build_tables(result: dict) -> list[report.Table]:
    cases = result["cases"]
    peers = result["peers"]
    stream = result.get("stream", {}).get("gbps")
    tables = []
    ops = [op for op in ALL_OPS if any(op in c["timings"] for c in cases)]
    headers = ["case"] + [SHORT[op] for op in ops] + [f"{SHORT[op]} GB/s (%STREAM)" for op in ops]
    rows = []
    for c in cases:
        row = [c["case"]["label"] + (" *" if c.get("in_cache") else "")]
        row += [fmt_time(c["timings"].get(op, {}).get("fastbn", {}).get("median", math.nan))
                for op in ops]
        for op in ops:
            g, p = c["gbps"].get(op), c["pct_stream"].get(op)
            row.append("-" if g is None else f"{g:.1f}" + ("" if p is None else f" ({p:.0f}%)"))
        rows.append(row)
    note = ("Bytes that must move: forward 3x|x| (read x twice, write y), backward 5x|x| "
            "(read x and dy twice, write dx), inference 2x|x|.")
    if stream:
        note += f" STREAM triad in this run: {stream:.1f} GB/s."
    if any(c.get("in_cache") for c in cases):
        llc = result.get("llc_bytes", 0) / 2**20
        note += (f" * x, y, dy and dx fit in the {llc:.0f} MiB last-level cache: cache "
                 "bandwidth, may exceed 100%.")
    tables.append(report.Table("fastbn: median time and effective bandwidth", headers, rows, note))
    for op in ops:
        present = [p for p in peers if any(p in c["timings"].get(op, {}) for c in cases)]
        if present == ["fastbn"] or not present:
            continue
        headers = ["case"] + present
        rows = []
        for c in cases:
            t = c["timings"].get(op, {})
            row = [c["case"]["label"]]
            for p in present:
                if p not in t:
                    row.append("-")
                elif p == "fastbn":
                    row.append(fmt_time(t[p]["median"]))
                else:
                    row.append(f"{fmt_time(t[p]['median'])} ({c['speedup'][op][p]:.1f}x)")
            rows.append(row)
        tables.append(report.Table(
            f"{OP_TITLES[op]}: median time per peer (fastbn's speed-up over it)", headers, rows))
    cold = result.get("cold_start")
    if cold:
        rows = []
        for key, name in (("warm_cache", "warm compile cache"), ("empty_cache", "empty cache"),
                          ("no_cache", "no cache (FASTBN_NO_CACHE=1)")):
            if key in cold:
                s = cold[key]
                rows.append([name, f"{s['import_s']:.2f} s", f"{s['first_call_s']:.2f} s",
                             f"{s['total_s']:.2f} s", f"{s['process_wall_s']:.2f} s"])
        tables.append(report.Table(
            f"cold start: import fastbn + first forward+backward {tuple(cold['shape'])} float32, "
            "fresh interpreter",
            ["cache", "import", "first fwd+bwd", "total", "whole process"], rows,
            "'whole process' adds interpreter start-up and import numpy."))
    vs_torch = torch_ratio_rows(result, ops)
    if vs_torch:
        tables.append(report.Table(
            "fastbn vs PyTorch: speed-up per operation (no operation may be slower)",
            ["case"] + [SHORT[op] for op in ops] + [""], vs_torch,
            f"LOW marks a ratio below {TORCH_MIN}x, or forward+backward below "
            f"{FWDBWD_MIN_LARGE}x on an input of at least 1 MiB."))
    sixteen = sixteen_bit_rows(result, ops)
    if sixteen:
        tables.append(report.Table(
            "16-bit storage: speed-up over fastbn float32 (same values, same run), and "
            "fwd+bwd over PyTorch in the same format",
            ["case"] + [f"{SHORT[op]} vs f32" for op in ops] + ["fwd+bwd vs torch", ""], sixteen,
            f"LOW marks a speed-up over float32 below {SIXTEEN_BIT_OWN_MIN}x on at least "
            f"{SIXTEEN_BIT_LARGE_BYTES // 2**20} MiB of 16-bit data (below 1x on smaller "
            f"inputs), or fwd+bwd below {SIXTEEN_BIT_TORCH_FWDBWD_MIN}x PyTorch."))
    targets = target_rows(result)
    if targets:
        tables.append(report.Table("targets (informational)",
                                   ["case", "op", "against", "target", "measured", ""], targets))
    return tables


def torch_ratio_rows(result: dict, ops: list[str]) -> list[list[str]]:
    """One row per case: fastbn's speed-up over torch per operation, flagged when too low."""
    rows = []
    for c in result["cases"]:
        ratios = {op: c["speedup"].get(op, {}).get("torch") for op in ops}
        if all(r is None for r in ratios.values()):
            continue
        large = c["bytes"] >= 2**20
        sixteen = c["case"]["dtype"] in SIXTEEN_BIT
        fwdbwd_min = SIXTEEN_BIT_TORCH_FWDBWD_MIN if sixteen else FWDBWD_MIN_LARGE
        low = [op for op, r in ratios.items() if r is not None and (
            r < TORCH_MIN or (op == "fwdbwd" and (large or sixteen) and r < fwdbwd_min))]
        rows.append([c["case"]["label"]]
                    + ["-" if r is None else f"{r:.2f}x" for r in ratios.values()]
                    + ["LOW: " + ", ".join(SHORT[op] for op in low) if low else "ok"])
    return rows


def sixteen_bit_rows(result: dict, ops: list[str]) -> list[list[str]]:
    """One row per 16-bit case: its speed-up over fastbn on float32 copies of the same
    values (interleaved in the same run) and over PyTorch in the same 16-bit format."""
    rows = []
    for c in result["cases"]:
        if c["case"]["dtype"] not in SIXTEEN_BIT:
            continue
        own = {op: c["speedup"].get(op, {}).get("fastbn_f32") for op in ops}
        vs_torch = c["speedup"].get("fwdbwd", {}).get("torch")
        large = c["bytes"] >= SIXTEEN_BIT_LARGE_BYTES
        low = [SHORT[op] for op, r in own.items() if r is not None and (
            r < SIXTEEN_BIT_OWN_MIN if large else r < 1.0)]
        if vs_torch is not None and vs_torch < SIXTEEN_BIT_TORCH_FWDBWD_MIN:
            low.append("fwd+bwd vs torch")
        rows.append([c["case"]["label"]]
                    + ["-" if r is None else f"{r:.2f}x" for r in own.values()]
                    + ["-" if vs_torch is None else f"{vs_torch:.2f}x"]
                    + ["LOW: " + ", ".join(low) if low else "ok"])
    return rows


def target_rows(result: dict) -> list[list[str]]:
    by_id = {c["case"]["id"]: c for c in result["cases"]}
    rows = []
    for case_id, op, peer, target in TARGETS:
        c = by_id.get(case_id)
        if c is None:
            continue
        if peer == "time_us":
            fast = c["timings"].get(op, {}).get("fastbn", {}).get("median")
            if fast is None:
                continue
            value = fast * 1e6
            rows.append([c["case"]["label"], OP_TITLES[op], "time", f"<= {target:g} µs",
                         f"{value:.1f} µs", "met" if value <= target else "MISSED"])
        elif peer == "stream":
            value = c["pct_stream"].get(op)
            if value is None:
                continue
            rows.append([c["case"]["label"], OP_TITLES[op], "STREAM triad", f">= {target:.0f}%",
                         f"{value:.0f}%", "met" if value >= target else "MISSED"])
        else:
            value = c["speedup"].get(op, {}).get(peer)
            if value is None:
                continue
            rows.append([c["case"]["label"], OP_TITLES[op], peer, f">= {target:g}x",
                         f"{value:.2f}x", "met" if value >= target else "MISSED"])
    if "cold_start" in result:
        v = result["cold_start"]["warm_cache"]["total_s"]
        rows.append(["cold start, warm cache", "import + first fwd+bwd", "-", "< 1 s",
                     f"{v:.2f} s", "met" if v < 1.0 else "MISSED"])
    return rows


def main(argv=None) -> int:
    args = _parse_args(argv)
    peers, skipped = available_peers(args.peer_list)
    for name, why in skipped.items():
        print(f"bench: peer {name} skipped ({why})", file=sys.stderr)
    cases = [Case(shape, dtype, axis) for shape, axis in args.shape_list
             for dtype in args.dtype_list]
    # Heavy imports (torch, jax) happen in peer construction; do one tiny case
    # first so fastbn's kernels are loaded and the threading layer is known.
    from .bandwidth import last_level_cache_bytes, stream_triad

    print(f"bench: {len(cases)} cases x {len(args.op_list)} operations, peers: "
          f"{', '.join(peers)}; {args.repeats} repeats", file=sys.stderr)
    if "fastbn" in peers and any(c.dtype in SIXTEEN_BIT for c in cases):
        peers = [*peers, "fastbn_f32"]  # run_case adds it on the 16-bit cases
    result: dict = {"peers": peers, "skipped_peers": skipped, "ops": args.op_list,
                    "repeats": args.repeats, "min_repeats": args.min_repeats,
                    "budget_s": args.budget, "cases": []}
    t_start = time.perf_counter()
    with _Progress(len(cases) * len(args.op_list) + 2 + (not args.no_cold_start),
                   args.plain) as progress:
        progress.describe("STREAM triad")
        result["stream"] = stream_triad(args.stream_elements)
        progress.log(f"STREAM triad: {result['stream']['gbps']:.1f} GB/s "
                     f"({result['stream']['threads']} threads)")
        progress.advance()
        for case in cases:
            r = run_case(case, peers, args.op_list, args.repeats, args.min_repeats, args.budget,
                         args.check_peers, progress)
            result["cases"].append(r)
        # STREAM again at the end: the roofline is the better of the two (a
        # shared machine's bandwidth drifts; the best run is the ceiling).
        progress.describe("STREAM triad (again)")
        result["stream_end"] = stream_triad(args.stream_elements)
        if result["stream_end"]["gbps"] > result["stream"]["gbps"]:
            result["stream"], result["stream_end"] = result["stream_end"], result["stream"]
        progress.log(f"STREAM triad: {result['stream']['gbps']:.1f} GB/s best of start and end "
                     f"(other: {result['stream_end']['gbps']:.1f} GB/s)")
        progress.advance()
        result["llc_bytes"] = last_level_cache_bytes()
        for r in result["cases"]:
            derive(r, result["stream"]["gbps"], result["llc_bytes"])
        if not args.no_cold_start:
            progress.describe("cold start (fresh interpreters)")
            from .cold_start import measure_cold_start

            result["cold_start"] = measure_cold_start(args.cold_start_runs,
                                                      include_no_cache=not args.quick)
            progress.advance()
    result["meta"] = report.machine_info()
    result["meta"]["elapsed_s"] = time.perf_counter() - t_start
    try:
        result["meta"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    tables = build_tables(result)
    report.print_tables(tables, use_rich=not args.plain)
    m = result["meta"]
    print(f"{m['cpu']}, {m['numba_threads']} Numba threads ({m['threading_layer']} layer), "
          f"numpy {m['versions']['numpy']}, numba {m['versions']['numba']}, "
          f"torch {m['versions']['torch']}, jax {m['versions']['jax']}; "
          f"{m['elapsed_s']:.0f} s")
    if skipped:
        print("skipped peers: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    for path, kind in ((args.json, "json"), (args.markdown, "md"), (args.png, "png")):
        if not path:
            continue
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "json":
            path.write_text(json.dumps(result, indent=1, default=float))
        elif kind == "md":
            path.write_text("\n\n".join(t.markdown() for t in tables) + "\n")
        elif report.write_chart(result, path) is None:
            continue
        print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
