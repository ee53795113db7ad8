"""Clean-up of what a job leaves behind.

1. The launcher's helpers ``children``, ``job_pids`` and ``kill_all`` (they live in
   dragon.infrastructure.jobprocs, shared with the shepherd, and are imported from there on first use).

2. The clean-up that outlives a Slurm job, for a Slurm epilog (slurm/dragon-epilog.sh) on every node of the
   job:

       python3 -m launcher.cleanup --slurm-job ID
       python3 /path/to/launcher/cleanup.py --slurm-job ID      # the same, without the package on sys.path

   Why it is needed: at ``scancel ID`` and at the time limit Slurm sends SIGTERM to every process of the job
   at once and SIGKILL KillWait seconds later (slurm/README.md has the measured details). dragon's teardown on
   that SIGTERM normally finishes well within KillWait, but not always (an overloaded node, a short KillWait,
   every task SIGKILLed at once), and a process that left the step's process tree is never signalled by
   Slurm's proctrack/linuxproc at all. The epilog runs on each node after Slurm has ended the job's processes
   it knows:

   - SIGKILLs every process whose environment has ``DRAGON_JOB=s<ID>_...`` (a dragon job started inside Slurm
     job ID; see ``dragon.env.new_job_id``);
   - unlinks every ``/dev/shm/dragon-s<ID>_*`` segment (the pools and channels of every dragon job of Slurm
     job ID on this node; the ``_`` ends the id, so job 12 never matches job 123's segments);
   - unlinks the MPICH segments of the job's steps: MPICH names them ``mpich_shm_<W>_<node>`` (and
     ``mpich_vci_<W>_<node>``) with W the 32-bit FNV-1a hash of the PMI key-value space name, which Slurm's
     PMI-2 makes ``<job id>.<step id>``; so they are found by the job id alone (steps 0..9999), and removed
     when no live process maps or holds them;
   - with ``--mpi-uid UID`` (the epilog passes the job's user) also any other MPICH segment of that user that
     no live process maps or holds open and that is older than ``--min-age`` seconds (e.g. an mpiexec's inside
     the job, whose names carry no Slurm job id).

   It prints one line saying what it did (``dragon-cleanup: slurm job ID: killed [...] removed [...]``) and
   exits 0 unless an argument is wrong: a failing epilog would make Slurm drain the node.

3. ``--stale`` (or ``remove_stale_slurm_segments()``), for a launcher at start on a node whose site runs no
   such epilog: unlinks the ``dragon-s<ID>_*`` segments of Slurm jobs that no live process belongs to (none
   has ``SLURM_JOB_ID=<ID>``) and that no live process maps or holds open. Unprivileged, it can only unlink
   the caller's own files (/dev/shm is sticky).

This module imports only the standard library at load time, so an epilog can run it as a plain file with any
Python 3, even one that does not have dragon installed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time

__all__ = [  # and, imported from dragon on first use: children, job_pids, kill_all
    "clean_slurm_job",
    "main",
    "mpich_world_id",
    "orphaned_mpi_segments",
    "remove_stale_slurm_segments",
    "slurm_job_mpi_segments",
    "slurm_job_pids",
    "slurm_job_segments",
    "stale_slurm_segments",
    "unused_segments",
]

SHM = "/dev/shm"
MPI_PREFIXES = ("mpich_shm_", "mpich_vci_")  # MPICH's intranode segments
MAX_STEPS = 10000  # steps of a job whose MPICH segments are recognised by name


def __getattr__(name):  # the launcher's helpers, imported from dragon only when asked for
    if name in ("children", "job_pids", "kill_all"):
        from dragon.infrastructure import jobprocs

        return getattr(jobprocs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _slurm_prefix(slurm_job) -> str:
    sid = str(slurm_job)
    if not sid.isdigit():
        raise ValueError(f"a Slurm job id is a number, got {slurm_job!r}")
    return f"s{int(sid)}_"


def _pids():
    me = os.getpid()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            yield int(d)


def slurm_job_pids(slurm_job) -> list[int]:
    """Live processes (no zombies) whose environment has DRAGON_JOB=s<slurm_job>_... (any dragon job of
    it)."""
    needle = re.compile(rb"(?:^|\0)DRAGON_JOB=" + re.escape(_slurm_prefix(slurm_job).encode()))
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if needle.search(data):
            found.append(pid)
    return found


def slurm_job_segments(slurm_job, shm: str = SHM) -> list[str]:
    """Names in shm of the segments of every dragon job of Slurm job slurm_job (dragon-s<id>_*)."""
    prefix = "dragon-" + _slurm_prefix(slurm_job)
    try:
        return sorted(n for n in os.listdir(shm) if n.startswith(prefix))
    except OSError:
        return []


def _in_use(keys) -> set:
    """The (st_dev, st_ino) of keys that some live process maps or holds open."""
    keys = set(keys)
    used = set()
    devs = {f"{os.major(d):02x}:{os.minor(d):02x}": d for d, _ in keys}
    for pid in _pids():
        if not keys - used:
            break
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) >= 5 and parts[3] in devs:
                        key = (devs[parts[3]], int(parts[4]))
                        if key in keys:
                            used.add(key)
        except (OSError, ValueError):
            pass
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in keys:
                used.add((st.st_dev, st.st_ino))
    return used


def _mpi_unused(uid: int, shm: str) -> dict:
    """{name: age in seconds} of the MPI segments in shm owned by uid that no live process maps or holds
    open."""
    now = time.time()
    cands = {}
    try:
        names = os.listdir(shm)
    except OSError:
        return {}
    for n in names:
        if not n.startswith(MPI_PREFIXES):
            continue
        try:
            st = os.stat(os.path.join(shm, n), follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid:
            cands[(st.st_dev, st.st_ino)] = (n, now - max(st.st_mtime, st.st_ctime))
    used = _in_use(cands) if cands else set()
    return dict(v for k, v in cands.items() if k not in used)


def orphaned_mpi_segments(uid: int, min_age: float = 2.0, shm: str = SHM, wait: bool = False) -> list[str]:
    """MPI segments (mpich_shm_*) in shm owned by uid, unchanged for min_age seconds, that no live process
    maps or holds open (a segment just made may not be mapped yet by its maker). Processes are matched by
    device and inode, so another mount namespace's /dev/shm (another node of the test cluster) never counts.
    With wait, unused segments younger than min_age are waited for (if that takes at most 3 s) and looked at
    again: an epilog right after a job that failed within a second still removes what its MPI library left."""
    unused = _mpi_unused(uid, shm)
    young = [min_age - age for age in unused.values() if age < min_age]
    if wait and young and max(young) <= 3.0:
        time.sleep(max(young) + 0.05)
        unused = _mpi_unused(uid, shm)
    return sorted(n for n, age in unused.items() if age >= min_age)


def mpich_world_id(kvsname: str) -> str:
    """MPICH's world id of a PMI key-value space (32-bit FNV-1a, as hex): the W in mpich_shm_<W>_<node>."""
    h = 2166136261
    for b in kvsname.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return f"{h:x}"


