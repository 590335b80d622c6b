"""Tests that run under ``mpiexec -n 2|3 python -m mpi4py -m pytest tests/mpi``.

They are launched by ``tests/test_mpi.py`` (which sets FASTBN_MPI_TESTS=1); a
plain ``pytest`` run does not collect them on its own.
"""

import os

if os.environ.get("FASTBN_MPI_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
