"""Ending an sbatch job of dragon the hard ways, on the real test cluster: a plain `scancel JOBID`, the job's
hard time limit (no --signal warning), and every dragon process SIGKILLed at once (dragon gets no time at all;
to Slurm, `scancel --signal=KILL` is a plain scancel, so the test kills them itself). Afterwards no process of
the job and no segment (dragon's or MPICH's) may be left on either node. In the first two cases dragon's own
teardown on Slurm's SIGTERM does it within KillWait (the epilog finds nothing); in the last the epilog
(slurm/dragon-epilog.sh, which start-cluster.sh configures) does, also for a process of the job outside
Slurm's process tracking. slurm/README.md has the facts these tests rest on.

Every test checks both nodes' own /dev/shm for any new entry (fixture `no_leaked_node_segments`, MPICH's
segments included) and every process carrying the job's unique marker, after the epilog has run on both
nodes."""

import os
import re
import signal
import subprocess
import sys

import pytest
from slurm_util import (
    ON_NODES,
    epilog_did,
    new_marker,
    no_leaked_node_segments,
    pid_alive,
    pids_with_marker,
    scancel,
    slurm_cluster,
    wait_epilog,
    wait_for_file,
    wait_job,
    wait_no_marker,
    wait_state,
)
from test_slurm_dragon import (
    FOREVER,
    TEMPLATE,
    job_processes,
    ready_line,
    segments_of,
    started_everywhere,
    submit,
)

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = ON_NODES

# A process of the job that Slurm does not track (what proctrack/linuxproc loses: re-parented to init): it has
# the job's DRAGON_JOB and maps one of the job's segments on its node.
STRAY = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 0)
os.close(fd)
print("stray ready", flush=True)
time.sleep(600)
"""


def hard_template(tmp_path):
    """The users' template without its --signal warning: the time limit then hits dragon unannounced."""
    lines = TEMPLATE.read_text().splitlines(keepends=True)
    kept = [x for x in lines if not x.startswith("#SBATCH --signal")]
    assert len(kept) == len(lines) - 1, "the template has no --signal line any more: update this test"
    path = tmp_path / "hard.sbatch"
    path.write_text("".join(kept))
    return path


def start(tmp_path, marker, nodes, script, time_limit):
    """sbatch script running FOREVER; -> (job, output path, dragon job) once it runs on both nodes."""
    app = tmp_path / "forever.py"
    app.write_text(FOREVER)
    job, out = submit(
        script, app, workdir=tmp_path, env={"DRAGON_TEST_MARKER": marker}, extra=[f"--time={time_limit}"]
    )
    try:
        assert wait_state(job, "RUNNING", timeout=90) == "RUNNING", job
        _, djob = ready_line(wait_for_file(out, timeout=60, contains="ready:"))
        started_everywhere(marker, djob, nodes)
    except BaseException:
        scancel(job)
        raise
    return job, out, djob


def assert_nothing_left(job, marker, djob, nodes, by_dragon=False):
    """After the epilog ran on both nodes: no process with the marker, no segment of any dragon job of this
    Slurm job on either node (MPICH's: the fixture); by_dragon: and the epilog found nothing to do (dragon's
    own teardown on Slurm's SIGTERM finished within KillWait). -> {node: epilog line}."""
    lines = wait_epilog(job, nodes, timeout=60)
    left = wait_no_marker(marker, timeout=10)
    assert not left, f"processes of the job survived: {job_processes(marker)}; epilog: {lines}"
    segs = segments_of(djob, nodes)
    assert not any(segs.values()), (segs, lines)
    if by_dragon:
        assert all(epilog_did(line) == ([], []) for line in lines.values()), lines
    return lines


@pytest.mark.timeout(200)
def test_plain_scancel_of_an_sbatch_job_leaves_nothing_on_any_node(slurm_cluster, tmp_path):
    # scancel JOBID: SIGTERM to every process of the job (srun, the launchers, dragon's services, the managed
    # processes) at once, SIGKILL KillWait (10 s) later
    marker, nodes = new_marker(), slurm_cluster.nodes[:2]
    job, out, djob = start(tmp_path, marker, nodes, TEMPLATE, 5)
    try:
        scancel(job)
        state = wait_job(job, timeout=90)
    finally:
        scancel(job)
    assert state == "CANCELLED", (state, out.read_text())
    text = out.read_text()
    assert "Traceback" not in text, text
    assert_nothing_left(job, marker, djob, nodes, by_dragon=True)


