"""Benchmark cases (shape, dtype, channel axis), seeded data, bytes moved, and the timer.

Everything the CLI, the pytest-benchmark suites, the CI gate and the A/B
workers share lives here, so that all of them time the same thing.
"""

from __future__ import annotations

import gc
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Case", "CaseData", "DTYPES", "SIXTEEN_BIT", "numpy_dtype", "parameter_dtype", "FULL_SHAPES",
    "QUICK_SHAPES", "parse_shape", "parse_shapes", "make_data", "bytes_moved", "interleaved",
    "calibrate_number", "fmt_time", "case_grid",
]

DTYPES = {"float32": "float32", "float64": "float64", "f32": "float32", "f64": "float64",
          "float16": "float16", "f16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
#: 16-bit storage formats: data in 16 bits, parameters and statistics in float32.
SIXTEEN_BIT = ("float16", "bfloat16")
_ID_SUFFIX = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a case's data; bfloat16 is ``ml_dtypes.bfloat16`` (the bench
    extra installs it; fastbn itself never imports it)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise RuntimeError("bfloat16 cases need ml_dtypes (pip install ml_dtypes, or the "
                               "bench extra)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def parameter_dtype(name: str) -> np.dtype:
    """Parameters and running statistics: float32 for 16-bit data (PyTorch's mixed type)."""
    return np.dtype(np.float32) if name in SIXTEEN_BIT else np.dtype(name)

# The grid of ``make bench``: (shape, channel axis).
FULL_SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((4, 8), 1),  # the fixed cost of a call
    ((100, 100), 1),  # a NumPy network's hidden layer: batch 100, 100 units
    ((32, 256), 1),
    ((64, 512), 1),
    ((256, 1024), 1),
    ((1024, 4096), 1),
    ((8192, 4096), 1),
    ((32, 64, 56, 56), 1),
    ((8, 256, 28, 28), 1),
    ((32, 56, 56, 64), -1),
]
QUICK_SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((100, 100), 1),
    ((32, 256), 1),
    ((1024, 4096), 1),
    ((32, 64, 56, 56), 1),
    ((32, 56, 56, 64), -1),
]


