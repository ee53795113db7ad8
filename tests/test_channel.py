"""Channels: send/recv variants, blocking and timeouts, wake-ups, full/empty, zero-copy, bad input."""

import multiprocessing as mp
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from dragon.channels import Channel, Message
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout, DragonError
from dragon.pools import Pool

ctx = mp.get_context("fork")


@pytest.fixture
def ch(pool):
    c = Channel.create(pool, capacity=8, block_size=64)
    yield c
    c.close()


# ------------------------------------------------------------------------------------------ basics
def test_attributes_and_attach(pool):
    c = Channel.create(pool, capacity=5, block_size=100, name="basic")
    assert (c.capacity, c.block_size, c.name, len(c)) == (5, 100, "basic", 0)
    assert c.pool is pool and c.creator
    d = Channel.attach(c.sdesc)
    assert (d.capacity, d.block_size, d.name, d.sdesc) == (5, 100, "basic", c.sdesc) and not d.creator
    d.send(b"x")
    assert len(c) == 1 and c.recv() == b"x"
    c.destroy()


def test_send_recv_types_and_sizes(ch, pool):
    msgs = [
        b"",
        b"a",
        b"x" * 64,
        b"y" * 65,
        os.urandom(100000),
        bytearray(b"ba"),
        memoryview(b"mv"),
        np.arange(5, dtype=np.int32),
        np.arange(100, dtype=np.float64),
    ]
    for m in msgs[:4]:
        ch.send(m)
    assert [ch.recv() for _ in range(4)] == [bytes(m) for m in msgs[:4]]
    for m in msgs[4:]:
        ch.send(m)
        assert ch.recv() == bytes(memoryview(m).cast("B"))
    ch.send(np.arange(20)[::2])  # non-contiguous: copied once more, still works
    assert np.array_equal(np.frombuffer(ch.recv(), dtype=int), np.arange(20)[::2])
    with pytest.raises(TypeError):
        ch.send("a str")
    with pytest.raises(TypeError):
        ch.send(12)
    assert pool.stats()["allocated_blocks"] == 1  # only the channel itself


def test_fifo_order_and_full_empty(ch):
    with pytest.raises(ChannelEmpty):
        ch.recv(timeout=0)
    for i in range(8):
        ch.send(struct.pack("<I", i), timeout=0)
    assert len(ch) == 8
    with pytest.raises(ChannelFull):
        ch.send(b"x", timeout=0)
    with pytest.raises(ChannelTimeout):
        ch.send(b"x", timeout=0.05)
    assert [struct.unpack("<I", ch.recv(timeout=0))[0] for _ in range(8)] == list(range(8))
    # many laps around the ring
    for i in range(1000):
        ch.send(struct.pack("<I", i))
        if i % 3 == 0:
            ch.send(b"extra")
            assert ch.recv() == struct.pack("<I", i)
            assert ch.recv() == b"extra"
        else:
            assert ch.recv() == struct.pack("<I", i)


def test_recv_into(ch):
    buf = bytearray(100)
    ch.send(b"hello")
    assert ch.recv_into(buf) == 5 and buf[:5] == b"hello"
    ch.send(os.urandom(1000))
    with pytest.raises(ChannelError, match="too small"):
        ch.recv_into(buf)
    with pytest.raises(ChannelError, match="too small"):
        ch.recv_into(buf, timeout=None)  # does not wait either: the message is there
    assert len(ch) == 1  # not lost
    big = np.zeros(1000, dtype=np.uint8)
    assert ch.recv_into(big) == 1000
    with pytest.raises(TypeError):
        ch.recv_into(b"readonly bytes")
    with pytest.raises(ChannelEmpty):
        ch.recv_into(buf, timeout=0)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 << 10, 1 << 20, "largest"])
def test_copying_api_at_every_size_that_matters(pool, size):
    """send / recv / recv_into at 0, 1, the inline limit (block_size 64) -1, exact and +1, 64 KiB, 1 MiB and
    the largest block the pool holds: the payload comes back intact, into bytes or into any writable buffer
    (bytearray, numpy array, a memoryview slice), a too-small buffer raises ChannelError and leaves the
    message queued, and every pool block is freed afterwards."""
    ch = Channel.create(pool, capacity=4, block_size=64)
    if size == "largest":
        size = pool.stats()["free_bytes"]  # (the channel's block is at the start: the rest is one run)
    data = os.urandom(size)
    ch.send(data)
    got = ch.recv()
    assert type(got) is bytes and got == data
    for buf in (bytearray(size), np.zeros(size + 7, dtype=np.uint8), memoryview(bytearray(size + 9))[5:]):
        ch.send(data)
        assert ch.recv_into(buf) == size and bytes(memoryview(buf)[:size]) == data
    if size:
        ch.send(data)
        with pytest.raises(ChannelError, match="too small"):
            ch.recv_into(bytearray(size - 1), timeout=0)
        assert len(ch) == 1 and ch.recv(timeout=0) == data  # not lost, not changed
    assert pool.stats()["allocated_blocks"] == 1  # only the channel: every message's block was freed
    ch.destroy()


