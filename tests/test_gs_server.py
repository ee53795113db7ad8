"""Global services in one process, fed messages by the test, which plays the shepherd's and the clients' parts
over real channels: the spec rules and the server-side deadlines, deterministically and without launches."""

import os
import time

import pytest

from dragon.errors import ChannelError, ChannelTimeout, DragonError, ProcessError, code_of
from dragon.infrastructure import messages as m

KEY = b"testkey1"  # the job's key: control messages (the shepherd's, the launcher's) carry it
E_PROCESS, E_CHANNEL, E_TIMEOUT, E_INTERNAL = (
    code_of(c) for c in (ProcessError, ChannelError, ChannelTimeout, DragonError)
)


@pytest.fixture
def gs(monkeypatch):
    monkeypatch.setenv("DRAGON_JOB", f"gstest{os.getpid()}")
    from dragon.channels import Channel
    from dragon.globalservices.server import GlobalServices
    from dragon.pools import Pool

    pool = Pool.create(8 << 20, name="gs")
    chans = [Channel.create(pool, capacity=256) for _ in range(4)]
    inbox, shep, launcher, client = chans
    nodes = [{"index": 0, "hostname": "h0", "cpus": 2}]
    g = GlobalServices(inbox, [shep.sdesc], launcher.sdesc, nodes, [pool.sdesc], KEY)
    g.t_shep, g.t_launcher, g.t_client = shep, launcher, client
    yield g
    for c in chans:
        c.destroy()
    pool.destroy()


def req(g, cls, caller=0, **fields):
    """Send a request as a client would and let GS handle it; returns the tag."""
    req.tag = getattr(req, "tag", 0) + 1
    g.handle(m.encode(cls(tag=req.tag, reply=bytes(g.t_client.sdesc), caller=caller, **fields)))
    return req.tag


def answer(g, tag=None):
    """The next answer to the client (checks its tag)."""
    r = m.decode(g.t_client.recv(timeout=1))
    assert isinstance(r, (m.Response, m.ControlResponse))
    if tag is not None:
        assert r.tag == tag
    return r


def pfields(result):
    """A process descriptor as GS sends it (its fields in ProcessDescriptor.__slots__ order) -> a dict."""
    from dragon.infrastructure.descriptors import ProcessDescriptor

    assert type(result) is list and len(result) == len(ProcessDescriptor.__slots__), result
    return dict(zip(ProcessDescriptor.__slots__, result))


def cfields(result):
    from dragon.infrastructure.descriptors import ChannelDescriptor

    assert type(result) is list and len(result) == len(ChannelDescriptor.__slots__), result
    return dict(zip(ChannelDescriptor.__slots__, result))


def no_answer(g):
    assert len(g.t_client) == 0


def shepherd_gets(g, cls):
    msg = m.decode(g.t_shep.recv(timeout=1))
    assert isinstance(msg, cls), msg
    return msg


def shepherd_replies(g, msg, err=0, text=None, result=None):
    g.handle(m.encode(m.ControlResponse(KEY, msg.tag, err, text, result)))


def create_req(g, caller=0, **fields):
    """A GSProcessCreate request with defaults for every field not given; returns the tag."""
    base = dict(
        exe="/bin/x", run_dir="/", args=[], env=None, user_name=None, options={}, soft=False, head=False
    )
    return req(g, m.GSProcessCreate, caller=caller, **{**base, **fields})


def start(g, name=None, caller=0, head=False, pid=100):
    tag = create_req(g, caller=caller, args=["a"], user_name=name, head=head)
    sh = shepherd_gets(g, m.SHProcessCreate)
    assert sh.exe == "/bin/x" and sh.args == ["a"]
    shepherd_replies(g, sh, result={"pid": pid, "reply_cd": b"rc%d" % sh.p_uid})
    r = answer(g, tag)
    assert r.err == 0, r
    return pfields(r.result), sh


def exit_(g, p_uid, code):
    g.handle(m.encode(m.SHProcessExit(KEY, 0, p_uid, code)))
    g._flush_reaped()  # (the loop's timer sends the batch; no loop runs here)
    assert shepherd_gets(g, m.SHProcessReaped).p_uids == [p_uid]


