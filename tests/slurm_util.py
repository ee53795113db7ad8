"""Helpers for tests that run real jobs on the test cluster of slurm/start-cluster.sh.

Import what you need in a test module (tests/ is on sys.path under pytest):

    from slurm_util import slurm_cluster, srun, sbatch, wait_job, wait_for_file, pids_with_marker

    pytestmark = pytest.mark.slurm

    def test_something(slurm_cluster, tmp_path):
        res = srun([sys.executable, "-c", "print(1)"], nodes=2)
        assert res.returncode == 0, res.stderr

The cluster: nodes node1..nodeN (`slurm_cluster.nodes`), each slurmd in its own network, UTS and mount
namespace: its own hostname, its own address, its own /dev/shm (see `node_shm`).  The file system outside
/dev/shm is shared, so `tmp_path` works for scripts and output files.  All nodes share this machine's pid
namespace, so a task's pid can be checked from the test process (`pid_alive`, `pids_with_marker`).

When is a Slurm test skipped?  Only outside CI (CI unset) and outside `tools/test-all.sh` (which sets
DRAGON_REQUIRE_SLURM=1), when `sinfo` is not installed or no cluster answers.  With CI=true or
DRAGON_REQUIRE_SLURM=1 a missing cluster fails the test instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BASE = Path(os.environ.get("DRAGON_SLURM_BASE", "/tmp/dragon-slurm"))
REPO = Path(__file__).resolve().parent.parent
START_HINT = f"start it with: bash {REPO / 'slurm' / 'start-cluster.sh'} (as root)"


def slurm_required() -> bool:
    """True when a missing cluster must fail the test rather than skip it (CI, or the README's test
    command)."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return ci or os.environ.get("DRAGON_REQUIRE_SLURM", "") == "1"


def _probe() -> tuple[list[str], str]:
    """(node names, "") when a cluster answers, else ([], why not)."""
    if shutil.which("sinfo") is None:
        return [], "Slurm is not installed (no sinfo on PATH); " + START_HINT
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], check=False, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return [], "sinfo did not answer within 20 s; " + START_HINT
    if out.returncode != 0:
        return [], f"sinfo failed ({out.stderr.strip()}); " + START_HINT
    nodes = sorted({line.split()[0] for line in out.stdout.splitlines() if line.strip()})
    if len(nodes) < 2:
        return [], f"the cluster has {len(nodes)} node(s), the tests need 2; " + START_HINT
    return nodes, ""


def require_slurm() -> list[str]:
    """Return the node names, or skip (outside CI) / fail (CI) with the reason."""
    nodes, why = _probe()
    if not nodes:
        if slurm_required():
            pytest.fail("Slurm cluster required here but not usable: " + why, pytrace=False)
        pytest.skip(why)
    return nodes


@dataclass
class Cluster:
    nodes: list[str]
    base: Path = BASE
    slurmd_pids: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    """The running test cluster (skips or fails per `require_slurm`)."""
    nodes = require_slurm()
    pids = {}
    for n in nodes:
        try:
            pids[n] = int((BASE / "run" / f"slurmd-{n}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return Cluster(nodes=nodes, slurmd_pids=pids)


# ------------------------------------------------------------------------------------------------ running
# jobs
def srun(
    argv,
    *,
    nodes: int = 2,
    ntasks_per_node: int = 1,
    time_limit: str = "5",
    timeout: float = 120,
    env: dict | None = None,
    cwd=None,
    extra=(),
) -> subprocess.CompletedProcess:
    """Run `srun -N nodes --ntasks-per-node=k [extra] argv` and return the finished process (text output).

    `time_limit` is Slurm's --time (minutes, or "M:SS"; Slurm rounds up to whole minutes).  `env` adds
    variables to this process's environment (srun exports the whole environment to the tasks)."""
    cmd = [
        "srun",
        "-N",
        str(nodes),
        f"--ntasks-per-node={ntasks_per_node}",
        f"--time={time_limit}",
        *extra,
        *[str(a) for a in argv],
    ]
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )


def dragon_launch_cmd() -> list[str]:
    """The command that starts dragon-launch: the console script if it is on PATH, else `python -m
    launcher.launch`."""
    exe = shutil.which("dragon-launch")
    return [exe] if exe else [sys.executable, "-m", "launcher.launch"]


def srun_dragon(app, *args, nodes: int = 2, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`srun -N nodes --ntasks-per-node=1 dragon-launch app args...` (keyword arguments as for `srun`)."""
    return srun([*dragon_launch_cmd(), app, *args], nodes=nodes, ntasks_per_node=1, timeout=timeout, **kw)


@dataclass
class Job:
    id: int
    output: Path


def sbatch(
    script,
    *,
    workdir,
    nodes: int | None = 2,
    time_limit: str | None = "5",
    output: str | None = "slurm-%j.out",
    env: dict | None = None,
    extra=(),
) -> Job:
    """Submit a batch script (a Path, or the script's text) and return Job(id, output file path).

    `nodes`, `time_limit` and `output` become -N, --time and --output; pass None to leave one to the script's
    own #SBATCH lines.  A relative output path is relative to `workdir`, where the job runs."""
    workdir = Path(workdir)
    if not isinstance(script, Path):
        text = str(script)
        if not text.startswith("#!"):
            text = "#!/bin/bash\n" + text
        script = workdir / f"job-{uuid.uuid4().hex[:8]}.sh"
        script.write_text(text)
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}"]
    if nodes is not None:
        cmd.append(f"--nodes={nodes}")
    if time_limit is not None:
        cmd.append(f"--time={time_limit}")
    if output is not None:
        cmd.append(f"--output={output}")
    cmd += [*extra, str(script)]
    res = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=30, env=dict(os.environ, **(env or {}))
    )
    if res.returncode != 0:
        raise RuntimeError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
    job_id = int(res.stdout.strip().split(";")[0])
    out = output.replace("%j", str(job_id)) if output is not None else job_info(job_id).get("StdOut", "")
    out_path = Path(out)
    if not out_path.is_absolute():
        out_path = workdir / out_path
    return Job(job_id, out_path)


def job_info(job_id: int) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict ({} once Slurm has forgotten the job, MinJobAge=300 s after its
    end)."""
    res = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    if res.returncode != 0:
        return {}
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", res.stdout))


def job_state(job_id: int) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or GONE."""
    return job_info(job_id).get("JobState", "GONE")


FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "GONE",
}


