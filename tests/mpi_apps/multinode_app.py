"""Programs for tests/test_multinode.py, run as ``mpiexec -n 3 dragon-launch --virtual-nodes multinode_app.py
CASE`` (the program runs once, on node 0). Prints "<case> ok" when its checks pass."""

import hashlib
import os
import signal
import sys
import time

from dragon.errors import ChannelEmpty, ChannelError, ChannelTimeout, ProcessError
from dragon.globalservices import channel, node, pool, process

PY = sys.executable
HERE = os.path.abspath(__file__)


def attach(desc):
    """A handle to a channel from its descriptor, wherever it lives."""
    from dragon.channels import Channel

    ch = Channel.attach(desc.sdesc)
    if desc.node != int(os.environ.get("DRAGON_NODE", "0")):
        from dragon._core.remote import RemoteChannel

        assert isinstance(ch, RemoteChannel), (ch, desc)
    return ch


def payload(i, n):
    seed = hashlib.sha256(b"%d-%d" % (i, n)).digest()
    return (seed * (n // 32 + 1))[:n]


SIZES = [0, 1, 8, 1000, 1024, 1025, 65536, 200_000, 1 << 20]


def case_processes():
    nodes = node.get_list()
    assert nodes == [0, 1, 2], nodes
    assert [node.query(k).index for k in nodes] == nodes
    for k in nodes:
        d = process.create(
            PY,
            None,
            ["-c", "import os; print('hello from node', os.environ['DRAGON_NODE'])"],
            user_name=f"hello{k}",
            options={"node": k},
        )
        assert d.node == k, d
        assert process.join(d.p_uid, timeout=60) == 0
        # a process on node k that uses global services itself (its requests come through the transport)
        d = process.create(PY, None, [HERE, "child_query", str(k)], options={"node": k})
        assert process.join(d.p_uid, timeout=60) == 0, process.query(d.p_uid)
        # kill one on each node
        d = process.create(PY, None, ["-c", "import time; time.sleep(60)"], options={"node": k})
        assert process.join(d.p_uid, timeout=0.2) is None
        process.kill(d.p_uid, signal.SIGTERM)
        assert process.join(d.p_uid, timeout=30) == -signal.SIGTERM
        assert process.query(d.p_uid).node == k
    print("processes ok", flush=True)


def case_twohosts():
    """Two real nodes (srun -N 2 on the test cluster: separate hosts, separate /dev/shm)."""
    assert node.get_list() == [0, 1]
    hosts = [node.query(k).hostname for k in (0, 1)]
    assert hosts[0] != hosts[1], hosts
    d = process.create(
        PY,
        None,
        ["-c", "import socket; print('host', socket.gethostname())"],
        user_name="where",
        options={"node": 1},
    )
    assert process.join(d.p_uid, timeout=60) == 0
    pd = pool.create(16 << 20, pool_options={"node": 1})
    cd = channel.create(pd.m_uid, channel_options={"capacity": 16})
    ch = attach(cd)
    for i, n in enumerate(SIZES):
        ch.send(payload(i, n))
        assert ch.recv(timeout=30) == payload(i, n)
    ch.close()
    channel.destroy(cd.c_uid)
    pool.destroy(pd.m_uid)
    print("twohosts ok", hosts, flush=True)


def child_query(k):
    me = process.this_process()
    assert me.node == int(k) == int(os.environ["DRAGON_NODE"]), me
    assert process.query(me.p_uid).p_uid == me.p_uid
    assert node.get_list() == [0, 1, 2]


def case_channels():
    # a pool and a channel on each remote node, used from here (node 0) and from a process on the third node
    for k in (1, 2):
        pd = pool.create(32 << 20, user_name=f"pool{k}", pool_options={"node": k})
        assert pd.node == k, pd
        cd = channel.create(pd.m_uid, user_name=f"ch{k}", channel_options={"capacity": 64})
        assert cd.node == k, cd
        ch = attach(cd)
        for i, n in enumerate(SIZES):
            ch.send(payload(i, n))
        for i, n in enumerate(SIZES):
            got = ch.recv(timeout=30)
            assert got == payload(i, n), (k, n, len(got))
        try:
            ch.recv(timeout=0.2)
            raise AssertionError("not empty")
        except ChannelTimeout:
            pass
        ch.close()
        channel.destroy(cd.c_uid)
        pool.destroy(pd.m_uid)
        try:
            pool.query(pd.m_uid)
            raise AssertionError("pool still there")
        except Exception:
            pass
    # several senders on nodes 1 and 2 stream into a channel on node 0: exactly once, in order per sender
    sink = channel.create(None, user_name="sink", channel_options={"capacity": 1024})
    count = 1500
    senders = [
        process.create(PY, None, [HERE, "sender", f"n{k}s{j}", str(count)], options={"node": k})
        for k in (1, 2)
        for j in range(2)
    ]
    expected = {f"n{k}s{j}": 0 for k in (1, 2) for j in range(2)}
    ch = attach(sink)
    got = 0
    while got < count * len(expected):
        for body in ch.recv_many(256, timeout=60):
            tag, i, _ = body.split(b":", 2)
            tag, i = tag.decode(), int(i)
            assert expected[tag] == i, (tag, i, expected[tag])
            expected[tag] = i + 1
            got += 1
    exited, _ = process.multi_join([d.p_uid for d in senders], timeout=60)
    for d in senders:
        assert process.join(d.p_uid, timeout=60) == 0
    time.sleep(0.3)
    try:
        ch.recv(timeout=0)
        raise AssertionError("a message was duplicated")
    except ChannelEmpty:
        pass
    # channel.join across nodes: a process on node 2 waits for a channel a process on node 1 creates
    waiter = process.create(PY, None, [HERE, "join_waiter"], options={"node": 2})
    time.sleep(0.5)
    maker = process.create(PY, None, [HERE, "join_maker"], options={"node": 1})
    assert process.join(maker.p_uid, timeout=60) == 0
    assert process.join(waiter.p_uid, timeout=60) == 0
    print("channels ok", flush=True)


def sender(tag, count):
    out = attach(channel.query("sink"))
    for i in range(int(count)):
        out.send(b"%s:%d:" % (tag.encode(), i) + (b"B" * 70000 if i % 100 == 3 else b"x" * (i % 11)))
    out.flush(60)


def join_waiter():
    d = channel.join("rendezvous", timeout=60)
    assert d.node == 1, d
    assert attach(d).recv(timeout=30) == b"from node 1"


def join_maker():
    d = channel.create(None, user_name="rendezvous")
    assert d.node == 1
    attach(d).send(b"from node 1")


def case_killnode():
    """Kill node 1's shepherd: its processes are reported dead, joins return, senders to it get an error; the
    job still ends (non-zero, naming node 1)."""
    d = process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": 1})
    pd = pool.create(8 << 20, pool_options={"node": 1})
    cd = channel.create(pd.m_uid, channel_options={"capacity": 2})
    ch = attach(cd)
    job1 = os.environ["DRAGON_JOB"][:-1] + "1"
    shep = _shepherd_of(job1)
    assert shep, "no shepherd found for node 1"
    print(f"killing the shepherd of node 1 (pid {shep})", flush=True)
    os.kill(shep, signal.SIGKILL)
    code = process.join(d.p_uid, timeout=60)
    assert code is not None and code < 0, code
    try:
        for _i in range(10000):  # the window of a remote channel of capacity 2 fills long before that
            ch.send(b"x", timeout=30)
        raise AssertionError("sends to a dead node never failed")
    except ChannelError as e:
        assert "node 1" in str(e), e
    try:
        process.create(PY, None, ["-c", "pass"], options={"node": 1})
        raise AssertionError("created a process on a dead node")
    except ProcessError:
        pass
    print("killnode ok", flush=True)


def case_killagent():
    """SIGKILL node 1's launcher rank (its transport agent): mpiexec ends every rank, and every node's
    services tear their node down (no process or segment may survive; the test checks)."""
    d = process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": 1})
    channel.create(pool.create(8 << 20, pool_options={"node": 2}).m_uid)
    rank1 = _launcher_of_node1()
    print(f"killing node 1's launcher and agent (pid {rank1})", flush=True)
    os.kill(rank1, signal.SIGKILL)
    process.join(d.p_uid, timeout=60)
    time.sleep(60)  # mpiexec ends the job long before this
    print("killagent: still alive", flush=True)


def case_killnode2():
    """killnode with two nodes (the Slurm test)."""
    case_killnode()


def case_killrank():
    """SIGKILL node 1's launcher rank under srun (which keeps the other ranks running): node 0's agent hears
    nothing more from it and declares the node down; its processes are reported dead, joins return."""
    _signal_node1_launcher(signal.SIGKILL, "killing node 1's launcher and agent", 90)
    print("killrank ok", flush=True)


def case_termrank():
    """SIGTERM to node 1's launcher rank alone (node 0 never orders a teardown): after a few seconds it tears
    its node down itself and tells node 0, whose joins then return at once (not after the heartbeats'
    silence)."""
    _signal_node1_launcher(signal.SIGTERM, "SIGTERM to node 1's launcher", 60)
    print("termrank ok", flush=True)


def _signal_node1_launcher(sig, what, timeout):
    """Start a sleeper on node 1, send sig to node 1's launcher rank: the sleeper's join must return, as
    killed."""
    d = process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": 1})
    rank1 = _launcher_of_node1()
    print(f"{what} (pid {rank1})", flush=True)
    os.kill(rank1, sig)
    code = process.join(d.p_uid, timeout=timeout)
    assert code is not None and code < 0, code


def _launcher_of_node1():
    """The pid of node 1's launcher rank: its shepherd's parent."""
    with open(f"/proc/{_shepherd_of(os.environ['DRAGON_JOB'][:-1] + '1')}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _shepherd_of(job):
    needle = f"DRAGON_JOB={job}\0".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read() + b"\0"
        except OSError:
            continue
        if b"shepherd" in cmd and needle in env:
            return int(d)
    return None


if __name__ == "__main__":
    what = sys.argv[1]
    fn = globals().get("case_" + what) or globals()[what]
    fn(*sys.argv[2:])
