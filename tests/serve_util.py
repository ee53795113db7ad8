"""Helpers for the tests of ``dragon-launch --serve`` and its clients (``dragon.init(connect=FILE)``).

``serving(...)`` starts a server (alone, or under ``mpiexec -n N --virtual-nodes``) with a marker in its
environment, waits for its connection file, and at the end stops it with ``dragon-launch --stop`` and
checks that nothing of it is left (no process with the marker, no segment of its job). ``client(path,
code)`` runs a client script in a fresh interpreter; ``CLIENT_HELPERS`` are the names a client script has.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

from slurm_util import pids_with_marker
from test_runtime_util import APP_HELPERS, REPO, job_segments, launch_cmd, launch_env

CLIENT_HELPERS = (
    APP_HELPERS
    + r"""
import os, time
import dragon
from dragon.channels import Channel
from dragon.globalservices import channel, node, pool, process


def names():
    return sorted(n for _, n in process.get_list())


def pool_names():
    found = [pool.query(u).name for u in pool.get_list()]
    return sorted(n for n in found if not n.startswith("dragon_infra"))


def wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)
"""
)

# client scripts shared by the tests of one host and of the Slurm cluster (argv: names of clients)
MAKE = r"""
import sys
h = dragon.init()
me, last = sys.argv[1], max(node.get_list())
assert h.mode == "connected" and h.client < 0, h
process.create("/bin/sleep", None, ["100"], user_name=me + "_sleep", options={"node": last})
pd = pool.create(1 << 20, user_name=me + "_pool", pool_options={"node": last})
cd = channel.create(pd.m_uid, user_name=me + "_ch", channel_options={"capacity": 8, "block_size": 256})
ch = Channel.attach(cd.sdesc)  # (through node 0's transport agent when last > 0)
ch.send(b"hello " + me.encode())
assert ch.recv(timeout=30) == b"hello " + me.encode()
code = "from dragon.globalservices import process; print('from', process.this_process().node)"
kid = process.create(PY, None, ["-c", code], options={"node": last})
assert process.join(kid.p_uid, timeout=60) == 0
ok("made " + me)
"""

SEES_NOTHING_OF = r"""
import sys
dragon.init()
other = sys.argv[1]
assert names() == [], names()
assert pool_names() == [], pool_names()
assert process.query(other + "_sleep").state == "exited"
assert process.query(other + "_sleep").retval == -9
raises(Exception, channel.query, other + "_ch")
ok("released")
"""

AT_ONCE = r"""
import sys
dragon.init()
me, other = sys.argv[1], sys.argv[2]
leaver, stayer = sorted([me, other])  # the first in order leaves first: what it made goes, the other's stays
last = max(node.get_list())
process.create("/bin/sleep", None, ["100"], user_name=me + "_sleep", options={"node": last})
pool.create(1 << 20, user_name=me + "_pool", pool_options={"node": last})
open(me + ".ready", "w").close()
wait_for(other + ".ready")
assert {me + "_sleep", other + "_sleep"} <= set(names()), names()
ok("both")
open(me + ".checked", "w").close()
if me == leaver:
    wait_for(stayer + ".checked")
    sys.exit(0)
deadline = time.monotonic() + 20
while leaver + "_sleep" in names() or leaver + "_pool" in pool_names():
    assert time.monotonic() < deadline, (names(), pool_names())
    time.sleep(0.05)
assert names() == [me + "_sleep"] and pool_names() == [me + "_pool"], (names(), pool_names())
ok(f"{leaver} released, {me} kept")
"""

MID_USE = r"""
import sys
h = dragon.init()
last = max(node.get_list())
s = process.create("/bin/sleep", None, ["100"], user_name="k_sleep", options={"node": last})
pd = pool.create(1 << 20, user_name="k_pool", pool_options={"node": last})
cd = channel.create(pd.m_uid, user_name="k_ch", channel_options={"capacity": 64, "block_size": 256})
ch = Channel.attach(cd.sdesc)
import multiprocessing as mp
from dragon.mp import heap
q = mp.get_context("dragon").Queue()  # a multiprocessing object: this client makes its heap
q.put(1)
print("PID", s.pid, heap.pool().name, flush=True)
n = 0
while True:  # SIGKILLed in the middle of this
    ch.send(b"x" * 100)
    ch.recv(timeout=30)
    n += 1
    if n == 20:
        print("READY", flush=True)
"""

AFTER_KILL = r"""
dragon.init()
deadline = time.monotonic() + 10
while names() or pool_names():
    assert time.monotonic() < deadline, (names(), pool_names())
    time.sleep(0.05)
raises(Exception, channel.query, "k_ch")
assert process.query("k_sleep").retval == -9
ok("released after SIGKILL")
"""


def wait_gone(mark, job, within=10.0):
    """Wait until no process carries mark and no segment of job is left; fail naming what is left."""
    deadline = time.monotonic() + within
    while (pids_with_marker(mark) or job_segments(job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(mark), f"processes left: {pids_with_marker(mark)}"
    assert not job_segments(job), f"segments left: {job_segments(job)}"


class Server:
    def __init__(self, proc, path, mark, info):
        self.proc, self.path, self.mark, self.info = proc, path, mark, info
        self.job = info["job"]

    def stop(self):
        res = subprocess.run(
            [*launch_cmd("--stop", self.path)], env=launch_env(), capture_output=True, text=True, timeout=90
        )
        out, err = self.proc.communicate(timeout=60)
        return res, out, err


def mpiexec_cmd(n):
    from mpi_util import mpiexec

    return [mpiexec(), "-n", str(n)]


@contextlib.contextmanager
def serving(tmp_path, nodes=1, flags=(), stop=True):
    """A running server: yields Server; stops it (unless the test did) and checks nothing is left."""
    mark = "dragon-serve-test-" + os.urandom(6).hex()
    path = str(tmp_path / "connect.json")
    cmd = launch_cmd(*(["--virtual-nodes"] if nodes > 1 else []), *flags, "--serve", "--connect-file", path)
    if nodes > 1:
        cmd = [*mpiexec_cmd(nodes), *cmd]
    proc = subprocess.Popen(
        cmd,
        env=launch_env({"DRAGON_TEST_MARK": mark}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
                raise AssertionError(f"the server did not come up: {proc.returncode}\n{out}\n{err}")
            time.sleep(0.05)
        with open(path) as f:
            info = json.load(f)
        assert os.stat(path).st_mode & 0o777 == 0o600
        srv = Server(proc, path, mark, info)
        yield srv
        if stop and proc.poll() is None:
            res, out, err = srv.stop()
            assert res.returncode == 0, res.stderr
            assert proc.returncode == 0, f"{proc.returncode}\n{out}\n{err}"
            assert not os.path.exists(path)
        wait_gone(mark, srv.job)
    finally:
        if proc.poll() is None:
            for pid in pids_with_marker(mark):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            proc.kill()
        proc.communicate(timeout=30)


def client_env(path, extra=None):
    env = launch_env(extra)
    env["DRAGON_CONNECT"] = path
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def client(tmp_path, path, code, args=(), timeout=90, name="client.py"):
    """Run a client script (CLIENT_HELPERS + code) with DRAGON_CONNECT=path; -> CompletedProcess (text)."""
    app = tmp_path / name
    app.write_text(CLIENT_HELPERS + code)
    return subprocess.run(
        [sys.executable, str(app), *args],
        env=client_env(path),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def start_client(tmp_path, path, code, args=(), name="client.py"):
    app = tmp_path / name
    app.write_text(CLIENT_HELPERS + code)
    return subprocess.Popen(
        [sys.executable, str(app), *args],
        env=client_env(path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
