"""The MPI that `pip install ".[mpi]"` (or ".[test]") brings: mpi4py and the `mpich` wheel's mpiexec."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from slurm_util import slurm_required

pytestmark = pytest.mark.mpi


def _mpiexec():
    """The mpiexec next to this interpreter (where the mpich wheel puts it), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        if slurm_required():  # CI / the README's test command installed the mpi extra: its absence is a bug
            pytest.fail("no mpiexec: the mpich wheel is not installed (pip install '.[mpi]')", pytrace=False)
        pytest.skip("no mpiexec: pip install '.[mpi]' brings mpi4py and the mpich wheel")
    return path


@pytest.mark.timeout(90)
def test_mpiexec_runs_two_ranks_of_one_world():
    mpiexec = _mpiexec()
    prog = (
        "import json, sys; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "sys.stdout.write(json.dumps([c.Get_rank(), c.Get_size(), c.allreduce(c.Get_rank() + 1), "
        "MPI.Get_library_version().splitlines()[0].strip()]) + '\\n')"
    )
    res = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, "-c", prog],
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
    res = subprocess.run([_mpiexec(), "--version"], check=False, capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    assert "HYDRA" in res.stdout, res.stdout
