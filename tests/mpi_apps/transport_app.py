"""Programs run on every node by dragon.transport.harness (tests/test_transport.py): python transport_app.py
CASE.

Each node's program finds the test channels of every node in DRAGON_TEST_CHANS; it exits 0 when its checks
pass.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from dragon._core.core import Channel
from dragon._core.remote import WINDOW, RemoteChannel
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout

NODE = int(os.environ["DRAGON_NODE"])
NNODES = int(os.environ["DRAGON_NNODES"])
CHANS = json.loads(os.environ["DRAGON_TEST_CHANS"])


def ch(node, name):
    return Channel.attach(bytes.fromhex(CHANS[str(node)][name]))


def expect(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc:
        return
    except Exception as e:
        raise AssertionError(f"{fn} raised {e!r}, expected {exc.__name__}") from None
    raise AssertionError(f"{fn} did not raise {exc.__name__}")


def case_api():
    """Every call of the API on a remote channel, both directions, with timeouts."""
    if NODE == 0:
        r = ch(1, "a")
        assert isinstance(r, RemoteChannel)
        assert r.capacity == 1024 and r.block_size == 1024 and r.name == "a"
        expect(ChannelEmpty, r.recv, timeout=0)
        t = time.monotonic()
        expect(ChannelTimeout, r.recv, timeout=0.3)
        assert time.monotonic() - t >= 0.29
        assert r.poll(timeout=0) is False
        assert r.poll(timeout=0.2) is False
        assert len(r) == 0
        r.send(b"x1")
        r.send(bytearray(b"x2"))
        r.send(memoryview(b"--x3--")[2:4])
        assert r.send_many([b"x4", b"x5"]) == 2
        r.flush(10)
        assert len(r) == 5
        assert r.poll(timeout=5) is True
        assert r.recv(timeout=5) == b"x1"
        assert r.recv_many(2, timeout=5) == [b"x2", b"x3"]
        buf = bytearray(1)
        expect(ChannelError, r.recv_into, buf, timeout=5)  # too small: stays queued
        buf = bytearray(10)
        assert r.recv_into(buf, timeout=5) == 2 and buf[:2] == b"x4"
        assert r.recv(timeout=5) == b"x5"
        expect(TypeError, r.recv_into, b"readonly")
        # a receive that waits for the other node to send
        ch(1, "small").send(b"please")
        t = time.monotonic()
        got = r.recv(timeout=20)
        assert got == b"answer", got
        r.close()
        expect(ChannelError, r.send, b"closed")
        # a bad sdesc reaches the remote agent, which reports it on the next call
        bad = RemoteChannel(bytes.fromhex(CHANS["1"]["a"])[:-3] + b"zzz", 1)
        expect(ChannelError, bad.recv, timeout=5)
        # a node that does not exist
        nowhere = RemoteChannel(bytes.fromhex(CHANS["1"]["a"]), 7)
        expect(ChannelError, nowhere.recv, timeout=5)
        print("api ok", flush=True)
    elif NODE == 1:
        assert ch(1, "small").recv(timeout=30) == b"please"
        time.sleep(0.2)
        ch(1, "a").send(b"answer")


SIZES = [0, 1, 7, 8, 100, 1000, 1024, 1025, 4096, 32 * 1024, 32 * 1024 + 1, 100_000, 1 << 20, (1 << 20) + 3]


def payload(i, n):
    seed = hashlib.sha256(b"%d-%d" % (i, n)).digest()
    return (seed * (n // 32 + 1))[:n]


def case_sizes():
    """Every size, both ways: node 0 -> node 1 (remote send) and node 1 -> node 0 (remote receive)."""
    if NODE == 0:
        out = ch(1, "a")
        for i, n in enumerate(SIZES):
            out.send(payload(i, n))
        assert out.flush(30)
        assert ch(0, "small").recv(timeout=30) == b"received"  # node 1 took them all: now it fills its "a"
        src = ch(1, "a")
        for i, n in enumerate(SIZES):
            got = src.recv(timeout=30)
            assert got == payload(i + 100, n), (n, len(got))
        many = []
        while len(many) < 3:
            many += src.recv_many(3 - len(many), timeout=30)
        assert [len(x) for x in many] == [5, 1 << 20, 0], [len(x) for x in many]
        print("sizes ok", flush=True)
    elif NODE == 1:
        a = ch(1, "a")
        for i, n in enumerate(SIZES):
            got = a.recv(timeout=30)
            assert got == payload(i, n), (i, n, len(got))
        ch(0, "small").send(b"received")
        for i, n in enumerate(SIZES):
            a.send(payload(i + 100, n))
        a.send_many([b"12345", b"\0" * (1 << 20), b""])


def _sender(target_node, tag, count):
    """A separate process sending count numbered messages (some large) to target_node's channel a."""
    out = ch(target_node, "a")
    for i in range(count):
        big = i % 50 == 7
        body = b"%s:%d:" % (tag.encode(), i) + (b"B" * 40000 if big else b"s" * (i % 13))
        out.send(body)
    out.flush(60)
    out.close()


