"""``dragon-launch --serve`` on the real test Slurm cluster, through the users' template
slurm/dragon-serve.sbatch, with clients on the first node (run inside that node's namespaces: its host name
and its own /dev/shm): two clients one after the other and at the same time, a client SIGKILLed mid-use,
``--stop``, and scancel of the serving job. Every test checks that no process of the job is left and
(fixture) that both nodes' /dev/shm are as before."""

import json
import os
import subprocess
import sys

import pytest
from serve_util import AFTER_KILL, AT_ONCE, CLIENT_HELPERS, MAKE, MID_USE, SEES_NOTHING_OF
from slurm_util import (
    BASE,
    ON_NODES,
    REPO,
    new_marker,
    no_leaked_node_segments,
    sbatch,
    scancel,
    slurm_cluster,
    wait_for_file,
    wait_job,
    wait_no_marker,
    wait_state,
)
from test_runtime_util import launch_cmd

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = [*ON_NODES, pytest.mark.timeout(240)]

TEMPLATE = REPO / "slurm" / "dragon-serve.sbatch"


def on_node(node, argv, env=None, **kw):
    """Popen argv on the host but inside node's namespaces (as a user logged into that node would run it)."""
    pid = int((BASE / "run" / f"slurmd-{node}.pid").read_text().split()[0])
    full = dict(
        os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})
    )
    cwd = kw.pop("cwd", None)  # (nsenter -m starts in the namespace's /: it is told where to work instead)
    return subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(pid),
            "-n",
            "-m",
            "-u",
            *([f"--wd={cwd}"] if cwd else []),
            "--",
            *map(str, argv),
        ],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def client_on(node, tmp_path, path, code, args=(), name="client.py"):
    app = tmp_path / name
    app.write_text(CLIENT_HELPERS + code)
    return on_node(node, [sys.executable, app, *args], env={"DRAGON_CONNECT": path}, cwd=tmp_path)


def finished(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out


@pytest.fixture
def served(slurm_cluster, tmp_path):
    """The template running on 2 nodes with its connection file in tmp_path: (job, path, info, first node)."""
    marker = new_marker()
    path = tmp_path / "connect.json"
    script = tmp_path / "serve.sbatch"
    text = TEMPLATE.read_text().replace('CONNECT="${1:-', f'CONNECT="{path}" # ${{1:-', 1)
    script.write_text(text)
    job = sbatch(script, workdir=tmp_path, nodes=2, time_limit="4", env={"DRAGON_TEST_MARKER": marker})
    try:
        assert wait_state(job.id, "RUNNING", timeout=90) == "RUNNING"
        wait_for_file(path, timeout=90, contains="}")
        info = json.loads(path.read_text())
        first = info["host"]
        assert first in slurm_cluster.nodes and info["nodes"] == 2, info
        yield job, str(path), info, first, marker
    finally:
        scancel(job.id)
        wait_job(job.id, timeout=60)
    left = wait_no_marker(marker, timeout=20)
    assert not left, f"processes of the job survived: {left}"


def test_clients_and_stop_on_slurm(served, tmp_path):
    job, path, info, first, marker = served
    # one after the other: the second sees nothing of the first
    finished(client_on(first, tmp_path, path, MAKE, ["a"]))
    assert "ok released" in finished(client_on(first, tmp_path, path, SEES_NOTHING_OF, ["a"], name="b.py"))
    # two at the same time
    c = client_on(first, tmp_path, path, AT_ONCE, ["c", "d"], name="c.py")
    d = client_on(first, tmp_path, path, AT_ONCE, ["d", "c"], name="d.py")
    finished(c)
    assert "ok c released, d kept" in finished(d)
    # one SIGKILLed in the middle of sends to a channel on the other node
    k = client_on(first, tmp_path, path, MID_USE, name="k.py")
    try:
        assert k.stdout.readline().startswith("PID ")
        assert k.stdout.readline() == "READY\n"
    finally:
        k.kill()
        k.communicate(timeout=30)
    assert "ok released after SIGKILL" in finished(client_on(first, tmp_path, path, AFTER_KILL, name="e.py"))
    # --stop, on the first node: the job ends by itself, the file is gone
    stop = on_node(first, launch_cmd("--stop", path))
    out, err = stop.communicate(timeout=90)
    assert stop.returncode == 0, out + err
    assert wait_job(job.id, timeout=60) == "COMPLETED"
    assert not os.path.exists(path)
    text = job.output.read_text()
    assert "serving job" in text and "Traceback" not in text, text


def test_scancel_of_the_serving_job(served, tmp_path):
    job, path, info, first, marker = served
    finished(client_on(first, tmp_path, path, MAKE, ["a"]))
    keeper = client_on(
        first, tmp_path, path, "dragon.init(keep=True)\nprint('IN', flush=True)\ntime.sleep(600)"
    )
    try:
        assert keeper.stdout.readline() == "IN\n"
        scancel(job.id)
        assert wait_job(job.id, timeout=60) in ("CANCELLED", "COMPLETED")
        assert not os.path.exists(path)
    finally:
        keeper.kill()
        keeper.communicate(timeout=30)
