"""multiprocessing objects of the 'dragon' start method used between processes: queues, pipes, locks and
semaphores, conditions, events, barriers, shared values. Run under dragon-launch: on one node (every child on
node 0) or on several (the children go round-robin over the nodes, so the objects made here on node 0 are used
from the others through the transport). Prints ``ok <check>``; exits non-zero on a failure."""

import multiprocessing as mp
import os
import pickle
import queue
import time

import numpy as np

import dragon  # noqa: F401
from dragon.globalservices import node as _node


def ok(name):
    print("ok", name, flush=True)


def producer(q, k, n):
    for i in range(n):
        q.put((k, i))


def consumer(q, out, stop):
    got = []
    while True:
        x = q.get(timeout=60)
        if x == stop:
            break
        got.append(x)
    out.put(got)


def array_echo(q, r):
    a = q.get(timeout=60)
    a[0] = -1.0  # a received array is writable
    r.put(a)


def pipe_child(conn, wconn):
    conn.send(conn.recv() * 2)
    conn.send_bytes(b"0123456789", 2, 5)
    big = conn.recv_bytes()
    conn.send_bytes(big[::-1])
    wconn.send("from a copy")
    # no close(): the end of file comes from this process's exit


def killed_writer(w, q):
    w.send("before dying")
    q.put(os.getpid())
    time.sleep(60)


def locked_adds(lock, v, n):
    for _ in range(n):
        with lock:
            v.value += 1


def rlock_child(rl, q):
    with rl:
        with rl:
            q.put("in")
    try:
        rl.release()
        q.put("released an unowned RLock")
    except AssertionError:
        q.put("refused")


def sem_child(sem, q):
    got = sum(sem.acquire(timeout=0.2) for _ in range(5))
    q.put(got)


def cond_child(cond, state, q):
    with cond:
        q.put("waiting")
        ok_ = cond.wait_for(lambda: state.value == 1, timeout=30)
        q.put(ok_)


def event_child(ev, q):
    q.put(ev.wait(30))


def event_pulse_child(ev, q):
    t = time.monotonic()
    got = ev.wait(60)
    q.put((got, time.monotonic() - t < 50))  # (woken by the set, not at the end of its timeout)


def stdlib_queue_child(sq, ssq, out, node, more):
    """A copy of the stdlib's queues here reads and writes a channel and takes a lock of this process; its
    shared locks travel on when it is pickled again (more: start a reader of its own, on the next node)."""
    from dragon.mp.relay import _ProcessLock

    assert isinstance(sq._rlock, _ProcessLock) and isinstance(ssq._wlock, _ProcessLock)
    if more:
        nxt = (node + 1) % N_NODES
        mp.get_context().Process(target=stdlib_queue_child, args=(sq, ssq, out, nxt, False), node=nxt).start()
    got = []
    for get in (lambda: sq.get(timeout=60), ssq.get):  # (with a timeout: poll, then take what poll found)
        while True:
            x = get()
            if x is None:
                break
            got.append(x)
    out.put((node, got))


def barrier_child(bar, q):
    q.put(bar.wait(30))


def shared_child(v, arr, s, raw, q):
    v.value = 7.5
    arr[1] = 11
    arr[2:4] = [12, 13]
    s.value = b"hello"
    raw[0] = 99
    q.put((arr[:], len(arr), s.value, raw[0]))


def manager_child(d, lst, k):
    d[k] = int(os.environ["DRAGON_NODE"])
    lst.append(k)


def bounded_burst(bq, out, back):
    """put_nowait into an empty Queue(100) made on node 0 until Full (from the last node in a multi-node run:
    a put there looks at the queue's length only when it must, and stays exact for one producer)"""
    took = 0
    try:
        while True:
            bq.put_nowait(took)
            took += 1
    except queue.Full:
        pass
    out.put(took)
    assert back.get(timeout=60) == "took 10"
    more = 0
    try:
        while True:
            bq.put_nowait(-1)
            more += 1
    except queue.Full:
        pass
    out.put(more)