BIG_SIZES = [20_000, 128 * 1024, 128 * 1024 + 1, 300_000, 1 << 20, 5]


def _big_sender(target_node, tag, count):
    """A separate process streaming count numbered messages of BIG_SIZES (every path: inline, staging block
    copied into the packet, MPI message of its own, send_block) to target_node's channel a."""
    out = ch(target_node, "a")
    for i in range(count):
        n = BIG_SIZES[i % len(BIG_SIZES)]
        head = b"%s:%d:" % (tag.encode(), i)
        body = head + payload(i, n)
        if i % 3 == 2 and len(body) > 16 * 1024:
            blk = out.pool.alloc(len(body))
            memoryview(blk)[:] = body
            out.send_block(blk)
        else:
            out.send(body)
    out.flush(60)
    out.close()


def case_bigmulti():
    """Several senders on every other node stream big messages into node 0's channel: several payloads in
    flight per stream, exactly once, in order per sender, intact."""
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    per_node = 2
    if NODE == 0:
        a = ch(0, "a")
        expected = {f"n{k}p{j}": 0 for k in range(1, NNODES) for j in range(per_node)}
        total = count * len(expected)
        _take_tagged(a, expected, total, lambda i: BIG_SIZES[i % len(BIG_SIZES)])
        time.sleep(0.3)
        expect(ChannelEmpty, a.recv, timeout=0)  # nothing duplicated
        print("bigmulti ok", total, flush=True)
    else:
        _run_senders("bigsender", per_node, count)


def _take_tagged(a, expected, total, size_of):
    """Receive total messages b"<tag>:<i>:<payload(i, size_of(i))>" from channel a: each sender's (expected:
    tag -> next i) in order, every payload intact."""
    for _ in range(total):
        with a.recv_message(timeout=60) as m:
            body = bytes(m)
        tag, i, rest = body.split(b":", 2)
        tag, i = tag.decode(), int(i)
        assert expected[tag] == i, (tag, i, expected[tag])
        assert rest == payload(i, size_of(i)), (tag, i, len(rest))
        expected[tag] = i + 1


def _run_senders(kind, per_node, count):
    """per_node processes of this node, each running `transport_app.py kind 0 n<node>p<j> count` (a stream of
    count tagged messages into node 0's channel "a"); they must all succeed."""
    procs = [
        subprocess.Popen([sys.executable, __file__, kind, str(0), f"n{NODE}p{j}", str(count)])
        for j in range(per_node)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0


def case_bigboth():
    """Both ways at once, many big payloads in MPI's hands: BOTH_SENDERS processes on each of two nodes stream
    big messages (each its own MPI message, one window of them in flight per stream) into the other node's
    channel, whose reader checks them. Each agent has more big sends in flight than an agent keeps in MPI's
    hands; neither may wait for its own sends to finish while the other waits for it (a hang)."""
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 120
    other = 1 - NODE
    procs = [
        subprocess.Popen([sys.executable, __file__, "bothsender", str(other), f"n{NODE}p{j}", str(count)])
        for j in range(BOTH_SENDERS)
    ]
    a = ch(NODE, "a")
    expected = {f"n{other}p{j}": 0 for j in range(BOTH_SENDERS)}
    try:
        _take_tagged(a, expected, count * BOTH_SENDERS, lambda i: BOTH_SIZE)
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:  # (a failure must not leave the senders streaming, the job waiting for their output to end)
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.3)
    expect(ChannelEmpty, a.recv, timeout=0)
    print("bigboth ok", count * BOTH_SENDERS, flush=True)


