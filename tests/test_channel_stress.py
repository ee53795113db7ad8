"""Channels under real concurrency: exactly-once delivery with many producers and consumers, and SIGKILLed
senders/receivers in the middle of a stream (survivors keep flowing, at most the killed process's in-flight
message is lost)."""

import multiprocessing as mp
import os
import random
import signal
import struct
import time

import numpy as np
import pytest

from dragon.channels import Channel
from dragon.errors import ChannelError, ChannelTimeout
from dragon.pools import Pool

ctx = mp.get_context("fork")
HDR = struct.Struct("<II")  # producer id, sequence number
STOP = b"STOP"


def _payload(prod, seq, rng_val):
    # 1 in 16 messages goes through a pool block (> block_size), the rest inline, sizes mixed
    extra = 1500 + rng_val % 3000 if rng_val % 16 == 0 else rng_val % 56
    return HDR.pack(prod, seq) + bytes([seq & 0xFF]) * extra


def _producer(sdesc, prod, n, batched, progress_sdesc=None, progress_off=None, linger=False):
    c = Channel.attach(sdesc)
    progress = None
    if progress_sdesc is not None:
        p = Pool.attach(progress_sdesc)
        progress = np.frombuffer(p.block(progress_off), dtype=np.int64)
    rng = random.Random(prod)
    seq = 0
    while seq < n:
        if batched:
            k = min(n - seq, rng.randint(1, 40))
            msgs = [_payload(prod, s, rng.getrandbits(16)) for s in range(seq, seq + k)]
            sent = 0
            while sent < k:
                sent += c.send_many(msgs[sent:])
            seq += k
        else:
            c.send(_payload(prod, seq, rng.getrandbits(16)))
            seq += 1
        if progress is not None:
            progress[prod] = seq
    while linger:  # a victim that is done waits to be killed
        time.sleep(1)


def _consumer(sdesc, marks_sdesc, marks_off, nprod, maxseq, batched, q=None):
    c = Channel.attach(sdesc)
    p = Pool.attach(marks_sdesc)
    marks = np.frombuffer(p.block(marks_off), dtype=np.uint8, count=nprod * maxseq).reshape(nprod, maxseq)
    last = [-1] * nprod
    bad = 0
    while True:
        msgs = c.recv_many(64) if batched else [c.recv()]
        for m in msgs:
            if m == STOP:
                for _ in range(msgs.count(STOP) - 1):  # a batch may hold other consumers' STOPs
                    c.send(STOP)
                if q is not None:
                    q.put(bad)
                return
            prod, seq = HDR.unpack_from(m)
            if seq <= last[prod] or (len(m) > 8 and m[-1] != seq & 0xFF):
                bad += 1  # per-producer order broken or payload corrupt
            last[prod] = seq
            marks[prod, seq] += 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_exactly_once_4x4_million_mixed():
    nprod = ncons = 4
    per = 250_000  # 10^6 messages in all
    with Pool.create(64 << 20) as pool:
        ch = Channel.create(pool, capacity=256, block_size=64)
        marks = [pool.alloc(nprod * per) for _ in range(ncons)]
        for b in marks:
            np.frombuffer(b, dtype=np.uint8)[:] = 0
        q = ctx.Queue()
        cons = [
            ctx.Process(target=_consumer, args=(ch.sdesc, pool.sdesc, marks[i].offset, nprod, per, i % 2, q))
            for i in range(ncons)
        ]
        prods = [ctx.Process(target=_producer, args=(ch.sdesc, i, per, i % 2)) for i in range(nprod)]
        try:
            for pr in cons + prods:
                pr.start()
            for pr in prods:
                pr.join(200)
                assert pr.exitcode == 0
            for _ in cons:
                ch.send(STOP)
            bad = [q.get(timeout=60) for _ in cons]
            for pr in cons:
                pr.join(30)
                assert pr.exitcode == 0
        finally:
            for pr in cons + prods:
                if pr.is_alive():
                    pr.kill()
                    pr.join()
        assert bad == [0] * ncons, "per-producer order broken or payload corrupt"
        total = sum(np.frombuffer(b, dtype=np.uint8).reshape(nprod, per).astype(np.int64) for b in marks)
        assert (total == 1).all(), f"missing {(total == 0).sum()}, duplicated {(total > 1).sum()}"
        assert len(ch) == 0
        ch.destroy()
        for b in marks:
            pool.free(b)
        assert pool.stats()["allocated_blocks"] == 0  # every pool-block message was freed


