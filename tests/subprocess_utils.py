"""Run Python snippets in fresh interpreters (crash isolation, clean Numba state)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def run_python(args, env_updates=None, timeout=240, cwd=None):
    """Run ``python <args>`` with the test interpreter; return the CompletedProcess."""
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    env.update(env_updates or {})
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def layer_env(layer: str) -> dict:
    """Environment that selects a Numba threading layer.

    No LD_LIBRARY_PATH for tbb: fastbn loads the pip wheel's libtbb itself.
    """
    return {"NUMBA_THREADING_LAYER": layer}


#: Elements enough for the parallel kernels (below fastbn._launch.SMALL_PROBLEM
#: every call runs serially and no threading layer is ever loaded).
PARALLEL_SIZE = 1 << 16


def layer_available(layer: str) -> bool:
    probe = ("import numpy as np, numba, fastbn; "
             f"fastbn.batch_stats(np.ones(({PARALLEL_SIZE}, 2))); "
             f"assert numba.threading_layer() == {layer!r}")
    return run_python(["-c", probe], layer_env(layer), timeout=120).returncode == 0