def test_copying_api_bad_buffers_and_timeouts(pool):
    """recv_into refuses what is not a writable contiguous buffer with TypeError and leaves the message
    queued; recv and recv_into raise ChannelEmpty (timeout 0) and ChannelTimeout (timeout t) when empty."""
    ch = Channel.create(pool, capacity=4, block_size=64)
    ch.send(b"m" * 1000)
    for bad in (
        b"read-only",
        memoryview(bytearray(4000))[::2],  # not contiguous
        np.zeros((40, 40), dtype=np.uint8)[:, ::2],
        "a str",
        5,
        None,
    ):
        with pytest.raises(TypeError):
            ch.recv_into(bad)
    assert len(ch) == 1 and ch.recv_into(bytearray(1000)) == 1000
    for call in (ch.recv, lambda timeout: ch.recv_into(bytearray(10), timeout=timeout)):
        with pytest.raises(ChannelEmpty):
            call(timeout=0)
        with pytest.raises(ChannelTimeout):
            call(timeout=0.05)
    ch.destroy()


def test_timeouts_a_bool_a_str_a_huge_int_and_nan_at_create(pool):
    """A timeout is None or a number of seconds: a bool (True is not "1 s") or a str is a TypeError; an int
    beyond a double waits as long as forever (one too negative: not at all), not an OverflowError; NaN is
    refused by create even when the pool's lock is free (no wait needed)."""
    ch = Channel.create(pool, capacity=4, block_size=64)
    for bad in (True, False, "1"):
        with pytest.raises(TypeError):
            ch.recv(timeout=bad)
        with pytest.raises(TypeError):
            ch.send(b"x", timeout=bad)
    assert len(ch) == 0
    ch.send(b"x", timeout=10**400)
    assert ch.recv(timeout=10**400) == b"x"
    with pytest.raises(ChannelEmpty):
        ch.recv(timeout=-(10**400))
    with pytest.raises(ChannelError, match="nan"):
        Channel.create(pool, capacity=4, timeout=float("nan"))
    ch.destroy()


def test_the_timeout_rule_the_remote_handle_shares():
    """core.timeout_seconds is the rule every wait of the core applies, stated once (a remote channel handle
    reads its timeouts through it): None means for good, as does more than 1e9 s or an int beyond a double;
    <= 0 means now."""
    from dragon._core.core import timeout_seconds

    assert timeout_seconds(None) is None and timeout_seconds(2e9) is None and timeout_seconds(10**400) is None
    assert timeout_seconds(0) == 0.0 and timeout_seconds(-3) == 0.0 and timeout_seconds(-(10**400)) == 0.0
    assert timeout_seconds(1.5) == 1.5 and timeout_seconds(2) == 2.0
    for bad in (True, "1", b"1", [1]):
        with pytest.raises(TypeError, match="number of seconds"):
            timeout_seconds(bad)
    with pytest.raises(ChannelError, match="nan"):
        timeout_seconds(float("nan"))


def test_recv_message_zero_copy(ch, pool):
    data = np.arange(10000, dtype=np.float64)
    ch.send(data)
    before = pool.stats()["allocated_blocks"]
    m = ch.recv_message()
    assert isinstance(m, Message) and m.in_pool and len(m) == data.nbytes
    a = np.frombuffer(m, dtype=np.float64)
    assert np.array_equal(a, data)
    assert pool.stats()["allocated_blocks"] == before  # the block now belongs to the message
    m.release()  # a numpy view is alive: the block stays
    assert pool.stats()["allocated_blocks"] == before and a[-1] == 9999.0
    with pytest.raises(ChannelError, match="released"):
        memoryview(m)
    del a
    assert pool.stats()["allocated_blocks"] == before - 1
    ch.send(b"small")
    with ch.recv_message() as m2:
        assert not m2.in_pool and bytes(m2) == b"small"
        memoryview(m2)[0:1] = b"S"  # writable
        assert bytes(m2) == b"Small"
    ch.send(os.urandom(5000))
    m3 = ch.recv_message()
    del m3  # garbage collection frees the block too
    assert pool.stats()["allocated_blocks"] == before - 1