def _matching(shm: str, pattern) -> dict:
    """{name: the pattern's first group} of the files in shm whose name matches pattern."""
    try:
        return {n: m.group(1) for n in os.listdir(shm) if (m := pattern.match(n))}
    except OSError:
        return {}


def unused_segments(shm: str, names) -> list[str]:
    """The names (files of shm) that no live process maps or holds open, sorted."""
    keys = {}
    for n in names:
        try:
            st = os.stat(os.path.join(shm, n), follow_symlinks=False)
        except OSError:
            continue
        keys[(st.st_dev, st.st_ino)] = n
    used = _in_use(keys) if keys else set()
    return sorted(n for k, n in keys.items() if k not in used)


def slurm_job_mpi_segments(slurm_job, shm: str = SHM) -> list[str]:
    """MPICH segments in shm made by a step of Slurm job slurm_job (PMI-2 names its space <job>.<step>) that
    no live process maps or holds open."""
    _slurm_prefix(slurm_job)
    found = _matching(shm, re.compile(r"(?:mpich_shm|mpich_vci)_([0-9a-f]+)_\d+$"))
    if not found:
        return []
    ours = {mpich_world_id(f"{int(slurm_job)}.{step}") for step in range(MAX_STEPS)}
    return unused_segments(shm, [n for n, w in found.items() if w in ours])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def clean_slurm_job(slurm_job, mpi_uid=None, min_age: float = 2.0, shm: str = SHM, wait: float = 5.0) -> dict:
    """Kill the dragon processes of Slurm job slurm_job on this node, then unlink its dragon segments and its
    steps' unused MPICH segments (and, with mpi_uid, that user's other orphaned MPICH segments). -> {"killed":
    [pids], "removed": [names], "left": [pids]}."""
    killed = slurm_job_pids(slurm_job)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait
    left = [p for p in killed if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    names = slurm_job_segments(slurm_job, shm) + slurm_job_mpi_segments(slurm_job, shm)
    if mpi_uid is not None:
        names += [n for n in orphaned_mpi_segments(int(mpi_uid), min_age, shm, wait=True) if n not in names]
    return {"killed": killed, "removed": _unlink(shm, names, say=True), "left": left}


def _unlink(shm: str, names, say: bool) -> list[str]:
    """Unlink shm/name for each name -> those removed (one already gone is skipped; another failure is printed
    when say, else skipped: a best-effort clean-up at start must stay quiet)."""
    removed = []
    for n in names:
        try:
            os.unlink(os.path.join(shm, n))
            removed.append(n)
        except FileNotFoundError:
            pass
        except OSError as e:
            if say:
                print(f"dragon-cleanup: cannot remove {shm}/{n}: {e}", file=sys.stderr)
    return removed


def _slurm_jobs_alive() -> set:
    """Slurm job ids that some live process (no zombie) of this machine has in its environment
    (SLURM_JOB_ID)."""
    pat = re.compile(rb"(?:^|\0)SLURM_JOB_ID=(\d+)(?:\0|$)")
    alive = set()
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                m = pat.search(f.read())
        except OSError:
            continue
        if m and _alive(pid):
            alive.add(m.group(1).decode())
    me = os.environ.get("SLURM_JOB_ID", "")
    if me.isdigit():
        alive.add(me)
    return alive


def stale_slurm_segments(shm: str = SHM) -> list[str]:
    """dragon segments of Slurm jobs that are over on this node: dragon-s<ID>_* where no live process has
    SLURM_JOB_ID=<ID> in its environment (every task of a running job has it, dragon's launchers included) and
    no live process maps or holds the segment. What an epilog would have removed, for sites without it. Only
    the owner can unlink a file of /dev/shm (sticky), so a user's clean-up never touches another user's
    segments."""
    cands = _matching(shm, re.compile(r"dragon-s(\d+)_"))
    if not cands:
        return []
    alive = _slurm_jobs_alive()
    return unused_segments(shm, [n for n, job in cands.items() if job not in alive])


def remove_stale_slurm_segments(shm: str = SHM) -> list[str]:
    """Unlink stale_slurm_segments() that this user may unlink; -> the names removed. Never raises (a launcher
    may call it at start, best effort)."""
    try:
        names = stale_slurm_segments(shm)
    except (OSError, ValueError):
        return []
    return _unlink(shm, names, say=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="dragon-cleanup",
        description="Remove what a Slurm job's dragon runs left on this node: kill processes whose "
        "DRAGON_JOB belongs to the job, unlink its /dev/shm/dragon-s<ID>_* segments and its steps' MPICH "
        "segments (and, with --mpi-uid, that user's other MPICH segments no process uses any more). Meant "
        "for a Slurm epilog (slurm/dragon-epilog.sh). Exit 0.",
    )
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--slurm-job", help="the Slurm job id (the epilog's $SLURM_JOB_ID)")
    what.add_argument(
        "--stale",
        action="store_true",
        help="instead: unlink the dragon-s<ID>_* segments of Slurm jobs no live process belongs to "
        "(no epilog)",
    )
    ap.add_argument("--mpi-uid", type=int, help="also unlink orphaned mpich_shm_* segments owned by this uid")
    ap.add_argument("--min-age", type=float, default=2.0, help="MPI segments must be this old, seconds (2)")
    ap.add_argument("--shm", default=SHM, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stale:
        print(f"dragon-cleanup: stale: removed {remove_stale_slurm_segments(args.shm)}", flush=True)
        return 0
    try:
        _slurm_prefix(args.slurm_job)
    except ValueError as e:
        ap.error(str(e))
    host = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    res = clean_slurm_job(args.slurm_job, args.mpi_uid, args.min_age, args.shm)
    msg = (
        f"dragon-cleanup: slurm job {args.slurm_job} on {host}: "
        f"killed {res['killed']} removed {res['removed']}"
    )
    if res["left"]:
        msg += f" still alive {res['left']}"
    print(msg, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