@pytest.mark.timeout(120)
def test_sigkill_senders_and_receivers_mid_stream():
    rounds = 6
    survivors_p, survivors_c = 2, 2
    nprod = survivors_p + rounds
    ncons = survivors_c + rounds
    maxseq = 200_000
    per_survivor = 20_000
    with Pool.create(64 << 20) as pool:
        ch = Channel.create(pool, capacity=64, block_size=64)
        progress = pool.alloc(8 * nprod)
        prog = np.frombuffer(progress, dtype=np.int64)
        prog[:] = 0
        marks = [pool.alloc(nprod * maxseq) for _ in range(ncons)]
        for b in marks:
            np.frombuffer(b, dtype=np.uint8)[:] = 0
        q = ctx.Queue()

        def consumer(i):
            return ctx.Process(
                target=_consumer,
                args=(
                    ch.sdesc,
                    pool.sdesc,
                    marks[i].offset,
                    nprod,
                    maxseq,
                    i % 2 and i < survivors_c,  # a victim takes one message per call: one in flight
                    q if i < survivors_c else None,
                ),
            )

        def producer(i, n):
            # victims send one message per call, so "in flight" is exactly one message
            victim = i >= survivors_p
            return ctx.Process(
                target=_producer,
                args=(ch.sdesc, i, n, (i % 2) and not victim, pool.sdesc, progress.offset, victim),
            )

        procs = [consumer(i) for i in range(survivors_c)] + [
            producer(i, per_survivor) for i in range(survivors_p)
        ]
        victims = []
        try:
            for pr in procs:
                pr.start()
            for r in range(rounds):
                vp = producer(survivors_p + r, maxseq)
                vc = consumer(survivors_c + r)
                vp.start()
                vc.start()
                victims += [vp, vc]
                time.sleep(0.05 + 0.1 * random.random())
                for v in (vp, vc):
                    os.kill(v.pid, signal.SIGKILL)
                for v in (vp, vc):
                    v.join(10)
                    assert v.exitcode == -signal.SIGKILL
            for pr in procs[survivors_c:]:
                pr.join(90)
                assert pr.exitcode == 0, "a surviving producer got stuck"
            for _ in range(survivors_c):
                ch.send(STOP, timeout=30)
            bad = [q.get(timeout=60) for _ in range(survivors_c)]
            for pr in procs[:survivors_c]:
                pr.join(30)
                assert pr.exitcode == 0
        finally:
            for pr in procs + victims:
                if pr.is_alive():
                    pr.kill()
                    pr.join()
        assert bad == [0] * survivors_c
        total = sum(np.frombuffer(b, dtype=np.uint8).reshape(nprod, maxseq).astype(np.int64) for b in marks)
        assert total.max() <= 1, "a message was delivered twice"
        missing = 0
        for pi in range(nprod):
            sent = int(prog[pi])  # confirmed sends; a killed producer may have had one more in flight
            got = total[pi]
            assert got[sent + 1 :].sum() == 0, "delivered a message that was never sent"
            missing += int(sent - got[:sent].sum())
            if pi < survivors_p:
                assert sent == per_survivor
        # every killed consumer may take one received-but-unrecorded message down with it
        assert missing <= rounds, f"{missing} messages lost, more than the {rounds} killed receivers"
        print("recovered slots:", ch._debug_state()["recoveries"], "missing:", missing)
        ch.destroy()
        del prog
        pool.free(progress)
        for b in marks:
            pool.free(b)
        # blocks leaked by killed processes: at most one in-flight message each
        assert pool.stats()["allocated_blocks"] <= 2 * rounds


def _big_sender(sdesc, size):
    c = Channel.attach(sdesc)
    data = b"v" * size
    while True:
        c.send(data)


def _big_receiver(sdesc):
    c = Channel.attach(sdesc)
    while True:
        c.recv()