def bounded_putter(bq, out):
    """put into a full Queue(2) made on node 0 (from the last node in a multi-node run)"""
    bq.put(1)
    bq.put(2)
    said = [bq.full()]
    for put in (lambda: bq.put(3, timeout=0.2), lambda: bq.put_nowait(3)):
        try:
            put()
            said.append("took it")
        except queue.Full:
            said.append("Full")
    out.put(said)


def joinable_child(jq):
    while True:
        x = jq.get(timeout=30)
        jq.task_done()
        if x is None:
            break


N_NODES = len(_node.get_list())


def main():
    mp.set_start_method("dragon")
    P = mp.Process

    def run(target, *args):
        p = P(target=target, args=args)
        p.start()
        return p

    nodes = set()

    # Queue: many producers and consumers, every item exactly once
    q, out = mp.Queue(), mp.Queue()
    NP, NC, N = 4, 3, 1500
    prods = [run(producer, q, k, N) for k in range(NP)]
    cons = [run(consumer, q, out, "STOP") for _ in range(NC)]
    for p in prods:
        p.join(120)
        assert p.exitcode == 0, p.exitcode
        nodes.add(p._popen.node)
    for _ in cons:
        q.put("STOP")
    got = [x for _ in cons for x in out.get(timeout=120)]
    for p in cons:
        p.join(60)
        nodes.add(p._popen.node)
    assert sorted(got) == sorted((k, i) for k in range(NP) for i in range(N)), len(got)
    for k in range(NP):  # per producer, in order
        seq = [i for kk, i in got if kk == k]
        assert sorted(seq) == list(range(N))
    ok(f"queue: {NP} producers, {NC} consumers, every item once (children on nodes {sorted(nodes)})")

    # Queue: timeouts, bounds, sizes, closing, a big array, an object that cannot be pickled
    b = mp.Queue(2)
    b.put(1)
    b.put_nowait(2)
    assert b.full() and b.qsize() == 2
    try:
        b.put(3, timeout=0.2)
        raise AssertionError("a full queue took more")
    except queue.Full:
        pass
    assert b.get() == 1 and b.get(timeout=1) == 2 and b.empty()
    t = time.monotonic()
    try:
        b.get(timeout=0.3)
        raise AssertionError("an empty queue gave something")
    except queue.Empty:
        assert time.monotonic() - t >= 0.25
    try:
        b.get_nowait()
        raise AssertionError("an empty queue gave something")
    except queue.Empty:
        pass
    b.put(lambda: 0)  # cannot be pickled: reported, not raised
    b.put("after")
    assert b.get(timeout=5) == "after"
    b.close()
    try:
        b.put(1)
        raise AssertionError("a closed queue took more")
    except ValueError:
        pass
    # a maxsize above what one channel holds (MAX_CAPACITY): put raised Full at the channel's 1024 items
    from dragon.mp.queues import MAX_CAPACITY

    bq = mp.Queue(MAX_CAPACITY + 2)
    for i in range(MAX_CAPACITY + 2):
        bq.put_nowait(i)
    assert bq.full() and bq.qsize() == MAX_CAPACITY + 2
    try:
        bq.put(-1, timeout=0.1)
        raise AssertionError("a full queue took more")
    except queue.Full:
        pass
    assert [bq.get(timeout=10) for _ in range(MAX_CAPACITY + 2)] == list(range(MAX_CAPACITY + 2))
    assert bq.empty() and not bq.full()
    # a bounded queue filled from another node: put raised no Full there (the transport took 512 messages)
    from dragon.globalservices import node

    bq, bout = mp.Queue(2), mp.Queue()
    p = mp.get_context("dragon").Process(target=bounded_putter, args=(bq, bout), node=max(node.get_list()))
    p.start()
    assert bout.get(timeout=60) == [True, "Full", "Full"]
    p.join(60)
    assert [bq.get(timeout=10), bq.get(timeout=10)] == [1, 2] and bq.empty()
    bq, back = mp.Queue(100), mp.Queue()
    p = mp.get_context("dragon").Process(
        target=bounded_burst, args=(bq, bout, back), node=max(node.get_list())
    )
    p.start()
    assert bout.get(timeout=60) == 100 and bq.qsize() == 100
    assert [bq.get(timeout=10) for _ in range(10)] == list(range(10))
    back.put("took 10")
    assert bout.get(timeout=60) == 10 and bq.qsize() == 100
    p.join(60)
    assert p.exitcode == 0
    arr = np.arange(2 << 20, dtype=np.float64)  # 16 MiB (across nodes it must fit the staging pool, 64 MiB)
    q2, r2 = mp.Queue(), mp.Queue()
    p = run(array_echo, q2, r2)
    q2.put(arr)
    back = r2.get(timeout=120)
    p.join(60)
    assert back[0] == -1.0 and np.array_equal(back[1:], arr[1:])
    assert not back.flags.owndata  # a view of the block it came in
    ok("queue: timeouts, bounds, closing, unpicklable objects, 16 MiB array")

    # a queue sent through a queue; JoinableQueue; SimpleQueue
    carrier, q3 = mp.Queue(), mp.Queue()
    carrier.put(q3)
    q3b = carrier.get(timeout=10)
    q3b.put("through")
    assert q3.get(timeout=10) == "through"
    jq = mp.JoinableQueue()
    p = run(joinable_child, jq)
    for i in range(20):
        jq.put(i)
    jq.put(None)
    jq.join()
    p.join(60)
    try:
        jq.task_done()
        raise AssertionError("task_done accepted once too often")
    except ValueError:
        pass
    sq = mp.SimpleQueue()
    assert sq.empty()
    sq.put([1, 2])
    assert not sq.empty() and sq.get() == [1, 2]
    sq.close()
    for closed in (
        sq.empty,
        sq.get,
        lambda: sq.put(1),
    ):  # as the stdlib's: OSError (empty() said ChannelError)
        try:
            closed()
            raise AssertionError("a closed SimpleQueue answered")
        except OSError:
            pass
    ok("queue through a queue, JoinableQueue, SimpleQueue")

    # Pipe: objects, bytes with offsets, a big message, EOF when every writer is gone, poll, errors
    a, bconn = mp.Pipe()
    r, w = mp.Pipe(duplex=False)
    p = run(pipe_child, bconn, w)
    bconn.close()
    w.close()
    a.send(21)
    assert a.recv() == 42
    assert a.recv_bytes() == b"23456"
    big = os.urandom(3 << 20)
    a.send_bytes(big)
    assert a.recv_bytes() == big[::-1]
    assert r.recv() == "from a copy"
    p.join(60)
    assert p.exitcode == 0
    try:
        r.recv()
        raise AssertionError("no end of file")
    except EOFError:
        pass
    assert r.poll(0)  # end of file counts as readable
    try:
        a.recv()
        raise AssertionError("no end of file")
    except EOFError:
        pass
    x, y = mp.Pipe(duplex=False)
    for bad, exc in (
        (lambda: x.send(1), OSError),
        (lambda: y.recv(), OSError),
        (lambda: y.send_bytes(b"ab", 3), ValueError),
    ):
        try:
            bad()
            raise AssertionError("accepted")
        except exc:
            pass
    assert not x.poll(0.1)
    y.send_bytes(b"abcdef")
    buf = bytearray(3)
    try:
        x.recv_bytes_into(buf)
        raise AssertionError("a short buffer took a long message")
    except mp.BufferTooShort as e:
        assert e.args[0] == b"abcdef"
    y.send_bytes(b"xyz")
    buf = bytearray(5)
    assert x.recv_bytes_into(buf, 1) == 3 and buf == b"\0xyz\0"
    y.close()
    x.close()
    # a message longer than recv_bytes' maxlength: that handle reads no more but still writes (it was closed,
    # so the other end got end of file)
    u, v = mp.Pipe()
    v.send_bytes(b"0123456789")
    try:
        u.recv_bytes(5)
        raise AssertionError("maxlength was ignored")
    except OSError:
        pass
    assert not u.closed and not u.readable and u.writable
    u.send("still writing")
    assert v.recv() == "still writing"
    try:
        u.recv()
        raise AssertionError("read after a too long message")
    except OSError as e:
        assert "write-only" in str(e), e
    u.close()
    v.close()
    try:
        x.recv()
        raise AssertionError("a closed handle received")
    except OSError:
        pass
    # a writer pickled into a Process whose pickling then fails: its reader still reaches end of file (the
    # copy had been announced and the reader waited for it for good)
    r, w = mp.Pipe(duplex=False)
    try:
        run(pipe_child, w, lambda: 0)
        raise AssertionError("a lambda was pickled")
    except (pickle.PicklingError, AttributeError):
        pass
    w.close()
    assert r.poll(10)
    try:
        r.recv()
        raise AssertionError("no end of file")
    except EOFError:
        pass
    # ... and one pickled for a process that could not be made (no such node)
    from dragon.errors import ProcessError

    r, w = mp.Pipe(duplex=False)
    try:
        mp.get_context("dragon").Process(target=pipe_child, args=(w,), node=99).start()
        raise AssertionError("started on node 99")
    except ProcessError:
        pass
    w.close()
    assert r.poll(10)
    ok("pipe: objects, bytes, 3 MiB, EOF, poll, errors")

    # a writer killed by a signal (no goodbye): its reader still reaches end of file, wait() says so
    r, w = mp.Pipe(duplex=False)
    kq = mp.Queue()
    p = run(killed_writer, w, kq)
    w.close()
    kq.get(timeout=60)
    p.kill()
    p.join(30)
    from multiprocessing.connection import wait as _wait

    assert r.recv() == "before dying"
    t = time.monotonic()
    assert _wait([r], 30) == [r]
    try:
        r.recv()
        raise AssertionError("no end of file after the writer was killed")
    except EOFError:
        pass
    ok(f"pipe: end of file after its writer was killed ({time.monotonic() - t:.1f} s)")

    # multiprocessing.connection.wait() on these connections and queues' readers
    from multiprocessing.connection import wait

    c1, c2 = mp.Pipe()
    wq = mp.Queue()
    assert wait([c1, wq._reader], 0.1) == []
    c2.send("x")
    assert wait([c1, wq._reader], 10) == [c1]
    assert c1.recv() == "x"
    assert wait([c1], 0.3) == []
    wq.put("y")
    assert wait([c1, wq._reader], 10) == [wq._reader]
    assert wq.get() == "y"
    ok("connection.wait()")

    # Lock, RLock, Semaphore, BoundedSemaphore between processes
    lock, v = mp.Lock(), mp.Value("i", 0, lock=False)
    ps = [run(locked_adds, lock, v, 200) for _ in range(3)]
    for p in ps:
        p.join(120)
    assert v.value == 600, v.value
    assert lock.acquire(timeout=1) and not lock.acquire(False)
    assert repr(lock) == "<Lock(owner=MainProcess)>", repr(lock)  # (the stdlib's: the process's name)
    lock.release()
    try:
        lock.release()
        raise AssertionError("released an unlocked lock")
    except ValueError:
        pass
    rl, rq = mp.RLock(), mp.Queue()
    with rl, rl:
        assert repr(rl) == "<RLock(MainProcess, 2)>", repr(rl)
    p = run(rlock_child, rl, rq)
    assert rq.get(timeout=60) == "in" and rq.get(timeout=60) == "refused"
    p.join(60)
    sem, sq2 = mp.Semaphore(3), mp.Queue()
    p = run(sem_child, sem, sq2)
    assert sq2.get(timeout=60) == 3
    p.join(60)
    sem.release()
    assert sem.get_value() == 1
    bs = mp.BoundedSemaphore(2)
    bs.acquire()
    bs.release()
    try:
        bs.release()
        raise AssertionError("a bounded semaphore went over")
    except ValueError:
        pass
    zero = mp.BoundedSemaphore(0)  # (the stdlib's may be made: it is never acquired, nor released)
    assert not zero.acquire(False) and zero.get_value() == 0
    try:
        zero.release()
        raise AssertionError("BoundedSemaphore(0) was released")
    except ValueError:
        pass
    ok("Lock, RLock, Semaphore, BoundedSemaphore")

    # Condition, Event, Barrier
    cond, state, cq = mp.Condition(), mp.Value("i", 0), mp.Queue()
    p = run(cond_child, cond, state, cq)
    assert cq.get(timeout=60) == "waiting"
    with cond:
        state.value = 1
        cond.notify_all()
    assert cq.get(timeout=60) is True
    p.join(60)
    ev, eq = mp.Event(), mp.Queue()
    ps = [run(event_child, ev, eq) for _ in range(2)]
    time.sleep(0.2)
    ev.set()
    assert [eq.get(timeout=60) for _ in ps] == [True, True]
    for p in ps:
        p.join(60)
    # a set() wakes every process waiting at that moment, even if a clear() follows at once (a "pulse"):
    # each wait returns (True, or False when it sees the clear first), as the stdlib's Event does
    ev = mp.Event()
    ps = [run(event_pulse_child, ev, eq) for _ in range(2)]
    deadline = time.monotonic() + 60
    while ev._cond._sleeping_count.get_value() < 2 and time.monotonic() < deadline:  # (both are waiting)
        time.sleep(0.01)
    ev.set()
    ev.clear()
    assert all(woken for _, woken in [eq.get(timeout=90) for _ in ps])
    for p in ps:
        p.join(60)
    bar, bq = mp.Barrier(3), mp.Queue()
    ps = [run(barrier_child, bar, bq) for _ in range(2)]
    me = bar.wait(30)
    assert sorted([me, bq.get(timeout=60), bq.get(timeout=60)]) == [0, 1, 2]
    for p in ps:
        p.join(60)
    ok("Condition, Event, Barrier")

    # Value, Array (numbers and chars), RawArray
    v, arr, s, raw = mp.Value("d", 0.0), mp.Array("i", 5), mp.Array("c", 8), mp.RawArray("i", 3)
    vq = mp.Queue()
    p = run(shared_child, v, arr, s, raw, vq)
    seen = vq.get(timeout=60)
    p.join(60)
    assert seen == ([0, 11, 12, 13, 0], 5, b"hello", 99), seen
    assert v.value == 7.5 and arr[:] == [0, 11, 12, 13, 0] and s.value == b"hello" and raw[0] == 99
    assert np.frombuffer(raw, dtype=np.int32)[0] == 99  # a real ctypes object here, over shared memory
    with v.get_lock():
        v.value += 1
    assert v.value == 8.5
    ok("Value, Array, RawArray")

    # the stdlib's Queue and SimpleQueue made with this context, read by children on every node (every item
    # once, get with a timeout). (Not read here: this process's relay thread takes what reaches the pipe.)
    from multiprocessing import queues as mpq

    ctx = mp.get_context()
    sq, ssq, sout = mpq.Queue(ctx=ctx), mpq.SimpleQueue(ctx=ctx), mp.Queue()
    D = ctx.Process
    ps = [
        D(target=stdlib_queue_child, args=(sq, ssq, sout, k % N_NODES, k == 0), node=k % N_NODES)
        for k in range(3)
    ]
    for p in ps:
        p.start()
    for i in range(300):
        (sq if i % 2 else ssq).put(i)
    for _ in range(4):  # (each reader, the first child's own among them, stops at the first it takes)
        sq.put(None)
        ssq.put(None)
    got = [sout.get(timeout=90) for _ in range(4)]
    for p in ps:
        p.join(60)
        assert p.exitcode == 0, p.exitcode
    seen = sorted(x for _, xs in got for x in xs)
    assert seen == list(range(300)), (len(seen), seen[:5])
    ok(f"stdlib Queue and SimpleQueue, every item once (readers on nodes {sorted({k for k, _ in got})})")

    # a Manager's proxies, used from every node
    with mp.Manager() as m:
        d, lst = m.dict(), m.list()
        ps = [run(manager_child, d, lst, k) for k in range(3)]
        for p in ps:
            p.join(60)
            assert p.exitcode == 0, p.exitcode
        assert sorted(lst) == [0, 1, 2] and set(d) == {0, 1, 2}, (list(lst), dict(d))
        where = sorted(set(d.values()))
    ok(f"Manager dict and list (used from nodes {where})")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
