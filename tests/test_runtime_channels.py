"""Acceptance tests of dragon.globalservices.pool / channel / node (the spec's Pool and Channel Services), run
under dragon-launch, plus the behaviour outside the runtime."""

import pytest
from test_runtime_util import APP_HELPERS, run_app

CHANNEL_APP = (
    APP_HELPERS
    + r'''
import os, sys, time
from dragon.errors import ChannelError, ChannelTimeout, PoolError, DragonError
from dragon.globalservices import channel as C, pool as M, process as P, node as N
from dragon.globalservices.channel import ChannelOptions, ChannelDescriptor
from dragon.globalservices.pool import PoolDescriptor, PoolOptions
from dragon.channels import Channel
from dragon.pools import Pool


# nodes
assert N.get_list() == [0]
nd = N.query(0)
assert nd.index == 0 and nd.hostname == os.uname().nodename and nd.cpus >= 1, nd
raises(DragonError, N.query, 1); raises(DragonError, N.query, "0")
ok("node")

# pools
infra = M.get_list()
assert len(infra) == 1 and M.query(infra[0]).name == "dragon_infra_0"
raises(PoolError, M.destroy, infra[0])
p = M.create(1 << 20, user_name="mypool")
assert isinstance(p, PoolDescriptor) and p.name == "mypool" and p.node == 0 and p.m_uid not in infra
assert p.sdesc and M.query("mypool").m_uid == p.m_uid and M.query(p.m_uid).name == "mypool"
assert sorted(M.get_list()) == sorted(infra + [p.m_uid])
assert "mypool" in raises(PoolError, M.create, 1 << 20, user_name="mypool")
assert M.create(1 << 20, user_name="mypool", soft=True).m_uid == p.m_uid
anon = M.create(4096, pool_options=PoolOptions(node=0))
assert anon.m_uid != p.m_uid and anon.name is None
pool = Pool.attach(p.sdesc)
b = pool.alloc(100); pool.free(b); pool.close()
ok("pool create query list soft attach")

# channels
c = C.create(p.m_uid, user_name="ch1", channel_options=ChannelOptions(capacity=16, block_size=256))
assert isinstance(c, ChannelDescriptor) and c.m_uid == p.m_uid and c.name == "ch1" and c.node == 0
assert (c.capacity, c.block_size) == (16, 256)
assert C.query("ch1").c_uid == c.c_uid and C.query(c.c_uid).name == "ch1" and c.c_uid in C.list()
assert "ch1" in raises(ChannelError, C.create, p.m_uid, user_name="ch1")
assert C.create(p.m_uid, user_name="ch1", soft=True).c_uid == c.c_uid
d = C.create(None)  # the node's default pool
assert d.m_uid == infra[0] and d.c_uid != c.c_uid
lo = C.create(p.m_uid, channel_options=ChannelOptions(local_opts={"capacity": 4, "block_size": 64}))
assert (lo.capacity, lo.block_size) == (4, 64)
ok("channel create query list soft")

# two processes talk over it
ch = Channel.attach(c.sdesc)
w = P.create(PY, None, ["-c", """
from dragon.globalservices import channel as C
from dragon.channels import Channel
ch = Channel.attach(C.query('ch1').sdesc)
for i in range(100):
    ch.send(b'x%d' % i)
"""])
got = [ch.recv(timeout=20) for _ in range(100)]
assert got == [b"x%d" % i for i in range(100)]
assert P.join(w.p_uid, timeout=20) == 0
ok("send recv across processes")

# pool.destroy refuses while channels live in it
assert "channel" in raises(PoolError, M.destroy, p.m_uid)

# destroy then query raises; a list of identifiers; unknown ones destroy nothing
C.destroy(d.c_uid)
raises(ChannelError, C.query, d.c_uid)
assert d.c_uid not in C.list()
raises(ChannelError, C.destroy, d.c_uid)
assert "424242" in raises(ChannelError, C.destroy, [lo.c_uid, 424242])
assert C.query(lo.c_uid).c_uid == lo.c_uid
C.destroy([lo.c_uid, "ch1"])
raises(ChannelError, C.query, "ch1"); raises(ChannelError, C.query, lo.c_uid)
ch.close()
M.destroy("mypool")
raises(PoolError, M.query, "mypool"); raises(PoolError, M.query, p.m_uid)
raises(PoolError, M.destroy, p.m_uid)
M.destroy(anon.m_uid)
assert sorted(M.get_list()) == sorted(infra)
ok("destroy then query raises")

# channel.join blocks until another process creates the channel; times out with TimeoutError
t0 = time.monotonic()
try:
    C.join("late", timeout=0.3)
    raise AssertionError("join did not time out")
except TimeoutError as e:
    assert isinstance(e, ChannelTimeout) and "late" in str(e)
assert 0.25 < time.monotonic() - t0 < 10
LATE = ("import time; time.sleep(0.5); from dragon.globalservices import channel as C; "
        "C.create(None, user_name='late')")
maker = P.create(PY, None, ["-c", LATE])
t0 = time.monotonic()
j = C.join("late", timeout=30)
assert j.name == "late" and time.monotonic() - t0 > 0.3
assert P.join(maker.p_uid, timeout=20) == 0
assert C.join("late").c_uid == j.c_uid  # exists now: immediate
C.destroy("late")
ok("channel.join")

# ref_count: destroyed when the last referencing process detaches or exits
rc = C.create(None, user_name="counted", channel_options=ChannelOptions(ref_count=True))
assert rc.ref_count
user = P.create(PY, None, ["-c", """
import sys
from dragon.globalservices import channel as C
d = C.attach('counted')
open('attached', 'w').close()
import time; time.sleep(0.5)
"""])
while not os.path.exists("attached"):
    time.sleep(0.01)
C.detach("counted")  # the creator's reference; the child still holds one
assert C.query("counted").c_uid == rc.c_uid
assert P.join(user.p_uid, timeout=20) == 0
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        C.query("counted")
    except ChannelError:
        break
    time.sleep(0.05)
else:
    raise AssertionError("ref_count channel survived its last user")
raises(ChannelError, C.detach, "counted")
ok("ref_count exit")
# a channel made by a process that exits without detaching goes with it
EPHEMERAL = ("from dragon.globalservices import channel as C; "
             "from dragon.globalservices.channel import ChannelOptions; "
             "C.create(None, user_name='ephemeral', channel_options=ChannelOptions(ref_count=True))")
mk = P.create(PY, None, ["-c", EPHEMERAL])
assert P.join(mk.p_uid, timeout=20) == 0
time.sleep(0.2)
raises(ChannelError, C.query, "ephemeral")
rc2 = C.create(None, channel_options={"ref_count": True})
C.attach(rc2.c_uid)
C.detach(rc2.c_uid); assert C.query(rc2.c_uid)
C.detach(rc2.c_uid); raises(ChannelError, C.query, rc2.c_uid)
plain = C.create(None)
C.attach(plain.c_uid); C.detach(plain.c_uid); C.detach(plain.c_uid)
assert C.query(plain.c_uid)  # not counted: attach/detach change nothing
C.destroy(plain.c_uid)
ok("ref_count detach")

# bad input
for exc, bad in [
    (PoolError, lambda: M.create(0)), (PoolError, lambda: M.create(-5)), (PoolError, lambda: M.create("big")),
    (PoolError, lambda: M.create(1 << 62)), (PoolError, lambda: M.create(4096, user_name=3)),
    (PoolError, lambda: M.create(4096, soft=True)),
    (PoolError, lambda: M.create(4096, pool_options=PoolOptions(node=3))),
    (PoolError, lambda: M.create(4096, pool_options="x")), (PoolError, lambda: M.query(999)),
    (PoolError, lambda: M.query("nope")), (PoolError, lambda: M.query(None)),
    (PoolError, lambda: M.destroy(999)),
    (ChannelError, lambda: C.create(999)), (ChannelError, lambda: C.create("pool")),
    (ChannelError, lambda: C.create(None, user_name=7)), (ChannelError, lambda: C.create(None, soft=True)),
    (ChannelError, lambda: C.create(None, channel_options=ChannelOptions(capacity=0))),
    (ChannelError, lambda: C.create(None, channel_options={"capacity": -1})),
    (ChannelError, lambda: C.create(None, channel_options={"nonsense": 1})),
    (ChannelError, lambda: C.create(None, channel_options=ChannelOptions(ref_count="yes"))),
    (ChannelError, lambda: C.create(None, channel_options=ChannelOptions(capacity=1 << 40))),
    (ChannelError, lambda: C.query(999)), (ChannelError, lambda: C.query("nope")),
    (ChannelError, lambda: C.query([1])),
    (ChannelError, lambda: C.join(5)), (ChannelError, lambda: C.join("")),
    (ChannelError, lambda: C.join("x", timeout=-1)),
    (ChannelError, lambda: C.destroy(999)), (ChannelError, lambda: C.destroy([])),
    (ChannelError, lambda: C.destroy(None)),
    (ChannelError, lambda: C.attach("nope")), (ChannelError, lambda: C.detach(999)),
]:
    assert raises(exc, bad)
assert "999" in raises(ChannelError, C.query, 999) and "nope" in raises(PoolError, M.query, "nope")
assert C.list() == []
ok("bad input")
print("ALL OK")
'''
)


