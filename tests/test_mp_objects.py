"""Queues, pipes, locks, semaphores, conditions, events, barriers and shared values of the 'dragon' start
method between processes, on one node (tests/mpi_apps/mp_objects_app.py under dragon-launch; the same app runs
across three virtual nodes in test_mp_multinode.py)."""

import os
import subprocess

import pytest
from test_runtime_util import launch_cmd, launch_env, run_app, run_app_ok

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "mp_objects_app.py")


@pytest.mark.timeout(200)
def test_objects_between_processes_on_one_node(tmp_path):
    r = subprocess.run(
        launch_cmd(APP), cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=190
    )
    assert "ALL OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "every item once (children on nodes [0])" in r.stdout
    assert "Manager dict and list (used from nodes [0])" in r.stdout
    assert "Can't pickle local object" in r.stderr  # the unpicklable object was reported, not raised


# shared values that were never sent to another process are freed when they are garbage (the block's own
# view, held by the ctypes object until after its attributes went, made every free fail: one heap block
# per Value, Array, RawValue, RawArray or Barrier ever made, until the process exited); one that was sent
# stays, and reads what the child wrote. A value received from another process keeps that process's heap
# mapped only while it lives (a cache kept every sender's heap, and its memory, mapped for good)
SHARED_VALUES_APP = r"""
import gc
import dragon
import multiprocessing as mp
from dragon.mp import heap

def add(v):
    v.value += 5

def send_value(q, back):
    q.put(mp.get_context("dragon").Value("i", 7))
    back.get(timeout=30)  # (until the parent has it)

def dead_heaps_mapped():
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/dragon-" in line and "(deleted)" in line)

def make(ctx, n):
    for i in range(n):
        v = ctx.Value("i", i)
        a = ctx.Array("d", 100)
        r = ctx.RawValue("q", i)
        ra = ctx.RawArray("b", b"xyz")
        b = ctx.Barrier(2)
        assert v.value == i and len(a) == 100 and r.value == i and bytes(ra) == b"xyz" and b.parties == 2

def blocks():
    gc.collect()
    return heap.pool().stats()["allocated_blocks"]

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    heap.pool()
    base = heap.pool().stats()["allocated_blocks"]
    make(ctx, 50)
    after_n = blocks()
    make(ctx, 100)
    after_2n = blocks()
    assert after_n == after_2n == base, (base, after_n, after_2n)
    kept = ctx.Value("i", 1)
    p = ctx.Process(target=add, args=(kept,))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and kept.value == 6, (p.exitcode, kept.value)
    gc.collect()
    assert heap.pool().stats()["allocated_blocks"] > base  # (sent: it lives as long as the heap)
    # a value another process sent: its heap is mapped here while the value lives, not after
    for _ in range(10):
        q, back = ctx.Queue(), ctx.Queue()
        p = ctx.Process(target=send_value, args=(q, back))
        p.start()
        v = q.get(timeout=30)
        assert v.value == 7
        del v
        back.put(None)
        p.join(30)
        assert p.exitcode == 0
    gc.collect()
    assert dead_heaps_mapped() == 0, dead_heaps_mapped()
    print("BOUNDED", base, after_n, after_2n)
"""


@pytest.mark.timeout(120)
def test_shared_values_do_not_pile_up(tmp_path):
    run_app_ok(tmp_path, SHARED_VALUES_APP, "BOUNDED")


# a process that polls a pipe's reader end it shares and then reads nothing (or ends) takes nothing from the
# other readers, as with an os pipe: a poll read the message ahead and held it in the polling process, so the
# parent never got it (its poll(5) said False) and it was lost with the child. Markers (a writer's copy
# announced, closed) at the head are still accounted by the poll, which then sees the data behind them.
POLL_APP = r"""
import dragon
import multiprocessing as mp

def poller(r, w, out, wait=0.0):
    w.close()  # (its copy's BYE goes into the channel behind what is there)
    out.put(r.poll(wait))
    out.put(r.poll(0))

if __name__ == "__main__":
    mp.set_start_method("dragon")
    r, w = mp.Pipe(duplex=False)
    out = mp.Queue()
    w.send("first")
    for _ in range(3):
        p = mp.Process(target=poller, args=(r, w, out))
        p.start()
        p.join(60)
        assert (out.get(timeout=30), out.get(timeout=30)) == (True, True)
    assert r.poll(5) and r.recv() == "first"
    p = mp.Process(target=poller, args=(r, w, out, None))
    p.start()  # (its poll takes the markers of its copy of w and waits for data)
    w.send("second")
    assert (out.get(timeout=30), out.get(timeout=30)) == (True, True)
    p.join(60)
    assert r.recv() == "second" and not r.poll(0)
    print("POLLED", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_poll_takes_nothing_from_the_other_readers(tmp_path):
    run_app_ok(tmp_path, POLL_APP, "POLLED")


# readers of a stdlib Queue in dragon processes lock within their own process (dragon.mp.relay), so a get
# with a timeout polls and then reads with nothing stopping another process in between: what its poll found
# must be kept for it. A poll that left the message in the channel let another reader take it, and the get
# then waited in its read for the next item past its timeout (the job hung in 1 of 2 runs)
STDLIB_QUEUE_READERS_APP = r"""
import dragon
import multiprocessing as mp
import multiprocessing.queues as mq
import queue
import time

