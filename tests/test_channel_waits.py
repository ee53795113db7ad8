"""Blocking waits: the learned spin budget, yielding to a peer on the same CPU, one wake per sleep, the knobs.

Nothing here asserts a time: the tests look at what the waits learned (`Channel._wait_state()`) and at the
per-process syscall counters (`wait_stats()`), which do not depend on how loaded the machine is.
"""

import multiprocessing as mp
import os
import threading
import time

import pytest

from dragon._core import core
from dragon.channels import Channel
from dragon.errors import ChannelTimeout
from dragon.pools import Pool

ctx = mp.get_context("fork")


@pytest.fixture
def params():
    """Restore this process's wait parameters after a test that changes them."""
    old = core.set_wait_params()
    yield old
    core.set_wait_params(spin_ns=old[0], chunk_ns=old[1], yield_ns=old[2], spin_max_ns=old[3])


def _wait_until(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# ------------------------------------------------------------------------------------------ knobs
def test_set_wait_params_bounds_and_fixed_budget(params, pool):
    spin, chunk, yld, spin_max = params
    assert spin <= spin_max and yld >= 0 and chunk >= 1000000
    assert core.set_wait_params(spin_ns=5000) == params  # returns the old values
    assert core.set_wait_params()[0::3] == (5000, 5000)  # spin_ns alone fixes the budget (no learning)
    core.set_wait_params(spin_ns=1000, spin_max_ns=70000)
    assert core.set_wait_params()[0::3] == (1000, 70000)
    core.set_wait_params(spin_max_ns=90000)  # the other bound stays
    assert core.set_wait_params()[0::3] == (1000, 90000)
    with pytest.raises(ValueError, match="spin_max_ns"):
        core.set_wait_params(spin_ns=50000, spin_max_ns=10000)
    with pytest.raises(ValueError, match="spin_max_ns"):
        core.set_wait_params(spin_max_ns=10)  # below the current spin_ns
    assert core.set_wait_params()[0::3] == (1000, 90000)  # a refused call changes nothing
    with pytest.raises(TypeError):
        core.set_wait_params(spin_ns="fast")
    core.set_wait_params(spin_ns=-5, yield_ns=-1)  # negative means 0
    assert core.set_wait_params()[0] == 0 and core.set_wait_params()[2] == 0

    # a fixed budget is what every wait uses, whatever it sees
    core.set_wait_params(spin_ns=30000)
    c = Channel.create(pool, capacity=2, block_size=16)
    for _ in range(3):
        with pytest.raises(ChannelTimeout):
            c.recv(timeout=0.01)
    assert c._wait_state()["recv"]["budget_ns"] == 30000
    c.destroy()


def test_wait_stats_count_and_reset(pool):
    core.wait_stats(reset=True)
    assert core.wait_stats() == {"waits": 0, "yields": 0, "switches": 0, "sleeps": 0, "wakes": 0}
    c = Channel.create(pool, capacity=2, block_size=16)
    with pytest.raises(ChannelTimeout):
        c.recv(timeout=0.05)  # waits once: spins its budget, then sleeps
    st = core.wait_stats(reset=True)
    assert st["waits"] == 1 and st["sleeps"] >= 1 and st["wakes"] == 0
    assert core.wait_stats()["waits"] == 0
    c.destroy()


# ------------------------------------------------------------------------------------------ wake-ups
def _alternate(a_sd, c_sd, b_sd, n, q):
    """Sleep at once on every receive (fixed budget 0), alternately on a and c; answer each on b."""
    core.set_wait_params(spin_ns=0)
    a, c, b = Channel.attach(a_sd), Channel.attach(c_sd), Channel.attach(b_sd)
    core.wait_stats(reset=True)
    for _ in range(n):
        b.send(a.recv(timeout=20))
        b.send(c.recv(timeout=20))
    q.put(core.wait_stats())


def test_sleeping_receiver_woken_by_exactly_one_wake(pool):
    a, c, b = (Channel.create(pool, capacity=4, block_size=16) for _ in range(3))
    n = 5
    q = ctx.Queue()
    proc = ctx.Process(target=_alternate, args=(a.sdesc, c.sdesc, b.sdesc, n, q))
    proc.start()
    core.wait_stats(reset=True)
    for i in range(n):
        for ch in (a, c):
            _wait_until(lambda ch=ch: ch._debug_state()["ne_waiters"] == 1, "the receiver to sleep")
            wakes = core.wait_stats()["wakes"]
            ch.send(b"m%d" % i)
            assert core.wait_stats()["wakes"] == wakes + 1  # the sleeper was woken, once
            assert b.recv(timeout=20) == b"m%d" % i
            # the woken receiver took its message without registering as a sleeper again, so nothing
            # is left for a later send to wake (the receiver now sleeps on the other channel)
            assert ch._debug_state()["ne_waiters"] == 0
    st = q.get(timeout=20)
    proc.join(10)
    assert st["sleeps"] >= 2 * n
    wakes = core.wait_stats()["wakes"]
    a.send(b"x")  # nobody sleeps: no wake syscall
    c.send(b"y")
    assert core.wait_stats()["wakes"] == wakes
    for ch in (a, b, c):
        ch.destroy()


def _echo(in_sd, out_sd, n, q):
    core.set_wait_params(spin_ns=10**9)  # a budget far above any wait: never sleeps
    i, o = Channel.attach(in_sd), Channel.attach(out_sd)
    core.wait_stats(reset=True)
    for _ in range(n):
        o.send(i.recv(timeout=30))
    q.put(core.wait_stats())


def test_no_wake_syscall_when_nobody_sleeps(pool, params):
    core.set_wait_params(spin_ns=10**9)
    a, b = (Channel.create(pool, capacity=8, block_size=64) for _ in range(2))
    n = 2000
    q = ctx.Queue()
    proc = ctx.Process(target=_echo, args=(a.sdesc, b.sdesc, n, q))
    proc.start()
    core.wait_stats(reset=True)
    for k in range(n):
        a.send(b"%d" % k)
        assert b.recv(timeout=30) == b"%d" % k
    mine, peer = core.wait_stats(), q.get(timeout=30)
    proc.join(10)
    for st in (mine, peer):
        assert st["sleeps"] == 0 and st["wakes"] == 0, (mine, peer)
    a.destroy()
    b.destroy()


def _alloc_blocking(psd, nbytes, q):
    p = Pool.attach(psd)
    core.wait_stats(reset=True)
    blk = p.alloc(nbytes, timeout=20)
    q.put(("got", core.wait_stats()["sleeps"]))
    time.sleep(0.5)  # hold the block while the parent frees another one
    p.free(blk)


def test_blocked_alloc_woken_once(pool):
    size = pool.stats()["free_bytes"]
    half = size // 2
    b1, b2 = pool.alloc(half), pool.alloc(size - half)
    q = ctx.Queue()
    proc = ctx.Process(target=_alloc_blocking, args=(pool.sdesc, half, q))
    proc.start()
    time.sleep(0.3)  # the child sleeps in alloc (the pool is full)
    core.wait_stats(reset=True)
    pool.free(b1)
    what, sleeps = q.get(timeout=20)
    assert what == "got" and sleeps >= 1
    pool.free(b2)  # the child holds its block and no longer waits: no wake for it
    assert core.wait_stats()["wakes"] == 1
    proc.join(10)
    assert pool.stats()["allocated_blocks"] == 0


# ------------------------------------------------------------------------------------------ learning
def test_budget_grows_for_short_waits_and_shrinks_after_long_ones(pool, params):
    # no yields: a yield that loses the CPU to another process (other load on this machine) also lowers the
    # budget
    core.set_wait_params(spin_ns=20000, spin_max_ns=50_000_000, yield_ns=10**9)
    c = Channel.create(pool, capacity=4, block_size=16)
    out = Channel.attach(c.sdesc)
    gaps = [0.001] * 12 + [0.08] * 4  # waits far below the cap, then longer than it
    budgets = []

    def sender():
        for g in gaps:
            time.sleep(g)
            out.send(b"x")

    th = threading.Thread(target=sender)
    th.start()
    for _ in gaps:
        assert c.recv(timeout=20) == b"x"
        budgets.append(c._wait_state()["recv"]["budget_ns"])
    th.join(10)
    grown, shrunk = budgets[11], budgets[-1]
    # short waits (~1 ms here) ask for twice their length: the budget climbs well above spin_ns
    assert grown >= 10 * 20000, budgets
    # each wait longer than spin_max_ns halves the distance to spin_ns
    assert shrunk < grown / 4, budgets
    assert all(20000 <= x <= 50_000_000 for x in budgets)
    out.close()
    c.destroy()


def _pinned_pingpong(cpu, in_sd, out_sd, n, starter, q):
    os.sched_setaffinity(0, {cpu})
    i, o = Channel.attach(in_sd), Channel.attach(out_sd)
    core.wait_stats(reset=True)
    if starter:
        o.send(b"ball")
    for _ in range(n):
        o.send(i.recv(timeout=30))
    q.put(core.wait_stats())


def test_peer_on_the_same_cpu_gets_it_at_once(pool):
    """Two processes on one CPU: spinning only delays the peer, so their waits yield at once."""
    cpu = min(os.sched_getaffinity(0))
    a, b = (Channel.create(pool, capacity=8, block_size=64) for _ in range(2))
    assert a._debug_state()["ne_cpu"] is None and a._debug_state()["nf_cpu"] is None
    q = ctx.Queue()
    n = 400
    procs = [
        ctx.Process(target=_pinned_pingpong, args=(cpu, a.sdesc, b.sdesc, n, True, q)),
        ctx.Process(target=_pinned_pingpong, args=(cpu, b.sdesc, a.sdesc, n, False, q)),
    ]
    for p in procs:
        p.start()
    res = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    for ch in (a, b):  # every commit notes its CPU for the waiters of the other side
        st = ch._debug_state()
        assert st["ne_cpu"] == cpu and st["nf_cpu"] == cpu, st
    for st in res:
        # most waits handed the CPU over (the peer ran) ...
        assert st["switches"] >= st["waits"] // 2, st
        # ... and now and then a wait sleeps instead, so that the scheduler may move one of them to a free CPU
        assert st["sleeps"] >= 1, st
    a.destroy()
    b.destroy()


def _send_twice(cpu, sdesc, gap):
    os.sched_setaffinity(0, {cpu})
    c = Channel.attach(sdesc)
    c.send(b"1")
    time.sleep(gap)  # (not runnable: a yield of the receiver on this CPU lets nobody run)
    c.send(b"2")


def _recv_twice(cpu, sdesc, q):
    os.sched_setaffinity(0, {cpu})
    # a budget of at least 10 ms: without the rule below, the second wait would yield for all of it
    core.set_wait_params(spin_ns=10_000_000, spin_max_ns=20_000_000)
    c = Channel.attach(sdesc)
    assert c.recv(timeout=30) == b"1"
    core.wait_stats(reset=True)
    assert c.recv(timeout=30) == b"2"
    q.put(core.wait_stats())


def test_yields_that_let_nobody_run_end_in_a_sleep(pool):
    """A wait whose peer last ran on its CPU yields to it; but when the scheduler runs nobody for its yields
    (the peer is not runnable, or not eligible yet: a transport agent beside the process it serves), yielding
    on only keeps the CPU from the peer. Two such yields in a row end the spinning: the wait sleeps."""
    cpu = min(os.sched_getaffinity(0))
    c = Channel.create(pool, capacity=4, block_size=16)
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_send_twice, args=(cpu, c.sdesc, 0.3)),
        ctx.Process(target=_recv_twice, args=(cpu, c.sdesc, q)),
    ]
    for p in procs:
        p.start()
    st = q.get(timeout=60)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert c._debug_state()["ne_cpu"] == cpu
    assert st["waits"] == 1 and st["sleeps"] >= 1, st
    # never more than two futile yields in a row (a yield that ran another task on this CPU starts a new row)
    assert st["yields"] - st["switches"] <= 2 * (st["switches"] + 1), st
    c.destroy()