@pytest.mark.timeout(240)
def test_hard_time_limit_of_an_sbatch_job_leaves_nothing_on_any_node(slurm_cluster, tmp_path):
    # --time=1 and no --signal: Slurm's smallest limit, checked every ~30 s, so the job ends 60-90 s after its
    # start
    marker, nodes = new_marker(), slurm_cluster.nodes[:2]
    job, out, djob = start(tmp_path, marker, nodes, hard_template(tmp_path), 1)
    try:
        state = wait_job(job, timeout=180)
    finally:
        scancel(job)
    text = out.read_text()
    assert state == "TIMEOUT", (state, text)
    assert "DUE TO TIME LIMIT" in text and "Traceback" not in text, text
    assert_nothing_left(job, marker, djob, nodes, by_dragon=True)


def sigkill_dragon(marker, exclude=()):
    """SIGKILL, all at once, every process of the job's dragon runs (launchers, services, managed processes;
    not srun or the batch shell): what an OOM killer or a node's hard reset of the step does. -> the pids."""
    pids = []
    for pid in pids_with_marker(marker):
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"DRAGON_JOB=" in environ or b"dragon-launch" in cmdline or b"launcher." in cmdline:
            pids.append(pid)
    # stop them all first: a launcher SIGKILLed before its shepherd would otherwise give the shepherd time for
    # a teardown of its own (PR_SET_PDEATHSIG), which then SIGTERMs the job's processes, the stray included
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    return pids


@pytest.mark.timeout(200)
def test_sigkill_of_every_task_and_a_stray_are_cleaned_by_the_epilog(slurm_cluster, tmp_path):
    # every dragon process of the job SIGKILLed at once: dragon runs no teardown at all, so what is left on
    # the nodes (dragon's segments, MPICH's, a process of the job that Slurm does not track) is the epilog's.
    # (`scancel --signal=KILL` cannot do this: to Slurm it is a plain scancel, SIGTERM first.)
    marker, nodes = new_marker(), slurm_cluster.nodes[:2]
    job, out, djob = start(tmp_path, marker, nodes, TEMPLATE, 5)
    stray = None
    try:
        base = re.sub(r"n\d+$", "", djob)
        seg = min(segments_of(djob, nodes)[nodes[1]])
        stray = subprocess.Popen(
            [
                "nsenter",
                "-t",
                str(slurm_cluster.slurmd_pids[nodes[1]]),
                "-m",
                "-u",
                "-n",
                "--",
                sys.executable,
                "-c",
                STRAY,
                f"/dev/shm/{seg}",
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, DRAGON_JOB=f"{base}n1", DRAGON_TEST_MARKER=marker),
            start_new_session=True,
        )
        assert stray.stdout.readline().strip() == "stray ready"
        killed_tasks = sigkill_dragon(marker, exclude={stray.pid})
        assert len(killed_tasks) >= 6, killed_tasks  # 2 launchers, their services, 2 sleepers, the program
        state = wait_job(job, timeout=90)
        lines = assert_nothing_left(job, marker, djob, nodes)
    finally:
        scancel(job)
        if stray is not None and stray.poll() is None:
            stray.kill()
        if stray is not None:
            stray.wait(timeout=10)
    assert state in ("FAILED", "CANCELLED"), (state, out.read_text())
    assert stray.returncode == -9 and not pid_alive(stray.pid)
    # the stray runs in node 2's namespaces, but the test nodes share one pid namespace: whichever node's
    # epilog runs first finds it by its DRAGON_JOB (on a real cluster only node 2's could)
    killed = [pid for n in nodes for pid in epilog_did(lines[n])[0]]
    assert stray.pid in killed, lines
    for k, n in enumerate(nodes):
        # dragon had no time: its segments on each node were the epilog's to remove
        _, removed = epilog_did(lines[n])
        assert any(r.startswith(f"dragon-{base}n{k}-") for r in removed), lines
