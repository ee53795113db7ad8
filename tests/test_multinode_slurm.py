"""Multi-node dragon on the test Slurm cluster (slurm/start-cluster.sh): ``srun -N 2 --ntasks-per-node=1
dragon-launch app.py``, two real nodes with their own hostnames, networks and /dev/shm; MPI between them goes
over the network."""

import os
import subprocess
import time

import pytest
from slurm_util import (
    ON_NODES,
    dragon_launch_cmd,
    no_leaked_node_segments,
    pids_with_marker,
    scancel,
    slurm_cluster,
    srun,
    srun_dragon,
    wait_for_file,
)

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = ON_NODES


def run(*args, tasks=None, **kw):
    """srun_dragon with a marker in the environment; no process may carry it afterwards, on any node.  tasks:
    srun -N nodes -n tasks (at most 2 per node) instead of one task per node."""
    mark = "DRAGON_TEST_MARK=" + os.urandom(6).hex()
    env = {"DRAGON_TEST_MARK": mark.split("=", 1)[1]}
    if tasks is None:
        res = srun_dragon(*args, env=env, **kw)
    else:
        res = srun([*dragon_launch_cmd(), *args], ntasks_per_node=2, extra=["-n", str(tasks)], env=env, **kw)
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


# ---- global services on a rank of its own: srun -N 2 -n 3 (block distribution: ranks 0, 1 on node 0)
# ----------
GS_APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "gsrank_app.py")


@pytest.mark.timeout(150)
def test_srun_one_extra_task_runs_global_services(slurm_cluster):
    res = run(GS_APP, "gsrank", tasks=3, nodes=2, timeout=140)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"gsrank ok {slurm_cluster.nodes[:2]!r}" in res.stdout, res.stdout + res.stderr
    for k in (0, 1):
        assert f"[child{k}@{k}] child on node {k} nodes [0, 1]" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_srun_killed_global_services_ends_the_job_naming_its_rank(slurm_cluster):
    res = run(GS_APP, "killgs", tasks=3, nodes=2, timeout=110)
    assert "killing global services" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode == 70, res.stdout + res.stderr
    assert "global services is gone: the global-services rank 1" in res.stderr, res.stderr


@pytest.mark.timeout(150)
@pytest.mark.mpi_leftovers_ok
def test_srun_killed_gs_rank_is_noticed_by_silence(slurm_cluster):
    """srun keeps the other tasks running: node 0's agent hears nothing more from the GS rank and ends the
    job."""
    res = run(GS_APP, "killgsrank", tasks=3, nodes=2, timeout=140)
    assert "killing the global-services rank's launcher" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode != 0
    assert "global services is gone: the global-services rank 1" in res.stderr, res.stderr


@pytest.mark.timeout(150)
def test_scancel_tears_down_the_nodes_and_the_gs_rank(slurm_cluster, tmp_path):
    """scancel: Slurm's SIGTERM reaches every process of the step at once, GS and its rank too; the job ends
    by dragon's teardown (143), quietly (GS going with the rest is no loss), and leaves nothing on any
    node."""
    mark = os.urandom(6).hex()
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    name = f"gsr{mark}"
    cmd = ["srun", "-N", "2", "-n", "3", "--time=3", "-J", name, *dragon_launch_cmd(), GS_APP, "forever"]
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=dict(os.environ, DRAGON_TEST_MARK=mark))
    try:
        wait_for_file(out, timeout=90, contains="ready")
        job = subprocess.run(
            ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=20, check=True
        ).stdout.split()
        assert len(job) == 1, job
        scancel(int(job[0]))
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.read_text() + err.read_text()
    assert rc != 0, text
    assert "still alive" not in text and "Traceback" not in text, text
    assert "the job lost" not in text and "global services is gone" not in text, text
    deadline = time.monotonic() + 10
    while pids_with_marker(f"DRAGON_TEST_MARK={mark}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_with_marker(f"DRAGON_TEST_MARK={mark}")
