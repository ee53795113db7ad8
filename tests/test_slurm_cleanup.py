"""launcher/cleanup.py as the Slurm epilog runs it (`python3 -I launcher/cleanup.py --slurm-job ID`), without
a cluster: which processes it kills and which segments it unlinks, and, as important, which it leaves alone
(another Slurm job whose id starts with the same digits, a job outside Slurm, MPI segments still mapped, held
open, just made or owned by someone else). The segments live in a private directory of /dev/shm (tmpfs, like
the real one), so no real segment of anything running on this machine is touched; the processes are real."""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLEANUP = REPO / "launcher" / "cleanup.py"
SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def shm():
    """A private directory on /dev/shm's tmpfs, removed afterwards."""
    d = Path("/dev/shm") / f"cleanuptest-{os.getpid()}-{random.getrandbits(32):08x}"
    d.mkdir()
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.fixture
def procs():
    """Start helper processes; all are killed at the end, whatever the test did."""
    started = []

    def start(code, env=None, **kw):
        p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, **(env or {})), **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def fake_slurm_job():
    return str(random.randint(10**8, 10**9))  # far above the test cluster's ids


def run_cleanup(*args, timeout=60):
    # -I: no site-packages, no PYTHONPATH: what an epilog with a bare python3 has
    return subprocess.run(
        [sys.executable, "-I", str(CLEANUP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def reported(stdout):
    m = re.search(r"killed \[([0-9, ]*)\] removed \[(.*?)\]", stdout)
    assert m, stdout
    killed = {int(x) for x in m.group(1).replace(",", " ").split()}
    removed = set(re.findall(r"'([^']+)'", m.group(2)))
    return killed, removed


def wait_dead(p, timeout=10):
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.timeout(60)
def test_removes_the_jobs_processes_and_segments_and_nothing_else(shm, procs):
    sid = fake_slurm_job()
    mine = [
        f"dragon-s{sid}_j0123456789n0-inf",
        f"dragon-s{sid}_j0123456789n0-m3",
        f"dragon-s{sid}_jabcdef0123-m1",
    ]
    others = [f"dragon-s{sid}1_j0123456789n0-inf", "dragon-j0123456789-inf", f"mpich_shm_{sid}_0", "x"]
    for n in mine + others:
        (shm / n).write_bytes(b"\0" * 4096)
    ours = procs(SLEEPER, {"DRAGON_JOB": f"s{sid}_j0123456789n1"})
    deaf = procs(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)",
        {"DRAGON_JOB": f"s{sid}_jabcdef0123"},
        start_new_session=True,  # like a managed process that left the step's process group
    )
    other_job = procs(SLEEPER, {"DRAGON_JOB": f"s{sid}1_j0123456789n0"})
    not_dragon = procs(SLEEPER, {"SLURM_JOB_ID": sid})  # the job's, but not dragon's: Slurm's business
    time.sleep(0.5)  # let the children exec (their environment is read from /proc)
    res = run_cleanup("--slurm-job", sid, "--shm", str(shm))
    assert res.returncode == 0, res.stderr
    assert f"dragon-cleanup: slurm job {sid} on " in res.stdout, res.stdout
    killed, removed = reported(res.stdout)
    assert killed == {ours.pid, deaf.pid}, res.stdout
    assert wait_dead(ours) == -signal.SIGKILL and wait_dead(deaf) == -signal.SIGKILL
    assert other_job.poll() is None and not_dragon.poll() is None
    assert removed == set(mine), res.stdout
    assert sorted(p.name for p in shm.iterdir()) == sorted(others)
    # a second run finds nothing and still exits 0 (the epilog may run again)
    res = run_cleanup("--slurm-job", sid, "--shm", str(shm))
    assert res.returncode == 0 and reported(res.stdout) == (set(), set()), res.stdout


@pytest.mark.timeout(60)
def test_mpi_segments_go_only_when_nobody_uses_them(shm, procs):
    sid = fake_slurm_job()
    uid = os.getuid()
    names = {k: f"mpich_shm_{sid}_{k}" for k in ("unused", "mapped", "open", "other_user")}
    names["other_name"] = f"ompi_{sid}"  # not MPICH's: never touched
    for n in names.values():
        (shm / n).write_bytes(b"\1" * 8192)
    if uid == 0:
        os.chown(shm / names["other_user"], 65534, 65534)
    mapper = procs(
        "import mmap, os, sys, time\n"
        f"fd = os.open({str(shm / names['mapped'])!r}, os.O_RDWR)\n"
        "m = mmap.mmap(fd, 8192)\nos.close(fd)\nprint('ready', flush=True)\ntime.sleep(120)\n",
        stdout=subprocess.PIPE,
    )
    holder = procs(
        f"import os, time\nfd = os.open({str(shm / names['open'])!r}, os.O_RDONLY)\n"
        "print('ready', flush=True)\ntime.sleep(120)\n",
        stdout=subprocess.PIPE,
    )
    # the mapping process closed its descriptor: only its mapping protects that segment
    assert mapper.stdout.readline().strip() == b"ready" and holder.stdout.readline().strip() == b"ready"
    mpi = ("--slurm-job", sid, "--shm", str(shm), "--mpi-uid", str(uid))
    # without --mpi-uid the MPI segments are not touched at all
    res = run_cleanup("--slurm-job", sid, "--shm", str(shm), "--min-age", "0")
    assert res.returncode == 0 and reported(res.stdout) == (set(), set()), res.stdout
    # younger than --min-age: kept (a segment just made, not mapped yet by its maker)
    res = run_cleanup(*mpi, "--min-age", "3600")
    assert res.returncode == 0 and reported(res.stdout) == (set(), set()), res.stdout
    time.sleep(1.2)
    res = run_cleanup(*mpi, "--min-age", "1")
    assert res.returncode == 0, res.stderr
    # as root, another user's segment is kept; without root it is this user's own, and unused
    expect = {names["unused"]} if uid == 0 else {names["unused"], names["other_user"]}
    assert reported(res.stdout)[1] == expect, res.stdout
    assert mapper.poll() is None and holder.poll() is None  # MPI users are never killed
    # once nobody maps it any more, it goes too
    mapper.kill()
    mapper.wait(timeout=10)
    res = run_cleanup(*mpi, "--min-age", "1")
    assert reported(res.stdout)[1] == {names["mapped"]}, res.stdout
    left = {names["open"], names["other_name"]} | ({names["other_user"]} if uid == 0 else set())
    assert {p.name for p in shm.iterdir()} == left
    # an unused segment younger than --min-age (a job that failed within a second) is waited for, then removed
    (shm / f"mpich_shm_{sid}_fresh").write_bytes(b"\1" * 4096)
    res = run_cleanup(*mpi, "--min-age", "1")
    assert reported(res.stdout)[1] == {f"mpich_shm_{sid}_fresh"}, res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [[], ["--slurm-job", "12a"], ["--slurm-job", ""], ["--slurm-job", "-3"]])
def test_bad_arguments_are_refused(bad):
    res = run_cleanup(*bad)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "usage: dragon-cleanup" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_launcher_helpers_still_importable():
    from launcher import cleanup
    from launcher.cleanup import job_pids

    assert cleanup.children() == cleanup.children(os.getpid())
    assert job_pids("no-such-job-" + fake_slurm_job()) == []
    with pytest.raises(AttributeError):
        cleanup.no_such_thing  # noqa: B018


def fnv1a(text):
    h = 2166136261
    for b in text.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return f"{h:x}"


@pytest.mark.timeout(60)
def test_mpich_segments_of_the_jobs_steps_are_found_by_name(shm, procs):
    # MPICH names its segments after a hash of the PMI space, which Slurm's PMI-2 calls <job>.<step>: the
    # epilog finds a job's own segments without --mpi-uid and without waiting for them to age
    sid = fake_slurm_job()
    assert fnv1a("9.0") == "e200f4fa"  # seen on the test cluster: job 9, step 0 made mpich_shm_e200f4fa_0
    step0, step3 = f"mpich_shm_{fnv1a(sid + '.0')}_0", f"mpich_vci_{fnv1a(sid + '.3')}_1"
    mapped = f"mpich_shm_{fnv1a(sid + '.1')}_0"
    other_job = f"mpich_shm_{fnv1a(sid + '1.0')}_0"
    for n in (step0, step3, mapped, other_job):
        (shm / n).write_bytes(b"\1" * 4096)
    mapper = procs(
        f"import mmap, os, time\nfd = os.open({str(shm / mapped)!r}, os.O_RDWR)\n"
        "m = mmap.mmap(fd, 4096)\nprint('ready', flush=True)\ntime.sleep(120)\n",
        stdout=subprocess.PIPE,
    )
    assert mapper.stdout.readline().strip() == b"ready"
    res = run_cleanup("--slurm-job", sid, "--shm", str(shm))
    assert res.returncode == 0, res.stderr
    assert reported(res.stdout)[1] == {step0, step3}, res.stdout
    assert {p.name for p in shm.iterdir()} == {mapped, other_job}


@pytest.mark.timeout(60)
def test_stale_removes_only_segments_of_slurm_jobs_nobody_belongs_to(shm, procs):
    # for a launcher at start on a node without the epilog: segments of Slurm jobs that are over on this
    # machine
    running, over, mapped_job = fake_slurm_job(), fake_slurm_job(), fake_slurm_job()
    names = {
        "running": f"dragon-s{running}_j0123456789n0-inf",
        "over": f"dragon-s{over}_j0123456789n1-m3",
        "mapped": f"dragon-s{mapped_job}_jabcdef0123n0-inf",
        "no_slurm": "dragon-j0123456789-inf",
        "not_dragon": f"mpich_shm_{over}_0",
    }
    for n in names.values():
        (shm / n).write_bytes(b"\0" * 4096)
    task = procs(SLEEPER, {"SLURM_JOB_ID": running})  # a task of a running job: its segments stay
    # a process that maps a segment, without SLURM_JOB_ID (e.g. given an environment of its own)
    mapper = procs(
        f"import mmap, os, time\nfd = os.open({str(shm / names['mapped'])!r}, os.O_RDWR)\n"
        "m = mmap.mmap(fd, 4096)\nprint('ready', flush=True)\ntime.sleep(120)\n",
        stdout=subprocess.PIPE,
    )
    assert mapper.stdout.readline().strip() == b"ready"
    time.sleep(0.3)
    res = run_cleanup("--stale", "--shm", str(shm))
    assert res.returncode == 0, res.stderr
    assert f"removed ['{names['over']}']" in res.stdout, res.stdout
    assert {p.name for p in shm.iterdir()} == set(names.values()) - {names["over"]}
    # once the job's last task is gone, its segments are stale too
    task.kill()
    task.wait(timeout=10)
    res = run_cleanup("--stale", "--shm", str(shm))
    assert f"removed ['{names['running']}']" in res.stdout, res.stdout
    assert mapper.poll() is None