def test_create_names_labels_and_uids(gs):
    d, sh = start(gs, name="w")
    assert d["p_uid"] == 1 and d["user_name"] == "w" and d["state"] == "running" and d["pid"] == 100
    assert sh.label == "w" and sh.p_uid == 1
    d2, sh2 = start(gs)
    assert d2["p_uid"] == 2 and d2["user_name"] and sh2.label == "2"
    r = answer(
        gs,
        create_req(gs, user_name="w"),
    )
    assert r.err == E_PROCESS and "'w'" in r.msg
    r = answer(
        gs,
        create_req(gs, user_name="w", soft=True),
    )
    assert r.err == 0 and pfields(r.result)["p_uid"] == 1
    # a create the shepherd refuses frees the name but not the p_uid
    tag = create_req(gs, exe="/no", user_name="bad")
    sh = shepherd_gets(gs, m.SHProcessCreate)
    shepherd_replies(gs, sh, err=E_INTERNAL, text="cannot start '/no'")
    r = answer(gs, tag)
    assert r.err == E_PROCESS and "/no" in r.msg
    d4, _ = start(gs, name="bad")
    assert d4["p_uid"] == 4


def test_join_deadline_is_kept_by_the_server(gs):
    d, _ = start(gs, name="w")
    tag = req(gs, m.GSProcessJoin, caller=0, ident="w", timeout=0.05)
    no_answer(gs)
    time.sleep(0.06)
    gs._fire_timers()
    r = answer(gs, tag)
    assert r.err == 0 and r.result is None
    tag_forever = req(gs, m.GSProcessJoin, ident=d["p_uid"], timeout=None)
    tag_multi = req(gs, m.GSProcessMultiJoin, idents=["w"], timeout=5.0)
    exit_(gs, d["p_uid"], -9)
    got = {r.tag: r for r in (answer(gs), answer(gs))}
    assert got[tag_forever].result == -9
    multi = got[tag_multi].result
    assert multi["exited"] == [[1, -9]] and pfields(multi["status"][1])["retval"] == -9
    assert answer(gs, req(gs, m.GSProcessJoin, ident="w", timeout=0)).result == -9
    assert answer(gs, req(gs, m.GSProcessList)).result == []


def test_join_self_and_unknown(gs):
    d, _ = start(gs, name="w")
    r = answer(gs, req(gs, m.GSProcessJoin, caller=d["p_uid"], ident="w", timeout=None))
    assert r.err == E_PROCESS and "itself" in r.msg
    r = answer(gs, req(gs, m.GSProcessQuery, ident=77))
    assert r.err == E_PROCESS and "77" in r.msg


def test_answers_owed_to_a_dead_process_are_dropped(gs, capfd):
    a, _ = start(gs, name="a")
    b, _ = start(gs, name="b")
    # b joins a through its own reply channel (b"rc2"); then b dies: GS must never answer into b's channel
    gs.handle(m.encode(m.GSProcessJoin(tag=9, reply=b"rc2", caller=b["p_uid"], ident="a", timeout=None)))
    exit_(gs, b["p_uid"], 0)
    exit_(gs, a["p_uid"], 0)
    assert gs.owed == {}
    assert "cannot answer" not in capfd.readouterr().err  # GS did not try b's (bogus) reply channel


def test_head_exit_tells_the_launcher(gs):
    d, sh = start(gs, head=True)
    assert sh.head is True
    exit_(gs, d["p_uid"], 3)
    msg = m.decode(gs.t_launcher.recv(timeout=1))
    assert isinstance(msg, m.LAHeadExit) and msg.exit_code == 3


def test_reply_channels_are_released_in_batches_and_none_is_forgotten(gs):
    """The shepherd hears which reply channels may go in batches: REAP_BATCH exits make one message at once;
    fewer wait for the loop's timer (REAP_AFTER); every exited process is named once, in exit order."""
    n = gs.REAP_BATCH + 3
    uids = [start(gs, pid=100 + i)[0]["p_uid"] for i in range(n)]
    for u in uids:
        gs.handle(m.encode(m.SHProcessExit(KEY, 0, u, 0)))
    first = shepherd_gets(gs, m.SHProcessReaped)
    assert first.p_uids == uids[: gs.REAP_BATCH]
    assert len(gs.t_shep) == 0  # the rest waits for the timer
    assert gs.reap_timer is not None and not gs.reap_timer.cancelled
    assert gs.reap_timer.when - time.monotonic() <= gs.REAP_AFTER
    gs.reap_timer.when = 0.0  # (its time has come: the loop fires it)
    gs._fire_timers()
    assert shepherd_gets(gs, m.SHProcessReaped).p_uids == uids[gs.REAP_BATCH :]
    assert gs.reap_timer is None and gs.reaped == {}
    # a process of a node that went down is never named to its (gone) shepherd
    d, _ = start(gs, pid=999)
    gs.handle(m.encode(m.SHProcessExit(KEY, 0, d["p_uid"], 0)))
    gs.down.add(0)
    gs._flush_reaped()
    assert len(gs.t_shep) == 0 and gs.reaped == {}


