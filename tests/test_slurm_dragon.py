"""dragon under the real test Slurm cluster (slurm/start-cluster.sh: nodes node1 and node2, each with its own
hostname, network and /dev/shm): the users' sbatch template running examples/slurm_hello.py, teardown on every
node after scancel and at the time limit, node identity as Slurm gives it, and a wrong MPI layout.

Every test checks, after the job, both nodes' own /dev/shm (no new entry, fixture `no_leaked_node_segments`)
and that no process of the job (they all carry a unique marker in their environment) is left, on either
node."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_util import (
    ON_NODES,
    REPO,
    dragon_launch_cmd,
    epilog_did,
    job_info,
    new_marker,
    no_leaked_node_segments,
    node_shm,
    pids_with_marker,
    scancel,
    slurm_cluster,
    srun,
    wait_epilog,
    wait_for_file,
    wait_job,
    wait_no_marker,
    wait_state,
)

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = ON_NODES

TEMPLATE = REPO / "slurm" / "dragon.sbatch"
HELLO = REPO / "examples" / "slurm_hello.py"

# Runs until killed: a pool, a channel and a sleeping process on every node (the one on node 1 ignores
# SIGTERM, so that teardown needs its SIGKILL there), then says where its segments are.
FOREVER = """
import os, signal, sys, time
from dragon.globalservices import channel, node, pool, process
SLEEP = "import time; time.sleep(600)"
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
for k in node.get_list():
    pd = pool.create(4 << 20, user_name=f"p{k}", pool_options={"node": k})
    channel.create(pd.m_uid, user_name=f"c{k}", channel_options={"capacity": 8})
    code = DEAF if k else SLEEP
    d = process.create(sys.executable, None, ["-c", code], user_name=f"sleeper{k}", options={"node": k})
    assert d.node == k, d
print("ready: slurm job", os.environ.get("SLURM_JOB_ID"), "dragon job", os.environ["DRAGON_JOB"], flush=True)
time.sleep(600)
"""

# Prints how every node sees itself: the head (node 0) in a HEAD line, one child per node in IDENT lines.
IDENT = """
import json, os, socket, sys
from dragon.globalservices import node, process
def env(name):
    return os.environ.get(name)
if len(sys.argv) > 1:
    me = process.this_process()
    print("IDENT " + json.dumps({"k": int(sys.argv[1]), "desc_node": me.node,
          "DRAGON_NODE": env("DRAGON_NODE"), "SLURMD_NODENAME": env("SLURMD_NODENAME"),
          "SLURM_NODEID": env("SLURM_NODEID"), "host": socket.gethostname()}), flush=True)
    sys.exit(0)
nodes = node.get_list()
hosts = [node.query(k).hostname for k in nodes]
descs = []
for k in nodes:
    d = process.create(sys.executable, None, [__file__, str(k)], user_name=f"id{k}", options={"node": k})
    assert process.join(d.p_uid, timeout=60) == 0
    descs.append({"node": d.node, "query_node": process.query(d.p_uid).node})
print("HEAD " + json.dumps({"nodes": nodes, "hosts": hosts, "descs": descs,
      "nodelist": env("SLURM_JOB_NODELIST"), "SLURMD_NODENAME": env("SLURMD_NODENAME"),
      "SLURM_NODEID": env("SLURM_NODEID")}), flush=True)
"""


# ------------------------------------------------------------------------------------------------ helpers
def submit(script, *args, workdir, env, extra=()):
    """sbatch [extra] script args... (the script's own #SBATCH lines otherwise); -> (job id, output path)."""
    res = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={workdir}", *extra, str(script), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, **env),
    )
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip().split(";")[0])
    return job, Path(workdir) / f"dragon-{job}.out"  # the template's --output=dragon-%j.out


def job_processes(marker):
    """{pid: command line} of every live process carrying the marker (any node: one pid namespace)."""
    out = {}
    for pid in pids_with_marker(marker):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            pass
    return out


def segments_of(dragon_job, nodes):
    """{node: [its /dev/shm entries of this dragon job]} (every dragon node's namespace is <job>n<k>)."""
    base = re.sub(r"n\d+$", "", dragon_job)
    return {n: [s for s in node_shm(n) if s.startswith(f"dragon-{base}")] for n in nodes}


