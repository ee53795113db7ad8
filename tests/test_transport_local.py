"""Node routing without MPI: sdescs name their node; attaching from another node goes through the
transport."""

import os

import pytest

from dragon.channels import Channel
from dragon.errors import ChannelError, PoolError
from dragon.pools import Pool


@pytest.fixture
def node_env(monkeypatch):
    monkeypatch.setenv("DRAGON_JOB", "tl" + os.urandom(3).hex())
    monkeypatch.setenv("DRAGON_NODE", "0")
    for var in ("DRAGON_GW_CD", "DRAGON_INF_PD"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_sdesc_names_the_node_of_its_creator(node_env):
    node_env.setenv("DRAGON_NODE", "3")
    with Pool.create(1 << 20) as pool:
        ch = Channel.create(pool, capacity=4)
        assert pool.node == 3 and ch.node == 3
        again = Channel.attach(ch.sdesc)  # same node: the channel itself
        assert isinstance(again, Channel) and again.node == 3 and again.sdesc == ch.sdesc
        assert Pool.attach(pool.sdesc).node == 3
        ch.destroy()


def test_attach_from_another_node_without_a_transport_is_a_clear_error(node_env):
    with Pool.create(1 << 20) as pool:
        ch = Channel.create(pool, capacity=4)
        node_env.setenv("DRAGON_NODE", "1")
        with pytest.raises(ChannelError, match="another node"):
            Channel.attach(ch.sdesc)
        with pytest.raises(PoolError, match="lives on node 0"):
            Pool.attach(pool.sdesc)
        node_env.setenv("DRAGON_NODE", "0")
        ch.destroy()


LOOPBACK = r"""
import os, threading
from mpi4py import MPI
from dragon.channels import Channel
from dragon.errors import ChannelEmpty, ChannelError, ChannelTimeout
from dragon.pools import Pool
from dragon._core import frames as W, remote
from dragon.transport.agent import Agent, start_thread
from dragon._core.remote import RemoteChannel

with Pool.create(32 << 20, name="inf") as pool:
    gw = Channel.create(pool, capacity=256, block_size=1024 + W.HSIZE)
    target = Channel.create(pool, capacity=4, block_size=64)
    os.environ["DRAGON_GW_CD"] = bytes(gw.sdesc).hex()
    os.environ["DRAGON_INF_PD"] = bytes(pool.sdesc).hex()
    agent = Agent(MPI.COMM_SELF, 0, [0], gw, pool)
    t = start_thread(agent)
    try:
        r = RemoteChannel(target.sdesc, 0)
        big = os.urandom(300_000)
        for data in (b"", b"x" * 64, big):
            r.send(data)
            assert r.recv(timeout=10) == data
        # errors come back as their own class (the ERR frame's code): empty, timed out, too small a buffer
        for call, cls in (
            (lambda: r.recv(timeout=0), ChannelEmpty),
            (lambda: r.recv(timeout=0.2), ChannelTimeout),
        ):
            try:
                call()
                raise AssertionError("not empty")
            except ChannelError as e:
                assert type(e) is cls, repr(e)
        r.send(b"y" * 40)
        try:
            r.recv_into(bytearray(8), timeout=10)
            raise AssertionError("fit")
        except ChannelError as e:
            assert type(e) is ChannelError and "too small" in str(e), repr(e)
        assert r.recv(timeout=10) == b"y" * 40  # (it stayed queued)
        try:  # send_many: all or nothing for bad input
            r.send_many([b"a", 1, b"b"])
            raise AssertionError("sent")
        except TypeError as e:
            assert "item 1" in str(e), e
        assert r.send_many([b"c", bytearray(b"d")]) == 2
        assert r.recv_many(5, timeout=10) == [b"c", b"d"]  # (nothing of the refused call came before them)
        assert r.capacity == 4
        pid = os.fork()  # a child uses the inherited handle: it gets its own stream and reply channel
        if pid == 0:
            code = 1
            try:
                r.send(b"from the child")
                code = 0 if r.flush(10) else 2
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        assert r.recv(timeout=10) == b"from the child"
        r.close()
        print("loopback ok")
    finally:
        agent.stop()
        t.join(10)
        remote.endpoint().close()
        target.destroy()
        gw.destroy()
"""


def test_remote_channel_through_an_agent_loopback(node_env):
    """An agent thread (a one-node MPI world) serving a RemoteChannel of its own process (in a subprocess: MPI
    must not be initialised in the test process, which forks)."""
    import subprocess
    import sys

    pytest.importorskip("mpi4py")
    res = subprocess.run(
        [sys.executable, "-c", LOOPBACK], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "loopback ok" in res.stdout, res.stdout + res.stderr


def test_remote_channel_has_the_local_channel_api():
    """Every public call of a local Channel exists on RemoteChannel, but the constructors (a RemoteChannel
    comes from Channel.attach of another node's sdesc)."""
    from dragon._core.remote import RemoteChannel

    local = {n for n in dir(Channel) if not n.startswith("_")} | {"__len__", "__enter__", "__exit__"}
    missing = {n for n in local - {"create", "attach"} if not hasattr(RemoteChannel, n)}
    assert not missing, missing


ACK_POLICY = r"""
import time
from mpi4py import MPI
from dragon.channels import Channel
from dragon.pools import Pool
from dragon._core import frames as W
from dragon.transport import incoming
from dragon.transport.agent import Agent
from dragon.transport.incoming import _In

def acks(agent, node):
    pkt = bytes(agent.out.get(node, b""))
    found, pos = [], 0
    while pos < len(pkt):
        kind, _f, _n, n, sid, seq = W.HDR.unpack_from(pkt, pos)
        if kind == W.ACK:
            found.append((sid, seq))
        pos += W.HSIZE + n
    return found

with Pool.create(8 << 20, name="inf") as pool:
    gw = Channel.create(pool, capacity=16, block_size=1024 + W.HSIZE)
    target = Channel.create(pool, capacity=4, block_size=64)
    agent = Agent(MPI.COMM_SELF, 0, [0, 0], gw, pool)  # (node 1's frames are only built here, never sent)
    s = _In(1, 77)
    s.ch = target
    agent.ins[(1, 77)] = s
    other = W.HDR.pack(W.SEND, 0, 1, 0, 5, 0)  # a frame of another stream going to node 1 anyway
    # an answer goes to the stream's node: one delivery waiting does not ride on it ...
    s.delivered = 1
    agent.ack_due.add(s)
    agent._emit(1, other)
    agent._acks()
    assert acks(agent, 1) == [] and s in agent.ack_due, acks(agent, 1)
    # ... ACK_RIDE of them do
    s.delivered = incoming.ACK_RIDE
    agent._acks()
    assert acks(agent, 1) == [(77, incoming.ACK_RIDE)] and s.acked == incoming.ACK_RIDE and not agent.ack_due
    # nothing going there: an ack waits for ACK_DELAY, then goes by itself
    agent.out.clear()
    s.delivered += 1
    agent.ack_due.add(s)
    agent._acks()
    assert acks(agent, 1) == [] and s in agent.ack_due
    time.sleep(incoming.ACK_DELAY * 2)
    agent._acks()
    assert acks(agent, 1) == [(77, incoming.ACK_RIDE + 1)] and not agent.ack_due
    # ACK_EVERY deliveries are acknowledged at once, whatever goes there
    agent.out.clear()
    s.delivered += incoming.ACK_EVERY
    agent.ack_due.add(s)
    agent._acks()
    assert acks(agent, 1) == [(77, incoming.ACK_RIDE + 1 + incoming.ACK_EVERY)]
    # an idle step (nothing delivered, nothing to send) looks at the acks only once one can be due (a long
    # ACK_DELAY here: a busy machine's stall between two lines must not make the ack due early)
    incoming.ACK_DELAY = 1.0
    calls = []
    real = agent._acks
    agent._acks = lambda: (calls.append(1), real())
    agent.out.clear()
    s.delivered += 1
    agent.ack_due.add(s)
    real()  # (what the step that delivered it does: the ack's clock starts)
    agent._step()
    assert calls == [] and s in agent.ack_due, calls
    time.sleep(incoming.ACK_DELAY * 1.1)
    agent._step()  # (sends the ack packet: to this very rank, on COMM_SELF)
    assert calls == [1] and not agent.ack_due and s.acked == s.delivered, calls
    target.destroy()
    gw.destroy()
    print("acks ok")
"""


def test_acks_ride_on_answers_only_once_several_wait(node_env):
    """A stream's acknowledgements are lazy: one rides on a packet going to the sender's node only once
    ACK_RIDE deliveries wait for it (an ack on every answer put a frame into the sender's reply channel on
    each round trip's path), else it goes after ACK_DELAY or ACK_EVERY deliveries (a real Agent on a one-rank
    MPI world, in a subprocess: MPI must not be initialised in the test process, which forks)."""
    import subprocess
    import sys

    pytest.importorskip("mpi4py")
    res = subprocess.run(
        [sys.executable, "-c", ACK_POLICY], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "acks ok" in res.stdout, res.stdout + res.stderr
