"""The MPI that `pip install ".[mpi]"` (or ".[test]") brings: mpi4py and the `mpich` wheel's mpiexec."""

import json
import re
import subprocess
import sys

import pytest
from mpi_util import mpiexec

pytestmark = pytest.mark.mpi


@pytest.mark.timeout(90)
def test_mpiexec_runs_two_ranks_of_one_world():
    exe = mpiexec()
    prog = (
        "import json, sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "sys.stdout.write(json.dumps([c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), "
        "MPI.Get_library_version().splitlines()[0].strip()]) + '\\n')"
    )
    res = subprocess.run(
        [exe, "-n", "2", sys.executable, "-c", prog],
        check=False,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert res.returncode == 0, res.stderr
    # mpiexec forwards each rank's output as it comes: two lines may arrive glued together
    rows = sorted(json.loads(m) for m in re.findall(r"\[[^\[\]]*\]", res.stdout))
    assert [r[:3] for r in rows] == [[0, 2, 3], [1, 2, 3]], res.stdout + res.stderr
    assert all("MPICH" in r[3] for r in rows), rows


@pytest.mark.timeout(30)
def test_mpiexec_is_mpich_hydra():
    res = subprocess.run([mpiexec(), "--version"], check=False, capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    assert "HYDRA" in res.stdout, res.stdout
