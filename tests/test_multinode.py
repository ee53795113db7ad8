"""Multi-node dragon on one host: ``mpiexec -n 3 dragon-launch --virtual-nodes tests/mpi_apps/multinode_app.py CASE``
(each rank is its own node, with its own segments; everything between nodes goes through the transport agents).

Every run carries a unique marker in its environment; after it, no process may carry the marker (a rank, a
service or a managed process left behind) and no segment may be left (the autouse fixture of conftest.py)."""

import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.mpi

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "multinode_app.py")


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        pytest.skip("no mpiexec: pip install '.[mpi]' brings mpi4py and the mpich wheel")
    return path


def _marked(mark):
    needle = f"DRAGON_TEST_MARK={mark}".encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(d))
        except OSError:
            pass
    return found


def launch(n, *args, timeout=100, virtual=True, program=APP):
    mark = os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAGON_")}
    env["DRAGON_TEST_MARK"] = mark
    cmd = [
        mpiexec(),
        "-n",
        str(n),
        sys.executable,
        "-m",
        "launcher.launch",
        *(["--virtual-nodes"] if virtual else []),
        program,
        *args,
    ]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        for pid in _marked(mark):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"dragon-launch {args} hung:\n{e.stdout}\n{e.stderr}")
    deadline = time.monotonic() + 5
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _marked(mark)
    assert not left, f"processes left behind: {left}"
    return res


@pytest.mark.timeout(120)
def test_processes_on_every_node_create_join_kill_and_their_output():
    res = launch(3, "processes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "processes ok" in res.stdout
    for k in range(3):  # other nodes' output reaches the terminal, labelled
        assert f"[hello{k}@{k}] hello from node {k}" in res.stdout, res.stdout


@pytest.mark.timeout(150)
def test_pools_and_channels_on_remote_nodes_every_size_several_senders_and_join():
    res = launch(3, "channels", timeout=140)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "channels ok" in res.stdout


@pytest.mark.timeout(120)
def test_a_killed_node_is_noticed_and_the_job_ends_naming_it():
    res = launch(3, "killnode")
    assert "killnode ok" in res.stdout, res.stdout + res.stderr
    assert res.returncode != 0, res.stdout + res.stderr
    assert "node 1" in res.stderr and "died" in res.stderr, res.stderr


@pytest.mark.timeout(60)
def test_exit_code_is_the_programs(tmp_path):
    prog = tmp_path / "fail.py"
    prog.write_text("import sys\nprint('bye', flush=True)\nsys.exit(3)\n")
    res = launch(3, program=str(prog))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "bye" in res.stdout


@pytest.mark.timeout(60)
def test_ranks_on_one_host_make_one_node_without_virtual_nodes(tmp_path):
    prog = tmp_path / "one.py"
    prog.write_text("from dragon.globalservices import node\nprint('nodes', node.get_list(), flush=True)\n")
    res = launch(2, program=str(prog), virtual=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nodes [0]" in res.stdout


@pytest.mark.timeout(120)
def test_a_killed_agent_ends_the_job_and_leaves_nothing():
    res = launch(3, "killagent")
    assert "killing node 1's launcher" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode != 0
