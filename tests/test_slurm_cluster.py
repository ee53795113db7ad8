"""The test cluster itself (slurm/start-cluster.sh): real Slurm, 2 nodes with their own hostnames, MPI over
PMI-2, sbatch, scancel and time limits.  These are the facts the dragon launcher relies on under Slurm."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import slurm_util
from slurm_util import (
    job_info,
    new_marker,
    no_leaked_node_segments,
    node_shm,
    pid_alive,
    pids_with_marker,
    sbatch,
    scancel,
    slurm_cluster,
    srun,
    wait_for_file,
    wait_job,
    wait_no_marker,
    wait_state,
)

# These tests create nothing in this host's /dev/shm (tasks run on the nodes, each with its own /dev/shm), so
# the host-wide check of conftest.py is replaced by a check of every node's /dev/shm.
pytestmark = [pytest.mark.slurm, pytest.mark.allow_leaks, pytest.mark.usefixtures("no_leaked_node_segments")]
__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

PY = sys.executable


@pytest.mark.timeout(60)
def test_two_nodes_with_their_own_hostnames(slurm_cluster):
    assert len(slurm_cluster.nodes) >= 2
    res = srun(["sh", "-c", 'echo "$SLURM_NODEID $SLURMD_NODENAME $(hostname)"'], nodes=2, timeout=50)
    assert res.returncode == 0, res.stderr
    rows = sorted(line.split() for line in res.stdout.splitlines())
    assert [r[0] for r in rows] == ["0", "1"], rows
    # each task runs on a different node, and that node's hostname is its Slurm node name
    assert rows[0][2] != rows[1][2], rows
    assert all(r[1] == r[2] for r in rows), rows
    assert {r[1] for r in rows} <= set(slurm_cluster.nodes)


MPI_PROGRAM = textwrap.dedent("""
    import json, os, socket
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    total = comm.allreduce(comm.Get_rank() + 1)
    names = comm.allgather(socket.gethostname())
    print(json.dumps({"rank": comm.Get_rank(), "size": comm.Get_size(), "host": socket.gethostname(),
                      "nodeid": os.environ.get("SLURM_NODEID"), "total": total, "names": names}), flush=True)
