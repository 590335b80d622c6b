"""CI performance gate: fastbn against in-run baselines, same process, interleaved.

Each gate case times fastbn and a baseline alternately (fastbn, baseline,
baseline, fastbn, ...), ``--repeats`` samples each (at least 7), takes the
median of the per-round ratios, and fails (exit 1) when it falls below the
committed threshold in ``bench/perf_gate_thresholds.json``.  The baseline is
chosen so that what slows the machine slows both sides alike:

* **Large float32 cases: the streaming speed measured in the same rounds.**
  A parallel ``y = s*x + t`` over the case's own array
  (:func:`bench.bandwidth.stream_probe`) is timed beside fastbn, and the gated
  value is the fraction of that streaming speed fastbn reaches on the bytes
  its operation must move (``bench.cases.BYTES_FACTOR``).  Both sides run on
  Numba's threads and are memory-bound, so a process on the other core, a
  neighbour on the memory bus or a process's unlucky pages slow them
  together; the single-threaded NumPy reference, the baseline until
  2026-12-03, slowed far less, and a CI runner under such load measured
  fastbn at half its quiet speed-up over NumPy.  The NumPy speed-up is still
  printed beside it.
* **Small calls, (100, 100) and (4, 8): the NumPy reference.**  Both sides run
  serially on the calling thread there, so load on the other core does not
  favour either; these cases exist to catch thread-team launches for tiny
  inputs.
* **16-bit cases: fastbn's own float32 on the same values** (both parallel).

Thresholds sit at about 60 % of the lowest value measured over three quiet
runs in fresh processes (recorded next to them as ``measured``), so noise
does not trip the gate but a real regression does: lost parallelism,
fastmath dropped from a reduction, a float64 upcast, a fallback to NumPy.  A
case below its threshold is measured again in a fresh process (a process can
keep a slow page placement for its whole life); the better run counts.
``FASTBN_SLOW_FALLBACK=1`` (serial kernels, no fastmath) demonstrates a red
gate.

    python -m bench.perf_gate                      # what `make perf-gate` runs
    python -m bench.perf_gate --list
    python -m bench.perf_gate --cases nchw-16x32x28x28-f32/fwdbwd --repeats 7
    python -m bench.perf_gate --calibrate 3        # 3 fresh processes, print new thresholds
    python -m bench.perf_gate --calibrate 3 --write-thresholds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bandwidth import STREAM_PROBE_BYTES, stream_probe
from .cases import (
    BYTES_FACTOR,
    SIXTEEN_BIT,
    Case,
    case_grid,
    fmt_time,
    interleaved,
    make_data,
    paired_ratios,
)
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
#: ratio under the tbb layer, so the threshold sits at 80 % of the lowest quiet
#: ratio.  Calibrated 2026-12-03 (night) on the AVX-512 Zen 4 runner: quiet 2.50-2.66x
#: (threshold 2.00x), serial-off (FASTBN_SERIAL_BELOW=0) 1.57-1.73x.  Until then
#: the threshold was 2.44x, from a runner where NumPy is slower (3.3x quiet),
#: and sat within 5 % of this runner's quiet ratio.
CASE_FRACTION: dict[str, float] = {"fc-100x100-f32/fwdbwd": 0.80}


#: Cases measured against the NumPy reference: small calls, serial on both sides.
NUMPY_BASELINE = ("fc-100x100-f32/fwdbwd", "fc-4x8-f32/fwdbwd")


def baseline_peer(case_id: str) -> str:
    """What a case is measured against: ``"stream"`` (the in-run streaming speed),
    ``"numpy"`` (the NumPy reference) or ``"fastbn_f32"`` (fastbn on float32
    copies of a 16-bit case's values)."""
    if GATE_CASES[case_id][0].dtype in SIXTEEN_BIT:
        return "fastbn_f32"
    return "numpy" if case_id in NUMPY_BASELINE else "stream"


def baseline_name(case_id: str) -> str:
    return {"fastbn_f32": "fastbn's own float32", "numpy": "the NumPy reference",
            "stream": "the streaming speed measured in the same rounds"}[baseline_peer(case_id)]


def is_stream_case(case_id: str) -> bool:
    return case_id in GATE_CASES and baseline_peer(case_id) == "stream"


def fmt_value(case_id: str, value: float) -> str:
    """A gated value as it reads: a percentage of streaming speed, or a speed-up."""
    if is_stream_case(case_id):
        return f"{100 * value:.0f}%" if math.isfinite(value) else "nan"
    return f"{value:.2f}x"


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
        value = fmt_value(case_id, ratio)
        stream = is_stream_case(case_id)
        if threshold is None:
            verdicts.append(Verdict(case_id, ratio, None, True,
                                    f"NOTE {case_id}: {value} {'of ' if stream else ''}"
                                    f"{_against(case_id)}{extra}; no committed threshold, "
                                    "not gated"))
            continue
        passed = bool(ratio >= threshold)  # False for NaN
        limit = fmt_value(case_id, threshold)
        if passed:
            what = (f"at {value} of {_against(case_id)}" if stream
                    else f"{value} faster than {_against(case_id)}")
            msg = f"PASS {case_id}: fastbn {what}{extra}, threshold {limit}"
        else:
            quiet = measured.get(case_id)
            quiet_txt = f", {fmt_value(case_id, quiet)} on a quiet run" if quiet else ""
            what = (f"at {value} of {_against(case_id)}" if stream
                    else f"{value} as fast as {_against(case_id)}")
            msg = (f"FAIL {case_id}: fastbn is only {what}"
                   f"{extra}, below the committed threshold {limit}{quiet_txt}. "
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
    """Time fastbn and each case's baseline, interleaved; ``{case: {"ratio", ...}}``.

    ``ratio`` is the gated value: for a stream case the fraction of the in-run
    streaming speed fastbn reaches (``BYTES_FACTOR[op] / STREAM_PROBE_BYTES``
    times the median per-round ``t_stream / t_fastbn``), else the median
    per-round speed-up over the baseline.
    """
    out = {}
    for case_id in case_ids:
        case, op = GATE_CASES[case_id]
        base = baseline_peer(case_id)
        data = make_data(case, seed=0)
        fast = make_peer("fastbn", data)
        check_peer(fast)  # a fast but wrong kernel must not pass the gate
        fns = {"fastbn": fast.op(op)}
        if base == "stream":
            fns["stream"] = stream_probe(data.x)
            fns["numpy"] = make_peer("numpy", data).op(op)  # printed, not gated
        else:
            fns[base] = make_peer(base, data).op(op)
        with np.errstate(all="ignore"):
            t = interleaved(fns, repeats, min_repeats=repeats, target_s=0.02)
        ratios = paired_ratios(t[base]["times"], t["fastbn"]["times"])
        scale = BYTES_FACTOR[op] / STREAM_PROBE_BYTES if base == "stream" else 1.0
        result = {
            "baseline": base,
            "ratio": float(scale * np.median(ratios)),
            "ratios": (scale * ratios).tolist(),
            "fastbn_median_s": t["fastbn"]["median"],
            "baseline_median_s": t[base]["median"],
            "fastbn_times": t["fastbn"]["times"],
            "baseline_times": t[base]["times"],
        }
        note = ""
        if base == "stream":
            speedup = float(np.median(paired_ratios(t["numpy"]["times"], t["fastbn"]["times"])))
            result["numpy_speedup"] = speedup
            result["numpy_median_s"] = t["numpy"]["median"]
            note = f"; {speedup:.2f}x the NumPy reference, not gated"
        out[case_id] = result
        log(f"  measured {case_id}: {fmt_value(case_id, result['ratio'])} "
            f"(fastbn {fmt_time(t['fastbn']['median'])}, {base} "
            f"{fmt_time(t[base]['median'])}{note})", flush=True)
        del fast, fns, data
    return out


def measure_in_fresh_process(case_ids: list[str], repeats: int) -> dict[str, dict]:
    """:func:`measure` in a new Python process (same environment), for retries and
    calibration: a process can keep a slow page placement for its whole life."""
    with tempfile.TemporaryDirectory(prefix="fastbn-perf-gate-") as tmp:
        path = Path(tmp) / "measured.json"
        cmd = [sys.executable, "-m", "bench.perf_gate", "--measure-only", "--json", str(path),
               "--cases", ",".join(case_ids), "--repeats", str(repeats)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("  measured "):
                print(line, flush=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"perf-gate: measuring in a fresh process failed "
                               f"(exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        return json.loads(path.read_text())["results"]


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
                   help="re-measure a case that fell below its threshold this many times, "
                        "each in a fresh process; the best run counts (default 1)")
    p.add_argument("--json", help="write measurements and verdicts here")
    p.add_argument("--list", action="store_true", help="list the gate cases and exit")
    p.add_argument("--calibrate", type=int, metavar="N",
                   help="measure N times, each in a fresh process, and print thresholds at "
                        f"{100 * THRESHOLD_FRACTION:.0f}%% of the lowest value")
    p.add_argument("--write-thresholds", action="store_true",
                   help="with --calibrate: write them to --thresholds")
    p.add_argument("--measure-only", action="store_true",
                   help="measure, write --json, judge nothing (used for fresh-process runs)")
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
                  f"threshold {'-' if th is None else fmt_value(case_id, th)} "
                  f"against {baseline_peer(case_id)}")
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
    print(f"perf-gate: fastbn vs in-run baselines (the streaming speed, the NumPy reference "
          f"for small calls, fastbn's float32 for 16-bit data), {args.repeats} interleaved "
          f"samples per side; {_env_note()}", flush=True)
    if args.measure_only:
        results = measure(case_ids, args.repeats)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results}, indent=1,
                                                  default=float))
        return 0

    if args.calibrate:
        runs = []
        for k in range(args.calibrate):
            print(f"perf-gate: calibration run {k + 1} of {args.calibrate} (fresh process)",
                  flush=True)
            runs.append(measure_in_fresh_process(case_ids, args.repeats))
        doc = {
            "comment": "Gated values, the median of interleaved per-round ratios: for cases "
                       "with baseline 'stream' the fraction of the in-run streaming speed "
                       "fastbn reaches on the bytes its operation must move, otherwise the "
                       "speed-up over the baseline ('numpy': the NumPy reference; "
                       "'fastbn_f32': fastbn on float32 copies). threshold = "
                       "threshold_fraction (or the case's own fraction) x measured_min, "
                       "measured_min = lowest of the calibration runs, each in a fresh "
                       "process. Regenerate with "
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
                "baseline": baseline_peer(case_id),
                "threshold": round(fraction * low, 3 if is_stream_case(case_id) else 2),
                "measured": [round(v, 3) for v in values],
                "measured_min": round(low, 3),
            }
            if fraction != THRESHOLD_FRACTION:
                doc["cases"][case_id]["fraction"] = fraction
            print(f"  {case_id:36s} measured "
                  f"{', '.join(fmt_value(case_id, v) for v in values)} -> threshold "
                  f"{fmt_value(case_id, doc['cases'][case_id]['threshold'])}")
        if args.write_thresholds:
            if args.cases and thresholds_path.exists():  # recalibrate these, keep the rest
                kept = json.loads(thresholds_path.read_text())["cases"]
                doc["cases"] = {**kept, **doc["cases"]}
                doc["calibrated"]["cases"] = case_ids
            thresholds_path.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"perf-gate: wrote {thresholds_path}")
        return 0

    results = measure(case_ids, args.repeats)
    # A case below its threshold is measured once more, in a fresh process (a
    # burst of load from another process can halve one measurement, and a
    # process can keep slow pages for its whole life); the better run counts.
    # A real regression fails both times.
    for _ in range(args.retries):
        low = [c for c in case_ids if c in thresholds
               and not results[c]["ratio"] >= thresholds[c]]
        if not low:
            break
        print(f"perf-gate: re-measuring {', '.join(low)} in a fresh process (below threshold "
              "once)", flush=True)
        again = measure_in_fresh_process(low, args.repeats)
        for c in low:
            again[c]["first_ratio"] = results[c]["ratio"]
            if again[c]["ratio"] > results[c]["ratio"]:
                results[c] = again[c]
            else:
                results[c]["retry_ratio"] = again[c]["ratio"]
    details = {
        c: f"median fastbn {fmt_time(r['fastbn_median_s'])} vs {baseline_peer(c)} "
           f"{fmt_time(r['baseline_median_s'])}, {OP_NAMES[GATE_CASES[c][1]]} "
           f"{GATE_CASES[c][0].label}"
           + (f"; {r['numpy_speedup']:.2f}x the NumPy reference" if "numpy_speedup" in r
              else "")
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
