"""Many Python threads calling fastbn at once: no crash, results bitwise equal to serial."""

import pytest

from .subprocess_utils import SCRIPTS, layer_available, layer_env, run_python

SCRIPT = str(SCRIPTS / "concurrent_calls.py")


@pytest.mark.parametrize("layer", ["omp", "tbb", "workqueue"])
def test_threads_hammering_every_entry_point(layer):
    if not layer_available(layer):
        pytest.skip(f"Numba threading layer {layer!r} is not available on this machine")
    result = run_python([SCRIPT, "8", "200"], layer_env(layer))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"layer={layer}" in result.stdout
    assert "calls=1600 mismatches=0" in result.stdout


def test_default_layer_is_thread_safe_or_guarded():
    result = run_python([SCRIPT, "8", "50"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches=0" in result.stdout


def test_workqueue_without_the_guard_aborts():
    """Shows the guard is load-bearing: the same run with it disabled kills the process."""
    snippet = (
        "import runpy, sys\n"
        "import fastbn._launch as L\n"
        "L._parallel_lock = lambda: None\n"
        f"sys.argv = ['x', '8', '200']\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    )
    result = run_python(["-c", snippet], layer_env("workqueue"))
    assert result.returncode != 0
    assert "Concurrent access has been detected" in result.stderr
