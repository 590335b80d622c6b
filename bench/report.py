"""Tables (rich, plain text, Markdown), machine metadata and the PNG chart of a benchmark run."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Table:
    def __init__(self, title: str, headers: list[str], rows: list[list[str]] | None = None,
                 note: str = ""):
        self.title, self.headers, self.rows, self.note = title, headers, rows or [], note

    def plain(self) -> str:
        widths = [max(len(str(r[i])) for r in [self.headers, *self.rows])
                  for i in range(len(self.headers))]
        fmt = lambda r: "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines = [self.title, fmt(self.headers), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in self.rows]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|"]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def rich(self):
        from rich.table import Table as RichTable

        t = RichTable(title=self.title, caption=self.note or None, title_justify="left")
        for i, h in enumerate(self.headers):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for r in self.rows:
            t.add_row(*[str(c) for c in r])
        return t


def print_tables(tables: list[Table], use_rich: bool = True) -> None:
    if use_rich:
        try:
            from rich.console import Console
        except ImportError:
            use_rich = False
    if use_rich:
        console = Console(width=max(160, Console().width))
        for t in tables:
            console.print(t.rich())
            console.print()
    else:
        for t in tables:
            print(t.plain())
            print()


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Machine, library versions, threads and threading layer (call after fastbn has run)."""
    import numba

    import fastbn

    try:
        from fastbn._config import threading_layer

        layer = threading_layer()
    except ImportError:
        layer = None
    if layer is None:
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = None
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "logical_cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "versions": {name: _version(name) for name in
                     ("fastbn", "numpy", "numba", "llvmlite", "torch", "jax", "jaxlib",
                      "autograd")},
        "numba_threads": numba.get_num_threads(),
        "threading_layer": layer,
        "fastbn_slow_fallback": os.environ.get("FASTBN_SLOW_FALLBACK", ""),
        "fastbn_file": fastbn.__file__,
        "env": {k: os.environ[k] for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS",
                                           "NUMBA_THREADING_LAYER", "MKL_NUM_THREADS")
                if k in os.environ},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(sys.argv),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


# ---------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------

#: The cases the chart (and README's headline table) show when a run has them:
#: a small call, two fully-connected sizes, NCHW and channels-last convolution maps.
HEADLINE_CASES = ("fc-100x100-f32", "fc-1024x4096-f32", "fc-8192x4096-f32",
                  "nchw-32x64x56x56-f32", "nhwc-32x56x56x64-f32")
#: README's headline table: three shapes, fastbn against NumPy and PyTorch.
HEADLINE_TABLE_CASES = ("fc-100x100-f32", "fc-1024x4096-f32", "nchw-32x64x56x56-f32")
PEER_LABELS = {"numpy": "NumPy reference", "graph": "NumPy staged graph", "torch": "PyTorch",
               "jax": "JAX (jit)", "autograd": "HIPS autograd"}
_LAYOUT_NAMES = {"fc": "", "nchw": " NCHW", "nhwc": " NHWC"}


