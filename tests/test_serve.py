"""``dragon-launch --serve`` and its clients: one node, and three virtual nodes under mpiexec.

Clients are plain python scripts with DRAGON_CONNECT set (``dragon.init()`` finds the file there). What a
client made is released when it leaves or is SIGKILLed, unless it attached with keep=True; a client never
ends the runtime; the server ends at --stop, SIGINT or SIGTERM, and nothing of it is left
(serve_util.serving checks).
"""

import json
import os
import signal
import subprocess
import time

import pytest
from serve_util import (
    AFTER_KILL,
    AT_ONCE,
    MAKE,
    MID_USE,
    SEES_NOTHING_OF,
    client,
    serving,
    start_client,
    wait_gone,
)
from test_runtime_util import launch_cmd, launch_env

pytestmark = pytest.mark.timeout(180)

LAYOUTS = [
    pytest.param(1, (), id="1node"),
    pytest.param(3, (), id="3vnodes", marks=pytest.mark.mpi),
    pytest.param(3, ("--gs-rank",), id="2vnodes+gsrank", marks=pytest.mark.mpi),
]


@pytest.mark.parametrize(("nodes", "flags"), LAYOUTS)
def test_clients_one_after_the_other(tmp_path, nodes, flags):
    with serving(tmp_path, nodes, flags) as srv:
        assert srv.info["nodes"] == nodes - len(flags)
        a = client(tmp_path, srv.path, MAKE, ["a"])
        assert a.returncode == 0, a.stdout + a.stderr
        assert "ok made a" in a.stdout
        b = client(tmp_path, srv.path, SEES_NOTHING_OF, ["a"], name="b.py")
        assert b.returncode == 0, b.stdout + b.stderr
        assert "ok released" in b.stdout


@pytest.mark.parametrize(("nodes", "flags"), LAYOUTS[:2])
def test_clients_at_the_same_time(tmp_path, nodes, flags):
    with serving(tmp_path, nodes, flags) as srv:
        a = start_client(tmp_path, srv.path, AT_ONCE, ["a", "b"], name="a.py")
        b = start_client(tmp_path, srv.path, AT_ONCE, ["b", "a"], name="b.py")
        out_a, err_a = a.communicate(timeout=120)
        out_b, err_b = b.communicate(timeout=120)
        assert a.returncode == 0, out_a + err_a
        assert b.returncode == 0, out_b + err_b
        assert "ok both" in out_a and "ok a released, b kept" in out_b, out_b + err_b
        after = client(
            tmp_path, srv.path, "dragon.init()\nassert names() == [] and pool_names() == []\nok('empty')"
        )
        assert "ok empty" in after.stdout, after.stdout + after.stderr


@pytest.mark.parametrize(("nodes", "flags"), LAYOUTS[:2])
def test_client_sigkilled_mid_use(tmp_path, nodes, flags):
    with serving(tmp_path, nodes, flags) as srv:
        k = start_client(tmp_path, srv.path, MID_USE, name="k.py")
        try:
            _, pid, heap = k.stdout.readline().split()
            pid = int(pid)
            assert os.path.exists(f"/dev/shm/{heap}"), heap
            assert k.stdout.readline() == "READY\n", k.stderr.read() if k.poll() is not None else ""
            k.kill()
        finally:
            k.kill()
            k.communicate(timeout=30)
        c = client(tmp_path, srv.path, AFTER_KILL)
        assert c.returncode == 0, c.stdout + c.stderr
        assert "ok released after SIGKILL" in c.stdout
        # its multiprocessing heap too (it could not destroy it; the runtime goes on, so no job end would)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/dev/shm/{heap}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/dev/shm/{heap}"), heap
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.proc.poll() is None, "a client's death ended the runtime"


# one process attaches, works and leaves again and again (a notebook's kernel): what it costs the runtime's
# launcher (the pidfd and record of its watch) and itself (each init() registered an exit step that kept its
# handle, connection and transport endpoint alive; each multiprocessing heap one that destroys it) must not
# grow with the visits
REVISITS = r"""
import json, sys
import multiprocessing as mp
import multiprocessing.util
info = json.load(open(os.environ["DRAGON_CONNECT"]))
launcher = info["pid"]
def visit():
    dragon.init()
    last = max(node.get_list())
    pd = pool.create(1 << 20, pool_options={"node": last})
    cd = channel.create(pd.m_uid, channel_options={"capacity": 8, "block_size": 256})
    ch = Channel.attach(cd.sdesc)  # (through the transport when last > 0: this process's endpoint)
    ch.send(b"x")
    assert ch.recv(timeout=30) == b"x"
    ch.close()
    channel.destroy(cd.c_uid)
    pool.destroy(pd.m_uid)
    q = mp.get_context("dragon").Queue()  # (this process's multiprocessing heap, made anew each visit)
    q.put(1)
    assert q.get(timeout=30) == 1
    dragon.shutdown()
def counts():
    import gc
    from dragon._core.remote import Endpoint
    from dragon.attach import Handle
    from dragon.infrastructure.client import Connection
    time.sleep(0.3)  # (the launcher's poll slice: it has read what the last visit's goodbye told it)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) in (Handle, Connection, Endpoint)]
    exit_steps = len(mp.util._finalizer_registry)
    return len(os.listdir(f"/proc/{launcher}/fd")), len(alive), exit_steps
n = int(sys.argv[1])
for _ in range(n):
    visit()
first = counts()
for _ in range(n):
    visit()
assert counts() == first, (first, counts())
ok("bounded")
"""


