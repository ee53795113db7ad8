"""Finding and killing what is left of a job: the processes whose environment names it (managed processes and
everything they started, even what left their process group) and the direct children of a process (orphans
come back to the launcher, a child subreaper). Used by the launcher and by a shepherd that lost its
launcher. Also what is left of one process: its multiprocessing heap segment (``heap_name``), which the
shepherd (a managed process) or node 0's launcher (a client of the runtime) unlinks when the process ended
without destroying it (killed, or a Pool's terminated worker)."""

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


def heap_name(uid, pid):
    """The name of the pool a process makes for its multiprocessing objects (``dragon.mp.heap``): uid is its
    p_uid (a client of the runtime: its client id), pid its own. Only the process the runtime watches under
    that uid has that pid while it lives, and uids are never reused in a job, so whoever saw it end can
    remove exactly its heap (a descendant that inherited the uid names its own by its own pid)."""
    return f"p{uid}h{pid}"


def unlink_heap(job, uid, pid):
    """Unlink the multiprocessing heap segment that process pid (uid: its p_uid or client id) of job left, if
    it left one (a process that ended cleanly destroyed it itself). Processes that mapped it keep their
    mapping, as they do when its owner destroys it at exit. -> True if there was one."""
    from dragon._core.core import job_prefix

    try:
        os.unlink(f"/dev/shm/{job_prefix(job)}{heap_name(uid, pid)}")
        return True
    except OSError:  # (none: it ended cleanly)
        return False
