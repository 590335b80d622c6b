"""A/B performance comparison of the current tree against a base git revision.

``make perf-compare BASE=<git ref>`` checks BASE out into a temporary ``git
worktree`` and starts two long-lived worker processes (:mod:`bench.ab_worker`,
always the *current* tree's driver code): A imports fastbn from the base
worktree, B from the current tree.  For every case both build identical seeded
data, then the driver asks them for samples alternately (A B, B A, A B, ...),
each sample being the same number of back-to-back calls.  Per case it reports
the median of the per-pair ratios B/A with a bootstrap 95 % confidence
interval, and fails (exit 1) only when a case is both more than ``--max-slowdown``
(default 10 %) slower *and* the interval's lower bound is above 1.0, i.e. the
slowdown is beyond the run-to-run spread, and a second set of pairs (``--confirm``)
says the same in two fresh worker processes (where each process's data land in
memory decides a cache-resident sweep's speed for that process's lifetime).

A base whose fastbn cannot be imported (or that predates it) prints "no base to
compare" and exits 0; the worktree is always removed.

    python -m bench.perf_compare --base HEAD~1
    python -m bench.perf_compare --base main --cases fc-1024x4096-f32/fwdbwd --pairs 21
    python -m bench.perf_compare --base-path /some/checkout     # compare with a directory
    python -m bench.perf_compare --base-path . --head-env FASTBN_SLOW_FALLBACK=1   # goes red
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .cases import Case, case_grid, fmt_time

ROOT = Path(__file__).resolve().parent.parent
WORKER_SOURCE = (Path(__file__).resolve().parent / "ab_worker.py").read_text()
PREFIX = "@@ab "

#: case id -> (case, op).  Large cases catch bandwidth and parallelism
#: regressions, the cache-resident NCHW one compute (vectorization) regressions,
#: the smallest one per-call overhead.  The forward-only case is (2048, 4096)
#: (32 MiB in, 32 MiB out), not (1024, 4096): that one's 32 MiB working set is
#: exactly an EPYC CCD's L3, and there its speed depended on where a process's
#: pages happened to land (CI once measured identical code 30 % slower in one
#: worker, in three rounds of pairs).
COMPARE_CASES: dict[str, tuple[Case, str]] = case_grid([
    (Case((1024, 4096), "float32"), "fwdbwd"),
    (Case((32, 64, 56, 56), "float32"), "fwdbwd"),
    (Case((32, 56, 56, 64), "float32", axis=-1), "fwdbwd"),
    (Case((2048, 4096), "float32"), "forward"),
    (Case((16, 32, 28, 28), "float32"), "fwdbwd"),
    (Case((32, 256), "float32"), "fwdbwd"),
])


class WorkerError(RuntimeError):
    """A worker failed; ``worker`` names which one ("base" or "head")."""

    def __init__(self, message: str, worker: str | None = None):
        super().__init__(message)
        self.worker = worker


class Worker:
    """One fastbn revision in a subprocess, driven over a pipe."""

    def __init__(self, name: str, root: Path, timeout: float = 600.0,
                 env_extra: dict[str, str] | None = None):
        self.name, self.root, self.timeout = name, Path(root), timeout
        env = dict(os.environ)
        env.update(env_extra or {})
        env["PYTHONPATH"] = str(self.root)
        env["FASTBN_AB_ROOT"] = str(self.root)
        env.pop("PYTHONSTARTUP", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_SOURCE], cwd=self.root, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1)
        self.hello = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise WorkerError(f"{self.name} worker exited (code {self.proc.wait()}): "
                                  f"{err.strip()[-1500:]}", self.name)
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise WorkerError(f"{self.name} worker did not answer in {self.timeout:.0f} s",
                          self.name)

    def request(self, **msg) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise WorkerError(f"{self.name}: {reply['error']}", self.name)
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------------
# Statistics (pure functions)
# ---------------------------------------------------------------------------


def bootstrap_median_ci(ratios, confidence: float = 0.95, resamples: int = 4000,
                        seed: int = 12345) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``ratios``."""
    r = np.asarray(ratios, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(r), size=(resamples, len(r)))
    medians = np.median(r[idx], axis=1)
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(medians, alpha)), float(np.quantile(medians, 1 - alpha))