@pytest.mark.parametrize(("nodes", "flags"), LAYOUTS[:2])
def test_a_client_that_comes_and_goes_costs_nothing_that_grows(tmp_path, nodes, flags):
    with serving(tmp_path, nodes, flags) as srv:
        c = client(tmp_path, srv.path, REVISITS, ["40"])
        assert c.returncode == 0, c.stdout + c.stderr
        assert "ok bounded" in c.stdout


def test_keep(tmp_path):
    with serving(tmp_path) as srv:
        a = client(
            tmp_path,
            srv.path,
            "dragon.init(keep=True)\npool.create(1 << 20, user_name='kept')\n"
            "process.create('/bin/sleep', None, ['100'], user_name='kept_sleep')\nok('made')",
        )
        assert "ok made" in a.stdout, a.stdout + a.stderr
        b = client(
            tmp_path,
            srv.path,
            "dragon.init()\nassert pool_names() == ['kept'] and names() == ['kept_sleep']\n"
            "pool.destroy('kept')\nprocess.kill('kept_sleep')\nok('kept')",
        )
        assert "ok kept" in b.stdout, b.stdout + b.stderr
        c = client(tmp_path, srv.path, KEPT_MP_CHILD)
        assert "ok kept child left" in c.stdout, c.stdout + c.stderr


KEPT_MP_CHILD = r"""
if __name__ == "__main__":
    import multiprocessing as mp
    import signal
    from dragon.errors import ProcessError
    ctx = mp.get_context("dragon")
    dragon.init(keep=True)
    p = ctx.Process(target=time.sleep, args=(100,))
    p.start()
    dragon.shutdown()
    # it runs on in the runtime, out of this process's reach: not joined or signalled through the next
    # runtime (where its p_uid may name another process), and not waited for at exit
    t = time.monotonic()
    p.join(0.2)
    assert p.is_alive() and time.monotonic() - t < 10
    raises(ProcessError, p.terminate)
    dragon.init()
    q = ctx.Queue()
    q.put(1)
    assert q.get(timeout=30) == 1
    assert p not in ctx.active_children()
    os.kill(p.pid, signal.SIGKILL)
    ok("kept child left")
"""


def test_init_with_a_home_relative_connection_file_is_idempotent(tmp_path):
    """init(connect="~/...") a second time returns the same handle (it raised "already in a runtime": the
    stored path had ~ expanded, the comparison did not)."""
    with serving(tmp_path) as srv:
        home = tmp_path / "home"
        (home / ".dragon").mkdir(parents=True)
        os.symlink(srv.path, home / ".dragon" / "s.json")
        a = client(
            tmp_path,
            srv.path,
            "os.environ['HOME'] = sys.argv[1]\nh = dragon.init(connect='~/.dragon/s.json')\n"
            "assert dragon.init(connect='~/.dragon/s.json') is h\nok('again')",
            args=(str(home),),
        )
        assert "ok again" in a.stdout, a.stdout + a.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_server_ends_at_a_signal(tmp_path, sig):
    with serving(tmp_path, stop=False) as srv:
        os.kill(srv.proc.pid, sig)
        out, err = srv.proc.communicate(timeout=60)
        assert srv.proc.returncode == 0, out + err
        assert not os.path.exists(srv.path)


GONE = r"""
from dragon.errors import RuntimeNotFound
t = time.monotonic()
print(raises(RuntimeNotFound, dragon.init))
assert time.monotonic() - t < 5
assert "DRAGON_GS_CD" not in os.environ
"""


def test_connection_file_of_a_gone_runtime(tmp_path):
    """A SIGKILLed server leaves its file: a client is told at once that the runtime is gone (no hang), and
    --stop says so too and removes the stale file."""
    with serving(tmp_path, stop=False) as srv:
        srv.proc.kill()
        srv.proc.wait()
        wait_gone(srv.mark, srv.job)
        assert os.path.exists(srv.path)
        c = client(tmp_path, srv.path, GONE)
        assert c.returncode == 0, c.stdout + c.stderr
        assert "is gone" in c.stdout
        res = subprocess.run(
            launch_cmd("--stop", srv.path), env=launch_env(), capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 1 and "is gone" in res.stderr, res.stderr
        assert not os.path.exists(srv.path)


def test_connection_file_of_another_host_or_garbage(tmp_path):
    with serving(tmp_path) as srv:
        with open(srv.path) as f:
            info = json.load(f)
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**info, "host": "elsewhere"}))
        c = client(tmp_path, str(other), GONE)
        assert "runs on host 'elsewhere'" in c.stdout, c.stdout + c.stderr
        junk = tmp_path / "junk.json"
        junk.write_text("{not json")
        c = client(tmp_path, str(junk), GONE)
        assert "cannot read the connection file" in c.stdout, c.stdout + c.stderr
        c = client(tmp_path, str(tmp_path / "none.json"), GONE)
        assert "no connection file" in c.stdout, c.stdout + c.stderr