def started_everywhere(marker, dragon_job, nodes):
    """Checks that the FOREVER program really runs on both nodes (so that the teardown checks can fail)."""
    sleepers = [c for c in job_processes(marker).values() if "time.sleep(600)" in c]
    assert len(sleepers) == 2, job_processes(marker)
    segs = segments_of(dragon_job, nodes)
    for k, n in enumerate(nodes):
        assert any(s.startswith(f"dragon-{re.sub(r'n[0-9]+$', '', dragon_job)}n{k}-") for s in segs[n]), segs


def assert_torn_down(marker, dragon_job, nodes, job=None):
    """No process of the job on any node, no segment of the dragon job in any node's /dev/shm; with the Slurm
    job id: and dragon did it itself, within Slurm's KillWait: the epilog (slurm/dragon-epilog.sh) found
    nothing."""
    left = wait_no_marker(marker, timeout=20)
    assert not left, f"processes of the job survived: {job_processes(marker)}"
    deadline = time.monotonic() + 5
    while any(segments_of(dragon_job, nodes).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(segments_of(dragon_job, nodes).values()), segments_of(dragon_job, nodes)
    if job is not None:
        lines = wait_epilog(job, nodes, timeout=60)
        assert all(epilog_did(line) == ([], []) for line in lines.values()), lines


def ready_line(text):
    m = re.search(r"ready: slurm job (\d+) dragon job ((?:s\d+_)?j[0-9a-f]+n\d+)", text)
    assert m, text
    return int(m.group(1)), m.group(2)


# ------------------------------------------------------------------------------------------------ 1. sbatch
@pytest.mark.timeout(150)
def test_sbatch_template_runs_slurm_hello_once_on_both_nodes(slurm_cluster, tmp_path):
    marker = new_marker()
    nodes = slurm_cluster.nodes[:2]
    job, out = submit(
        TEMPLATE, HELLO, 3, workdir=tmp_path, env={"DRAGON_TEST_MARKER": marker}, extra=["--time=3"]
    )
    try:
        state = wait_job(job, timeout=120)
    finally:
        scancel(job)
    text = out.read_text()
    assert state == "FAILED", (state, text)  # exit code 3 is a failed job to Slurm
    assert job_info(job).get("ExitCode") == "3:0", (job_info(job), text)  # the program's exit code, kept
    assert f"job {job} on 2 node(s)" in text, text
    assert text.count("2 node(s): 0=") == 1 and f"2 node(s): 0={nodes[0]}, 1={nodes[1]}" in text, text
    for k, n in enumerate(nodes):
        # the worker's own print, forwarded from its node and labelled; its answer crossed to node 0
        line = f"[worker{k}@{k}] worker {k} on host {n} (Slurm node {n}, SLURM_NODEID {k}, dragon node {k})"
        assert line in text, text
        assert f"answer from node {k} ({n}): {sum(range(1000 * (k + 1)))} ok" in text, text
    assert text.count("hello from 2 node(s) done") == 1, text
    assert "WRONG" not in text and "Traceback" not in text, text
    left = wait_no_marker(marker, timeout=20)  # the nodes' /dev/shm: fixture no_leaked_node_segments
    assert not left, f"processes of the job survived: {job_processes(marker)}"


# ------------------------------------------------------------------------------------------------ 2. teardown
@pytest.mark.timeout(120)
def test_scancel_of_srun_dragon_launch_tears_down_every_node(slurm_cluster, tmp_path):
    marker = new_marker()
    nodes = slurm_cluster.nodes[:2]
    app = tmp_path / "forever.py"
    app.write_text(FOREVER)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    cmd = ["srun", "-N", "2", "--ntasks-per-node=1", "--time=3", *dragon_launch_cmd(), str(app)]
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=dict(os.environ, DRAGON_TEST_MARKER=marker))
    try:
        job, djob = ready_line(wait_for_file(out, timeout=90, contains="ready:"))
        started_everywhere(marker, djob, nodes)
        scancel(job)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc != 0, (out.read_text(), err.read_text())
    # dragon-launch tore the job down itself: its log line says so, or, when srun dropped the cancelled step's
    # last forwarded lines (it may: see assert_ended_by_dragon), srun's own report of the task's exit code 143
    # (128 + SIGTERM: dragon-launch's exit after its teardown; a task the signal killed is reported otherwise)
    errs = err.read_text()
    assert "got signal 15: tearing the job down" in errs or "Exited with exit code 143" in errs, errs
    # Slurm signals every process of the step, the services too: they end quietly
    assert "Traceback" not in errs + out.read_text(), errs
    assert wait_job(job, timeout=30) == "CANCELLED"
    assert_torn_down(marker, djob, nodes, job)