def case_bigquit():
    """Both ways at once, the node programs end mid-stream: BOTH_SENDERS processes on each node stream big
    messages into the other node's channel; the program exits after argv[2] seconds and leaves them running
    (their pids in the file argv[3], for the test to kill), so the agents stop with big payloads in MPI's
    hands both ways. The job must end, without a crash."""
    other = 1 - NODE
    with open(sys.argv[3], "a") as f:
        for j in range(BOTH_SENDERS):
            p = subprocess.Popen(
                [sys.executable, __file__, "bothsender", str(other), f"n{NODE}p{j}", "100000"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            f.write(f"{p.pid}\n")
    time.sleep(float(sys.argv[2]))
    print("bigquit ok", flush=True)


def case_rankdies():
    """Node 1's harness rank dies (SIGKILL) while node 0's program still runs (it would for argv[2] seconds):
    node 0's harness must notice, stop its program and end, saying which node it lost."""
    if NODE == 1:
        time.sleep(0.5)
        print("rankdies: killing node 1's harness rank", flush=True)
        os.kill(os.getppid(), signal.SIGKILL)
        return
    time.sleep(float(sys.argv[2]))  # (the harness's SIGTERM ends it here)
    print("rankdies: node 0's program was never stopped", flush=True)


BOTH_SENDERS = 6
BOTH_SIZE = 136 * 1024  # (above BIG_MIN: its own MPI message; a window of 8 MiB holds 60 of them)


def _both_sender(target_node, tag, count):
    out = ch(target_node, "a")
    for i in range(count):
        out.send(b"%s:%d:" % (tag.encode(), i) + payload(i, BOTH_SIZE))
    out.flush(60)
    out.close()


def case_multi():
    """Several senders on every other node stream into node 0's channel: exactly once, in order per sender."""
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    per_node = 2
    if NODE == 0:
        a = ch(0, "a")
        expected = {f"n{k}p{j}": 0 for k in range(1, NNODES) for j in range(per_node)}
        total = count * len(expected)
        got = 0
        while got < total:
            msgs = a.recv_many(256, timeout=60)
            for body in msgs:
                tag, i, rest = body.split(b":", 2)
                tag, i = tag.decode(), int(i)
                assert expected[tag] == i, (tag, i, expected[tag])
                expected[tag] = i + 1
                got += 1
        time.sleep(0.3)
        expect(ChannelEmpty, a.recv, timeout=0)  # nothing duplicated
        print("multi ok", got, flush=True)
    else:
        _run_senders("sender", per_node, count)


def case_full():
    """A full remote channel stops the sender (ChannelFull / ChannelTimeout) without losing or duplicating."""
    if NODE == 0:
        s = ch(1, "small")  # capacity 4
        sent = 0
        for _ in range(2):  # the second round sends what the acknowledgements of the first let through
            try:
                while sent < 10 * WINDOW:
                    s.send(b"m%d" % sent, timeout=0)
                    sent += 1
            except ChannelFull:
                pass
            time.sleep(0.5)
        assert 4 <= sent <= 4 + WINDOW, sent
        assert s.flush(timeout=0.2) is False  # not all of them can be in a channel of capacity 4
        t = time.monotonic()
        expect(ChannelTimeout, s.send, b"late", timeout=0.3)
        assert time.monotonic() - t >= 0.29
        # send_block into the full window: refused the same way, and the block stays the caller's
        for size in (64, 100_000):
            blk = s.pool.alloc(size)
            expect(ChannelFull, s.send_block, blk, timeout=0)
            expect(ChannelTimeout, s.send_block, blk, timeout=0.1)
            assert not blk.freed
            s.pool.free(blk)
        ch(1, "a").send(b"drain %d" % sent)
        # blocked send: completes once node 1 drains
        s.send(b"m%d" % sent, timeout=60)
        sent += 1
        s.send(b"end", timeout=60)
        s.flush(60)
        print("full ok", sent, flush=True)
    elif NODE == 1:
        cmd = ch(1, "a").recv(timeout=60)
        n = int(cmd.split()[1]) + 1
        small = ch(1, "small")
        for i in range(n):
            got = small.recv(timeout=60)
            assert got == b"m%d" % i, (got, i)
        assert small.recv(timeout=60) == b"end"
        time.sleep(0.3)
        expect(ChannelEmpty, small.recv, timeout=0)


ZC_SIZES = [0, 5, 1000, 16 * 1024, 16 * 1024 + 1, 100_000, 1 << 20]


def _staging_blocks(pool):
    return pool.stats()["allocated_blocks"]


def case_zerocopy():
    """send_block, recv_message and destroy of a remote channel (the zero-copy API of a local Channel)."""
    from dragon.channels import Message
    from dragon.pools import Block, Pool

    if NODE == 0:
        r = ch(1, "a")
        staging = r.pool
        assert isinstance(staging, Pool) and staging.node == 0, staging
        before = _staging_blocks(staging)
        # send_block: blocks of this node's staging pool, whole or in part
        for i, n in enumerate(ZC_SIZES):
            blk = staging.alloc(max(n, 1) + 7)
            memoryview(blk)[:n] = payload(i, n)
            r.send_block(blk, nbytes=n)
            if n <= 16 * 1024:
                assert blk.freed  # copied and freed here: the Block says so
        whole = staging.alloc(3000)
        memoryview(whole)[:] = payload(99, 3000)
        r.send_block(whole)  # nbytes defaults to the block's size
        # bad input: the documented classes, nothing sent
        expect(TypeError, r.send_block, b"bytes")
        eight = staging.alloc(8)
        expect(TypeError, r.send_block, eight, nbytes=1.5)
        expect(ChannelError, r.send_block, eight, nbytes=9)
        expect(ChannelError, r.send_block, eight, nbytes=-1)
        staging.free(eight)
        gone = staging.alloc(8)
        staging.free(gone)
        expect(ChannelError, r.send_block, gone)
        other = Pool.create(1 << 20)
        try:
            expect(ChannelError, r.send_block, other.alloc(64))
        finally:
            other.destroy()
        assert r.flush(30)
        assert ch(0, "small").recv(timeout=30) == b"checked"
        # recv_message: node 1 filled its channel with ZC_SIZES payloads
        expect(ChannelEmpty, r.recv_message, timeout=0) if len(r) == 0 else None
        assert ch(0, "small").recv(timeout=30) == b"filled"
        for i, n in enumerate(ZC_SIZES):
            m = r.recv_message(timeout=30)
            assert isinstance(m, Message), type(m)
            assert len(m) == n and m.nbytes == n, (n, len(m))
            assert bytes(m) == payload(i + 50, n)
            if n > 64 * 1024:
                assert m.in_pool  # the block the agent received it into: no copy since
                view = memoryview(m)
                assert view[:5] == payload(i + 50, n)[:5]
                view.release()
            m.release()
            expect(ChannelError, bytes, m)
        expect(ChannelEmpty, r.recv_message, timeout=0)
        t = time.monotonic()
        expect(ChannelTimeout, r.recv_message, timeout=0.3)
        assert time.monotonic() - t >= 0.29
        with r.recv_message(timeout=30) as m:  # sent by node 1 after a pause
            assert bytes(m) == b"late"
        victim_sd = bytes.fromhex(ch(0, "small").recv(timeout=30).decode())  # (a pool block while queued)
        # every staging block is back (sent ones freed by the agent, received ones by release)
        deadline = time.monotonic() + 10
        while _staging_blocks(staging) != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _staging_blocks(staging) == before, (_staging_blocks(staging), before, staging.stats())
        # destroy: a channel node 1 made for it
        v = Channel.attach(victim_sd)
        v2 = Channel.attach(victim_sd)
        v.send(b"doomed")
        assert v.flush(10)
        v.destroy()
        assert v.closed
        expect(ChannelError, v.send, b"after")
        expect(ChannelError, v.destroy)
        expect(ChannelError, v2.recv, timeout=5)  # another handle: the channel is gone
        expect(ChannelError, v2.destroy)
        ch(1, "small").send(b"destroyed")
        r.close()
        expect(ChannelError, r.recv_message, timeout=0)
        print("zerocopy ok", flush=True)
    elif NODE == 1:
        a = ch(1, "a")
        for i, n in enumerate(ZC_SIZES):
            with a.recv_message(timeout=30) as m:
                assert bytes(m) == payload(i, n), (i, n, len(m))
        assert a.recv(timeout=30) == payload(99, 3000)
        time.sleep(0.2)
        expect(ChannelEmpty, a.recv, timeout=0)  # the refused send_blocks sent nothing
        ch(0, "small").send(b"checked")
        time.sleep(0.3)
        for i, n in enumerate(ZC_SIZES):
            a.send(payload(i + 50, n))
        ch(0, "small").send(b"filled")
        time.sleep(0.8)
        a.send(b"late")
        inf = Pool.attach(bytes.fromhex(os.environ["DRAGON_INF_PD"]))
        victim = Channel.create(inf, capacity=8, block_size=64)
        ch(0, "small").send(bytes(victim.sdesc).hex().encode())
        assert ch(1, "small").recv(timeout=30) == b"destroyed"
        expect(ChannelError, victim.recv, timeout=0)  # destroyed from node 0
        assert isinstance(Block, type)


class Interrupted(Exception):
    pass


def _interrupted_recv(r, after=0.3):
    """A receive on r that a signal interrupts (as Ctrl-C would) while its request waits on the other node."""

    def stop(signum, frame):
        raise Interrupted()

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, after)
    try:
        got = r.recv(timeout=20)
        raise AssertionError(f"the receive was not interrupted: {got!r}")
    except Interrupted:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def case_abandon():
    """Messages taken from a channel for receives nobody waits for any more go back into the channel: a
    receive interrupted, then its handle closed; a receive interrupted in a process that then exits without
    reading. A sender whose channel is destroyed on its node gets ChannelError from flush."""
    if NODE == 0:
        r = ch(1, "a")
        _interrupted_recv(r)
        ch(1, "small").send(b"send late")  # node 1 sends it now: the abandoned request takes it
        time.sleep(1.0)
        r.close()
        assert ch(1, "a").recv(timeout=10) == b"late"  # put back into the channel, not lost with the handle
        child = subprocess.run([sys.executable, __file__, "abandoner"], timeout=60)
        assert child.returncode == 0
        assert ch(1, "a").recv(timeout=10) == b"late2"  # put back by the agent when the process was gone
        expect(ChannelEmpty, ch(1, "a").recv, timeout=0)
        # a channel destroyed under a sender
        s = Channel.attach(bytes.fromhex(ch(0, "small").recv(timeout=30).decode()))
        s.send(b"1")
        assert s.flush(10)
        ch(1, "small").send(b"destroy")
        assert ch(0, "small").recv(timeout=30) == b"destroyed"
        s.send(b"2")  # (in the window: it returns; the agent there finds the channel gone)
        try:
            s.flush(10)
            raise AssertionError("flush to a destroyed channel did not raise")
        except ChannelError as e:
            assert "destroyed" in str(e), e
        expect(ChannelError, s.send, b"3")
        ch(1, "small").send(b"done")
        print("abandon ok", flush=True)
    elif NODE == 1:
        from dragon.pools import Pool

        a, small = ch(1, "a"), ch(1, "small")
        assert small.recv(timeout=30) == b"send late"
        a.send(b"late")
        assert small.recv(timeout=30) == b"send late2"
        a.send(b"late2")
        inf = Pool.attach(bytes.fromhex(os.environ["DRAGON_INF_PD"]))
        victim = Channel.create(inf, capacity=8, block_size=64)
        ch(0, "small").send(bytes(victim.sdesc).hex().encode())
        assert small.recv(timeout=30) == b"destroy"
        victim.destroy()
        ch(0, "small").send(b"destroyed")
        assert small.recv(timeout=30) == b"done"


def _abandoner():
    """(case_abandon) A receive interrupted with its request waiting on node 1, which then sends; this process
    exits without reading what came for it."""
    r = ch(1, "a")
    _interrupted_recv(r)
    ch(1, "small").send(b"send late2")
    time.sleep(1.0)  # the message arrives in this process's reply channel, which it never reads
    os._exit(0)


def case_badframes():
    """A process writes malformed and forged frames into its node's gateway between good sends: each bad frame
    is dropped alone (the agent logs it), every good message arrives once and in order, and nothing forged
    acts (a CTRL frame telling the agents to stop, a NODE_DOWN, a heartbeat)."""
    import struct

    from dragon._core import frames as W
    from dragon.infrastructure import messages as m

    if NODE == 0:
        a = ch(0, "a")
        got = [a.recv(timeout=30) for _ in range(40)]
        assert got == [b"good %d" % i for i in range(40)], got
        expect(ChannelTimeout, a.recv, timeout=0.5)  # (and no putback of the cut-short list came in)
        ch(1, "small").send(b"checked")
        print("badframes ok", flush=True)
    elif NODE == 1:
        r = ch(0, "a")
        gw = Channel.attach(bytes.fromhex(os.environ["DRAGON_GW_CD"]))
        hdr = W.HDR.pack
        sid = r._st.sid
        ctrl = m.encode(m.LAExit(key=b"guessed!"))
        many = W.prefix_sdesc(bytes.fromhex(CHANS["0"]["a"]), W.pack_many([b"x", b"y"])[:-1])
        bad = [
            b"",
            b"\x02\x00",  # shorter than a header
            hdr(W.SEND, 0, 0, 50, sid, 0) + b"short",  # a payload shorter than its header says
            hdr(W.SEND, 0, 0, 2, sid, 0) + b"longer than 2",
            hdr(W.CTRL, 0, 0, len(ctrl), 0, 0) + ctrl,  # frames only agents send
            hdr(W.NODE_DOWN, 0, 0, 0, 0, 0),
            hdr(W.HEARTBEAT, 0, 0, 0, 0, 0),
            hdr(W.ACK, 0, 0, 0, sid, 10**6),
            hdr(W.PUTBACK, W.MANY, 0, len(many), 0, 0) + many,  # a packed list cut short (parsed on node 0)
            hdr(W.RECV, 0, 0, 3, sid, 77) + b"abc",  # a request too short to be one
            hdr(W.SEND, W.PTR, 0, 1 << 30, sid, 0) + W.U64.pack(0),  # more than any staging block holds
            hdr(W.SEND, W.PTR, 0, 8, sid, 0) + W.U64.pack(2**63 + 5),  # no such block
            hdr(99, 0, 0, 0, 0, 0),
            struct.pack("<BBHIQQ", W.OPEN, 0, 0, 4, 1, 0) + b"\xff\xff\x00\x00",  # a stream to nowhere
        ]
        for i in range(40):
            r.send(b"good %d" % i)
            gw.send(bad[i % len(bad)], timeout=10)
        assert r.flush(30)
        assert ch(1, "small").recv(timeout=30) == b"checked"


def case_idle():
    """An idle agent does not burn a core: report this rank's agent's CPU use (the parent process)."""
    from dragon.transport.agent import idle_cpu

    time.sleep(1.5)
    use = idle_cpu(3.0, os.getppid())
    print(f"idle node {NODE}: {use:.4f}", flush=True)


if __name__ == "__main__":
    case = sys.argv[1]
    if case == "sender":
        _sender(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif case == "bigsender":
        _big_sender(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif case == "bothsender":
        _both_sender(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif case == "abandoner":
        _abandoner()
    else:
        globals()["case_" + case]()