def _send_on(cpu, sdesc):
    os.sched_setaffinity(0, {cpu})
    Channel.attach(sdesc).send(b"x")


def test_commits_note_their_cpu(pool):
    cpus = sorted(os.sched_getaffinity(0))
    c = Channel.create(pool, capacity=4, block_size=16)
    for cpu in (cpus[-1], cpus[0]):
        p = ctx.Process(target=_send_on, args=(cpu, c.sdesc))
        p.start()
        p.join(10)
        assert c._debug_state()["ne_cpu"] == cpu
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpus[-1]})
        assert c.recv() == b"x"
        assert c._debug_state()["nf_cpu"] == cpus[-1]
    finally:
        os.sched_setaffinity(0, old)
    c.destroy()


# ------------------------------------------------------------------------------------------ CPU when idle
def _busy_then_idle(sdesc, ack_sd, n, q):
    # no yields and a high cap (see test_budget_grows_...): the waits here are short whatever the load
    core.set_wait_params(spin_ns=20000, spin_max_ns=50_000_000, yield_ns=10**9)
    c, ack = Channel.attach(sdesc), Channel.attach(ack_sd)
    budgets = []
    for _ in range(n):
        c.recv(timeout=20)
        budgets.append(c._wait_state()["recv"]["budget_ns"])
        ack.send(b"ok")
    t0, w0 = os.times(), time.monotonic()
    try:
        c.recv(timeout=1.0)
        q.put(("got", budgets, 0, 0))
    except ChannelTimeout:
        t1 = os.times()
        q.put(("timeout", budgets, (t1.user - t0.user) + (t1.system - t0.system), time.monotonic() - w0))


def test_receiver_that_learned_a_long_budget_still_sleeps_when_idle(pool):
    c, ack = (Channel.create(pool, capacity=8, block_size=64) for _ in range(2))
    q = ctx.Queue()
    n = 40
    proc = ctx.Process(target=_busy_then_idle, args=(c.sdesc, ack.sdesc, n, q))
    proc.start()
    for _ in range(n):  # messages a little apart: the receiver learns to spin through such waits
        t = time.perf_counter() + 40e-6
        while time.perf_counter() < t:
            pass
        c.send(b"m")
        ack.recv(timeout=20)
    what, budgets, cpu, wall = q.get(timeout=30)
    proc.join(10)
    assert what == "timeout" and wall >= 0.95
    assert max(budgets) > 20000, f"the receiver did not learn a longer budget: {budgets}"
    assert cpu < 0.05 * wall, f"idle receiver used {cpu:.3f} s CPU in {wall:.2f} s"
    c.destroy()
    ack.destroy()