def test_kill_validates_and_forwards(gs):
    d, _ = start(gs, name="w")
    r = answer(gs, req(gs, m.GSProcessKill, ident="w", sig=12345))
    assert r.err == E_PROCESS
    tag = req(gs, m.GSProcessKill, ident="w", sig=15)
    k = shepherd_gets(gs, m.SHProcessKill)
    assert (k.p_uid, k.sig) == (d["p_uid"], 15)
    shepherd_replies(gs, k)
    assert answer(gs, tag).err == 0
    exit_(gs, d["p_uid"], -15)
    assert "exited" in answer(gs, req(gs, m.GSProcessKill, ident="w", sig=15)).msg


def _make_channel(gs, name, ref_count, caller=0):
    tag = req(
        gs,
        m.GSChannelCreate,
        caller=caller,
        m_uid=None,
        user_name=name,
        options={"ref_count": ref_count, "capacity": 8, "block_size": 64},
        soft=False,
    )
    sh = shepherd_gets(gs, m.SHChannelCreate)
    assert (sh.capacity, sh.block_size) == (8, 64)
    shepherd_replies(gs, sh, result={"sdesc": b"sd"})
    return cfields(answer(gs, tag).result)


def test_channel_join_waits_for_create_and_times_out(gs):
    tag_wait = req(gs, m.GSChannelJoin, name="later", timeout=None)
    tag_short = req(gs, m.GSChannelJoin, name="never", timeout=0.05)
    time.sleep(0.06)
    gs._fire_timers()
    r = answer(gs, tag_short)
    assert r.err == E_TIMEOUT and "never" in r.msg
    c = _make_channel(gs, "later", False)
    r = answer(gs, tag_wait)
    assert r.err == 0 and cfields(r.result)["c_uid"] == c["c_uid"]


def test_ref_count_channel_goes_with_its_last_holder(gs):
    a, _ = start(gs, name="a")
    b, _ = start(gs, name="b")
    c = _make_channel(gs, "rc", True, caller=a["p_uid"])
    assert answer(gs, req(gs, m.GSChannelAttach, caller=b["p_uid"], ident="rc")).err == 0
    exit_(gs, a["p_uid"], 0)
    assert answer(gs, req(gs, m.GSChannelQuery, ident="rc")).err == 0
    assert answer(gs, req(gs, m.GSChannelDetach, caller=b["p_uid"], ident="rc")).err == 0
    d = shepherd_gets(gs, m.SHChannelDestroy)
    assert d.c_uid == c["c_uid"]
    assert answer(gs, req(gs, m.GSChannelQuery, ident="rc")).err == E_CHANNEL


def test_uids_are_never_reused(gs):
    seen = set()
    for i in range(3):
        c = _make_channel(gs, f"c{i}", False)
        assert c["c_uid"] not in seen
        seen.add(c["c_uid"])
        tag = req(gs, m.GSChannelDestroy, idents=[c["c_uid"]])
        shepherd_replies(gs, shepherd_gets(gs, m.SHChannelDestroy))
        assert answer(gs, tag).err == 0
    assert answer(gs, req(gs, m.GSChannelList)).result == []


def test_unknown_message_gets_an_error_not_a_crash(gs):
    gs.handle(m.encode(m.SHTeardown(KEY, tag=5, reply=bytes(gs.t_client.sdesc), grace=1)))
    r = answer(gs, 5)
    assert r.err == E_INTERNAL and "global services: does not handle SHTeardown" in r.msg


def test_control_messages_without_the_jobs_key_are_dropped(gs):
    """A managed process that writes the runtime's own messages into GS's inbox changes nothing (issue
    17.5)."""
    d, _ = start(gs, name="w", head=True)
    for key in (None, b"", b"wrongkey"):
        gs.handle(m.encode(m.SHProcessExit(key, 0, d["p_uid"], 0)))  # a forged exit of a running process
        gs.handle(m.encode(m.GSNodeDown(key, 0, 0, "forged")))
        gs.handle(m.encode(m.GSHalt(key)))
        gs.handle(m.encode(m.ControlResponse(key, 1, 0, None, None)))
    assert gs.running and gs.down == set()
    assert pfields(answer(gs, req(gs, m.GSProcessQuery, ident="w")).result)["state"] == "running"
    assert len(gs.t_launcher) == 0  # no LAHeadExit: the launcher still waits for the real exit
    assert len(gs.t_shep) == 0
    tag = req(gs, m.GSProcessQuery, ident="w")
    gs.handle(m.encode(m.SHTeardown(b"nope", tag=99, reply=bytes(gs.t_client.sdesc), grace=1)))
    assert pfields(answer(gs, tag).result)["state"] == "running"
    r = answer(gs, 99)  # a forged request that has a reply channel is answered with an error
    assert r.err == E_INTERNAL and "key" in r.msg
    exit_(gs, d["p_uid"], 7)  # the real one still counts
    assert m.decode(gs.t_launcher.recv(timeout=1)).exit_code == 7


