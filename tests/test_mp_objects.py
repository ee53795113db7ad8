"""Queues, pipes, locks, semaphores, conditions, events, barriers and shared values of the 'dragon' start
method between processes, on one node (tests/mpi_apps/mp_objects_app.py under dragon-launch; the same app runs
across three virtual nodes in test_mp_multinode.py)."""

import os
import subprocess

import pytest
from test_runtime_util import launch_cmd, launch_env

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "mp_objects_app.py")


@pytest.mark.timeout(200)
def test_objects_between_processes_on_one_node(tmp_path):
    r = subprocess.run(
        launch_cmd(APP), cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=190
    )
    assert "ALL OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "every item once (children on nodes [0])" in r.stdout
    assert "Manager dict and list (used from nodes [0])" in r.stdout
    assert "Can't pickle local object" in r.stderr  # the unpicklable object was reported, not raised