def test_send_block_zero_copy(ch, pool):
    b = pool.alloc(4096)
    np.frombuffer(b, dtype=np.int32)[:] = 7
    off = b.offset
    ch.send_block(b, nbytes=4000)
    assert b.freed
    with pytest.raises(ChannelError, match="freed or sent"):
        ch.send_block(b)
    m = ch.recv_message()
    assert len(m) == 4000 and np.frombuffer(m, dtype=np.int32).sum() == 7000
    assert m.in_pool
    m.release()
    ch.send_block(pool.alloc(10))  # small blocks travel by offset too; recv() copies and frees
    assert ch.recv() == bytes(10) or len(ch) == 0
    assert pool.stats()["allocated_blocks"] == 1
    with pytest.raises(ChannelError, match="does not fit"):
        ch.send_block(pool.alloc(10), nbytes=100000)
    with Pool.create(4096) as other, pytest.raises(ChannelError, match="another pool"):
        ch.send_block(other.alloc(10))
    with pytest.raises(TypeError):
        ch.send_block(b"bytes")
    assert off >= 0


def test_send_many_recv_many(ch):
    assert ch.send_many([b"a", bytearray(b"b"), np.array([1], dtype=np.uint8), b"x" * 500]) == 4
    out = ch.recv_many(10)
    assert out == [b"a", b"b", b"\x01", b"x" * 500]
    with pytest.raises(ChannelEmpty):
        ch.recv_many(3, timeout=0)
    assert ch.send_many([b"%d" % i for i in range(20)], timeout=0) == 8  # partial: returns the count
    with pytest.raises(ChannelFull):
        ch.send_many([b"z"], timeout=0)
    assert ch.recv_many(3) == [b"0", b"1", b"2"]
    assert ch.recv_many(100, timeout=0) == [b"%d" % i for i in range(3, 8)]
    with pytest.raises(ChannelError):
        ch.recv_many(0)
    assert ch.send_many([]) == 0


def test_send_many_checks_every_item_before_sending_any(ch, pool):
    """All or nothing for bad input: an item that is not bytes-like, or that could never be sent, raises
    before the good ones in front of it are sent (a generator too)."""
    with pytest.raises(TypeError, match=r"not int \(item 1\): nothing was sent"):
        ch.send_many([b"a", 1, b"b"])
    with pytest.raises(TypeError, match="item 2"):
        ch.send_many(x for x in (b"a", bytearray(b"b"), "text"))
    with pytest.raises(ChannelError, match="more than its pool could ever hold"):
        ch.send_many([b"a", b"x" * (pool.size + 1)])
    assert len(ch) == 0
    with pytest.raises(ChannelEmpty):
        ch.recv(timeout=0)
    assert ch.send_many(x for x in (b"a", memoryview(b"bc")[::-1])) == 2  # (a strided view is copied)
    assert ch.recv_many(5, timeout=0) == [b"a", b"cb"]


def test_poll(ch):
    assert ch.poll(timeout=0) is False
    t = time.monotonic()
    assert ch.poll(timeout=0.1) is False
    assert time.monotonic() - t >= 0.09
    ch.send(b"x")
    assert ch.poll() and ch.poll(0) and len(ch) == 1  # does not consume
    ch.recv()
    threading.Timer(0.1, ch.send, (b"y",)).start()
    assert ch.poll(timeout=10)
    assert ch.recv() == b"y"


def test_peek(ch):
    # the first bytes of the next message and its length, without taking it: inline and in a pool block
    assert ch._peek() is None
    ch.send(b"hello world")
    ch.send(b"z" * 5000)
    assert ch._peek(5) == (b"hello", 11) and ch._peek(0) == (b"", 11) and ch._peek() == (b"hello world", 11)
    assert len(ch) == 2 and ch.recv() == b"hello world"
    assert ch._peek(3) == (b"zzz", 5000) and len(ch) == 1
    assert ch.recv() == b"z" * 5000 and ch._peek() is None
    for bad in (-1, 257):
        with pytest.raises(ValueError):
            ch._peek(bad)