def headline_cases(result: dict, ids=HEADLINE_CASES, limit: int = 6) -> list[dict]:
    """The run's cases named in ``ids`` (in that order); without any, up to ``limit``
    forward+backward cases of the run's first dtype, spread over its sizes."""
    by_id = {c["case"]["id"]: c for c in result["cases"] if "fwdbwd" in c.get("speedup", {})}
    chosen = [by_id[i] for i in ids if i in by_id]
    if chosen:
        return chosen
    cases = list(by_id.values())
    if not cases:
        return []
    first = cases[0]["case"]["dtype"]
    cases = [c for c in cases if c["case"]["dtype"] == first]
    step = max(1, -(-len(cases) // limit))
    return cases[::step][:limit]


def _case_name(c: dict, dtype: bool = True) -> str:
    case = c["case"]
    layout = case["id"].split("-", 1)[0]
    name = f"{tuple(case['shape'])}{_LAYOUT_NAMES.get(layout, '')}"
    return f"{name} {case['dtype']}" if dtype else name


def _run_line(result: dict) -> str:
    """'2026-12-01, Intel(R) Xeon(R) Processor, 2 Numba threads (tbb)'."""
    meta = result.get("meta", {})
    line = f"{meta.get('date', '')[:10]}, {meta.get('cpu', 'unknown CPU')}"
    if meta.get("numba_threads"):
        line += f", {meta['numba_threads']} Numba threads"
        if meta.get("threading_layer"):
            line += f" ({meta['threading_layer']})"
    return line


def _versions_line(result: dict) -> str:
    versions = result.get("meta", {}).get("versions", {})
    names = (("numpy", "NumPy"), ("numba", "Numba"), ("torch", "PyTorch"), ("jax", "JAX"))
    return ", ".join(f"{label} {versions[k]}" for k, label in names if versions.get(k))


def write_chart(result: dict, path: str | Path) -> Path | None:
    """One panel: fastbn's forward+backward speed-up over each peer on the headline cases.

    Horizontal bars on a log axis (1x = as fast as the peer), one group per
    case, one bar per peer, each labelled with its ratio; the machine, date,
    thread count and library versions in the caption.  Returns None (and says
    why on stderr) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        print("bench: matplotlib not installed; no PNG chart written", file=sys.stderr)
        return None
    import numpy as np

    cases = headline_cases(result)
    peers = [p for p in result["peers"] if p != "fastbn"
             and any(p in c["speedup"]["fwdbwd"] for c in cases)]
    n_peers = max(1, len(peers))
    dtypes = sorted({c["case"]["dtype"] for c in cases})
    fig_h = 1.6 + 0.16 * n_peers * max(1, len(cases)) + 0.2 * len(cases)
    fig, ax = plt.subplots(figsize=(8.5, fig_h), constrained_layout=True)
    group = 0.82
    height = group / n_peers
    ys = np.arange(len(cases))[::-1]  # first case on top
    colors = plt.get_cmap("tab10").colors
    top = 1.0
    for i, peer in enumerate(peers):
        vals = np.array([c["speedup"]["fwdbwd"].get(peer, np.nan) for c in cases])
        pos = ys + group / 2 - (i + 0.5) * height
        ax.barh(pos, vals, height * 0.9, left=0, label=PEER_LABELS.get(peer, peer),
                color=colors[i % len(colors)])
        for y, v in zip(pos, vals, strict=True):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}x", (v, y), xytext=(3, 0), textcoords="offset points",
                            va="center", fontsize=8.5)
                top = max(top, v)
    ax.set_xscale("log")
    ax.set_xlim(0.8, top * 1.6)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200) if t <= top * 1.6]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="k", lw=1)
    ax.grid(axis="x", color="0.85", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_yticks(ys, [_case_name(c, dtype=len(dtypes) > 1) for c in cases], fontsize=11)
    ax.set_ylim(ys[-1] - 0.5, ys[0] + 0.5)
    ax.tick_params(axis="x", labelsize=10)
    ax.set_xlabel("peer's time / fastbn's time (log scale; right of 1x: fastbn is faster)",
                  fontsize=10)
    what = dtypes[0] + " " if len(dtypes) == 1 else ""
    ax.set_title(f"Batch norm {what}forward + backward: fastbn's speed-up over each peer",
                 fontsize=12, loc="left", pad=26)
    ax.legend(fontsize=9.5, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(peers),
              frameon=False, borderaxespad=0.1, handlelength=1.2, columnspacing=1.2)
    # supxlabel, not fig.text: constrained layout keeps room for it below the axis label
    fig.supxlabel(f"make bench, {_run_line(result)}; medians of interleaved samples.\n"
                  f"{_versions_line(result)}", fontsize=8.5, color="0.3", x=0.01, ha="left",
                  multialignment="left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Headline table, publishing a run (docs and README), re-plotting
# ---------------------------------------------------------------------------

RESULTS = ROOT / "bench" / "results"
PUBLISHED = RESULTS / "published"  # .json, .md, .png: the run the docs and README show
README_START = "<!-- bench-headline:start (written by python -m bench.report --publish) -->"
README_END = "<!-- bench-headline:end -->"


def headline_markdown(result: dict) -> str:
    """README's table: forward+backward time of fastbn, NumPy and PyTorch on three shapes."""
    from .cases import fmt_time

    cases = headline_cases(result, HEADLINE_TABLE_CASES)[:3]
    peers = [p for p in ("numpy", "torch") if any(p in c["timings"]["fwdbwd"] for c in cases)]
    lines = ["| forward + backward | fastbn | " + " | ".join(PEER_LABELS[p] for p in peers)
             + " |", "|---|---:|" + "---:|" * len(peers)]
    for c in cases:
        t = c["timings"]["fwdbwd"]
        row = [_case_name(c), f"**{fmt_time(t['fastbn']['median'])}**"]
        row += [f"{fmt_time(t[p]['median'])} ({c['speedup']['fwdbwd'][p]:.1f}×)"
                if p in t else "-" for p in peers]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Median times; in parentheses fastbn's speed-up. `make bench` "
              f"(full grid) on {_run_line(result)}."]
    return "\n".join(lines)


def published_markdown(result: dict) -> str:
    """The Performance page's include: the run's header, headline and every table."""
    from .cli import build_tables

    meta = result.get("meta", {})
    stream = result.get("stream", {}).get("gbps")
    header = [f"Run: {_run_line(result)}; {meta.get('logical_cpus', '?')} logical CPUs"
              + (f", {meta['memory_gib']} GiB" if meta.get("memory_gib") else "")
              + (f"; STREAM triad {stream:.1f} GB/s in the same run" if stream else "") + ".",
              f"Versions: {_versions_line(result)}."
              + (f" fastbn commit `{meta['git_commit'][:10]}`"
                 + (" (with local changes)" if meta.get("git_dirty") else "") + "."
                 if meta.get("git_commit") else "")]
    args = meta.get("command", "").split()[1:]
    header.append(f"Command: `make bench` (`{' '.join(['python -m bench.cli', *args])}`).")
    parts = ["<!-- Written by `python -m bench.report --publish`; do not edit by hand. -->",
             "<!-- --8<-- [start:run] -->", " ".join(header), "<!-- --8<-- [end:run] -->",
             "<!-- --8<-- [start:headline] -->", headline_markdown(result),
             "<!-- --8<-- [end:headline] -->",
             "<!-- --8<-- [start:tables] -->",
             "\n\n".join(t.markdown() for t in build_tables(result)),
             "<!-- --8<-- [end:tables] -->"]
    return "\n\n".join(parts) + "\n"


def update_readme(result: dict, readme: Path = ROOT / "README.md") -> bool:
    """Replace README's headline block with this run's table; False when README has none."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{headline_markdown(result)}\n{README_END}{tail}")
    return True


def publish(json_path: str | Path, prefix: Path = PUBLISHED, readme: Path | None = None) -> None:
    """Make ``json_path`` the run that the docs and README show.

    Writes ``published.json`` (a copy), ``published.md`` (tables, included by
    the Performance page) and ``published.png`` (the chart, shown by README and
    the docs), and rewrites README's headline table.
    """
    import json
    import shutil

    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    out_json = prefix.with_suffix(".json")
    if json_path.resolve() != out_json.resolve():
        shutil.copyfile(json_path, out_json)
    prefix.with_suffix(".md").write_text(published_markdown(result))
    written = [out_json, prefix.with_suffix(".md")]
    if write_chart(result, prefix.with_suffix(".png")) is not None:
        written.append(prefix.with_suffix(".png"))
    if update_readme(result, readme or ROOT / "README.md"):
        written.append(readme or ROOT / "README.md")
    for path in written:
        print(f"bench: wrote {path}")


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Re-draw the chart of a saved benchmark run, or publish a run to the "
                    "docs and README (no benchmark is re-run).")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--replot", nargs=2, metavar=("JSON", "PNG"),
                       help="draw the chart of the run in JSON into PNG")
    group.add_argument("--publish", nargs="?", const=str(RESULTS / "latest.json"),
                       metavar="JSON", help="make JSON (default bench/results/latest.json) "
                       "the published run: bench/results/published.{json,md,png} and "
                       "README's headline table")
    group.add_argument("--headline", metavar="JSON", help="print README's headline table")
    args = p.parse_args(argv)
    if args.replot:
        src, dst = args.replot
        if write_chart(json.loads(Path(src).read_text()), dst) is None:
            return 1
        print(f"bench: wrote {dst}")
    elif args.headline:
        print(headline_markdown(json.loads(Path(args.headline).read_text())))
    else:
        publish(args.publish)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
