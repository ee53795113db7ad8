"""Multi-node dragon on the test Slurm cluster (slurm/start-cluster.sh): ``srun -N 2 --ntasks-per-node=1
dragon-launch app.py``, two real nodes with their own hostnames, networks and /dev/shm; MPI between them goes
over the network."""

import os
import time

import pytest
from slurm_util import no_leaked_node_segments, pids_with_marker, slurm_cluster, srun_dragon

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

# the nodes' own /dev/shm are checked; this host's is not used by these tests (other programs may use it)
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.mpi,
    pytest.mark.allow_leaks,
    pytest.mark.usefixtures("no_leaked_node_segments"),
]


def run(*args, **kw):
    """srun_dragon with a marker in the environment; no process may carry it afterwards, on any node."""
    mark = "DRAGON_TEST_MARK=" + os.urandom(6).hex()
    env = {"DRAGON_TEST_MARK": mark.split("=", 1)[1]}
    res = srun_dragon(*args, env=env, **kw)
    deadline = time.monotonic() + 5
    while pids_with_marker(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(mark), f"processes left behind: {pids_with_marker(mark)}"
    return res


APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "multinode_app.py")


@pytest.mark.timeout(180)
def test_srun_two_nodes(slurm_cluster):
    res = run(APP, "twohosts", nodes=2, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "twohosts ok" in res.stdout
    assert "[where@1] host node" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_srun_exit_code_is_the_programs(slurm_cluster, tmp_path):
    prog = tmp_path / "fail.py"
    prog.write_text("import sys\nprint('bye', flush=True)\nsys.exit(5)\n")
    res = run(str(prog), nodes=2, timeout=110)
    assert res.returncode == 5, res.stdout + res.stderr
    assert "bye" in res.stdout


@pytest.mark.timeout(150)
def test_srun_killed_node_is_noticed(slurm_cluster):
    res = run(APP, "killnode2", nodes=2, timeout=140)
    assert "killnode ok" in res.stdout, res.stdout + res.stderr
    assert res.returncode != 0
    assert "node 1" in res.stderr and "died" in res.stderr, res.stderr


@pytest.mark.timeout(150)
@pytest.mark.mpi_leftovers_ok
def test_srun_killed_launcher_rank_is_noticed_by_silence(slurm_cluster):
    """srun keeps the other tasks running when one dies: node 0's agent notices the silence of node 1's."""
    res = run(APP, "killrank", nodes=2, timeout=140)
    assert "killrank ok" in res.stdout, res.stdout + res.stderr
    assert res.returncode != 0
    assert "node 1" in res.stderr and "is down" in res.stderr, res.stderr