def wait_job(job_id: int, timeout: float = 120) -> str:
    """Wait until the job has ended; return its final state.

    Raises TimeoutError (after scancel) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in FINAL_STATES:
            return state
        if time.monotonic() > deadline:
            scancel(job_id)
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s (cancelled it)")
        time.sleep(0.3)


def wait_state(job_id: int, states, timeout: float = 60) -> str:
    """Wait until the job is in one of `states` (or has ended); return the state seen."""
    states = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in states or state in FINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout} s, wanted {sorted(states)}")
        time.sleep(0.2)


def scancel(job_id: int, signal: str | None = None) -> None:
    cmd = ["scancel", *([f"--signal={signal}"] if signal else []), str(job_id)]
    subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=20)


def wait_for_file(path, timeout: float = 60, contains: str | None = None, lines: int | None = None) -> str:
    """Wait until `path` exists (and holds `contains`, or at least `lines` lines); return its text."""
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        if (
            text is not None
            and (contains is None or contains in text)
            and (lines is None or len(text.splitlines()) >= lines)
        ):
            return text
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: not there (or incomplete) after {timeout} s; now: {text!r}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ inspecting
# nodes
def new_marker() -> str:
    """A unique value for DRAGON_TEST_MARKER: pass it in a job's env, then find every process of that job."""
    return "dragon-test-" + uuid.uuid4().hex[:12]


def pids_with_marker(marker: str) -> list[int]:
    """Pids (any node: they share this machine's pid namespace) whose environment or command line holds
    `marker`."""
    needle = marker.encode()
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            data = b""
            for name in ("cmdline", "environ"):
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    data += f.read()
        except (OSError, IndexError):
            continue
        if needle in data:
            found.append(int(entry))
    return found


