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


def write_chart(result: dict, path: str | Path) -> Path | None:
    """Bar chart: fastbn's fwd+bwd speed-up over each peer per case; % of STREAM per case.

    Returns None (and says why on stderr) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed; no PNG chart written", file=sys.stderr)
        return None
    import numpy as np

    cases = result["cases"]
    labels = [c["case"]["label"].replace(" axis", "\naxis").replace(" float", "\nfloat")
              + ("\n(in cache)" if c.get("in_cache") else "") for c in cases]
    peers = [p for p in result["peers"] if p != "fastbn"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 1.3 * len(cases) + 3), 10),
                                   constrained_layout=True)
    width = 0.8 / max(1, len(peers))
    xs = np.arange(len(cases))
    for i, peer in enumerate(peers):
        vals = [c.get("speedup", {}).get("fwdbwd", {}).get(peer, np.nan) for c in cases]
        bars = ax1.bar(xs + (i - (len(peers) - 1) / 2) * width, vals, width, label=peer)
        for b, v in zip(bars, vals, strict=True):
            if np.isfinite(v):
                ax1.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                             va="bottom", fontsize=7)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xticks(xs, labels, fontsize=8)
    ax1.set_ylabel("fastbn speed-up (peer time / fastbn time)")
    ax1.set_title("Forward + backward: fastbn speed-up over each peer (higher is better)")
    ax1.legend(fontsize=8)

    ops = [op for op in ("forward", "backward", "fwdbwd") if any(
        op in c.get("pct_stream", {}) for c in cases)]
    width2 = 0.8 / max(1, len(ops))
    for i, op in enumerate(ops):
        vals = [c.get("pct_stream", {}).get(op, np.nan) for c in cases]
        ax2.bar(xs + (i - (len(ops) - 1) / 2) * width2, vals, width2,
                label={"fwdbwd": "fwd+bwd"}.get(op, op))
    ax2.axhline(100.0, color="k", lw=0.8)
    ax2.set_xticks(xs, labels, fontsize=8)
    stream = result.get("stream", {}).get("gbps")
    ax2.set_ylabel("% of STREAM triad (in-cache shapes may exceed 100%)")
    ax2.set_title(f"fastbn effective bandwidth, % of STREAM triad "
                  f"({stream:.1f} GB/s measured in the same run)" if stream else
                  "fastbn effective bandwidth")
    ax2.legend(fontsize=8)
    meta = result.get("meta", {})
    fig.suptitle(f"fastbn benchmarks - {meta.get('cpu', '')}, {meta.get('numba_threads')} "
                 f"threads, {meta.get('date', '')}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
