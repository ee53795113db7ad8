"""Cross-node delivery soak (issue 11), run once on node 0 by dragon-launch on several nodes:

    mpiexec -n 3 dragon-launch --virtual-nodes tests/mpi_apps/soak_app.py CASE [ARGS]
    srun -N 2 dragon-launch tests/mpi_apps/soak_app.py CASE [ARGS]

Every case prints "<case> ok ..." when its checks pass and raises otherwise.

- ``exits ROUNDS``: several senders on every other node stream into one channel on node 0 (random sizes across
  the transport's inline, batched and big-payload paths; send / send_block / send_many), each ending in its
  own way right after its last send returned (return, sys.exit, os._exit, SIGKILL of itself, close, dropped
  handle). Node 0 checks exactly-once and per-sender order; a message missing after every sender has ended is
  a loss.
- ``joined``: the same senders, ending cleanly; once the app has joined them all, every message is in the
  channel before it receives anything.
- ``stuck``: a sender fills a channel nobody reads and ends: it waits DRAGON_EXIT_FLUSH_TIMEOUT, says so,
  and its messages arrive later.
- ``handles``: a long-lived sender opens, uses and closes many handles: their streams end without its exit.
- ``receivers``: a channel on node 1 filled by a local sender, drained through the transport by receivers on
  other nodes, some of which time out or are SIGKILLed mid-stream: every message is received exactly once.
- ``shortlived N``: N processes (on the other nodes, a few at a time) each start, send one message into a
  channel on node 0 and exit: N received.
"""

import os
import random
import signal
import struct
import sys
import time

from dragon.errors import ChannelEmpty, ChannelTimeout
from dragon.globalservices import channel, node, pool, process

PY = sys.executable
HERE = os.path.abspath(__file__)
HDR = struct.Struct("<HI")  # sender id, message number
ENDINGS = ["return", "sys_exit", "os_exit", "kill", "close", "drop"]
APIS = ["send", "send_block", "send_many"]
STALL = 30.0  # no message for this long after every sender ended: the rest is lost


def sizes(seed, count):
    """The payload sizes (after the header) of one sender's messages: small ones inline, mid-sized ones
    through staging blocks copied into the agents' packets, big ones (above 128 KiB) as MPI messages of their
    own."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.55:
            out.append(rng.randint(0, 64))
        elif r < 0.75:
            out.append(rng.randint(65, 16 * 1024))
        elif r < 0.93:
            out.append(rng.randint(16 * 1024 + 1, 128 * 1024))
        else:
            out.append(rng.randint(128 * 1024 + 1, (1 << 20) - HDR.size))
    return out


def body(sid, i, n):
    return HDR.pack(sid, i) + bytes([(sid * 31 + i * 7) & 255]) * n


def check(msg, lens, expected):
    """One received message: its sender's next, with the right length and bytes."""
    sid, i = HDR.unpack_from(msg)
    assert sid in expected, f"message from unknown sender {sid}"
    assert i == expected[sid], f"sender {sid}: got message {i}, expected {expected[sid]} (lost or duplicated)"
    n = len(msg) - HDR.size
    assert n == lens[sid][i], f"sender {sid} message {i}: {n} bytes, expected {lens[sid][i]}"
    v = (sid * 31 + i * 7) & 255
    assert n == 0 or msg.count(v, HDR.size) == n, f"sender {sid} message {i}: corrupted"
    expected[sid] = i + 1


def infra_blocks(k):
    """How many blocks node k's infrastructure pool holds, as a process there sees it (its own reply channels
    included, the same each time): processes that are gone must have left none."""
    res = channel.create(None, channel_options={"capacity": 4})
    d = process.create(PY, None, [HERE, "count_infra_blocks", res.sdesc.hex()], options={"node": k})
    n = int(attach(res).recv(timeout=60))
    assert process.join(d.p_uid, timeout=60) == 0
    channel.destroy(res.c_uid)
    return n


def count_infra_blocks(res_hex):
    from dragon.channels import Channel
    from dragon.pools import Pool

    res = Channel.attach(bytes.fromhex(res_hex))
    len(res)  # (this process's transport endpoint exists before the count, as in every count)
    infra = Pool.attach(bytes.fromhex(os.environ["DRAGON_INF_PD"]))
    res.send(b"%d" % infra.stats()["allocated_blocks"])