def wait_no_marker(marker: str, timeout: float = 30) -> list[int]:
    """Wait until no process carries `marker`; return the survivors (empty list = all gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = pids_with_marker(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def kill_listed(path: Path) -> None:
    """SIGKILL the processes whose pids the file lists, one a line (a test app's orphans; the test cluster's
    nodes share this machine's pid namespace), and empty the file."""
    if path.exists():
        for line in path.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        path.write_text("")


def node_exec(node: str, argv, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run argv on the host but inside `node`'s namespaces (its network, hostname, /dev/shm), without
    Slurm."""
    pid = int((BASE / "run" / f"slurmd-{node}.pid").read_text().split()[0])
    cmd = ["nsenter", "-t", str(pid), "-n", "-m", "-u", "--", *[str(a) for a in argv]]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def node_shm(node: str) -> list[str]:
    """Names in `node`'s own /dev/shm (each node has a private one)."""
    res = node_exec(node, ["ls", "-A", "/dev/shm"])
    if res.returncode != 0:
        raise RuntimeError(f"cannot list /dev/shm of {node}: {res.stderr.strip()}")
    return sorted(res.stdout.split())


def mpich_world_id(kvsname: str) -> str:
    """The W of MPICH's mpich_shm_<W>_<node>: 32-bit FNV-1a of the PMI space name (Slurm PMI-2:
    <job>.<step>)."""
    h = 2166136261
    for b in kvsname.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return f"{h:x}"


def running_jobs_segment_test():
    """A predicate: is this /dev/shm name a segment of a job that is RUNNING right now (dragon-s<job>_*, or
    MPICH's of one of its first 20 steps)?  Other sessions share the test cluster: their jobs' segments come
    and go while a test runs and are not the test's leaks.  A finished job's segments (state COMPLETING
    included) still count."""
    res = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-o", "%A"], check=False, capture_output=True, text=True, timeout=20
    )
    jobs = {j for j in res.stdout.split() if j.isdigit()} if res.returncode == 0 else set()
    worlds = {mpich_world_id(f"{j}.{step}") for j in jobs for step in range(20)}

    def other(name: str) -> bool:
        m = re.match(r"dragon-s(\d+)_", name)
        if m:
            return m.group(1) in jobs
        m = re.match(r"mpich_(?:shm|vci)_([0-9a-f]+)_\d+$", name)
        return bool(m) and m.group(1) in worlds

    return other


# the pytest marks of a module whose tests run dragon on the cluster's nodes: their own /dev/shm are checked
# (by no_leaked_node_segments), not this host's, which other programs may use
ON_NODES = [
    pytest.mark.slurm,
    pytest.mark.mpi,
    pytest.mark.allow_leaks,
    pytest.mark.usefixtures("no_leaked_node_segments"),
]


@pytest.fixture
def no_leaked_node_segments(slurm_cluster, request):
    """Fail a test that leaves a new entry in any node's own /dev/shm (tests/conftest.py checks only this
    host's).

    Use it with `pytest.mark.allow_leaks` when the test itself creates nothing in the host's /dev/shm: then
    other programs on a shared machine creating segments during a long Slurm test cannot fail it. A test that
    SIGKILLs an MPI rank marks itself `mpi_leftovers_ok`: the MPI library's own segments (mpich_shm_*) of the
    killed rank may outlive the step (dragon unlinks them when its shepherd outlives the rank, but Slurm may
    end the step first); they must still be gone once the job's epilog (slurm/dragon-epilog.sh, which removes
    a job's MPICH segments) has run, so they get up to 30 s instead of 5; dragon's own segments get 5 s as
    always.  Segments of jobs that are RUNNING when the test ends (other sessions share the cluster) are not
    counted (`running_jobs_segment_test`)."""
    before = {n: set(node_shm(n)) for n in slurm_cluster.nodes}
    yield
    mpi_wait = 30.0 if request.node.get_closest_marker("mpi_leftovers_ok") else 5.0
    start = time.monotonic()
    while True:
        other = running_jobs_segment_test()
        new = {
            n: sorted(x for x in set(node_shm(n)) - before[n] if not other(x)) for n in slurm_cluster.nodes
        }
        new = {n: names for n, names in new.items() if names}
        waited = time.monotonic() - start
        mpi_only = all(x.startswith("mpich_") for names in new.values() for x in names)
        if not new or waited > (mpi_wait if mpi_only else 5.0):
            break
        time.sleep(0.1)
    if new:
        for n, names in new.items():  # do not let one leak fail every later test
            node_exec(n, ["rm", "-f", *[f"/dev/shm/{name}" for name in names]])
        pytest.fail(f"test left shared-memory segments behind on the nodes: {new}")


# ------------------------------------------------------------------------------------------------ the epilog
EPILOG_LOG = BASE / "log" / "epilog.log"  # start-cluster.sh's epilog (slurm/dragon-epilog.sh) appends here


def epilog_lines(job_id: int) -> dict[str, str]:
    """{node: the epilog's line} for Slurm job job_id, from every node whose epilog has run for it."""
    try:
        text = EPILOG_LOG.read_text()
    except FileNotFoundError:
        return {}
    found = {}
    for line in text.splitlines():
        m = re.match(rf"dragon-cleanup: slurm job {job_id} on (\S+): ", line)
        if m:
            found[m.group(1)] = line
    return found


def wait_epilog(job_id: int, nodes, timeout: float = 60) -> dict[str, str]:
    """Wait until the epilog has run for job_id on every node in nodes; return {node: line}.

    Raises TimeoutError (the cluster must run slurm/dragon-epilog.sh: restart it with slurm/start-cluster.sh
    if it predates that)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = epilog_lines(job_id)
        if all(n in lines for n in nodes):
            return {n: lines[n] for n in nodes}
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no epilog line for job {job_id} on {sorted(set(nodes) - set(lines))} after {timeout} s in "
                f"{EPILOG_LOG} (is Epilog= set? `scontrol show config | grep -i epilog`)"
            )
        time.sleep(0.2)


def epilog_did(line: str) -> tuple[list[int], list[str]]:
    """(pids killed, names removed) from one epilog line."""
    m = re.search(r"killed \[([0-9, ]*)\] removed \[(.*?)\]", line)
    if not m:
        raise ValueError(f"not an epilog line: {line!r}")
    return [int(x) for x in m.group(1).replace(",", " ").split()], re.findall(r"'([^']+)'", m.group(2))