def run_template_until_stopped(marker, app, workdir, nodes, extra, stop=None):
    """sbatch the template running FOREVER; once it runs on both nodes, stop(job) (None: wait for Slurm).
    -> (final state, output text, dragon job)."""
    job, out = submit(TEMPLATE, app, workdir=workdir, env={"DRAGON_TEST_MARKER": marker}, extra=extra)
    try:
        assert wait_state(job, "RUNNING", timeout=90) == "RUNNING"
        _, djob = ready_line(wait_for_file(out, timeout=60, contains="ready:"))
        started_everywhere(marker, djob, nodes)
        if stop is not None:
            stop(job)
        state = wait_job(job, timeout=150)
    finally:
        scancel(job)
    return state, job, out.read_text(), djob


def assert_ended_by_dragon(state, job, text):
    """The job ended because dragon-launch tore it down on SIGTERM (exit 143), not by Slurm's SIGKILL."""
    assert state == "FAILED", (state, text)
    # 143:0 is dragon-launch's own exit after its SIGTERM teardown (a process killed by the signal shows
    # 0:15). Its "got signal 15" log line is not asserted: srun may drop a cancelled step's last stderr lines.
    assert job_info(job).get("ExitCode") == "143:0", (job_info(job), text)
    # srun got no signal (Slurm's own SIGTERM at scancel/the limit reaches srun too: "forcing job
    # termination")
    assert "forcing job termination" not in text and "Traceback" not in text, text


@pytest.mark.timeout(240)
def test_time_limit_of_the_template_tears_down_every_node(slurm_cluster, tmp_path):
    # Slurm's smallest limit is one minute.  The template's --signal=TERM@120 warns dragon (the tasks, not
    # srun or the batch shell) before the limit, so that the program is stopped on purpose and nothing is left
    # to the SIGKILL that follows the limit's SIGTERM; here 20 s before it, which Slurm's periodic check turns
    # into ~30-40 s after the start.  (The hard limit without a warning: tests/test_slurm_teardown.py.)
    marker = new_marker()
    nodes = slurm_cluster.nodes[:2]
    app = tmp_path / "forever.py"
    app.write_text(FOREVER)
    state, job, text, djob = run_template_until_stopped(
        marker, app, tmp_path, nodes, ["--time=1", "--signal=TERM@20"]
    )
    assert_ended_by_dragon(state, job, text)  # before the limit: not TIMEOUT
    assert_torn_down(marker, djob, nodes, job)


@pytest.mark.timeout(150)
def test_scancel_signal_term_of_the_template_tears_down_every_node(slurm_cluster, tmp_path):
    # what the template tells users to run to stop a job early
    marker = new_marker()
    nodes = slurm_cluster.nodes[:2]
    app = tmp_path / "forever.py"
    app.write_text(FOREVER)
    state, job, text, djob = run_template_until_stopped(
        marker, app, tmp_path, nodes, ["--time=3"], stop=lambda job: scancel(job, signal="TERM")
    )
    assert_ended_by_dragon(state, job, text)
    assert_torn_down(marker, djob, nodes, job)


