"""Compile cache: used when warm, optional when nothing is writable, robust to corruption."""

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import fastbn

from .subprocess_utils import run_python

PACKAGE = Path(fastbn.__file__).parent

# Computes something small, checks it against NumPy, and reports where the
# package and its cache live.
CHECK = """
import numpy as np, fastbn
from fastbn import _config
from fastbn.kernels import SERIAL
x = np.random.default_rng(0).standard_normal((64, 5)) * 3 + 7
y, ctx = fastbn.batch_norm_forward(x)
expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
assert np.allclose(y, expected, rtol=0, atol=1e-12), "wrong result"
stats = SERIAL.train_forward_rows.stats  # a small input: the serial variant
print("file", fastbn.__file__)
print("cache", _config.CACHE, _config.CACHE_DIR)
print("hits", sum(stats.cache_hits.values()), "misses", sum(stats.cache_misses.values()))
"""


def _copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    shutil.copytree(PACKAGE, root / "fastbn", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _run_check(root: Path, env=None):
    env = {"PYTHONPATH": str(root), **(env or {})}
    result = run_python(["-c", CHECK], env, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"file {root}" in result.stdout  # the copy, not the installed package
    fields = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    return fields


def _make_read_only(root: Path) -> None:
    # A regular file where Numba wants its __pycache__ directory: unwritable
    # even for root, for whom chmod alone does not stop writes.
    for package in (root / "fastbn", root / "fastbn" / "kernels"):
        (package / "__pycache__").write_text("not a directory")
    for path in (root / "fastbn").rglob("*"):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    (root / "fastbn").chmod(0o555)


def test_read_only_package_without_any_writable_cache_still_computes(tmp_path):
    root = _copy_package(tmp_path)
    _make_read_only(root)
    # No NUMBA_CACHE_DIR and a HOME where no user cache directory can be made.
    fields = _run_check(root, {"HOME": "/dev/null", "XDG_CACHE_HOME": "/dev/null/cache",
                               "NUMBA_CACHE_DIR": ""})
    assert fields["cache"] == "False None"


def test_read_only_package_caches_into_numba_cache_dir(tmp_path):
    root = _copy_package(tmp_path)
    _make_read_only(root)
    cache_dir = tmp_path / "numba-cache"
    env = {"NUMBA_CACHE_DIR": str(cache_dir)}
    first = _run_check(root, env)
    assert first["cache"].startswith(f"True {cache_dir}")
    assert any(cache_dir.rglob("*.nbi")), "nothing was written to NUMBA_CACHE_DIR"
    second = _run_check(root, env)
    assert second["hits"].startswith("1 "), second  # loaded, not compiled
    assert second["hits"].endswith("misses 0")


def test_warm_cache_is_used_by_a_fresh_process(tmp_path):
    root = _copy_package(tmp_path)
    cold = _run_check(root)
    assert cold["hits"] == "0 misses 1"
    warm = _run_check(root)
    assert warm["hits"] == "1 misses 0"


def test_editing_an_inlined_helper_recompiles_the_kernels_that_inline_it(tmp_path):
    """Numba stamps an entry with its own file only; the kernel checked here
    (drivers.py) inlines storage.py's loads, so a storage.py-only change must
    not load the old machine code.  The size changes, as in any real edit."""
    root = _copy_package(tmp_path)
    assert _run_check(root)["hits"] == "0 misses 1"
    assert _run_check(root)["hits"] == "1 misses 0"
    storage_file = root / "fastbn" / "kernels" / "storage.py"
    drivers_file = root / "fastbn" / "kernels" / "drivers.py"
    drivers_stamp = drivers_file.stat()
    storage_file.write_text(storage_file.read_text() + "\n# an edit\n")
    assert drivers_file.stat().st_mtime_ns == drivers_stamp.st_mtime_ns
    assert _run_check(root)["hits"] == "0 misses 1"  # recompiled
    assert _run_check(root)["hits"] == "1 misses 0"  # and cached again


def test_corrupt_cache_entries_are_recompiled_not_fatal(tmp_path):
    root = _copy_package(tmp_path)
    _run_check(root)
    cache_files = list((root / "fastbn" / "kernels" / "__pycache__").glob("*.nb*"))
    assert cache_files
    for i, path in enumerate(cache_files):
        if i % 2:
            path.write_bytes(b"\x80\x04garbage, not a pickle")
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated
    fields = _run_check(root)
    assert fields["cache"].startswith("True")
    # and the rewritten cache serves the next process
    assert _run_check(root)["hits"] == "1 misses 0"


@pytest.mark.parametrize("command", ["info", "warmup"])
def test_cli_commands_run(command):
    # warmup of one dtype: every dtype compiles ~45 driver variants (over a minute
    # cold); the loop is the same for each (test_warmup_dtypes_option: the selection)
    args = ["warmup", "--dtypes", "float32"] if command == "warmup" else [command]
    result = run_python(["-m", "fastbn", *args], timeout=600)
    assert result.returncode == 0, result.stderr
    if command == "info":
        for key in ("numba threads", "threading layer", "cache directory", "cached variants"):
            assert key in result.stdout
    else:
        assert "kernel variants" in result.stdout


def test_warmup_dtypes_option():
    # The selection in-process; the command itself ran (float32) in test_cli_commands_run
    # (a second dtype compiled in a subprocess cost over a minute of a cold CI run).
    from fastbn.__main__ import DTYPES, _selected_dtypes

    assert _selected_dtypes(None) == list(DTYPES)
    assert _selected_dtypes("float64") == [np.float64]
    assert _selected_dtypes(" float16, bfloat16 ") == [np.float16, "bfloat16"]
    assert _selected_dtypes(["float32", np.float64]) == [np.float32, np.float64]
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        _selected_dtypes("float64,float8")
    bad = run_python(["-m", "fastbn", "warmup", "--dtypes", "float64,float8"], timeout=600)
    assert bad.returncode == 2 and "unknown dtype 'float8'" in bad.stderr