@pytest.mark.timeout(60)
def test_a_process_naming_its_own_pools_like_the_runtimes_does_not_break_pool_create(tmp_path):
    """Pool.create(name=...) of a process and the pools global services makes share the job's segment names:
    the shepherd named its pools m<m_uid>, so a process's own pools "m2".."m5" made pool.create fail."""
    app = r"""
from dragon.globalservices import pool
from dragon.pools import Pool
mine = [Pool.create(4096, name=f"m{i}") for i in range(1, 8)]
made = [pool.create(1 << 20) for _ in range(3)]
assert len({d.m_uid for d in made}) == 3
for d in made:
    pool.destroy(d.m_uid)
for p in mine:
    p.destroy()
print("names ok", flush=True)
"""
    r = run_app(tmp_path, app, timeout=50)
    assert r.returncode == 0 and "names ok" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(90)
def test_pool_channel_api(tmp_path):
    r = run_app(tmp_path, CHANNEL_APP, timeout=80)
    assert "ALL OK" in r.stdout, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert r.returncode == 0, r.stderr


def test_outside_runtime_raises_runtime_not_found(monkeypatch):
    from dragon.errors import RuntimeNotFound
    from dragon.globalservices import channel, node, pool, process

    for k in ("DRAGON_GS_CD", "DRAGON_REPLY_CD", "DRAGON_PUID"):
        monkeypatch.delenv(k, raising=False)
    for call in (
        process.this_process,
        process.get_list,
        lambda: process.query(1),
        pool.get_list,
        channel.list,
        lambda: channel.join("x", 1),
        node.get_list,
        lambda: process.create("/bin/true", None, []),
    ):
        with pytest.raises(RuntimeNotFound, match="dragon-launch"):
            call()