# ------------------------------------------------------------------------------------------------ 3. node
# identity
@pytest.mark.timeout(120)
def test_node_names_are_slurms(slurm_cluster, tmp_path):
    marker = new_marker()
    app = tmp_path / "ident.py"
    app.write_text(IDENT)
    res = srun([*dragon_launch_cmd(), app], nodes=2, timeout=110, env={"DRAGON_TEST_MARKER": marker})
    assert res.returncode == 0, res.stdout + res.stderr
    head = json.loads(res.stdout.split("HEAD ", 1)[1].splitlines()[0])
    idents = {}
    for line in res.stdout.splitlines():
        if "IDENT " in line:
            d = json.loads(line.split("IDENT ", 1)[1])
            idents[d["k"]] = d
    # Slurm's own order of the allocation's nodes (SLURM_NODEID i is the i-th of them)
    order = subprocess.run(
        ["scontrol", "show", "hostnames", head["nodelist"]],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout.split()
    assert order == slurm_cluster.nodes[:2], order
    assert head["nodes"] == [0, 1], head
    assert head["hosts"] == order, head  # node.query(k).hostname is the Slurm node name of SLURM_NODEID k
    # the program runs on node 0
    assert (head["SLURMD_NODENAME"], head["SLURM_NODEID"]) == (order[0], "0"), head
    assert sorted(idents) == [0, 1], res.stdout
    for k in (0, 1):
        d = idents[k]
        assert head["descs"][k] == {"node": k, "query_node": k}, head
        assert d["desc_node"] == k and d["DRAGON_NODE"] == str(k), d
        assert d["SLURMD_NODENAME"] == d["host"] == order[k], d
        # node.query(k).hostname is the SLURMD_NODENAME that node k's own processes see
        assert head["hosts"][k] == d["SLURMD_NODENAME"], (head, d)
        assert d["SLURM_NODEID"] == str(k), d
        assert f"[id{k}@{k}] IDENT" in res.stdout, res.stdout  # the forwarded output's label names the node
    assert wait_no_marker(marker, timeout=20) == []


# ------------------------------------------------------------------------------------------------ 4. layout
@pytest.mark.timeout(90)
def test_srun_without_mpi_wiring_is_refused_at_once(slurm_cluster, tmp_path):
    marker = new_marker()
    app = tmp_path / "ran.py"
    app.write_text("print('RAN', flush=True)\n")
    t0 = time.monotonic()
    res = srun(
        [*dragon_launch_cmd(), app],
        nodes=2,
        timeout=80,
        env={"DRAGON_TEST_MARKER": marker},
        extra=("--mpi=none",),
    )
    took = time.monotonic() - t0
    assert res.returncode == 2, res.stdout + res.stderr
    assert "RAN" not in res.stdout, res.stdout
    # both tasks say why and what to do
    why = "srun started 2 tasks, but MPI shows each of them a world of 1 rank"
    assert res.stderr.count(why) == 2, res.stderr
    assert "--mpi=pmi2" in res.stderr and "--ntasks-per-node=1" in res.stderr, res.stderr
    assert wait_no_marker(marker, timeout=20) == []
    # what the launcher supports is in its --help
    helptext = subprocess.run(
        [*dragon_launch_cmd(), "--help"], check=False, capture_output=True, text=True, timeout=30
    ).stdout
    assert "srun -N NODES --ntasks-per-node=1 dragon-launch app.py" in helptext
    assert "--mpi=none" in helptext and "exit status 2" in helptext
    assert took < 60  # "at once": well under the srun timeout (no hang until a time limit)


@pytest.mark.timeout(120)
def test_two_tasks_per_node_still_run_one_runtime_once(slurm_cluster, tmp_path):
    # the supported extra layout (see --help): extra ranks on a node only wait; the program runs once, 2 nodes
    marker = new_marker()
    app = tmp_path / "nodes.py"
    app.write_text(
        "import os\nfrom dragon.globalservices import node\n"
        "print('RAN on', os.environ['SLURMD_NODENAME'], 'nodes', node.get_list(),"
        " [node.query(k).hostname for k in node.get_list()], flush=True)\n"
    )
    res = srun(
        [*dragon_launch_cmd(), app],
        nodes=2,
        ntasks_per_node=2,
        timeout=110,
        env={"DRAGON_TEST_MARKER": marker},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    nodes = slurm_cluster.nodes[:2]
    assert res.stdout.count("RAN on") == 1, res.stdout
    assert f"RAN on {nodes[0]} nodes [0, 1] {nodes!r}" in res.stdout, res.stdout
    assert wait_no_marker(marker, timeout=20) == []
