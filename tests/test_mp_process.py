"""The 'dragon' start method's Process (dragon.mp), under single-node dragon-launch: start/join/exit codes,
signals, sentinels and connection.wait(), parent_process(), daemons, placement, the zygote, and what cannot be
supported. One app; each check prints ``ok <name>``."""

import pytest
from test_runtime_util import run_app

APP = r"""
import os, signal, socket, sys, time
import dragon
import multiprocessing as mp
from multiprocessing.connection import wait

def ok(name):
    print("ok", name, flush=True)

def code(n):
    sys.exit(n)

def attrs(q):
    import resource
    mask = os.umask(0)
    q.put((mask, resource.getrlimit(resource.RLIMIT_NOFILE), os.nice(0), sorted(os.sched_getaffinity(0)),
           signal.getsignal(signal.SIGHUP) == signal.SIG_IGN))

def sleeper(t):
    time.sleep(t)

def report(q):
    me = mp.current_process()
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent_cmd = f.read().replace(b"\0", b" ").decode()
    q.put((me.name, os.getpid(), mp.parent_process().pid, mp.parent_process().name, __name__,
           mp.get_start_method(), parent_cmd, os.environ.get("MARK")))

def spawn_daemon(q):
    d = mp.Process(target=sleeper, args=(60,), daemon=True)
    d.start()
    q.put(d.pid)
    time.sleep(60)

def parent_watch(q):
    q.put(mp.parent_process().is_alive())
    mp.parent_process().join(30)
    q.put(mp.parent_process().is_alive())

def middle(q):
    p = mp.Process(target=parent_watch, args=(q,))
    p.start()
    time.sleep(60)

def heap_user(q):
    from dragon.mp import heap
    own = mp.Queue()  # an object of its own: this process makes its heap
    own.put(1)
    q.put(heap.pool().name)
    time.sleep(60)

def segments():
    from dragon._core.core import job_prefix
    return {n for n in os.listdir("/dev/shm") if n.startswith(job_prefix())}

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

if __name__ == "__main__":
    assert "dragon" in mp.get_all_start_methods()
    mp.set_start_method("dragon")
    assert mp.get_start_method() == "dragon"
    ctx = mp.get_context("dragon")
    from dragon.globalservices import node, process
    assert mp.cpu_count() == sum(node.query(i).cpus for i in node.get_list())
    ok("start method, cpu_count")

    ps = [mp.Process(target=code, args=(i,)) for i in range(4)]
    for p in ps:
        p.start()
    for i, p in enumerate(ps):
        p.join(30)
        assert p.exitcode == i and not p.is_alive(), (i, p.exitcode)
    # what the OS keeps of sys.exit(n) outside 0..255, as spawn's parent sees it (not -1: "killed by SIGHUP")
    for n, want in ((256, 0), (257, 1), (-1, 255), (1000, 232)):
        p = mp.Process(target=code, args=(n,))
        p.start()
        p.join(30)
        assert p.exitcode == want, (n, p.exitcode)
    ok("exit codes")

    q = mp.Queue()
    os.environ["MARK"] = "inherited"
    p = mp.Process(target=report, args=(q,), name="Reporter")
    p.start()
    name, pid, ppid, pname, modname, method, parent_cmd, mark = q.get(timeout=30)
    p.join(30)
    got = (name, pid, ppid, pname)
    assert got == ("Reporter", p.pid, os.getpid(), "MainProcess"), got
    assert modname == "__mp_main__" and method == "dragon" and mark == "inherited", (modname, method, mark)
    ok("child: name, pid, parent, main module as __mp_main__, environment")
    zygote_seen = "dragon.localservices.zygote" in parent_cmd

    p = mp.Process(target=sleeper, args=(60,))
    p.start()
    assert (p.pid, "") in [(process.query(u).pid, "") for u, _ in process.get_list()]
    assert p.is_alive() and p.exitcode is None and p in mp.active_children()
    assert p.join(0) is None and p.is_alive()
    assert isinstance(p.sentinel, int) and wait([p.sentinel], 0) == []
    p.terminate()
    assert wait([p.sentinel], 30) == [p.sentinel]
    p.join(30)
    assert p.exitcode == -signal.SIGTERM, p.exitcode
    p = mp.Process(target=sleeper, args=(60,))
    p.start()
    p.kill()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL and p not in mp.active_children()
    p.close()
    try:
        p.is_alive()
        raise AssertionError("closed process answered")
    except ValueError:
        pass
    ok("managed process, terminate/kill, sentinel and wait()")

    # join(timeout) returns in time; wait() mixes sentinels and pipes
    p = mp.Process(target=sleeper, args=(0.5,))
    p.start()
    t = time.monotonic()
    p.join(0.1)
    assert p.is_alive() and time.monotonic() - t < 5
    r, w = os.pipe()
    assert wait([r, p.sentinel], 30) == [p.sentinel]
    os.close(r)
    os.close(w)
    p.join()
    assert p.exitcode == 0
    ok("join timeout, wait() on mixed objects")

    # a grandchild sees its parent (a dragon process) die
    q = mp.Queue()
    m = mp.Process(target=middle, args=(q,))
    m.start()
    assert q.get(timeout=30) is True
    m.terminate()
    m.join(30)
    assert q.get(timeout=30) is False
    ok("parent_process() of a grandchild")

    # a daemon ends when its parent is killed (not only at its parent's orderly exit)
    q = mp.Queue()
    m = mp.Process(target=spawn_daemon, args=(q,))
    m.start()
    dpid = q.get(timeout=30)
    assert alive(dpid)
    m.kill()
    m.join(30)
    deadline = time.monotonic() + 20
    while alive(dpid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(dpid), "the daemon outlived its killed parent"
    ok("daemon ends with its parent")

    # placement: node= and placement(); the only node is 0 here, a bad node is an error
    p = ctx.Process(target=code, args=(0,), node=0)
    p.start()
    p.join(30)
    assert p.node == 0 and p.exitcode == 0
    from dragon.mp import placement
    with placement(0):
        p = mp.Process(target=code, args=(0,))
        p.start()
    p.join(30)
    try:
        ctx.Process(target=code, args=(0,), node=5).start()
        raise AssertionError("node 5 accepted")
    except Exception as e:
        assert "node" in str(e), e
    ok("placement")

    # what cannot cross nodes says so
    s1, s2 = socket.socketpair()
    try:
        mp.Process(target=code, args=(s1,)).start()
        raise AssertionError("a socket was passed")
    except NotImplementedError as e:
        assert "file descriptor" in str(e), e
    s1.close()
    s2.close()
    ok("fd passing refused")

    # the zygote forks children once it is up: many starts
    t = time.monotonic()
    ps = [mp.Process(target=code, args=(0,)) for _ in range(30)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(30)
        assert p.exitcode == 0
    q = mp.Queue()
    p = mp.Process(target=report, args=(q,))
    p.start()
    parent_cmd = q.get(timeout=30)[6]
    p.join()
    assert zygote_seen or "dragon.localservices.zygote" in parent_cmd, parent_cmd
    ok("zygote")

    # the heap of a child that could not destroy it (killed; a Pool's workers, which leaving `with Pool()`
    # terminates) is removed when it ends, not at the end of the job (a served runtime, a notebook: never)
    q = mp.Queue()
    p = mp.Process(target=heap_user, args=(q,))
    p.start()
    name = q.get(timeout=30)
    assert any(n.endswith(name) for n in segments()), (name, segments())
    p.kill()
    p.join(30)
    assert not any(n.endswith(name) for n in segments()), (name, segments())
    before = segments()
    for _ in range(3):
        with mp.Pool(3) as pool:
            assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
    assert segments() == before, segments() - before
    ok("heaps of killed children and terminated Pool workers removed")

    # a queue that spilled (a feeder thread sends what did not fit) and that the program drops is garbage
    # collected and its feeder ends (the thread held the queue: neither was ever freed, and at exit the
    # queue's finalizer ran in that thread: "Exception ignored ... cannot join current thread")
    import gc, threading, weakref
    q = mp.Queue()
    for i in range(3000):
        q.put(i)
    assert sum(q.get(timeout=30) for _ in range(3000)) == sum(range(3000))
    gone = weakref.ref(q)
    del q
    unread = mp.Queue()  # dropped with 2000 items its feeder still holds: nobody can receive them, silently
    for i in range(3000):
        unread.put(i)
    del unread
    def feeders():
        return [t for t in threading.enumerate() if t.name == "QueueFeederThread"]
    deadline = time.monotonic() + 10
    while (gone() is not None or feeders()) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert gone() is None and not feeders(), (gone(), feeders())
    ok("a dropped queue and its feeder thread go")

    # what a spawn child inherits and a fork of the zygote would not (last: it changes this process)
    import resource
    os.umask(0o077)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))
    nice = os.nice(3)
    os.sched_setaffinity(0, {0})
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    q = mp.Queue()
    p = mp.Process(target=attrs, args=(q,))
    p.start()
    got = q.get(timeout=30)
    p.join(30)
    assert got == (0o077, (1000, hard), nice, [0], True), got
    ok("umask, rlimits, niceness, affinity, ignored signals inherited")
    print("ALL OK")
"""