@dataclass(frozen=True)
class Case:
    """One benchmark problem: ``x`` of ``shape`` and ``dtype``, channels on ``axis``."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    axis: int = 1
    eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        name = str(self.dtype)
        name = DTYPES.get(name, name if name in DTYPES else np.dtype(self.dtype).name)
        if name not in _ID_SUFFIX:
            raise ValueError(f"dtype must be float32, float64, float16 or bfloat16, got {name}")
        object.__setattr__(self, "dtype", name)
        if not -len(self.shape) <= self.axis < len(self.shape):
            raise ValueError(f"axis {self.axis} out of range for shape {self.shape}")

    @property
    def channels(self) -> int:
        return self.shape[self.axis]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * (2 if self.dtype in SIXTEEN_BIT else np.dtype(self.dtype).itemsize)

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "fc"
        return "nhwc" if self.axis % len(self.shape) == len(self.shape) - 1 else "nchw"

    @property
    def shape_str(self) -> str:
        text = "x".join(map(str, self.shape))
        return text if self.axis == 1 else f"{text}:{self.axis}"

    @property
    def label(self) -> str:
        """Human label, e.g. ``(32, 56, 56, 64) axis=-1 float32``."""
        axis = "" if self.axis == 1 else f" axis={self.axis}"
        return f"{self.shape}{axis} {self.dtype}"

    @property
    def id(self) -> str:
        """Stable identifier, e.g. ``nhwc-32x56x56x64-f32``."""
        return f"{self.layout}-{'x'.join(map(str, self.shape))}-{_ID_SUFFIX[self.dtype]}"

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "axis": self.axis,
                "eps": self.eps, "id": self.id, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(tuple(d["shape"]), d.get("dtype", "float32"), int(d.get("axis", 1)),
                   float(d.get("eps", 1e-5)))


_SHAPE_RE = re.compile(r"^\s*\(?\s*([0-9][0-9x,\s]*?)\s*\)?\s*(?::\s*(-?\d+))?\s*$")


def parse_shape(text: str) -> tuple[tuple[int, ...], int]:
    """``"1024x4096"`` / ``"32,64,56,56"`` / ``"32x56x56x64:-1"`` -> (shape, axis).

    The optional ``:AXIS`` suffix gives the channel axis (default 1).
    """
    m = _SHAPE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse shape {text!r}; write e.g. 1024x4096 or 32x56x56x64:-1")
    dims = tuple(int(p) for p in re.split(r"[x,\s]+", m.group(1).strip()) if p)
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"shape {text!r} needs at least 2 positive dimensions")
    axis = int(m.group(2)) if m.group(2) is not None else 1
    if not -len(dims) <= axis < len(dims):
        raise ValueError(f"axis {axis} out of range for shape {dims}")
    return dims, axis


def parse_shapes(text: str) -> list[tuple[tuple[int, ...], int]]:
    """Semicolon- or space-separated list of :func:`parse_shape` items."""
    return [parse_shape(p) for p in re.split(r"[;\s]+", text.strip()) if p]


@dataclass
class CaseData:
    """Seeded inputs of a case, allocated once; peers copy or wrap, never regenerate."""

    case: Case
    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    dy: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    extra: dict = field(default_factory=dict)


def make_data(case: Case, seed: int = 0) -> CaseData:
    """Identical data for identical (case, seed) on any machine and any fastbn version."""
    rng = np.random.default_rng(seed)
    sixteen = case.dtype in SIXTEEN_BIT
    dt = np.float32 if sixteen else np.dtype(case.dtype).type  # 16-bit: drawn in float32
    pt = parameter_dtype(case.dtype).type
    c = case.channels
    x = rng.standard_normal(case.shape, dtype=dt)
    x *= dt(2.0)
    x += dt(0.5)
    dy = rng.standard_normal(case.shape, dtype=dt)
    if sixteen:
        x, dy = x.astype(numpy_dtype(case.dtype)), dy.astype(numpy_dtype(case.dtype))
    gamma = rng.uniform(0.5, 1.5, c).astype(pt)
    beta = rng.standard_normal(c).astype(pt)
    running_mean = (rng.standard_normal(c) * 0.1 + 0.5).astype(pt)
    running_var = rng.uniform(3.0, 5.0, c).astype(pt)
    return CaseData(case, x, gamma, beta, dy, running_mean, running_var)


#: Bytes an operation must move at the least (the roofline numerator):
#: forward reads x twice (statistics, normalize) and writes y; backward reads x
#: and dy twice (reduce, apply) and writes dx; inference reads x once, writes y.
BYTES_FACTOR = {"forward": 3, "backward": 5, "fwdbwd": 8, "inference": 2}


def bytes_moved(case: Case, op: str) -> int:
    return BYTES_FACTOR[op] * case.nbytes


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def calibrate_number(fn: Callable[[], object], target_s: float = 0.002,
                     max_number: int = 10_000) -> tuple[int, float]:
    """(calls per sample so one sample lasts about ``target_s``, seconds of one call).

    Calls ``fn`` at least twice (the first call is a warm-up: compilation,
    page faults of fresh buffers), except when the first call alone takes over
    half a second: then one call per sample is the answer anyway.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > max(50 * target_s, 0.5):  # a slow peer on a huge shape: one call per sample
        return 1, first
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    if single < target_s / 4:  # short calls: measure a few more to estimate better
        n = max(1, min(1000, int(target_s / max(single, 1e-7) / 4)))
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        single = (time.perf_counter() - t0) / n
    number = max(1, min(max_number, math.ceil(target_s / max(single, 1e-9))))
    return number, single


def _time_once(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, *,
                target_s: float = 0.002, min_repeats: int = 3,
                budget_s: float | dict[str, float] | None = None,
                numbers: dict[str, int] | None = None,
                on_round: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Time several callables round-robin (A B C A B C ...): ``{name: {"times", "number"}}``.

    Each sample is ``number`` back-to-back calls (chosen so a sample lasts about
    ``target_s``) divided by ``number``.  A callable whose samples have used up
    ``budget_s`` seconds stops after ``min_repeats`` samples, so slow peers on
    huge shapes do not dominate the run; the others keep going to ``repeats``.
    The garbage collector is off while timing (as in :mod:`timeit`).
    """
    names = list(fns)
    if numbers is None:
        numbers = {name: calibrate_number(fns[name], target_s)[0] for name in names}
    if budget_s is None or isinstance(budget_s, (int, float)):
        budget = dict.fromkeys(names, budget_s)
    else:
        budget = {name: budget_s.get(name) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            active = [n for n in names
                      if len(times[n]) < min_repeats or budget[n] is None or spent[n] < budget[n]]
            if not active:
                break
            # Alternate the order every round so no callable always runs right
            # after the same neighbour (cache and frequency effects).
            order = active if r % 2 == 0 else active[::-1]
            for name in order:
                t = _time_once(fns[name], numbers[name])
                times[name].append(t)
                spent[name] += t * numbers[name]
            if on_round is not None:
                on_round(r)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"times": times[name], "number": numbers[name],
                   "median": float(np.median(times[name])) if times[name] else math.nan}
            for name in names}


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> np.ndarray:
    """Per-round ratios ``num[i] / den[i]`` of two interleaved series (same length prefix)."""
    n = min(len(num), len(den))
    return np.asarray(num[:n], dtype=float) / np.asarray(den[:n], dtype=float)


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def case_grid(pairs: Sequence[tuple[Case, str]]) -> dict[str, tuple[Case, str]]:
    """``{"<case id>/<op>": (case, op)}``: the id scheme shared by the gate and the A/B."""
    return {f"{case.id}/{op}": (case, op) for case, op in pairs}
