"""The 'dragon' start method on the test Slurm cluster (two real nodes with their own hostnames, networks and
/dev/shm): ``srun -N 2 dragon-launch app``. The same apps as on virtual nodes (tests/mpi_apps/mp_*_app.py):
every object used between processes on both nodes, the Pool and ProcessPoolExecutor with workers on both,
a killed worker, and an app dying with a busy pool leaving nothing on either node."""

import os
import time

import pytest
from slurm_util import ON_NODES, no_leaked_node_segments, pids_with_marker, slurm_cluster, srun_dragon

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = ON_NODES

APPS = os.path.join(os.path.dirname(__file__), "mpi_apps")


def run(app, *args, timeout):
    mark = os.urandom(6).hex()
    res = srun_dragon(
        os.path.join(APPS, app), *args, nodes=2, timeout=timeout, env={"DRAGON_TEST_MARK": mark}
    )
    deadline = time.monotonic() + 5
    while pids_with_marker(f"DRAGON_TEST_MARK={mark}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(f"DRAGON_TEST_MARK={mark}"), "processes left behind"
    return res


@pytest.mark.timeout(240)
def test_objects_between_processes_on_two_slurm_nodes(slurm_cluster):
    res = run("mp_objects_app.py", timeout=230)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout + res.stderr
    assert "every item once (children on nodes [0, 1])" in res.stdout
    assert "Manager dict and list (used from nodes [0, 1])" in res.stdout


@pytest.mark.timeout(240)
def test_pool_and_executor_with_workers_on_two_slurm_nodes(slurm_cluster):
    res = run("mp_pool_app.py", timeout=230)
    assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout + res.stderr
    assert "errors (workers on nodes [0, 1])" in res.stdout


@pytest.mark.timeout(120)
def test_an_app_that_dies_with_a_busy_pool_leaves_nothing_on_the_slurm_nodes(slurm_cluster):
    res = run("mp_pool_app.py", "crash", timeout=110)
    assert "crashing" in res.stdout and res.returncode == 3, res.stdout + res.stderr


@pytest.mark.timeout(150)
def test_example_pool_under_the_sbatch_template(slurm_cluster, tmp_path):
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--wait",
            f"--chdir={tmp_path}",
            "--time=3",
            os.path.join(repo, "slurm", "dragon.sbatch"),
            os.path.join(repo, "examples", "mp_pool_pi.py"),
            "4000000",
        ],
        capture_output=True,
        text=True,
        timeout=140,
    )
    job = res.stdout.strip().split(";")[0]
    text = (tmp_path / f"dragon-{job}.out").read_text()
    assert res.returncode == 0 and "pi ~ 3.14" in text, res.stderr + text
    workers = text.split("workers per node: ")[1].splitlines()[0]
    assert [part.split(":")[0] for part in workers.split(", ")] == ["node 0", "node 1"], text
    counted = dict(
        part.split(": ") for part in text.split("batches per node: ")[1].splitlines()[0].split(", ")
    )
    # every batch counted once, by whichever worker was free first
    assert sum(map(int, counted.values())) == 20, text