@pytest.mark.timeout(90)
def test_sigkill_inside_long_claims():
    """Messages big enough to be copied inline for milliseconds: kills land while a slot is WRITING/READING,
    and the peers must take the dead process's slot over."""
    size = 4 << 20
    with Pool.create(32 << 20) as pool:
        ch = Channel.create(pool, capacity=2, block_size=size)
        for r in range(16):
            if r >= 4 and ch._debug_state()["recoveries"] >= 1:
                break
            # a sender dies mid-copy: the receiver (this process) skips its slot and keeps receiving
            v = ctx.Process(target=_big_sender, args=(ch.sdesc, size))
            v.start()
            deadline = time.monotonic() + 0.05 + 0.05 * random.random()
            while time.monotonic() < deadline:
                try:
                    ch.recv(timeout=0.01)
                except ChannelTimeout:
                    pass
            os.kill(v.pid, signal.SIGKILL)  # not reaped yet: a zombie must count as dead too
            drained = 0
            while True:
                try:
                    ch.recv(timeout=0.3)
                    drained += 1
                except ChannelTimeout:
                    break
            assert drained <= 2
            ch.send(b"after %d" % r, timeout=5)
            assert ch.recv(timeout=5) == b"after %d" % r  # the ring flows again
            v.join(10)
            # a receiver dies mid-copy: this process (a sender) gets its slot back
            v = ctx.Process(target=_big_receiver, args=(ch.sdesc,))
            v.start()
            data = b"w" * size
            deadline = time.monotonic() + 0.05 + 0.05 * random.random()
            while time.monotonic() < deadline:
                ch.send(data, timeout=5)
            os.kill(v.pid, signal.SIGKILL)
            v.join(10)
            while ch.poll(timeout=0.1):  # what the dead receiver left queued
                ch.recv(timeout=5)
            ch.send(data, timeout=5)
            ch.send(data, timeout=5)  # needs both slots: the dead reader's one was recovered
            assert len(ch.recv(timeout=5)) == size and len(ch.recv(timeout=5)) == size
        print("recovered slots:", ch._debug_state()["recoveries"])
        assert ch._debug_state()["recoveries"] >= 1  # at least one kill landed inside a claim
        ch.destroy()
        assert pool.stats()["allocated_blocks"] == 0


def _small_producer(ch, k, n):
    for i in range(n):
        ch.send(HDR.pack(k, i) + b"y" * (i % 3 * 40))  # 8, 48 (inline) and 88 bytes (pool block)


def _small_consumer(ch, q):
    got = []
    while True:
        m = ch.recv()
        if m == STOP:
            break
        got.append(HDR.unpack_from(m))
    q.put(got)


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_tiny_rings_exactly_once(capacity):
    n = 10_000
    with Pool.create(1 << 20) as pool:
        ch = Channel.create(pool, capacity=capacity, block_size=64)
        q = ctx.Queue()
        cons = [ctx.Process(target=_small_consumer, args=(ch, q)) for _ in range(2)]
        prods = [ctx.Process(target=_small_producer, args=(ch, k, n)) for k in range(2)]
        try:
            for pr in cons + prods:
                pr.start()
            for pr in prods:
                pr.join(60)
            for _ in cons:
                ch.send(STOP, timeout=30)
            res = [q.get(timeout=30) for _ in cons]
        finally:
            for pr in cons + prods:
                pr.join(10)
                if pr.is_alive():
                    pr.kill()
                    pr.join()
        assert sorted(x for r in res for x in r) == [(k, i) for k in range(2) for i in range(n)]
        for r in res:
            for k in range(2):
                seqs = [i for p, i in r if p == k]
                assert seqs == sorted(seqs)
        ch.destroy()
        assert pool.stats()["allocated_blocks"] == 0


# ------------------------------------------------------------------------------------------ scribbled
# channels
CH_HDR = 384  # the channel header: 6 cache lines (see dragon/_core/README.md), then the slots
SLOT_HDR = 16  # state u64, len u32, flags u32, then the data (or a pool block's offset)
GOOD = [b"", b"g" * 40, b"G" * 3000, b"h" * 64, b"H" * 100_000]  # inline and in pool blocks


def _scribble_view(pool, ch):
    """A writable view of the channel's own block (any process of the node can do this to a channel)."""
    off = struct.unpack_from("<4sBBHQQQQH", ch.sdesc)[6]
    return memoryview(pool.block(off))


