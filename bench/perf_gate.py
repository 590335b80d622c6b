"""CI performance gate: fastbn against the NumPy reference, same process, interleaved.

For each gate case the two are timed alternately (fastbn, NumPy, NumPy,
fastbn, ...), ``--repeats`` samples each (at least 7), and the speed-up is the
median of the per-round ratios ``t_numpy / t_fastbn``.  The gate fails (exit 1)
when a speed-up falls below the committed threshold in
``bench/perf_gate_thresholds.json``.  Thresholds sit at about 60 % of the
lowest ratio measured over three quiet-ish runs (recorded next to them as
``measured``), so noise does not trip the gate but a real regression does:
lost parallelism, fastmath dropped from a reduction, a float64 upcast, a
fallback to NumPy.  ``FASTBN_SLOW_FALLBACK=1`` (serial kernels, no fastmath)
demonstrates a red gate.

    python -m bench.perf_gate                      # what `make perf-gate` runs
    python -m bench.perf_gate --list
    python -m bench.perf_gate --cases nchw-16x32x28x28-f32/fwdbwd --repeats 7
    python -m bench.perf_gate --calibrate 3        # measure 3 times, print new thresholds
    python -m bench.perf_gate --calibrate 3 --write-thresholds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cases import SIXTEEN_BIT, Case, case_grid, fmt_time, interleaved, make_data, paired_ratios
from .peers import check_peer, make_peer

THRESHOLDS = Path(__file__).resolve().parent / "perf_gate_thresholds.json"
THRESHOLD_FRACTION = 0.6
MIN_REPEATS = 7
OP_NAMES = {"fwdbwd": "forward+backward", "forward": "forward", "backward": "backward",
            "inference": "inference"}

#: The gate's grid: case id -> (case, operation).
GATE_CASES: dict[str, tuple[Case, str]] = case_grid([
    (Case((1024, 4096), "float32"), "fwdbwd"),
    (Case((32, 64, 56, 56), "float32"), "fwdbwd"),
    (Case((32, 56, 56, 64), "float32", axis=-1), "fwdbwd"),
    (Case((1024, 4096), "float32"), "forward"),
    (Case((32, 64, 56, 56), "float32"), "backward"),
    # Small (1.6 MB): used by the test that shows the gate going red.
    (Case((16, 32, 28, 28), "float32"), "fwdbwd"),
    # Small calls, where the fixed cost per call decides: a NumPy network's
    # (100, 100) layer and a tiny (4, 8) input.  They run the serial kernels;
    # a return to thread-team launches for tiny inputs (FASTBN_SERIAL_BELOW=0)
    # costs about 10 us per call and must trip these.
    (Case((100, 100), "float32"), "fwdbwd"),
    (Case((4, 8), "float32"), "fwdbwd"),
    # 16-bit storage against fastbn's own float32 on the same values (the NumPy
    # reference has no 16-bit version): a conversion that stops vectorizing, a
    # widening to float64 or the software float16 path (FASTBN_SOFTWARE_F16=1)
    # loses the speed-up that halving the bytes buys.
    (Case((32, 64, 56, 56), "float16"), "fwdbwd"),
    (Case((32, 64, 56, 56), "bfloat16"), "fwdbwd"),
])

#: Per-case threshold fraction where 60 % would not catch the regression the
#: case exists for: at (100, 100) parallel launches cost "only" ~35 % of the
#: ratio under the tbb layer, so the threshold sits at 70 % of the quiet ratio
#: (75 % until 2026-12-03, when an AVX-512 Zen 4 runner measured the quiet
#: ratio at 2.53-2.66x against that 2.61x; serial-off there is 1.53-1.60x).
CASE_FRACTION: dict[str, float] = {"fc-100x100-f32/fwdbwd": 0.70}


def baseline_peer(case_id: str) -> str:
    """What a case's speed-up is measured against: the NumPy reference, or for 16-bit
    data fastbn itself on float32 copies of the same values (``fastbn_f32``)."""
    return "fastbn_f32" if GATE_CASES[case_id][0].dtype in SIXTEEN_BIT else "numpy"


def baseline_name(case_id: str) -> str:
    return ("fastbn's own float32" if baseline_peer(case_id) == "fastbn_f32"
            else "the NumPy reference")


def threshold_fraction(case_id: str) -> float:
    return CASE_FRACTION.get(case_id, THRESHOLD_FRACTION)


@dataclass(frozen=True)
class Verdict:
    case_id: str
    ratio: float
    threshold: float | None
    passed: bool
    message: str


def evaluate(ratios: dict[str, float], thresholds: dict[str, float],
             details: dict[str, str] | None = None,
             measured: dict[str, float] | None = None) -> list[Verdict]:
    """Pass/fail per case: a speed-up passes when it is at least its threshold.

    Pure function.  A case without a threshold passes (it is reported as not
    gated); a NaN ratio (the case could not be timed) fails.
    """
    details = details or {}
    measured = measured or {}
    verdicts = []
    for case_id, ratio in ratios.items():
        threshold = thresholds.get(case_id)
        extra = f" ({details[case_id]})" if case_id in details else ""
        if threshold is None:
            verdicts.append(Verdict(case_id, ratio, None, True,
                                    f"NOTE {case_id}: {ratio:.2f}x {_against(case_id)}{extra}; "
                                    "no committed threshold, not gated"))
            continue
        passed = bool(ratio >= threshold)  # False for NaN
        if passed:
            msg = (f"PASS {case_id}: fastbn {ratio:.2f}x faster than {_against(case_id)}"
                   f"{extra}, threshold {threshold:.2f}x")
        else:
            quiet = measured.get(case_id)
            quiet_txt = f", {quiet:.2f}x on a quiet run" if quiet else ""
            msg = (f"FAIL {case_id}: fastbn is only {ratio:.2f}x as fast as {_against(case_id)}"
                   f"{extra}, below the committed threshold {threshold:.2f}x{quiet_txt}. "
                   "A drop like this means lost parallelism, a slow (non-vectorized) kernel, a "
                   "float64 upcast or a fallback to NumPy; thresholds live in "
                   "bench/perf_gate_thresholds.json")
        verdicts.append(Verdict(case_id, ratio, threshold, passed, msg))
    return verdicts


def _against(case_id: str) -> str:
    return baseline_name(case_id) if case_id in GATE_CASES else "the NumPy reference"


def load_thresholds(path: Path = THRESHOLDS) -> tuple[dict[str, float], dict[str, float]]:
    """({case: threshold}, {case: lowest measured ratio}) from the committed JSON."""
    doc = json.loads(Path(path).read_text())
    thresholds = {k: float(v["threshold"]) for k, v in doc["cases"].items()}
    measured = {k: float(v["measured_min"]) for k, v in doc["cases"].items()
                if "measured_min" in v}
    return thresholds, measured


def measure(case_ids: list[str], repeats: int, log=print) -> dict[str, dict]:
    """Time fastbn and the NumPy reference on each case; ``{case: {"ratio", ...}}``."""
    out = {}
    for case_id in case_ids:
        case, op = GATE_CASES[case_id]
        data = make_data(case, seed=0)
        fast, ref = make_peer("fastbn", data), make_peer(baseline_peer(case_id), data)
        check_peer(fast)  # a fast but wrong kernel must not pass the gate
        with np.errstate(all="ignore"):
            t = interleaved({"fastbn": fast.op(op), "numpy": ref.op(op)}, repeats,
                            min_repeats=repeats, target_s=0.02)
        ratios = paired_ratios(t["numpy"]["times"], t["fastbn"]["times"])
        out[case_id] = {
            "ratio": float(np.median(ratios)),
            "ratios": ratios.tolist(),
            "fastbn_median_s": t["fastbn"]["median"],
            "numpy_median_s": t["numpy"]["median"],
            "fastbn_times": t["fastbn"]["times"],
            "numpy_times": t["numpy"]["times"],
        }
        log(f"  measured {case_id}: {out[case_id]['ratio']:.2f}x "
            f"(fastbn {fmt_time(t['fastbn']['median'])}, {baseline_peer(case_id)} "
            f"{fmt_time(t['numpy']['median'])})")
        del fast, ref, data
    return out


def _env_note() -> str:
    import numba

    import fastbn

    notes = [f"fastbn from {Path(fastbn.__file__).parent}", f"{numba.get_num_threads()} threads"]
    if os.environ.get("FASTBN_SLOW_FALLBACK"):
        notes.append("FASTBN_SLOW_FALLBACK is set (serial kernels, no fastmath)")
    if os.environ.get("FASTBN_SOFTWARE_F16"):
        notes.append("FASTBN_SOFTWARE_F16 is set (float16 converted by integer code)")
    if os.environ.get("FASTBN_SERIAL_BELOW"):
        notes.append(f"FASTBN_SERIAL_BELOW={os.environ['FASTBN_SERIAL_BELOW']} (small-input "
                     "threshold of the serial kernels)")
    return ", ".join(notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_gate",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--cases", help="comma-separated case ids (default: every case with a "
                   "committed threshold); see --list")
    p.add_argument("--repeats", type=int, default=11, help=f"samples per side (>= {MIN_REPEATS})")
    p.add_argument("--thresholds", default=str(THRESHOLDS), help="thresholds JSON")
    p.add_argument("--retries", type=int, default=1,
                   help="re-measure a case that fell below its threshold this many times; "
                        "the best run counts (default 1)")
    p.add_argument("--json", help="write measurements and verdicts here")
    p.add_argument("--list", action="store_true", help="list the gate cases and exit")
    p.add_argument("--calibrate", type=int, metavar="N",
                   help="measure N times and print thresholds at "
                        f"{100 * THRESHOLD_FRACTION:.0f}%% of the lowest ratio")
    p.add_argument("--write-thresholds", action="store_true",
                   help="with --calibrate: write them to --thresholds")
    args = p.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        p.error(f"--repeats must be at least {MIN_REPEATS}")
    thresholds_path = Path(args.thresholds)
    thresholds, measured_min = ({}, {})
    if thresholds_path.exists():
        thresholds, measured_min = load_thresholds(thresholds_path)
    if args.list:
        for case_id, (case, op) in GATE_CASES.items():
            th = thresholds.get(case_id)
            print(f"{case_id:36s} {case.label:32s} {OP_NAMES[op]:18s} "
                  f"threshold {'-' if th is None else f'{th:.2f}x'}")
        return 0
    if args.cases:
        case_ids = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in case_ids if c not in GATE_CASES]
        if unknown:
            p.error(f"unknown case(s) {', '.join(unknown)}; see --list")
    elif args.calibrate:
        case_ids = list(GATE_CASES)
    else:
        case_ids = [c for c in GATE_CASES if c in thresholds] or list(GATE_CASES)
    print(f"perf-gate: fastbn vs NumPy reference, {args.repeats} interleaved samples per side; "
          f"{_env_note()}", flush=True)

    if args.calibrate:
        runs = [measure(case_ids, args.repeats) for _ in range(args.calibrate)]
        doc = {
            "comment": "fastbn speed-up over the NumPy reference (median of interleaved "
                       "per-round ratios). threshold = threshold_fraction (or the case's "
                       "own fraction) x measured_min, "
                       "measured_min = lowest of the calibration runs. Regenerate with "
                       "`python -m bench.perf_gate --calibrate 3 --write-thresholds`.",
            "threshold_fraction": THRESHOLD_FRACTION,
            "calibrated": {"date": _dt.date.today().isoformat(), "runs": args.calibrate,
                           "repeats": args.repeats, "environment": _env_note(),
                           "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg")
                           else None},
            "cases": {},
        }
        for case_id in case_ids:
            values = [r[case_id]["ratio"] for r in runs]
            low = min(values)
            fraction = threshold_fraction(case_id)
            doc["cases"][case_id] = {
                "threshold": round(fraction * low, 2),
                "measured": [round(v, 3) for v in values],
                "measured_min": round(low, 3),
            }
            if fraction != THRESHOLD_FRACTION:
                doc["cases"][case_id]["fraction"] = fraction
            print(f"  {case_id:36s} measured {', '.join(f'{v:.2f}' for v in values)} -> "
                  f"threshold {doc['cases'][case_id]['threshold']:.2f}x")
        if args.write_thresholds:
            if args.cases and thresholds_path.exists():  # recalibrate these, keep the rest
                kept = json.loads(thresholds_path.read_text())["cases"]
                doc["cases"] = {**kept, **doc["cases"]}
                doc["calibrated"]["cases"] = case_ids
            thresholds_path.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"perf-gate: wrote {thresholds_path}")
        return 0

    results = measure(case_ids, args.repeats)
    # A case below its threshold is measured once more (a burst of load from
    # another process can halve one measurement); the better run counts.  A
    # real regression fails both times.
    for _ in range(args.retries):
        low = [c for c in case_ids if c in thresholds
               and not results[c]["ratio"] >= thresholds[c]]
        if not low:
            break
        print(f"perf-gate: re-measuring {', '.join(low)} (below threshold once)", flush=True)
        again = measure(low, args.repeats)
        for c in low:
            again[c]["first_ratio"] = results[c]["ratio"]
            if again[c]["ratio"] > results[c]["ratio"]:
                results[c] = again[c]
            else:
                results[c]["retry_ratio"] = again[c]["ratio"]
    details = {
        c: f"median fastbn {fmt_time(r['fastbn_median_s'])} vs {baseline_peer(c)} "
           f"{fmt_time(r['numpy_median_s'])}, {OP_NAMES[GATE_CASES[c][1]]} "
           f"{GATE_CASES[c][0].label}"
        for c, r in results.items()
    }
    verdicts = evaluate({c: r["ratio"] for c, r in results.items()}, thresholds, details,
                        measured_min)
    for v in verdicts:
        print(v.message)
    failed = [v for v in verdicts if not v.passed]
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"results": results, "verdicts": [v.__dict__ for v in verdicts]}, indent=1,
            default=float))
    if failed:
        print(f"perf-gate: FAILED - {len(failed)} of {len(verdicts)} cases below threshold: "
              + ", ".join(v.case_id for v in failed), flush=True)
        return 1
    print(f"perf-gate: OK - all {len(verdicts)} cases at or above their thresholds", flush=True)
    return 0 if not any(math.isnan(v.ratio) for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
