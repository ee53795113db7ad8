"""dragon.init() in a plain python: a single-node runtime in the background, the calling process its client.

Every test runs a real script in a fresh interpreter (no dragon-launch in front of it), with a marker in its
environment that the runtime's processes inherit; after the script ends (by any path), nothing may carry the
marker and no segment of its job may be left.
"""

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from slurm_util import pids_with_marker
from test_runtime_util import APP_HELPERS, job_segments, launch_env, run_app, write_app

pytestmark = pytest.mark.timeout(120)


def marked_env(extra=None):
    mark = "dragon-init-test-" + os.urandom(6).hex()
    return mark, launch_env({"DRAGON_TEST_MARK": mark, **(extra or {})})


def assert_nothing_left(mark, job, within=5.0):
    """No process carries mark and no segment of job is in /dev/shm within `within` seconds."""
    deadline = time.monotonic() + within
    while (pids_with_marker(mark) or job_segments(job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(mark), f"processes left: {pids_with_marker(mark)}"
    assert not job_segments(job), f"segments left: {job_segments(job)}"


def run_script(tmp_path, code, env, timeout=60):
    app = write_app(tmp_path, APP_HELPERS + code)
    return subprocess.run(
        [sys.executable, str(app)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_of(out):
    for line in out.splitlines():
        if line.startswith("JOB "):
            return line.split()[1]
    raise AssertionError(f"no JOB line in {out!r}")


EVERY_API = r"""
import dragon
from dragon.channels import Channel
from dragon.errors import ChannelError, PoolError, ProcessError
from dragon.globalservices import channel, node, pool, process
from dragon.pools import Pool

h = dragon.init()
print("JOB", h.job, flush=True)
assert h.mode == "local" and h.client < 0, h
assert dragon.init() is h
ok("init")
assert node.get_list() == [0] and node.query(0).hostname
ok("node")
d = process.create(PY, None, ["-c", "print('child says hi')"], user_name="child")
assert process.join(d.p_uid, timeout=30) == 0
assert process.query("child").state == "exited"
s = process.create("/bin/sleep", None, ["60"])
assert s.p_uid in [u for u, _ in process.get_list()]
process.kill(s.p_uid)
assert process.join(s.p_uid, timeout=30) == -9
r = process.multi_join([d.p_uid, s.p_uid], timeout=5)
assert len(r[0]) == 2, r
raises(ProcessError, process.create, "/no/such/exe", None, [])
ok("process")
pd = pool.create(1 << 20, user_name="p")
assert pool.query("p").m_uid == pd.m_uid
blk = Pool.attach(pd.sdesc)
blk.close()
cd = channel.create(pd.m_uid, user_name="c", channel_options={"capacity": 8, "block_size": 256})
ch = Channel.attach(cd.sdesc)
ch.send(b"ping")
assert ch.recv(timeout=5) == b"ping"
assert channel.join("c", timeout=1).c_uid == cd.c_uid
raises(PoolError, pool.destroy, pd.m_uid)
ch.close()
channel.destroy(cd.c_uid)
pool.destroy(pd.m_uid)
raises(ChannelError, channel.query, "c")
ok("pool and channel")
# a managed process reaches a channel the client made (in the infrastructure pool)
cd = channel.create(None, user_name="to_child", channel_options={"capacity": 4, "block_size": 256})
code = (
    "from dragon.channels import Channel; from dragon.globalservices import channel; "
    "Channel.attach(channel.join('to_child', timeout=10).sdesc).send(b'from child')"
)
kid = process.create(PY, None, ["-c", code])
ch = Channel.attach(cd.sdesc)
assert ch.recv(timeout=30) == b"from child"
assert process.join(kid.p_uid, timeout=30) == 0
ok("child to client")
"""


def test_init_every_api(tmp_path):
    mark, env = marked_env()
    res = run_script(tmp_path, EVERY_API, env)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("init", "node", "process", "pool and channel", "child to client"):
        assert f"ok {name}\n" in res.stdout, res.stdout + res.stderr
    assert "child says hi" in res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    assert_nothing_left(mark, job_of(res.stdout))


MP_IMPLIED = r"""
import multiprocessing as mp  # before dragon: its exit steps must still run while the runtime is up
import os
import time

import dragon


def square(x):
    return x * x


def child(q, lock):
    with lock:
        q.put(("child", os.environ["DRAGON_PUID"]))
    time.sleep(float(os.environ.get("CHILD_SLEEP", "0")))


if __name__ == "__main__":
    mp.set_start_method("dragon")
    assert "DRAGON_GS_CD" not in os.environ  # nothing started yet
    q, lock = mp.Queue(), mp.Lock()  # the first object starts the runtime
    h = dragon.attach.current()
    assert h is not None and h.mode == "local", h
    print("JOB", h.job, flush=True)
    p = mp.Process(target=child, args=(q, lock))
    p.start()
    who, puid = q.get(timeout=30)
    assert who == "child" and int(puid) > 0, (who, puid)
    if os.environ.get("CHILD_SLEEP"):
        print("left running", flush=True)  # a non-daemon child: multiprocessing joins it at exit
    else:
        p.join(30)
        assert p.exitcode == 0, p.exitcode
        with mp.Pool(2) as pool:
            assert sum(pool.map(square, range(100))) == 328350
        ok("pool")
"""


@pytest.mark.parametrize("child_sleep", ["", "2"])
def test_mp_start_method_starts_the_runtime_by_itself(tmp_path, child_sleep):
    """set_start_method("dragon") in a plain python, no dragon.init(): the first object or Process starts the
    runtime; at exit multiprocessing joins its children before the runtime ends, and nothing is left."""
    mark, env = marked_env({"CHILD_SLEEP": child_sleep} if child_sleep else None)
    res = run_script(tmp_path, MP_IMPLIED, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert ("left running" if child_sleep else "ok pool") in res.stdout, res.stdout + res.stderr
    assert_nothing_left(mark, job_of(res.stdout))


EXIT_PATH = r"""
import os, sys, time
import dragon
from dragon.globalservices import pool, process

h = dragon.init()
print("JOB", h.job, flush=True)
process.create("/bin/sleep", None, ["100"])
pool.create(1 << 20)
how = sys.argv[1]
if how == "exception":
    raise RuntimeError("the program failed")
if how == "sys_exit":
    sys.exit(3)
if how == "shutdown":
    dragon.shutdown()
    assert "DRAGON_GS_CD" not in os.environ
    h2 = dragon.init()  # a new runtime
    assert h2 is not h and h2.job != h.job
    print("JOB", h2.job, flush=True)
    process.join(process.create("/bin/true", None, []).p_uid, timeout=30)
if how == "sigkill":
    print("READY", flush=True)
    time.sleep(100)
"""


@pytest.mark.parametrize(("how", "code"), [("return", 0), ("exception", 1), ("sys_exit", 3), ("shutdown", 0)])
def test_exit_paths(tmp_path, how, code):
    mark, env = marked_env()
    app = write_app(tmp_path, APP_HELPERS + EXIT_PATH)
    res = subprocess.run(
        [sys.executable, str(app), how], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == code, res.stdout + res.stderr
    if how == "exception":
        assert "RuntimeError: the program failed" in res.stderr
    else:
        assert "Traceback" not in res.stderr, res.stderr
    jobs = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("JOB ")]
    assert len(jobs) == (2 if how == "shutdown" else 1), res.stdout
    for job in jobs:
        assert_nothing_left(mark, job)


MP_AGAIN = r"""
import multiprocessing as mp
import os
import time

import dragon


def put_pid(q):
    q.put(os.getpid())


if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    for round in range(2):
        h = dragon.init()
        print("JOB", h.job, flush=True)
        q = ctx.Queue()
        p = ctx.Process(target=put_pid, args=(q,))
        p.start()
        assert q.get(timeout=30) == p.pid
        p.join(30)
        with ctx.Pool(2) as pool:
            assert pool.map(abs, [-1, -2]) == [1, 2]
        left = ctx.Process(target=time.sleep, args=(100,))  # still running at shutdown()
        left.start()
        done = ctx.Process(target=time.sleep, args=(0,))  # exited, not joined yet
        done.start()
        time.sleep(1)
        dragon.shutdown()
        # the runtime ended them (and what ended keeps its own code); the next runtime is not asked about
        # them: their p_uids name other processes there
        assert left.exitcode == -9 and not left.is_alive(), left.exitcode
        assert done.exitcode == 0, done.exitcode
        assert left not in ctx.active_children()
        ok(f"round {round}")
"""


def test_multiprocessing_after_shutdown_and_init_again(tmp_path):
    """A notebook restarts its runtime: dragon.shutdown(), then dragon.init() again. Queues, Processes and
    Pools work in the new runtime (their channels were made in the heap of the first one, whose segment that
    runtime's end removed: a child could not attach them, and a Queue.get timed out), the first runtime's
    children are not joined or signalled through the second, and nothing of either is left."""
    mark, env = marked_env()
    res = run_script(tmp_path, MP_AGAIN, env, timeout=100)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok round 0" in res.stdout and "ok round 1" in res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    jobs = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("JOB ")]
    assert len(jobs) == 2 and jobs[0] != jobs[1], res.stdout
    for job in jobs:
        assert_nothing_left(mark, job)


INTERACTIVE = r"""
import multiprocessing as mp
import dragon
h = dragon.init()
print("JOB", h.job, flush=True)
ctx = mp.get_context("dragon")
K = 10
def addk(x):
    return x + K
class Point:
    def __init__(self, x):
        self.x = x
    def norm(self):
        return abs(self.x)
def work(q, p):
    q.put((p.norm(), isinstance(p, Point)))
with ctx.Pool(2) as pool:
    assert pool.map(addk, range(3)) == [10, 11, 12]
    assert pool.map(lambda x: -x, range(3)) == [0, -1, -2]
    assert pool.map(Point.norm, [Point(-3), Point(4)]) == [3, 4]
q = ctx.Queue()
p = ctx.Process(target=work, args=(q, Point(-7)))
p.start()
assert q.get(timeout=30) == (7, True)
p.join(30)
assert p.exitcode == 0
q.put(Point(5))
o = q.get(timeout=30)
assert type(o) is Point and o.x == 5
# one Pool call's function is loaded once in each worker, not once per batch of tasks (each load its own
# globals): a worker's tasks see one list
import os
calls = []
def count(x):
    calls.append(x)
    return (os.getpid(), len(calls))
with ctx.Pool(2) as pool:
    got = pool.map(count, range(200), chunksize=1)
per = {}
for pid, n in got:
    per.setdefault(pid, []).append(n)
assert all(sorted(v) == list(range(1, len(v) + 1)) for v in per.values()), per
from concurrent.futures import ProcessPoolExecutor
with ProcessPoolExecutor(2, mp_context=ctx) as ex:  # (its call queue pickles with ForkingPickler)
    assert list(ex.map(addk, range(3))) == [10, 11, 12] and ex.submit(lambda: 42).result() == 42
print("ok interactive", flush=True)
"""


def test_what_an_interactive_main_defines_reaches_the_children(tmp_path):
    """In a notebook, a REPL or ``python -c`` the functions and classes of __main__ are in no file a child
    could import (with spawn, a child fails: "Can't get attribute 'addk' on <module '__main__'>"; here the
    Pool's worker died with exit code 1): they travel by value, lambdas too."""
    mark, env = marked_env()
    res = subprocess.run(
        [sys.executable, "-c", INTERACTIVE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
    )
    assert res.returncode == 0 and "ok interactive" in res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert_nothing_left(mark, job_of(res.stdout))


@pytest.mark.parametrize("run", range(3))
def test_sigkill_of_the_client_ends_the_runtime(tmp_path, run):
    mark, env = marked_env()
    app = write_app(tmp_path, APP_HELPERS + EXIT_PATH)
    proc = subprocess.Popen(
        [sys.executable, str(app), "sigkill"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        job = proc.stdout.readline().split()[1]
        assert proc.stdout.readline() == "READY\n"
        assert len(pids_with_marker(mark)) >= 4  # client, launcher, GS, shepherd (and sleep)
        proc.kill()
        proc.wait()
        assert_nothing_left(mark, job, within=5.0)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


CTRL_C = r"""
import time
import dragon
from dragon.globalservices import process

h = dragon.init()
print("JOB", h.job, flush=True)
s = process.create("/bin/sleep", None, ["100"])
print("READY", flush=True)
try:
    process.join(s.p_uid)  # blocks until Ctrl-C
    print("join returned", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
# the runtime is unharmed: the process still runs, and calls work
assert process.query(s.p_uid).state == "running"
process.kill(s.p_uid)
assert process.join(s.p_uid, timeout=30) == -9
print("DONE", flush=True)
"""


def _ctrl_c_in_a_pty(tmp_path, code, env, ready="READY", done="DONE"):
    """Run code (a script) in a real terminal (a pty), type Ctrl-C once it printed ready, wait for done and
    its exit (code 0) -> everything it printed."""
    app = write_app(tmp_path, APP_HELPERS + code)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(tmp_path)
        os.execve(sys.executable, [sys.executable, str(app)], env)
    out = b""
    try:

        def until(text, timeout=30):
            nonlocal out
            deadline = time.monotonic() + timeout
            while text.encode() not in out:
                assert time.monotonic() < deadline, f"no {text!r} in {out!r}"
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        out += os.read(fd, 4096)
                    except OSError:  # the child ended
                        break

        until(ready)
        time.sleep(0.3)  # it is blocked in join
        os.write(fd, b"\x03")
        until(done)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, out
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        os.close(fd)
    return out.decode(errors="replace")


def test_ctrl_c_in_a_terminal_interrupts_a_blocked_call(tmp_path):
    """Ctrl-C typed into a real terminal (a pty): the client gets KeyboardInterrupt, the runtime (in a session
    of its own) does not see it."""
    mark, env = marked_env()
    text = _ctrl_c_in_a_pty(tmp_path, CTRL_C, env)
    assert "interrupted" in text and "join returned" not in text, text
    assert_nothing_left(mark, job_of(text.replace("\r", "")))


CTRL_C_MP = r"""
import time
import dragon
import multiprocessing as mp

def worker():
    while True:
        time.sleep(0.1)

if __name__ == "__main__":
    mp.set_start_method("dragon")
    p = mp.Process(target=worker)
    p.start()
    print("JOB", dragon.attach.current().job, flush=True)
    print("READY", flush=True)
    try:
        p.join()
    except KeyboardInterrupt:
        p.join(10)
        print("child exitcode", p.exitcode, "DONE", flush=True)
"""


def test_ctrl_c_in_a_terminal_reaches_the_programs_multiprocessing_children(tmp_path):
    """As with 'spawn' (same process group), Ctrl-C in the terminal reaches the 'dragon' children of the
    program too, though they are the runtime's (another session): the program waited for a non-daemon child
    for good (its join, then multiprocessing's at exit)."""
    mark, env = marked_env()
    text = _ctrl_c_in_a_pty(tmp_path, CTRL_C_MP, env)
    assert "child exitcode 1 DONE" in text, text  # (the child's KeyboardInterrupt: exit code 1, as spawn's)
    assert_nothing_left(mark, job_of(text.replace("\r", "")))


def test_init_under_dragon_launch_is_a_no_op(tmp_path):
    mark, env = marked_env()
    res = run_app(
        tmp_path,
        APP_HELPERS
        + r"""
import os
import dragon
from dragon.globalservices import process
h = dragon.init()
assert h.mode == "managed" and dragon.init() is h and h.job == os.environ["DRAGON_JOB"], h
dragon.shutdown()  # a no-op for a managed process
assert dragon.init() is h
assert process.join(process.create("/bin/true", None, []).p_uid, timeout=30) == 0
ok("managed")
""",
        env={"DRAGON_TEST_MARK": mark},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok managed" in res.stdout


def test_import_dragon_stays_cheap():
    """import dragon loads nothing of the runtime (init() imports it when called)."""
    code = (
        "import sys, dragon; print(sorted(m for m in sys.modules if m.startswith(('dragon.', 'launcher'))))"
    )
    res = subprocess.run([sys.executable, "-c", code], env=launch_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_start_failure_is_a_clear_error(tmp_path):
    """A runtime that cannot start (an infrastructure pool bigger than /dev/shm) gives RuntimeNotFound, at
    once."""
    mark, env = marked_env({"DRAGON_INFRA_POOL_SIZE": "64G"})
    code = r"""
import dragon
from dragon.errors import RuntimeNotFound
print(raises(RuntimeNotFound, dragon.init))
"""
    res = run_script(tmp_path, code, env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "could not start" in res.stdout, res.stdout
    assert not pids_with_marker(mark)
