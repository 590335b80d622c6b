"""Launch the MPI tests (tests/mpi) under ``mpiexec -n 2`` and ``-n 3``, with a timeout.

``python -m mpi4py`` aborts every rank when one raises an uncaught exception,
so a failure cannot leave the other ranks waiting in a collective.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mpiexec():
    pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (pip install -e '.[mpi]')")
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec found (pip install mpich, or a system MPI)")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_suite(ranks):
    mpiexec = _mpiexec()
    env = {**os.environ, "FASTBN_MPI_TESTS": "1", "OMP_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "pytest",
               "tests/mpi", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=420)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the MPI tests under {ranks} ranks hung (> {exc.timeout} s)")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert output.count(" passed") >= ranks, output[-3000:]  # every rank ran and passed
    assert " failed" not in output


def test_import_without_mpi4py_is_lazy():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import fastbn, fastbn.distributed as d\n"
            "layer = d.SyncBatchNorm(3)\n"
            "try:\n    layer.communicator\nexcept ImportError as e:\n    print('lazy:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lazy: synchronized batch norm over MPI needs mpi4py" in result.stdout