def reader(q, out):
    got = 0
    end = time.monotonic() + 4
    while time.monotonic() < end:
        try:
            q.get(timeout=0.01)
            got += 1
        except queue.Empty:
            pass
    out.put(got)

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    q, out = mq.Queue(ctx=ctx), ctx.Queue()
    ps = [ctx.Process(target=reader, args=(q, out)) for _ in range(3)]
    for p in ps:
        p.start()
    for i in range(200):
        q.put(i)
        time.sleep(0.01)
    assert sum(out.get(timeout=60) for _ in ps) == 200
    for p in ps:
        p.join(60)
    print("ALL READ", flush=True)
"""


@pytest.mark.timeout(120)
def test_readers_of_a_stdlib_queue_get_with_a_timeout(tmp_path):
    run_app_ok(tmp_path, STDLIB_QUEUE_READERS_APP, "ALL READ")


# connection.wait() over a dragon connection and an os pipe, both readable: it returned only the os pipe (as
# long as the readiness watcher had not yet seen the message sent just before), where the stdlib returns both
WAIT_APP = r"""
import dragon
import multiprocessing as mp
import os
from multiprocessing.connection import wait

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    r, w = ctx.Pipe(duplex=False)
    rfd, wfd = os.pipe()
    os.write(wfd, b"x")
    assert wait([r], timeout=0.2) == []
    for i in range(300):
        w.send(i)
        assert sorted(map(id, wait([r, rfd], timeout=5))) == sorted(map(id, [r, rfd])), i
        assert r.recv() == i
    print("BOTH READY", flush=True)
"""


@pytest.mark.timeout(120)
def test_wait_sees_a_message_sent_just_before(tmp_path):
    run_app_ok(tmp_path, WAIT_APP, "BOTH READY")


# a message longer than recv_bytes' maxlength: as with the stdlib, a read-only end is then closed (it said
# closed False and raised "connection is write-only"), a duplex one still writes
MAXLENGTH_APP = r"""
import dragon
import multiprocessing as mp

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    r, w = ctx.Pipe(duplex=False)
    w.send_bytes(b"x" * 100)
    w.send_bytes(b"y")
    for call in (lambda: r.recv_bytes(10), r.poll, r.recv_bytes):
        try:
            call()
            raise AssertionError("no OSError")
        except OSError as e:
            print(str(e), flush=True)
    assert r.closed
    a, b = ctx.Pipe()
    a.send_bytes(b"x" * 100)
    try:
        b.recv_bytes(10)
    except OSError as e:
        print(str(e), flush=True)
    assert not b.closed
    b.send("still writes")
    assert a.recv() == "still writes"
    print("MAXLENGTH OK", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_read_only_end_is_closed_after_a_too_long_message(tmp_path):
    r = run_app(tmp_path, MAXLENGTH_APP, timeout=110)
    assert r.stdout.split("\n")[:3] == ["bad message length", "handle is closed", "handle is closed"], (
        r.stdout
    )
    assert "MAXLENGTH OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"


# a duplex end whose other end is closed everywhere (it read the end of file) sent into a channel nobody would
# read again, and once that held 1024 messages a send waited for ever; with the stdlib it raises
# BrokenPipeError (a loop `while True: conn.send(x)` that stops on it hung)
BROKEN_PIPE_APP = r"""
import dragon
import multiprocessing as mp

def peer(b):
    b.send("bye")

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    for node_eof in ("recv", "poll"):
        a, b = ctx.Pipe()
        p = ctx.Process(target=peer, args=(b,))
        p.start()
        b.close()
        assert a.recv() == "bye"
        try:
            a.recv() if node_eof == "recv" else a.poll(60)
        except EOFError:
            pass
        p.join(60)
        for send in (lambda: a.send("x"), lambda: a.send_bytes(b"x")):
            n = 0
            try:
                while n < 5000:
                    send()
                    n += 1
            except BrokenPipeError:
                print("BROKEN", node_eof, n, flush=True)
    print("DONE", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_duplex_end_at_end_of_file_gets_broken_pipe(tmp_path):
    r = run_app(tmp_path, BROKEN_PIPE_APP, timeout=110)
    assert r.stdout.split("\n")[:4] == ["BROKEN recv 0"] * 2 + ["BROKEN poll 0"] * 2, r.stdout
    assert "DONE" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"


# wait() on a connection another thread of the process is receiving from: fileno() must not wait for that
# thread's read (it held the reader's lock, and wait() did not return until a message came)
WAIT_WHILE_RECV_APP = r"""
import dragon
import multiprocessing as mp
import threading
from multiprocessing.connection import wait

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    a, b = ctx.Pipe()
    got = []
    t = threading.Thread(target=lambda: got.append(b.recv()))
    t.start()
    while b._rlock.acquire(blocking=False):  # until the thread waits in recv, holding the reader's lock
        b._rlock.release()
    assert wait([b], timeout=1) == []
    a.send("one")
    t.join(60)
    assert got == ["one"]
    print("WAITED", flush=True)
"""


@pytest.mark.timeout(60)
def test_wait_while_another_thread_receives(tmp_path):
    run_app_ok(tmp_path, WAIT_WHILE_RECV_APP, "WAITED", timeout=50)
