"""The connection file of a served runtime (``dragon-launch --serve``): what a client on node 0's host needs
to attach (``dragon.init(connect=FILE)``), written by node 0's launcher, read by clients and
``dragon-launch --stop``.

It is JSON, mode 0600 (it names the job's segments; other users could not open them anyway), written
atomically (a reader never sees half a file):

    {"version": 1, "job": ..., "host": node 0's host name, "pid": node 0's launcher, "start": its start time,
     "nodes": number of nodes, "env": {the environment contract of a client: see dragon.env.CLIENT}}

A client is given what a managed process is given (global services' public inbox, node 0's infrastructure
pool and, across nodes, its transport gateway), never the job's key. The launcher's pid and start time tell
whether the runtime still runs: a file whose runtime is gone is refused with ``RuntimeNotFound`` at once,
never waited on.
"""

import json
import os

from dragon import env as E
from dragon._core.remote import start_time
from dragon.errors import RuntimeNotFound

VERSION = 1


def default_path(job):
    """Where ``dragon-launch --serve`` writes the file of job when no --connect-file is given."""
    return os.path.join(os.path.expanduser("~"), ".dragon", f"{job}.json")


def write(path, info):
    """Write info to path (mode 0600, atomically; the directory is made, 0700, if missing)."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": VERSION, **info}, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read(path):
    """The info of a connection file; RuntimeNotFound saying why if there is none or it is not one."""
    try:
        with open(os.path.expanduser(path)) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise RuntimeNotFound(
            f"no connection file {path!r} (is `dragon-launch --serve` running? it prints its file's path)"
        ) from None
    except (OSError, ValueError) as e:
        raise RuntimeNotFound(f"cannot read the connection file {path!r}: {e}") from None
    ok = (
        isinstance(info, dict)
        and info.get("version") == VERSION
        and all(isinstance(info.get(k), str) for k in ("job", "host"))
        and all(isinstance(info.get(k), int) for k in ("pid", "start"))
        and isinstance(info.get("env"), dict)
        and set(info["env"]) <= set(E.CLIENT)
        and all(isinstance(v, str) for v in info["env"].values())
        and E.GS_CD in info["env"]
    )
    if not ok:
        raise RuntimeNotFound(f"{path!r} is not a connection file of this dragon version")
    return info


def alive(info):
    """True while the runtime of info runs (its node 0 launcher, the same process as when the file was
    written, and not a zombie that its parent has not reaped yet)."""
    try:
        with open(f"/proc/{info['pid']}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                return False
    except (OSError, IndexError):
        return False
    return start_time(info["pid"]) == info["start"]


def check(path, info):
    """RuntimeNotFound unless a client here can attach to the runtime of info (read from path)."""
    host = os.uname().nodename
    if info["host"] != host:
        raise RuntimeNotFound(
            f"the runtime of {path!r} (job {info['job']}) runs on host {info['host']!r}, this is {host!r}: "
            "a client must run on node 0's host (it shares that node's /dev/shm)"
        )
    if not alive(info):
        raise RuntimeNotFound(
            f"the runtime of {path!r} (job {info['job']}) is gone: "
            f"its launcher (pid {info['pid']}) no longer runs"
        )


def remove(path, pid):
    """Remove the file at path if it is still the one launcher pid wrote (a new server may have replaced
    it)."""
    try:
        with open(path) as f:
            if json.load(f).get("pid") != pid:
                return
        os.unlink(path)
    except (OSError, ValueError, AttributeError):
        pass