""")


@pytest.mark.timeout(120)
def test_srun_mpi4py_ranks_on_two_nodes_share_one_world(slurm_cluster, tmp_path):
    prog = tmp_path / "mpi_world.py"
    prog.write_text(MPI_PROGRAM)
    res = srun([PY, prog], nodes=2, ntasks_per_node=1, timeout=100)
    assert res.returncode == 0, res.stderr
    ranks = sorted((json.loads(m) for m in re.findall(r"\{[^{}]*\}", res.stdout)), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], res.stdout + res.stderr
    # PMI-2 worked: one world of 2, not two singletons of size 1
    assert all(r["size"] == 2 for r in ranks), ranks
    assert all(r["total"] == 3 for r in ranks), ranks
    assert ranks[0]["host"] != ranks[1]["host"], ranks
    assert ranks[0]["names"] == ranks[1]["names"] == [ranks[0]["host"], ranks[1]["host"]]
    assert [r["nodeid"] for r in ranks] == ["0", "1"]


@pytest.mark.timeout(60)
def test_srun_keeps_the_exit_code(slurm_cluster):
    res = srun(["sh", "-c", "exit 3"], nodes=2, timeout=50)
    assert res.returncode == 3, (res.returncode, res.stderr)


@pytest.mark.timeout(60)
def test_a_failing_task_does_not_kill_the_others(slurm_cluster):
    # KillOnBadExit=0 (Slurm's default): the step's other tasks finish, srun returns the highest exit code
    script = 'if [ "$SLURM_PROCID" = 0 ]; then exit 3; fi; sleep 2; echo "task $SLURM_PROCID finished"'
    res = srun(["sh", "-c", script], nodes=2, timeout=50)
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "task 1 finished" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(120)
def test_sbatch_runs_and_writes_its_output(slurm_cluster, tmp_path):
    marker = new_marker()
    job = sbatch(
        textwrap.dedent(f"""\
        echo "batch on $(hostname) job $SLURM_JOB_ID nodes $SLURM_JOB_NUM_NODES"
        srun --ntasks-per-node=1 sh -c 'echo "step on $(hostname)"'
        echo "{marker} done"
        """),
        workdir=tmp_path,
        nodes=2,
    )
    state = wait_job(job.id, timeout=100)
    text = wait_for_file(job.output, timeout=20, contains=f"{marker} done")
    assert state == "COMPLETED", (state, text)
    assert f"job {job.id} nodes 2" in text
    steps = sorted(line.split()[-1] for line in text.splitlines() if line.startswith("step on "))
    assert len(steps) == 2 and steps[0] != steps[1], text


TASK = textwrap.dedent("""
    import os, socket, sys, time
    path = os.path.join(sys.argv[1], "task-%s" % os.environ["SLURM_PROCID"])
    with open(path + ".tmp", "w") as f:
        f.write("%s %d\\n" % (socket.gethostname(), os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(600)
""")


def _start_sleeping_tasks(tmp_path, time_limit="5"):
    """sbatch a job whose step runs one sleeping python task per node; return (job, marker, {host: pid})."""
    (tmp_path / "task.py").write_text(TASK)
    marker = new_marker()
    job = sbatch(
        f"srun --ntasks-per-node=1 {PY} {tmp_path / 'task.py'} {tmp_path}\n",
        workdir=tmp_path,
        nodes=2,
        time_limit=time_limit,
        env={"DRAGON_TEST_MARKER": marker},
    )
    tasks = {}
    for rank in (0, 1):
        host, pid = wait_for_file(tmp_path / f"task-{rank}", timeout=60).split()
        tasks[host] = int(pid)
    assert len(tasks) == 2, f"both tasks on one host: {tasks}"
    assert all(pid_alive(p) for p in tasks.values())
    assert set(tasks.values()) <= set(pids_with_marker(marker))
    return job, marker, tasks


@pytest.mark.timeout(120)
def test_scancel_kills_the_tasks_on_both_nodes(slurm_cluster, tmp_path):
    job, marker, tasks = _start_sleeping_tasks(tmp_path)
    assert wait_state(job.id, "RUNNING", timeout=10) == "RUNNING"
    scancel(job.id)
    assert wait_job(job.id, timeout=60) == "CANCELLED"
    left = wait_no_marker(marker, timeout=30)
    assert not left, f"processes of the cancelled job still running: {left}"
    assert not any(pid_alive(p) for p in tasks.values()), tasks


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_time_limit_ends_the_job_on_both_nodes(slurm_cluster, tmp_path):
    # Slurm's smallest limit is one minute, checked about every 30 s: this test takes 60-100 s
    job, marker, tasks = _start_sleeping_tasks(tmp_path, time_limit="1")
    assert wait_job(job.id, timeout=200) == "TIMEOUT", job_info(job.id)
    left = wait_no_marker(marker, timeout=30)
    assert not left, f"processes of the timed-out job still running: {left}"
    assert not any(pid_alive(p) for p in tasks.values()), tasks
    assert "DUE TO TIME LIMIT" in job.output.read_text()


@pytest.mark.timeout(60)
def test_each_node_has_its_own_dev_shm(slurm_cluster):
    name = f"dragon-shm-probe-{new_marker()}"
    first, second = slurm_cluster.nodes[:2]
    res = srun(
        ["sh", "-c", f"touch /dev/shm/{name} && ls /dev/shm"], nodes=1, extra=("-w", first), timeout=50
    )
    assert res.returncode == 0, res.stderr
    try:
        assert name in node_shm(first)
        assert name not in node_shm(second)
    finally:
        srun(["rm", "-f", f"/dev/shm/{name}"], nodes=1, extra=("-w", first), timeout=50)
    assert name not in node_shm(first)


@pytest.mark.timeout(60)
def test_sbatch_template_directives_are_read(slurm_cluster, tmp_path):
    # held, so it never runs: only checks that Slurm understood the template's #SBATCH lines
    template = slurm_util.REPO / "slurm" / "dragon.sbatch"
    job = sbatch(template, workdir=tmp_path, nodes=None, time_limit=None, output=None, extra=("--hold",))
    try:
        info = job_info(job.id)
        assert info.get("JobName") == "dragon", info
        assert info.get("NumNodes", "").startswith("2"), info
        assert info.get("TimeLimit") == "00:10:00", info
        assert job.output == tmp_path / f"dragon-{job.id}.out", info
    finally:
        scancel(job.id)
    assert wait_job(job.id, timeout=30) == "CANCELLED"


@pytest.mark.timeout(60)
def test_start_cluster_again_is_a_no_op(slurm_cluster):
    if os.geteuid() != 0:
        pytest.skip("start-cluster.sh needs root")
    before = dict(slurm_cluster.slurmd_pids)
    res = subprocess.run(
        ["bash", str(slurm_util.REPO / "slurm" / "start-cluster.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "already running" in res.stdout, res.stdout
    for node, pid in before.items():
        assert (slurm_util.BASE / "run" / f"slurmd-{node}.pid").read_text().split()[0] == str(pid)