def test_bad_bytes_and_bad_fields_never_stop_gs(gs, capfd):
    import msgpack

    for data in (b"", b"\xc1", b"\x84\x00B\x01\x00\x02\x00\x03\x00", msgpack.packb([12, 1]), b"\x00" * 9):
        gs.handle(data)
    wire = m.GSProcessQuery(tag=42, reply=bytes(gs.t_client.sdesc), caller=0, ident=1)._wire()
    wire[-1] = {"not": "an ident"}
    gs.handle(msgpack.packb(wire, use_bin_type=True))
    r = answer(gs, 42)  # answered: the message named the field that is wrong
    assert r.err == E_INTERNAL and "GSProcessQuery.ident" in r.msg
    for _ in range(3000):
        gs.handle(b"\xc1")
    err = capfd.readouterr().err
    assert err.count("bad message (undecodable") < 30  # logged a few times, then rarely, with counts
    d, _ = start(gs, name="after")
    assert d["user_name"] == "after"


def test_bulk_work_never_blocks_gs_on_a_full_shepherd_inbox(gs):
    """3000 channel destroys in one request: GS's requests fill the shepherd's inbox (capacity 256) and the
    rest wait in GS's outbox; GS itself never blocks, and every one is sent and answered in the end."""
    tags = [_make_channel(gs, None, False)["c_uid"] for _ in range(300)]
    c_uids = []
    for _ in range(10):
        c_uids += tags
        tags = [_make_channel(gs, None, False)["c_uid"] for _ in range(270)] if len(c_uids) < 2700 else []
    c_uids = list(dict.fromkeys(c_uids))[:3000] or c_uids
    t = time.monotonic()
    tag = req(gs, m.GSChannelDestroy, idents=c_uids)
    assert time.monotonic() - t < 5  # (no timing is asserted: this only says it returned, it did not block)
    assert gs.outbox  # what did not fit waits here
    got = 0
    while got < len(c_uids):
        for data in gs.t_shep.recv_many(64, timeout=1):
            shepherd_replies(gs, m.decode(data))
            got += 1
        gs.flush()
    assert answer(gs, tag).err == 0 and not gs.outbox


def test_node_down_reports_its_processes_dead_and_fails_its_requests(gs):
    start(gs, name="a")
    tag_join = req(gs, m.GSProcessJoin, ident="a", timeout=None)
    tag_kill = req(gs, m.GSProcessKill, ident="a", sig=15)
    shepherd_gets(gs, m.SHProcessKill)  # never answered: the node dies
    gs.handle(m.encode(m.GSNodeDown(KEY, 0, None, "shepherd of node 0 died")))
    got = {r.tag: r for r in (answer(gs), answer(gs))}
    assert got[tag_join].result == -9
    assert got[tag_kill].err == E_PROCESS and "down" in got[tag_kill].msg
    r = answer(
        gs,
        create_req(gs, exe="/x"),
    )
    assert r.err == E_PROCESS and "node 0 is down" in r.msg


def test_a_client_that_leaves_is_forgotten_by_gs_and_unwatched_by_the_launcher(gs):
    # GS answers a leaving client's goodbye last into its reply channel (which the client then destroys): no
    # handle to it stays in GS's reply cache (one per client that ever left, up to REPLY_CACHE, before), and
    # node 0's launcher hears it may stop watching the client's pid (a pidfd per visit, before)
    def visit():
        tag = req(gs, m.GSClientRegister, pid=os.getpid(), start=1, keep=False)
        watch = m.decode(gs.t_launcher.recv(timeout=1))
        assert isinstance(watch, m.LAClientWatch)
        gs.handle(m.encode(m.ControlResponse(KEY, watch.tag, 0, None, None)))
        cid = answer(gs, tag).result["client"]
        assert answer(gs, req(gs, m.GSPoolList, caller=cid)).err == 0
        assert gs.replies  # (the client's reply channel is cached while it is a client)
        assert answer(gs, req(gs, m.GSClientBye, caller=cid)).err == 0
        unwatch = m.decode(gs.t_launcher.recv(timeout=1))
        assert isinstance(unwatch, m.LAClientUnwatch) and unwatch.client == cid
        assert not gs.replies and not gs.clients

    for _ in range(3):
        visit()