def judge(ratios, max_slowdown: float = 0.10, confidence: float = 0.95) -> dict:
    """Verdict for one case from per-pair ratios head/base (> 1 means head is slower).

    ``slower`` only when the median slowdown exceeds ``max_slowdown`` *and* the
    bootstrap interval's lower bound is above 1.0; ``faster`` symmetrically.
    """
    median = float(np.median(ratios))
    low, high = bootstrap_median_ci(ratios, confidence)
    if median > 1.0 + max_slowdown and low > 1.0:
        verdict = "SLOWER"
    elif median < 1.0 / (1.0 + max_slowdown) and high < 1.0:
        verdict = "faster"
    else:
        verdict = "same"
    return {"median": median, "ci_low": low, "ci_high": high, "verdict": verdict,
            "n": len(ratios)}


# ---------------------------------------------------------------------------
# Worktree and the comparison
# ---------------------------------------------------------------------------


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@contextmanager
def base_worktree(ref: str):
    """Check ``ref`` out (detached) into a temporary worktree; always removed afterwards."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    tmp = Path(tempfile.mkdtemp(prefix="fastbn-base-"))
    path = tmp / "base"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path, commit
    finally:
        try:
            _git("worktree", "remove", "--force", str(path))
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _git("worktree", "prune")
        except subprocess.CalledProcessError:
            pass


def _pairs(base: Worker, head: Worker, pairs: int, number: int, max_slowdown: float) -> dict:
    """``pairs`` alternating samples (A B, B A, ...) and the verdict on head/base."""
    tb, th = [], []
    for i in range(pairs):
        order = (base, head) if i % 2 == 0 else (head, base)
        for w in order:
            (tb if w is base else th).append(w.request(cmd="time", number=number)["t"])
    j = judge(np.asarray(th) / np.asarray(tb), max_slowdown)
    j.update(base_median_s=float(np.median(tb)), head_median_s=float(np.median(th)),
             base_times=tb, head_times=th)
    return j


def _start(name: str, root: Path, env: dict | None) -> Worker:
    """A worker whose fastbn imported; WorkerError (naming it) otherwise."""
    worker = Worker(name, root, env_extra=env)
    if "error" in worker.hello:
        worker.close()
        raise WorkerError(f"{name}: {worker.hello['error']}", name)
    return worker


def _setup(base: Worker, head: Worker, case: Case, op: str, target_s: float,
           number: int | None = None) -> int:
    """Build the case's data in both workers, warm up; returns the calls per sample."""
    msg = {"cmd": "setup", "case": case.to_dict(), "op": op, "seed": 0}
    t_base = base.request(**msg)["single_s"]
    t_head = head.request(**msg)["single_s"]
    if number is None:
        number = max(1, math.ceil(target_s / max(min(t_base, t_head), 1e-7)))
    base.request(cmd="time", number=number)  # one discarded round each
    head.request(cmd="time", number=number)
    return number


def compare(base_root: Path, head_root: Path, case_ids: list[str], pairs: int,
            target_s: float, max_slowdown: float, log=print, confirm: int = 1,
            base_env: dict | None = None, head_env: dict | None = None) -> dict | None:
    """Run the A/B comparison; None when the base has no importable fastbn.

    A case judged slower is measured again (``confirm`` times) in *fresh* worker
    processes with freshly allocated data: where a process's arrays land in
    physical memory and the caches (pages, L3 sets, huge pages or not) is fixed
    for its lifetime and can cost an L3-resident sweep 30 % in one process and
    not in the next, so re-measuring in the same two processes only re-confirms
    that placement.  A real regression is slower in every pair of processes.
    """
    try:
        base = _start("base", base_root, base_env)
    except WorkerError as exc:
        log(f"perf-compare: no base to compare ({exc})")
        return None
    head = None
    try:
        head = _start("head", head_root, head_env)
        log(f"perf-compare: base fastbn {base.hello['version']} from {base.hello['file']}")
        log(f"perf-compare: head fastbn {head.hello['version']} from {head.hello['file']}")
        results = {}
        for case_id in case_ids:
            case, op = COMPARE_CASES[case_id]
            try:
                number = _setup(base, head, case, op, target_s)
            except WorkerError as exc:
                if exc.worker != "base":
                    raise
                log(f"  {case_id}: base cannot run it ({exc}); skipped")
                results[case_id] = {"skipped": str(exc)}
                continue
            j = _pairs(base, head, pairs, number, max_slowdown)
            for _ in range(confirm):
                if j["verdict"] != "SLOWER":
                    break
                # Confirm with fresh processes and fresh pairs: a slowdown counts
                # only if it shows again where the data sit elsewhere in memory.
                log(f"  {case_id:32s} head/base {j['median']:.3f} [{j['ci_low']:.3f}, "
                    f"{j['ci_high']:.3f}] SLOWER? measuring again in fresh processes "
                    "to confirm")
                base.close()
                head.close()
                head = None
                base = _start("base", base_root, base_env)
                head = _start("head", head_root, head_env)
                _setup(base, head, case, op, target_s, number)
                again = _pairs(base, head, pairs, number, max_slowdown)
                again["earlier"] = j.get("earlier", []) + [
                    {k: j[k] for k in ("median", "ci_low", "ci_high", "verdict")}]
                j = again
            j.update(number=number, op=op, case=case.to_dict())
            results[case_id] = j
            log(f"  {case_id:32s} base {fmt_time(j['base_median_s']):>9s}  head "
                f"{fmt_time(j['head_median_s']):>9s}  head/base {j['median']:.3f} "
                f"[{j['ci_low']:.3f}, {j['ci_high']:.3f}]  {j['verdict']}")
        return results
    finally:
        base.close()
        if head is not None:
            head.close()