@pytest.mark.timeout(150)
def test_process(tmp_path):
    r = run_app(tmp_path, APP, timeout=140)
    assert "ALL OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "Exception ignored" not in r.stderr and "ChannelError" not in r.stderr, r.stderr


SIGINT_APP = r"""
import os, signal, time
import dragon
import multiprocessing as mp

def sleeper():
    time.sleep(60)

if __name__ == "__main__":
    mp.set_start_method("dragon")
    codes = []
    for _ in range(20):
        p = mp.Process(target=sleeper)
        p.start()
        os.kill(p.pid, signal.SIGINT)  # at once: the child may not have its handler yet
        p.join(20)
        if p.exitcode is None:
            p.kill()
            p.join()
            codes.append("ignored")
        else:
            codes.append(p.exitcode)
    print("CODES", codes)
"""


@pytest.mark.timeout(200)
def test_sigint_right_after_start(tmp_path):
    # As with spawn: a SIGINT that reaches a child before its target runs kills it by SIGINT (-2); one that
    # reaches it in its target raises KeyboardInterrupt there (1). It is never lost, nor an exit code of 255.
    r = run_app(tmp_path, SIGINT_APP, timeout=190)
    out = f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.returncode == 0 and "CODES" in r.stdout, out
    codes = eval(r.stdout.split("CODES", 1)[1].strip())
    assert set(codes) <= {-2, 1}, out
