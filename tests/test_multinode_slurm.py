"""Multi-node dragon on the test Slurm cluster (slurm/start-cluster.sh): ``srun -N 2 --ntasks-per-node=1
dragon-launch app.py``, two real nodes with their own hostnames, networks and /dev/shm; MPI between them goes
over the network."""

import os

import pytest
from slurm_util import slurm_cluster, srun_dragon

__all__ = ["slurm_cluster"]  # a fixture, imported for pytest

pytestmark = [pytest.mark.slurm, pytest.mark.mpi]

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "multinode_app.py")


@pytest.mark.timeout(180)
def test_srun_two_nodes(slurm_cluster):
    res = srun_dragon(APP, "twohosts", nodes=2, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "twohosts ok" in res.stdout
    assert "[where@1] host node" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_srun_exit_code_is_the_programs(slurm_cluster, tmp_path):
    prog = tmp_path / "fail.py"
    prog.write_text("import sys\nprint('bye', flush=True)\nsys.exit(5)\n")
    res = srun_dragon(str(prog), nodes=2, timeout=110)
    assert res.returncode == 5, res.stdout + res.stderr
    assert "bye" in res.stdout


@pytest.mark.timeout(150)
def test_srun_killed_node_is_noticed(slurm_cluster):
    res = srun_dragon(APP, "killnode2", nodes=2, timeout=140)
    assert "killnode ok" in res.stdout, res.stdout + res.stderr
    assert res.returncode != 0
    assert "node 1" in res.stderr and "died" in res.stderr, res.stderr