def _env_pairs(parser, items) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_compare",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="git revision to compare against (e.g. HEAD~1, main)")
    src.add_argument("--base-path", help="a directory holding the base's fastbn/ (no git)")
    p.add_argument("--head-path", default=str(ROOT), help="the tree under test (default: this)")
    p.add_argument("--cases", help=f"comma-separated subset of: {', '.join(COMPARE_CASES)}")
    p.add_argument("--pairs", type=int, default=15, help="A/B sample pairs per case (default 15)")
    p.add_argument("--target", type=float, default=0.05,
                   help="seconds per sample (calls per sample chosen to reach it; default 0.05)")
    p.add_argument("--max-slowdown", type=float, default=10.0,
                   help="percent slowdown tolerated before failing (default 10)")
    p.add_argument("--confirm", type=int, default=1,
                   help="re-measure a case judged slower this many times, each time in fresh "
                        "worker processes; it fails only if every measurement says slower "
                        "(default 1)")
    p.add_argument("--base-env", action="append", metavar="KEY=VALUE",
                   help="environment variable for the base worker only (repeatable)")
    p.add_argument("--head-env", action="append", metavar="KEY=VALUE",
                   help="environment variable for the head worker only (repeatable); e.g. "
                        "FASTBN_SLOW_FALLBACK=1 shows the comparison going red")
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args(argv)
    case_ids = list(COMPARE_CASES)
    if args.cases:
        case_ids = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in case_ids if c not in COMPARE_CASES]
        if unknown:
            p.error(f"unknown case(s): {', '.join(unknown)}")
    if args.pairs < 5:
        p.error("--pairs must be at least 5")
    max_slowdown = args.max_slowdown / 100.0
    t0 = time.perf_counter()

    def run(base_root: Path, label: str):
        print(f"perf-compare: head {args.head_path} vs base {label}; {args.pairs} alternating "
              f"pairs per case; fails on > {args.max_slowdown:g}% slower with the 95% CI "
              "above 1.0", flush=True)
        return compare(base_root, Path(args.head_path), case_ids, args.pairs, args.target,
                       max_slowdown, confirm=args.confirm, base_env=_env_pairs(p, args.base_env),
                       head_env=_env_pairs(p, args.head_env))

    if args.base_path:
        results, label = run(Path(args.base_path).resolve(), args.base_path), args.base_path
    else:
        try:
            _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
        except subprocess.CalledProcessError:
            print(f"perf-compare: {args.base!r} is not a commit in {ROOT}", file=sys.stderr)
            return 2
        with base_worktree(args.base) as (path, commit):
            label = f"{args.base} ({commit[:10]})"
            results = run(path, label)
    if results is None:
        return 0
    slower = [c for c, r in results.items() if r.get("verdict") == "SLOWER"]
    if args.json:
        Path(args.json).write_text(json.dumps({"base": label, "results": results}, indent=1))
    elapsed = time.perf_counter() - t0
    if slower:
        for c in slower:
            r = results[c]
            print(f"perf-compare: {c} is {100 * (r['median'] - 1):.1f}% slower than {label} "
                  f"(95% CI of head/base [{r['ci_low']:.3f}, {r['ci_high']:.3f}])")
        print(f"perf-compare: FAILED - {len(slower)} case(s) slower than the base "
              f"({elapsed:.0f} s)")
        return 1
    print(f"perf-compare: OK - no case slower than {label} beyond {args.max_slowdown:g}% and "
          f"the run-to-run spread ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
