"""Fork safety: worker processes started after the parent ran parallel kernels never hang.

GNU OpenMP (Numba's ``omp`` layer) terminates a forked child that starts a
parallel region after the parent used one, and a ``multiprocessing`` pool then
waits forever.  fastbn detects the fork and runs serial kernels in such a
child.  Every run here is bounded by a timeout, so a hang fails the test
instead of hanging CI.
"""

import os
import subprocess
import sys
import venv

import pytest

from .subprocess_utils import SCRIPTS, layer_available, layer_env, run_python

SCRIPT = str(SCRIPTS / "fork_pool.py")
LAYERS = ["omp", "tbb", "workqueue"]
TIMEOUT = 180


def _run(context, layer, *extra):
    if not layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available on this machine")
    try:
        return run_python([SCRIPT, context, *extra], layer_env(layer), timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{context} workers under the {layer} layer hung (> {TIMEOUT} s)")


def _fields(stdout):
    line = [line for line in stdout.splitlines() if line.startswith("layer=")][-1]
    return dict(item.split("=") for item in line.split())


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn", "os.fork"])
def test_workers_after_parallel_parent_match_bitwise(context, layer):
    result = _run(context, layer)
    assert result.returncode == 0, result.stdout + result.stderr
    fields = _fields(result.stdout)
    assert fields["layer"] == layer
    assert fields["equal"] == "True"
    forked = context in ("fork", "os.fork")
    if forked and layer == "omp":
        # The guard is what kept the children alive: they ran serial kernels and said why.
        assert int(fields["forced_serial"]) > 0
        assert int(fields["fork_warnings"]) >= 1
    else:  # fork-safe layers, or fresh interpreters: parallel kernels as usual
        assert fields["forced_serial"] == "0"
        assert fields["fork_warnings"] == "0"


@pytest.mark.slow
def test_without_the_guard_an_omp_child_is_terminated():
    """Shows the guard is load-bearing: disabled, GNU OpenMP kills the forked child."""
    result = _run("os.fork", "omp", "--no-guard")
    assert result.returncode != 0
    assert "child 0 failed" in result.stdout
    assert "fork() called from a process already using GNU OpenMP" in result.stderr


def test_serial_path_is_taken_only_in_a_guarded_child():
    from fastbn import _launch

    assert not _launch.forked_serial_only()  # this process was not forked from one


def _fresh_venv_python(tmp_path):
    """A venv with fastbn's runtime dependencies only (numpy, numba, tbb), or skip."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "numpy", "numba", "tbb"],
        capture_output=True, text=True, timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"cannot install numpy/numba/tbb into a fresh venv: {install.stderr[-300:]}")
    return python


@pytest.mark.slow
@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"),
                    reason="the tbb wheel is a dependency on Linux x86_64 only")
def test_fresh_install_selects_tbb_without_ld_library_path(tmp_path):
    python = _fresh_venv_python(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "NUMBA_THREADING_LAYER", "PYTHONPATH")}
    env.update(PYTHONPATH=root, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    probe = ("import numpy as np, fastbn\n"
             "from fastbn import _config\n"
             "fastbn.batch_stats(np.ones((1 << 16, 2)))\n"
             "print('layer', _config.threading_layer(), 'tbb', _config.TBB_LIBRARY)\n")
    result = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "layer tbb" in result.stdout
    assert str(tmp_path / "venv") in result.stdout  # the wheel's own libtbb


def test_info_reports_layer_and_its_safety():
    result = run_python(["-m", "fastbn", "info"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fork-safe" in result.stdout and "thread-safe" in result.stdout


def test_info_into_a_closed_pipe_exits_quietly():
    # `true` exits without reading, so every write of `info` meets a closed pipe.
    command = f"{sys.executable} -m fastbn info | true; echo status=${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            timeout=300)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert "status=1" in result.stdout


def test_empty_layer_variable_means_the_default_order():
    """``NUMBA_THREADING_LAYER=`` (empty) is no choice: Numba alone rejects '' at launch."""
    code = ("import numba, numpy as np, fastbn; "
            "fastbn.batch_norm_forward(np.ones((512, 512), np.float32)); "
            "print('layer=' + numba.threading_layer())")
    unset = run_python(["-c", code], timeout=300)
    empty = run_python(["-c", code], {"NUMBA_THREADING_LAYER": ""}, timeout=300)
    assert unset.returncode == 0, unset.stderr
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == unset.stdout.strip()
    info = run_python(["-m", "fastbn", "info"], {"NUMBA_THREADING_LAYER": " "}, timeout=300)
    assert "(requested: tbb > omp > workqueue)" in info.stdout, info.stdout
