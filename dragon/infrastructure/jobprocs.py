"""Finding and killing what is left of a job: the processes whose environment names it (managed processes and
everything they started, even what left their process group) and the direct children of a process (orphans
come back to the launcher, a child subreaper). Used by the launcher and by a shepherd that lost its
launcher."""

import os
import signal


def job_pids(job, exclude=()):
    """Pids of the live processes whose environment has DRAGON_JOB=<job>."""
    needle = b"\0DRAGON_JOB=" + job.encode() + b"\0"
    found = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        if pid == me or pid in exclude:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                data = b"\0" + f.read()
        except OSError:
            continue
        if needle in data or data.endswith(needle[:-1]):
            found.append(pid)
    return found


def children(pid=None):
    """Direct children of pid (default: this process)."""
    pid = os.getpid() if pid is None else pid
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return kids


def kill_all(pids, sig=signal.SIGKILL):
    """Signal each pid and its process group (managed processes lead their own)."""
    for pid in pids:
        for fn in (os.killpg, os.kill):
            try:
                fn(pid, sig)
            except OSError:
                pass