def _drain_counting(sdesc, n, out):
    c = Channel.attach(sdesc)
    got = 0
    while got < n:
        try:
            c.recv(timeout=30)
        except ChannelTimeout:
            break
        got += 1
    out.put(got)


@pytest.mark.timeout(120)
def test_peek_while_other_processes_take(pool):
    # a peek races receivers of other processes: it sees a message that is at the head (never a torn or freed
    # one: every message says its own length in its first bytes), or none, and takes nothing
    c = Channel.create(pool, capacity=64, block_size=32)
    n = 20000
    out = ctx.Queue()
    takers = [ctx.Process(target=_drain_counting, args=(c.sdesc, n // 2, out)) for _ in range(2)]
    for t in takers:
        t.start()
    seen = 0
    for i in range(n):
        size = 16 if i % 3 else 300 + i % 700  # inline and in blocks
        c.send(struct.pack("<I", size).ljust(size, b"p"))
        head = c._peek(4)
        if head is not None:
            assert struct.unpack("<I", head[0])[0] == head[1]
            seen += 1
    assert sorted(out.get(timeout=60) for _ in takers) == [n // 2, n // 2]  # nothing taken by the peeks
    for t in takers:
        t.join(30)
    assert seen and len(c) == 0
    c.destroy()


# ------------------------------------------------------------------------------------------ blocking across
# processes
def _send_later(sdesc, delay, payloads):
    time.sleep(delay)
    c = Channel.attach(sdesc)
    for p in payloads:
        c.send(p)


def test_blocking_recv_woken_by_late_sender(ch):
    proc = ctx.Process(target=_send_later, args=(ch.sdesc, 0.3, [b"late", b"x" * 5000]))
    proc.start()
    t = time.monotonic()
    assert ch.recv(timeout=None) == b"late"
    assert time.monotonic() - t >= 0.25
    assert ch.recv(timeout=10) == b"x" * 5000
    proc.join(10)


def _recv_n(sdesc, n, q):
    c = Channel.attach(sdesc)
    time.sleep(0.3)
    q.put([c.recv(timeout=10) for _ in range(n)])


def test_blocking_send_woken_by_receiver(ch):
    for i in range(8):
        ch.send(b"%d" % i)
    q = ctx.Queue()
    proc = ctx.Process(target=_recv_n, args=(ch.sdesc, 10, q))
    proc.start()
    t = time.monotonic()
    ch.send(b"8", timeout=None)
    assert time.monotonic() - t >= 0.2
    ch.send(b"9", timeout=10)
    assert q.get(timeout=20) == [b"%d" % i for i in range(10)]
    proc.join(10)


def _blocked_recv_cpu(sdesc, q):
    c = Channel.attach(sdesc)
    t0 = os.times()
    w0 = time.monotonic()
    try:
        c.recv(timeout=1.0)
        q.put(("got", 0, 0))
    except ChannelTimeout:
        t1 = os.times()
        q.put(("timeout", (t1.user - t0.user) + (t1.system - t0.system), time.monotonic() - w0))


def test_blocked_receiver_uses_no_cpu(ch):
    q = ctx.Queue()
    proc = ctx.Process(target=_blocked_recv_cpu, args=(ch.sdesc, q))
    proc.start()
    what, cpu, wall = q.get(timeout=20)
    proc.join(10)
    assert what == "timeout" and wall >= 0.95
    assert cpu < 0.05 * wall, f"blocked receiver used {cpu:.3f} s CPU in {wall:.2f} s"


def _many_blocked(sdesc, q):
    c = Channel.attach(sdesc)
    try:
        q.put(c.recv(timeout=20))
    except ChannelError as e:
        q.put(type(e).__name__)


def test_wakeups_not_lost_with_many_waiters(ch):
    q = ctx.Queue()
    procs = [ctx.Process(target=_many_blocked, args=(ch.sdesc, q)) for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # all asleep on the futex
    for i in range(4):
        ch.send(b"m%d" % i)
        time.sleep(0.02)
    got = sorted(q.get(timeout=20) for _ in range(4))
    assert got == [b"m0", b"m1", b"m2", b"m3"]
    for p in procs:
        p.join(10)


def test_timeout_semantics(ch):
    for bad_t in (0, -1, 0.0):
        with pytest.raises(ChannelEmpty):
            ch.recv(timeout=bad_t)
    t = time.monotonic()
    with pytest.raises(ChannelTimeout) as ei:
        ch.recv(timeout=0.2)
    assert time.monotonic() - t >= 0.19 and isinstance(ei.value, TimeoutError)
    with pytest.raises(TypeError):
        ch.recv(timeout="soon")
    with pytest.raises(ChannelError, match="timeout"):
        ch.recv(timeout=float("nan"))
    with pytest.raises(ChannelEmpty):
        ch.recv(timeout=float("-inf"))


def test_threads_block_without_gil(ch):
    got = []
    th = threading.Thread(target=lambda: got.append(ch.recv(timeout=10)))
    th.start()
    time.sleep(0.2)
    t = time.monotonic()
    n = 0
    while time.monotonic() - t < 0.1:  # the main thread keeps running while the other is blocked
        n += 1
    ch.send(b"go")
    th.join(10)
    assert got == [b"go"] and n > 1000


# ------------------------------------------------------------------------------------------ destroy / close
def _blocked_until_destroy(sdesc, q):
    c = Channel.attach(sdesc)
    try:
        c.recv()
        q.put("received?")
    except ChannelError as e:
        q.put(("ChannelError", str(e)))


def test_destroy_wakes_blocked_receiver(pool):
    c = Channel.create(pool, capacity=4, block_size=16)
    q = ctx.Queue()
    proc = ctx.Process(target=_blocked_until_destroy, args=(c.sdesc, q))
    proc.start()
    time.sleep(0.3)
    c.destroy()
    kind, msg = q.get(timeout=10)
    proc.join(10)
    assert kind == "ChannelError" and "destroyed" in msg


def test_destroy_wakes_blocked_thread_and_frees_queued_blocks(pool):
    base = pool.stats()["allocated_blocks"]
    c = Channel.create(pool, capacity=2, block_size=16)
    c.send(b"x" * 1000)
    c.send(b"y" * 1000)
    errs = []

    def sender():
        try:
            c.send(b"z")
        except ChannelError as e:
            errs.append(e)

    th = threading.Thread(target=sender)
    th.start()
    time.sleep(0.2)
    c.destroy()
    th.join(10)
    assert len(errs) == 1 and not isinstance(errs[0], (ChannelFull, ChannelTimeout))
    assert pool.stats()["allocated_blocks"] == base  # channel and both queued blocks freed


def test_use_after_close_and_destroy(pool):
    c = Channel.create(pool, capacity=2)
    d = Channel.attach(c.sdesc)
    d.close()
    d.close()
    for op in (lambda: d.send(b"x"), lambda: d.recv(0), lambda: len(d), lambda: d.poll(0), d.destroy):
        with pytest.raises(ChannelError, match="closed"):
            op()
    e = Channel.attach(c.sdesc)
    c.destroy()
    for h in (c, e):
        for op in (
            lambda h=h: h.send(b"x"),
            lambda h=h: h.recv(0),
            lambda h=h: h.recv_message(0),
            lambda h=h: h.poll(0),
            lambda h=h: h.send_many([b"x"]),
            lambda h=h: h.recv_many(1, 0),
            h.destroy,
        ):
            with pytest.raises(ChannelError, match="destroyed"):
                op()
    with pytest.raises(ChannelError):
        Channel.attach(c.sdesc)


def test_context_manager(pool):
    base = pool.stats()["allocated_blocks"]
    with Channel.create(pool) as c:
        with Channel.attach(c.sdesc) as d:
            d.send(b"1")
        assert d.closed and c.recv() == b"1"
    assert pool.stats()["allocated_blocks"] == base


def test_pool_destroyed_under_channel():
    p = Pool.create(1 << 16)
    c = Channel.create(p, capacity=2)
    p.destroy()
    with pytest.raises(ChannelError, match="pool"):
        c.send(b"x")
    with pytest.raises(ChannelError):
        Channel.attach(c.sdesc)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_create_args(pool):
    for kw in ({"capacity": 0}, {"capacity": -1}, {"block_size": -1}, {"capacity": 1 << 40}):
        with pytest.raises(ChannelError):
            Channel.create(pool, **kw)
    with pytest.raises(ChannelError, match="more than pool"):
        Channel.create(pool, capacity=100000, block_size=1 << 20)
    with pytest.raises(ChannelError, match="too long"):
        Channel.create(pool, name="n" * 100)
    with pytest.raises(TypeError):
        Channel.create("not a pool")
    with pytest.raises(TypeError):
        Channel.create(pool, capacity="x")
    with pytest.raises(TypeError):
        Channel.create(pool, capacity=2.0)
    with pytest.raises(ChannelError, match="out of range"):
        Channel.create(pool, capacity=2**99)
    with pytest.raises(TypeError):
        Channel()
    closed = Pool.attach(pool.sdesc)
    closed.close()
    with pytest.raises(ChannelError, match="closed"):
        Channel.create(closed)


def test_message_larger_than_pool():
    with Pool.create(1 << 16) as p:
        c = Channel.create(p, capacity=2, block_size=64)
        for t in (None, 0, 1):
            with pytest.raises(ChannelError, match="could ever hold"):
                c.send(b"x" * (1 << 17), timeout=t)
        big = c.pool.alloc(30000)
        with pytest.raises(ChannelFull, match="no room"):
            c.send(b"x" * 40000, timeout=0)
        with pytest.raises(ChannelTimeout):
            c.send(b"x" * 40000, timeout=0.05)
        p.free(big)
        c.send(b"x" * 40000, timeout=0)
        assert c.recv() == b"x" * 40000


def test_garbage_truncated_and_stale_sdesc(pool):
    c = Channel.create(pool, capacity=2)
    sd = c.sdesc
    for bad in (b"", b"DRGN", sd[:-1], sd[:20], sd + b"\0", os.urandom(len(sd)), b"\0" * len(sd)):
        with pytest.raises(ChannelError):
            Channel.attach(bad)
    with pytest.raises(ChannelError, match="not a channel sdesc"):
        Channel.attach(pool.sdesc)
    with pytest.raises(TypeError):
        Channel.attach(None)
    for off in (0, 1, 1 << 40, 4096, struct.unpack_from("<Q", sd, 24)[0] + 256):
        bad = bytearray(sd)
        struct.pack_into("<Q", bad, 24, off)
        with pytest.raises(ChannelError):
            Channel.attach(bytes(bad))
    blk = pool.alloc(5000)  # an allocated block that is not a channel
    bad = bytearray(sd)
    struct.pack_into("<Q", bad, 24, blk.offset)
    with pytest.raises(ChannelError, match="corrupt"):
        Channel.attach(bytes(bad))
    bad = bytearray(sd)
    struct.pack_into("<Q", bad, 32, 12345)  # generation
    with pytest.raises(ChannelError, match="stale"):
        Channel.attach(bytes(bad))
    c.destroy()
    c2 = Channel.create(pool, capacity=2)  # likely the same offset, new generation
    with pytest.raises(ChannelError):
        Channel.attach(sd)
    c2.destroy()


def test_errors_hierarchy():
    assert issubclass(ChannelTimeout, TimeoutError) and issubclass(ChannelTimeout, ChannelError)
    assert issubclass(ChannelFull, ChannelError) and issubclass(ChannelEmpty, ChannelError)
    assert issubclass(ChannelError, DragonError)


def _pickled_handle(c, q):
    c.send(b"via pickle")
    q.put("ok")


def test_handles_pickle_to_spawned_process(ch):
    sctx = mp.get_context("spawn")
    q = sctx.Queue()
    proc = sctx.Process(target=_pickled_handle, args=(ch, q))
    proc.start()
    assert q.get(timeout=60) == "ok"
    proc.join(60)
    assert ch.recv(timeout=5) == b"via pickle"


# ------------------------------------------------------------------------------------------ signals
def _blocked_then_sigint(sdesc, what, q):
    c = Channel.attach(sdesc)
    try:
        q.put("ready")
        t = time.monotonic()
        if what == "recv":
            c.recv()
        elif what == "poll":
            c.poll()
        elif what == "send":
            while True:
                c.send(b"fill")
        elif what == "alloc":
            c.pool.alloc(c.pool.size)
    except KeyboardInterrupt:
        q.put(("KeyboardInterrupt", time.monotonic() - t))
    except Exception as e:  # noqa: BLE001 - reported to the test
        q.put((repr(e), 0))


@pytest.mark.parametrize("what", ["recv", "poll", "send", "alloc"])
def test_ctrl_c_interrupts_blocking_calls(pool, what):
    c = Channel.create(pool, capacity=4, block_size=16)
    hog = pool.alloc(pool.stats()["free_bytes"]) if what == "alloc" else None
    q = ctx.Queue()
    proc = ctx.Process(target=_blocked_then_sigint, args=(c.sdesc, what, q))
    proc.start()
    assert q.get(timeout=10) == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGINT)
    kind, elapsed = q.get(timeout=10)
    proc.join(10)
    assert kind == "KeyboardInterrupt" and elapsed < 5
    if hog is not None:
        pool.free(hog)
    c.destroy()


def test_forked_child_does_not_free_parents_message(ch, pool):
    ch.send(os.urandom(5000))
    m = ch.recv_message()
    before = pool.stats()["allocated_blocks"]
    pid = os.fork()
    if pid == 0:  # the child's copy of the Message goes away with the child: it must not free the block
        m.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert pool.stats()["allocated_blocks"] == before
    m.release()
    assert pool.stats()["allocated_blocks"] == before - 1


def test_fuzzed_sdesc_never_crashes(pool):
    c = Channel.create(pool, capacity=4)
    sd = c.sdesc
    rng = random.Random(7)
    ok = 0
    for _ in range(3000):
        bad = bytearray(sd)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        if rng.random() < 0.1:
            bad = bad[: rng.randrange(len(bad))]
        try:
            d = Channel.attach(bytes(bad))
        except ChannelError:
            continue
        d.send(b"ok")  # whatever attached must be the real channel
        assert c.recv() == b"ok"
        ok += 1
    assert ok < 3000
    c.destroy()


def test_threads_mpmc_exactly_once(pool):
    c = Channel.create(pool, capacity=16, block_size=32)
    n_per, nthreads = 5000, 3
    got = [[] for _ in range(nthreads)]

    def produce(k):
        for i in range(n_per):
            c.send(struct.pack("<II", k, i) + b"x" * (i % 100))  # some go through pool blocks

    def consume(k):
        while True:
            m = c.recv(timeout=30)
            if m == b"STOP":
                return
            got[k].append(struct.unpack_from("<II", m))

    cons = [threading.Thread(target=consume, args=(k,)) for k in range(nthreads)]
    prods = [threading.Thread(target=produce, args=(k,)) for k in range(nthreads)]
    for t in cons + prods:
        t.start()
    for t in prods:
        t.join(60)
    for _ in cons:
        c.send(b"STOP")
    for t in cons:
        t.join(60)
    for seen in got:  # each consumer sees each producer's messages in order
        for k in range(nthreads):
            seqs = [i for p, i in seen if p == k]
            assert seqs == sorted(seqs)
    allmsgs = sorted(x for seen in got for x in seen)
    assert allmsgs == sorted((k, i) for k in range(nthreads) for i in range(n_per))
    c.destroy()
    assert pool.stats()["allocated_blocks"] == 0


def _sleep_in_recv(sdesc):
    Channel.attach(sdesc).recv()


def test_killed_sleeper_costs_at_most_one_spurious_wake(ch):
    proc = ctx.Process(target=_sleep_in_recv, args=(ch.sdesc,))
    proc.start()
    deadline = time.monotonic() + 10
    while ch._debug_state()["ne_waiters"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ch._debug_state()["ne_waiters"] == 1  # asleep on the futex
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    seq = ch._debug_state()["ne_seq"]
    ch.send(b"a")  # sees the flag, wakes (nobody), clears it
    st = ch._debug_state()
    assert st["ne_waiters"] == 0 and st["ne_seq"] == seq + 1
    ch.send(b"b")  # no wake-up syscall any more
    assert ch._debug_state()["ne_seq"] == seq + 1
    assert ch.recv() == b"a" and ch.recv() == b"b"


def test_pickling_message_copies_payload(ch):
    import pickle

    ch.send(b"m" * 3000)
    with ch.recv_message() as m:
        assert pickle.loads(pickle.dumps(m)) == b"m" * 3000


# ------------------------------------------------------------------------------------------ scribbled slots
def _slot_fields(pool, c):
    """(view of the channel's block, offset of slot i's len/flags/data) for writing garbage into slots."""
    off = struct.unpack_from("<4sBBHQQQQH", c.sdesc)[6]
    stride = (16 + c.block_size + 63) // 64 * 64
    return memoryview(pool.block(off)), lambda i: 384 + i * stride + 8, off


def test_bad_lengths_and_offsets_in_slots_raise_and_are_dropped(pool):
    """Every length and block offset read from a slot is checked against the channel and the pool before use;
    a bad slot raises ChannelError naming the channel, is dropped, and the messages behind it still come."""
    c = Channel.create(pool, capacity=16, block_size=64, name="scribbled")
    mv, field, choff = _slot_fields(pool, c)
    filler = pool.alloc(3000)  # an allocated block smaller than the lengths below
    bad = [
        struct.pack("<II", 65, 0),  # inline, longer than block_size
        struct.pack("<IIQ", 100, 1, 12345),  # a pool block offset that is no block
        struct.pack("<IIQ", 5000, 1, filler.offset),  # a block too small for its length
        struct.pack("<IIQ", 10, 1, choff),  # the channel's own block
        struct.pack("<II", 0xFFFFFFFF, 0),  # 4 GiB inline
    ]
    for i, fields in enumerate(bad):
        c.send(b"x" * 3000 if i % 2 else b"x")  # a block or an inline message, then scribbled
        mv[field(2 * i) : field(2 * i) + len(fields)] = fields
        c.send(b"good %d" % i)
    stats = pool.stats()

    def into():
        buf = bytearray(100)  # (not "buffer too small" for a bad length: the slot is dropped)
        return bytes(buf[: c.recv_into(buf, timeout=0)])

    receivers = [
        lambda: c.recv(timeout=0),
        lambda: bytes(c.recv_message(timeout=0)),
        into,
        lambda: c.recv(timeout=1),
        lambda: c.recv_many(5, timeout=0)[0],
    ]
    for i, receive in enumerate(receivers):
        assert c.poll(timeout=0)  # a bad slot is something to receive (an error)
        with pytest.raises(ChannelError, match="'scribbled': a corrupt message slot"):
            receive()
        assert receive() == b"good %d" % i
    with pytest.raises(ChannelEmpty):
        c.recv(timeout=0)
    # nothing was freed by mistake (the filler, the channel itself); the blocks of messages 1 and 3, whose
    # offsets were overwritten, stay allocated (2 blocks leak: nothing says whose they are)
    assert pool.stats()["allocated_blocks"] == stats["allocated_blocks"]
    pool.free(filler)
    c.send(b"y" * 3000)
    assert c.recv(timeout=0) == b"y" * 3000
    c.destroy()
    assert pool.stats()["allocated_blocks"] == 2


def test_recv_many_stops_before_a_bad_slot(pool):
    """recv_many returns the good messages before a bad slot (raising would lose them); the next call drops
    it."""
    c = Channel.create(pool, capacity=8, block_size=64, name="batch")
    mv, field, _ = _slot_fields(pool, c)
    for i in range(4):
        c.send(b"m%d" % i)
    mv[field(2) : field(2) + 4] = struct.pack("<I", 1000)
    assert c.recv_many(8, timeout=0) == [b"m0", b"m1"]
    with pytest.raises(ChannelError, match="corrupt"):
        c.recv_many(8, timeout=0)
    assert c.recv_many(8, timeout=0) == [b"m3"]
    c.destroy()


# ------------------------------------------------------------------------------------------ memory
_BATCHES = r"""
import resource, sys
from dragon._core import core
from dragon.channels import Channel
from dragon.pools import Pool

payload = b"x" * (1 << 20)
with Pool.create(64 << 20) as pool:
    c = Channel.create(pool, capacity=16, block_size=64)
    faults = []
    for i in range(12):
        c.send_many([payload] * 8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        got = c.recv_many(8)
        assert len(got) == 8 and got[3] == payload
        del got
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    c.close()
print(max(faults[4:]), core.keep_freed_memory())
"""


@pytest.mark.timeout(60)
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_batches_of_big_messages_do_not_fault_their_memory_in_again():
    """recv_many of 8 x 1 MiB, again and again: each batch is 8 new bytes objects. With glibc's defaults the
    freed batch goes back to the kernel and the next one faults in (and zeroes) every page again, about
    2,000 faults a batch; recv_many keeps freed memory in the heap once a batch holds 2 MiB
    (core.keep_freed_memory), unless DRAGON_KEEP_FREED_MEMORY=0."""
    runs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "DRAGON_KEEP_FREED_MEMORY": setting}
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        r = subprocess.run(
            [sys.executable, "-c", _BATCHES], env=env, capture_output=True, text=True, timeout=50
        )
        assert r.returncode == 0, r.stderr
        worst, kept = r.stdout.split()
        runs[setting] = (int(worst), kept == "True")
    assert runs["1"][1] and runs["1"][0] < 256, runs  # (a batch is 2,048 pages: none of it faults in again)
    assert not runs["0"][1] and runs["0"][0] >= 1024, runs  # (the setting is honoured; the test can tell)