def _receive_scribbled(sdesc, name, out):
    """Drain a scribbled channel with every receive call, then check that it carries good messages again. Exit
    0: only ChannelErrors naming the channel; 2: anything else. A crash is the exit code of its signal."""
    rng = random.Random(os.getpid())
    errors = 0
    try:
        ch = Channel.attach(sdesc)
        for _ in range(200):  # (a scribbled header, e.g. its tail counter, can make every call fail)
            try:
                how = rng.randrange(4)
                if how == 0:
                    ch.recv(timeout=0.2)
                elif how == 1:
                    ch.recv_into(bytearray(200_000), timeout=0.2)
                elif how == 2:
                    bytes(ch.recv_message(timeout=0.2))
                else:
                    ch.recv_many(3, timeout=0.2)
            except ChannelTimeout:
                break
            except ChannelError as e:
                assert name in str(e), e
                errors += 1
        for data in GOOD:  # the channel goes on: good messages after the bad ones come through intact, in
            ch.send(data, timeout=5)  # order (between them, what a scribble made of a slot not yet written)
        want = list(GOOD)
        for _ in range(3 * len(GOOD)):
            try:
                if ch.recv(timeout=5) == want[0]:
                    want.pop(0)
            except ChannelError as e:
                assert name in str(e), e
            if not want:
                break
        assert not want, f"{len(want)} good message(s) lost"
        os.write(out, struct.pack("<I", errors))
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(2)
    os._exit(0)


def _fill_and_scribble(pool, ch, rng, whole):
    """Queue a mix of inline and pool-block messages, then write random bytes over slots (whole: anywhere in
    the channel's block, its header included)."""
    for _ in range(rng.randrange(1, 12)):
        n = rng.choice((0, 5, 64, 65, 300, 5000))
        ch.send(bytes([rng.randrange(256)]) * n, timeout=0)
    mv = _scribble_view(pool, ch)
    stride = (SLOT_HDR + ch.block_size + 63) // 64 * 64
    for _ in range(rng.randrange(1, 6)):
        if whole:
            start = rng.randrange(len(mv))
        else:
            slot = CH_HDR + rng.randrange(ch.capacity) * stride
            # mostly the slot's header (state, length, flags) and the block offset, sometimes its data
            start = slot + (rng.randrange(SLOT_HDR + 8) if rng.random() < 0.8 else rng.randrange(stride))
        n = min(rng.choice((1, 2, 4, 8, 16)), len(mv) - start)
        mv[start : start + n] = bytes(rng.randrange(256) for _ in range(n))
    mv.release()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("whole", [False, True], ids=["slots", "whole-block"])
def test_scribbled_channel_never_crashes_the_receiver(whole):
    """Random bytes over a channel's slots (lengths, block offsets, states, data) or over its whole block: the
    receiving process never crashes; a bad slot raises ChannelError naming the channel and is dropped, and the
    channel carries good messages again (for slot scribbles; a scribbled header may leave it unusable, never
    crashing anyone)."""
    rng = random.Random(1217 + whole)
    errors = 0
    trials = 40
    for trial in range(trials):
        with Pool.create(4 << 20) as pool:
            ch = Channel.create(pool, capacity=16, block_size=64, name=f"scribbled-{trial}")
            _fill_and_scribble(pool, ch, rng, whole)
            r, w = os.pipe()
            proc = ctx.Process(target=_receive_scribbled, args=(ch.sdesc, ch.name, w))
            proc.start()
            proc.join(60)
            if proc.exitcode is None:  # (a hang fails the test below)
                proc.kill()
                proc.join()
            os.close(w)
            got = os.read(r, 4)
            os.close(r)
            if whole:  # a scribbled header may be refused at attach or leave the ring stuck: only no crash
                assert proc.exitcode in (0, 2), f"trial {trial}: receiver died with {proc.exitcode}"
            else:
                assert proc.exitcode == 0, f"trial {trial}: receiver exit {proc.exitcode}"
                errors += struct.unpack("<I", got)[0]
    if not whole:
        assert errors >= trials // 4, f"only {errors} bad slots detected in {trials} trials"