def settled_infra_blocks(nodes, before=None, wait=10.0):
    """infra_blocks of each node, once it matches ``before`` (the agents retire what a process left shortly
    after it is gone) or ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        now = {k: infra_blocks(k) for k in nodes}
        if before is None or now == before or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def attach(desc):
    from dragon.channels import Channel

    return Channel.attach(desc.sdesc)


# ---- exits
# -----------------------------------------------------------------------------------------------------
def case_exits(rounds="3", per_node="4", count="300"):
    rounds, per_node, count = int(rounds), int(per_node), int(count)
    others = [k for k in node.get_list() if k != 0]
    assert others, "needs at least two nodes"
    sink = channel.create(None, channel_options={"capacity": 128})
    ch = attach(sink)
    blocks = settled_infra_blocks(others)
    total = 0
    for rnd in range(rounds):
        senders, lens, expected = start_senders(sink, others, per_node, count, rnd, ENDINGS, rnd * 1000)
        want = count * len(lens)
        got = 0
        ended = None
        last = time.monotonic()
        while got < want:
            try:
                msgs = ch.recv_many(64, timeout=1.0)
            except ChannelTimeout:
                msgs = []
            for msg in msgs:
                check(msg, lens, expected)
            got += len(msgs)
            now = time.monotonic()
            if msgs:
                last = now
            if ended is None:
                done, _ = process.multi_join(list(senders), timeout=0)
                if done is not None and len(done) == len(senders):
                    ended = now
                    for p_uid, code in done:
                        sid, ending, api, k = senders[p_uid]
                        want_code = -signal.SIGKILL if ending == "kill" else 0
                        assert code == want_code, f"sender {sid} ({ending}, {api}) on node {k} exited {code}"
            elif now - last > STALL:
                missing = {
                    f"sender {sid} {senders_of(senders, sid)}": f"{expected[sid]}/{count}"
                    for sid in lens
                    if expected[sid] < count
                }
                raise AssertionError(f"round {rnd}: messages lost (received/sent): {missing}")
        try:
            extra = ch.recv(timeout=0.2)
            raise AssertionError(f"round {rnd}: an extra message {HDR.unpack_from(extra)}")
        except (ChannelEmpty, ChannelTimeout):
            pass
        total += got
        print(f"round {rnd}: {got} messages from {len(lens)} senders", flush=True)
    ch.close()
    channel.destroy(sink.c_uid)
    left = settled_infra_blocks(others, blocks)
    assert left == blocks, f"the senders left blocks in their nodes' infrastructure pools: {blocks} -> {left}"
    print(f"exits ok {total}", flush=True)


def start_senders(sink, others, per_node, count, rnd, endings, seed0):
    """per_node exits_sender processes on each of the other nodes, each sending count messages into sink and
    ending its own way -> (p_uid -> (sid, ending, api, node), sid -> sizes, sid -> next expected number)."""
    senders, lens, expected = {}, {}, {}
    for k in others:
        for j in range(per_node):
            sid = len(lens) + 1
            ending = endings[(rnd + sid) % len(endings)]
            api = APIS[(rnd + j + k) % len(APIS)]
            seed = seed0 + sid
            lens[sid] = sizes(seed, count)
            expected[sid] = 0
            d = process.create(
                PY,
                None,
                [HERE, "exits_sender", sink.sdesc.hex(), str(sid), str(seed), str(count), ending, api],
                options={"node": k},
            )
            senders[d.p_uid] = (sid, ending, api, k)
    return senders, lens, expected


def senders_of(senders, sid):
    for _p, (s, ending, api, k) in senders.items():
        if s == sid:
            return f"({ending}, {api}, node {k})"
    return ""


def exits_sender(sdesc_hex, sid, seed, count, ending, api):
    from dragon.channels import Channel

    sid, count = int(sid), int(count)
    out = Channel.attach(bytes.fromhex(sdesc_hex))
    lens = sizes(int(seed), count)
    if api == "send_many":
        i = 0
        while i < count:
            batch = [body(sid, j, lens[j]) for j in range(i, min(count, i + 7))]
            k = 0
            while k < len(batch):
                k += out.send_many(batch[k:], timeout=60)
            i += len(batch)
    else:
        for i in range(count):
            data = body(sid, i, lens[i])
            if api == "send_block" and i % 2:
                blk = out.pool.alloc(len(data), timeout=60)
                memoryview(blk)[:] = data
                out.send_block(blk, timeout=60)
            else:
                out.send(data, timeout=60)
    if ending == "os_exit":
        os._exit(0)
    if ending == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if ending == "sys_exit":
        sys.exit(0)
    if ending == "close":
        out.close()
    if ending == "drop":
        del out


# ---- joined
# ----------------------------------------------------------------------------------------------------
def case_joined(rounds="3", per_node="2", count="150"):
    """Senders on the other nodes each send count messages into a small channel on node 0 and end cleanly,
    while node 0 drains it slowly (their last messages wait in the transport for room). The moment every
    sender is joined, everything they sent is in the channel or was received already: nothing is still on
    its way (as on one node, a join means the sends landed; a parent that joins its producers and then puts
    a sentinel into their queue must find the sentinel behind their items)."""
    rounds, per_node, count = int(rounds), int(per_node), int(count)
    others = [k for k in node.get_list() if k != 0]
    assert others, "needs at least two nodes"
    mem = pool.create(256 << 20)
    clean = ["return", "sys_exit", "close", "drop"]
    total = 0
    for rnd in range(rounds):
        sink = channel.create(mem.m_uid, channel_options={"capacity": 32})
        ch = attach(sink)
        senders, lens, expected = start_senders(sink, others, per_node, count, rnd, clean, 7000 + rnd * 100)
        want = count * len(lens)
        got = 0
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, f"round {rnd}: senders not joined, {got} of {want} received"
            done, _ = process.multi_join(list(senders), timeout=0)
            if done is not None and len(done) == len(senders):
                for p_uid, code in done:
                    assert code == 0, f"sender {senders[p_uid]} exited {code}"
                break
            try:
                for msg in ch.recv_many(4, timeout=0.05):
                    check(msg, lens, expected)
                    got += 1
            except ChannelTimeout:
                pass
            time.sleep(0.005)  # slower than the senders: the channel stays full
        n = len(ch)
        assert got + n == want, (
            f"round {rnd}: every sender joined with {want - got - n} of its messages still on the way "
            f"({got} received, {n} in the channel, {want} sent)"
        )
        while got < want:
            for msg in ch.recv_many(64, timeout=10):
                check(msg, lens, expected)
                got += 1
        total += want
        ch.close()
        channel.destroy(sink.c_uid)
        print(f"round {rnd}: {want} messages from {len(lens)} senders", flush=True)
    pool.destroy(mem.m_uid)
    print(f"joined ok {total}", flush=True)


def case_stuck(count="20", limit="1"):
    """A sender on another node fills a channel nobody reads and ends: its exit waits for its sends to land
    only as long as DRAGON_EXIT_FLUSH_TIMEOUT (limit seconds), says so on stderr, and the messages still
    arrive, in order, once node 0 reads."""
    count = int(count)
    others = [k for k in node.get_list() if k != 0]
    sink = channel.create(None, channel_options={"capacity": 4})
    ch = attach(sink)
    d = process.create(
        PY,
        None,
        [HERE, "exits_sender", sink.sdesc.hex(), "1", "0", str(count), "return", "send"],
        env={"DRAGON_EXIT_FLUSH_TIMEOUT": limit},
        options={"node": others[0]},
    )
    t = time.monotonic()
    code = process.join(d.p_uid, timeout=60)
    assert code == 0, f"the sender exited {code}"
    waited = time.monotonic() - t
    lens, expected = {1: [0] * count}, {1: 0}
    for _ in range(count):
        msg = ch.recv(timeout=30)
        sid, i = HDR.unpack_from(msg)
        lens[1][i] = len(msg) - HDR.size
        check(msg, lens, expected)
    ch.close()
    channel.destroy(sink.c_uid)
    print(f"stuck ok {count} (the sender was joined after {waited:.1f} s)", flush=True)


def case_handles(n="300"):
    """A sender on another node opens a handle, sends, and closes it, n times, and lives on: every stream
    ends at the agents once its sends are acknowledged (none lingers until the process exits), and node 0
    gets every message."""
    n = int(n)
    others = [k for k in node.get_list() if k != 0]
    sink = channel.create(None, channel_options={"capacity": 4096})
    ch = attach(sink)
    d = process.create(
        PY, None, [HERE, "handles_sender", sink.sdesc.hex(), str(n)], options={"node": others[0]}
    )
    got = set()
    deadline = time.monotonic() + 60
    while len(got) < 3 * n:
        assert time.monotonic() < deadline, f"received {len(got)} of {3 * n}"
        try:
            for m in ch.recv_many(256, timeout=1):
                assert bytes(m) not in got, f"message {bytes(m)} twice"
                got.add(bytes(m))
        except ChannelTimeout:
            pass
    code = process.join(d.p_uid, timeout=60)
    assert code == 0, f"the sender exited {code}"
    ch.close()
    channel.destroy(sink.c_uid)
    print(f"handles ok {len(got)}", flush=True)


def handles_sender(sdesc_hex, n):
    from dragon._core import remote
    from dragon.channels import Channel

    desc = bytes.fromhex(sdesc_hex)
    for i in range(int(n)):
        h = Channel.attach(desc)
        for j in range(3):
            h.send(f"{i}.{j}".encode())
        h.close()  # (its sends are usually not acknowledged yet: the stream ends once they are)
    ep = remote.endpoint()
    deadline = time.monotonic() + 30
    while True:
        ep.drain()
        with ep.cond:
            left = len(ep.streams)
        if not left:
            break
        assert time.monotonic() < deadline, (
            f"{left} of {n} streams still open 30 s after their handles closed"
        )
        time.sleep(0.01)


# ---- receivers
# -------------------------------------------------------------------------------------------------
def case_receivers(count="3000"):
    """Receivers on other nodes drain a channel on node 1 through the transport; one times out at a time, one
    is SIGKILLed mid-stream: together with the survivors they receive every message exactly once.

    The victim is killed while it waits in recv with nothing in hand (the sender pauses a quarter of the way
    until every message so far was reported), and the stream resumes at once, so the far agent may hand the
    next message to the dead receiver's pending receive: that message must come back to the channel. (A
    receiver killed after its recv took a message loses it with itself, as with a local channel: such a kill
    would say nothing about the transport.)"""
    count = int(count)
    nodes = node.get_list()
    assert len(nodes) >= 2
    pd = pool.create(64 << 20, pool_options={"node": 1})
    src = channel.create(pd.m_uid, channel_options={"capacity": 64})
    res = channel.create(None, channel_options={"capacity": 1024})  # receivers report what they got, here
    go = channel.create(None, channel_options={"capacity": 4})  # resumes the paused sender
    far = [k for k in nodes if k != 1] or [0]
    # a receiver that is SIGKILLed while it receives, and one that keeps timing out and giving up
    victims = [
        process.create(
            PY,
            None,
            [HERE, "receiver", src.sdesc.hex(), res.sdesc.hex(), "victim"],
            options={"node": far[-1]},
        ),
        process.create(
            PY,
            None,
            [HERE, "receiver", src.sdesc.hex(), res.sdesc.hex(), "quitter"],
            options={"node": far[0]},
        ),
    ]
    sender = process.create(
        PY, None, [HERE, "receivers_sender", src.sdesc.hex(), str(count), go.sdesc.hex()], options={"node": 1}
    )
    out = attach(res)
    seen = {}
    victim_alive = True
    last = time.monotonic()
    while len(seen) < count:
        missing = sorted(set(range(count)) - set(seen))[:10]
        assert time.monotonic() - last < STALL, f"received {len(seen)} of {count}; lost: {missing}"
        if victim_alive and len(seen) >= count // 4:  # the sender waits: the victim waits in recv
            time.sleep(0.2)
            process.kill(victims[0].p_uid, signal.SIGKILL)
            attach(go).send(b"go")
            victim_alive = False
            # the survivor: a receiver on another node that takes the rest
            survivor = process.create(
                PY,
                None,
                [HERE, "receiver", src.sdesc.hex(), res.sdesc.hex(), "survivor"],
                options={"node": far[0]},
            )
        try:
            for m in out.recv_many(256, timeout=0.5):
                who, i = m.split(b":")
                i = int(i)
                assert i not in seen, f"message {i} received twice ({seen[i]} and {who})"
                seen[i] = who
                last = time.monotonic()
        except ChannelTimeout:
            pass
    src_ch = attach(src)
    src_ch.send(b"stop")
    src_ch.send(b"stop")
    for d in (sender, survivor, victims[1]):
        assert process.join(d.p_uid, timeout=60) == 0, process.query(d.p_uid)
    assert process.join(victims[0].p_uid, timeout=30) == -signal.SIGKILL
    by = {w: sum(1 for x in seen.values() if x == w) for w in set(seen.values())}
    src_ch.close()
    channel.destroy(src.c_uid)
    channel.destroy(res.c_uid)
    channel.destroy(go.c_uid)
    pool.destroy(pd.m_uid)
    print(f"receivers ok {len(seen)} {sorted(by.items())}", flush=True)


def receivers_sender(src_hex, count, go_hex):
    from dragon.channels import Channel

    ch = Channel.attach(bytes.fromhex(src_hex))
    for i in range(int(count)):
        if i == int(count) // 4:
            Channel.attach(bytes.fromhex(go_hex)).recv(timeout=60)
        ch.send(b"%d" % i + b"." * (i % 3000), timeout=60)
        if i % 20 == 19:
            time.sleep(0.01)  # a stream that lasts a few seconds: the receivers are killed mid-way


def receiver(src_hex, res_hex, who):
    from dragon.channels import Channel

    src = Channel.attach(bytes.fromhex(src_hex))
    res = Channel.attach(bytes.fromhex(res_hex))
    tag = who.encode()
    rng = random.Random(who)
    while True:
        try:
            if who == "quitter":
                m = src.recv(timeout=rng.choice([0, 0.001, 0.01]))
            else:
                m = src.recv(timeout=5)
        except (ChannelEmpty, ChannelTimeout):
            if who == "quitter":
                continue
            raise
        if m == b"stop":
            return
        res.send(tag + b":" + m.split(b".", 1)[0], timeout=60)


# ---- a receiver that dies between an answer's header and its payload
# -------------------------------------------------------------------------------------------------
def case_orphan(rounds="5"):
    """A receiver on another node dies right after taking the header of its answer from its reply channel,
    before the payload behind it: the message goes back to the channel (the agent knows where the payload
    lies), every round."""
    nodes = node.get_list()
    far = [k for k in nodes if k != 1][-1]
    pd = pool.create(16 << 20, pool_options={"node": 1})
    src = channel.create(pd.m_uid, channel_options={"capacity": 16})
    ch = attach(src)
    for r in range(int(rounds)):
        sent = b"precious %d " % r + b"." * (r * 5000)  # inline and pool-block payloads
        ch.send(sent, timeout=30)
        victim = process.create(PY, None, [HERE, "orphan_victim", src.sdesc.hex()], options={"node": far})
        assert process.join(victim.p_uid, timeout=60) == 7, process.query(victim.p_uid)
        got = ch.recv(timeout=30)
        assert got == sent, (r, got[:40])
    ch.close()
    channel.destroy(src.c_uid)
    pool.destroy(pd.m_uid)
    print(f"orphan ok {rounds}", flush=True)


def orphan_victim(src_hex):
    from dragon._core import frames as W
    from dragon.channels import Channel

    ch = Channel.attach(bytes.fromhex(src_hex))
    ep = ch._ep
    real = ep.reply

    class DiesAfterAHeader:
        """The reply channel, but the process exits as soon as it has taken a header whose payload follows."""

        def __getattr__(self, name):
            return getattr(real, name)

        def recv_message(self, timeout=None):
            m = real.recv_message(timeout=timeout)
            if m.nbytes >= W.HSIZE and memoryview(m)[1] & W.NEXT:
                os._exit(7)
            return m

    ep.reply = DiesAfterAHeader()
    ch.recv(timeout=30)
    os._exit(1)  # (not reached: every single receive's answer is a header and its payload)


# ---- short-lived senders
# ---------------------------------------------------------------------------------------
def case_shortlived(n="200", in_flight="16"):
    n, in_flight = int(n), int(in_flight)
    others = [k for k in node.get_list() if k != 0]
    sink = channel.create(None, channel_options={"capacity": 1024})
    ch = attach(sink)
    blocks = settled_infra_blocks(others)
    running, started, got = set(), 0, set()
    deadline = time.monotonic() + 240
    while len(got) < n:
        assert time.monotonic() < deadline, f"received {len(got)} of {n}"
        while started < n and len(running) < in_flight:
            d = process.create(
                PY,
                None,
                [HERE, "one_shot", sink.sdesc.hex(), str(started)],
                options={"node": others[started % len(others)]},
            )
            running.add(d.p_uid)
            started += 1
        done, _ = process.multi_join(list(running), timeout=0) if running else ([], None)
        for p_uid, code in done or ():
            assert code == 0, (p_uid, code)
            running.discard(p_uid)
        try:
            for m in ch.recv_many(64, timeout=0.05):
                i = int(m)
                assert i not in got, f"message {i} twice"
                got.add(i)
        except ChannelTimeout:
            pass
    ch.close()
    channel.destroy(sink.c_uid)
    left = settled_infra_blocks(others, blocks)
    assert left == blocks, f"the senders left blocks in their nodes' infrastructure pools: {blocks} -> {left}"
    print(f"shortlived ok {len(got)}", flush=True)


def one_shot(sdesc_hex, i):
    from dragon.channels import Channel

    Channel.attach(bytes.fromhex(sdesc_hex)).send(i.encode())


if __name__ == "__main__":
    what = sys.argv[1]
    fn = globals().get("case_" + what) or globals()[what]
    fn(*sys.argv[2:])
