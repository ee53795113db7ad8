"""Global services: one process per job that owns every name and unique id (p_uid, m_uid, c_uid; never reused)
and the rules of the user API. It never forks and never touches users' shared memory: each node's shepherd does
the physical work, addressed by node index. One event loop on the input channel, with a timer heap for the
server-side deadlines of join, multi_join and channel.join.

Handlers return a result (answered at once), raise ``_Fail`` (answered as an error), or return ``DEFER`` and
answer later (when a shepherd replies, a process exits, a channel appears or a deadline passes).
"""

import heapq
import itertools
import os
import signal
import time

from dragon._core.core import Channel
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout
from dragon.infrastructure import messages as m
from dragon.infrastructure.log import get_logger

DEFER = object()
PENDING, RUNNING, EXITED = "pending", "running", "exited"  # as ProcessDescriptor.state
SHEP_SEND_TIMEOUT = 10.0
_VALID_SIGNALS = {int(s) for s in signal.valid_signals()}


class _Fail(Exception):
    def __init__(self, kind, text):
        super().__init__(text)
        self.kind = kind


def _lookup(ident, table, names, err, what, uid):
    """The record of a process, pool or channel by its uid (int) or name (str); _Fail(err) naming it if none."""
    if isinstance(ident, bool) or not isinstance(ident, (int, str)):
        raise _Fail(err, f"{what} identifier must be a {uid} (int) or a name (str), not {ident!r}")
    r = table.get(names.get(ident) if isinstance(ident, str) else ident)
    if r is None:
        raise _Fail(
            err, f"no {what} named {ident!r}" if isinstance(ident, str) else f"no {what} with {uid} {ident}"
        )
    return r


def _pfail(text):
    return _Fail(m.ERR_PROCESS, text)


class _Proc:
    __slots__ = (
        "p_uid",
        "name",
        "named",
        "node",
        "state",
        "retval",
        "pid",
        "exe",
        "args",
        "head",
        "reply_cd",
        "joiners",
        "chan_refs",
    )

    def __init__(self, p_uid, name, named, node, exe, args, head):
        self.p_uid, self.name, self.named, self.node = p_uid, name, named, node
        self.exe, self.args, self.head = exe, args, head
        self.state = PENDING
        self.retval = None
        self.pid = None
        self.reply_cd = None
        self.joiners = []  # _Waiter
        self.chan_refs = {}  # c_uid -> count of references this process holds


class _Waiter:
    """A deferred answer: a join, multi_join or channel.join waiting for an event or its deadline."""

    __slots__ = ("kind", "reply", "tag", "caller", "targets", "done")

    def __init__(self, kind, msg, targets):
        self.kind, self.reply, self.tag, self.caller = kind, msg.reply, msg.tag, msg.caller
        self.targets = targets
        self.done = False


class GlobalServices:
    def __init__(self, inbox, shepherd_cds, launcher_cd, nodes, infra_pools, node=0):
        """inbox: this service's input Channel; shepherd_cds[i]: sdesc of node i's shepherd input channel;
        nodes: list of dicts {index, hostname, cpus}; infra_pools: list of sdescs of each node's infra pool;
        node: the transport index GS runs on (a channel's sdesc names its node: Channel.attach reaches the
        others through the transport)."""
        self.inbox = inbox
        self.inbox_sdesc = bytes(inbox.sdesc)
        self.node = node
        self.shepherds = [Channel.attach(sd) for sd in shepherd_cds]
        self.launcher = Channel.attach(launcher_cd) if launcher_cd else None
        self.nodes = list(nodes)
        self.log = get_logger("gs", 0)
        self.replies = {}  # reply sdesc -> attached Channel (cache)
        self.pending = {}  # tag of a request to a shepherd -> (node, continuation(Response))
        self.down = set()  # nodes that are gone
        self.tags = itertools.count(1)
        self.timers = []  # heap of (deadline, seq, waiter)
        self.compact_at = 1024
        self.seq = itertools.count()
        self.running = True

        self.procs, self.proc_names = {}, {}
        self.pools, self.pool_names = {}, {}
        self.chans, self.chan_names = {}, {}
        self.chan_joiners = {}  # channel name -> [waiter]
        self.owed = {}  # reply sdesc -> set of waiters owing an answer into it
        self.next_puid, self.next_muid, self.next_cuid = 1, 1, 1
        for i, sd in enumerate(infra_pools):  # each node's infrastructure pool, usable as a default pool
            self._add_pool(self._new_muid(), f"dragon_infra_{i}", i, 0, bytes(sd), infra=True)

        self.handlers = {
            m.GSProcessCreate: self.process_create,
            m.GSProcessList: self.process_list,
            m.GSProcessQuery: self.process_query,
            m.GSProcessKill: self.process_kill,
            m.GSProcessJoin: self.process_join,
            m.GSProcessMultiJoin: self.process_multi_join,
            m.GSPoolCreate: self.pool_create,
            m.GSPoolList: self.pool_list,
            m.GSPoolQuery: self.pool_query,
            m.GSPoolDestroy: self.pool_destroy,
            m.GSChannelCreate: self.channel_create,
            m.GSChannelList: self.channel_list,
            m.GSChannelQuery: self.channel_query,
            m.GSChannelJoin: self.channel_join,
            m.GSChannelDestroy: self.channel_destroy,
            m.GSChannelAttach: self.channel_attach,
            m.GSChannelDetach: self.channel_detach,
            m.GSNodeList: self.node_list,
            m.GSNodeQuery: self.node_query,
            m.GSHalt: self.halt,
        }

    # ---- loop ---------------------------------------------------------------------------------------------
    def run(self):
        recv_many = self.inbox.recv_many
        while self.running:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                batch = recv_many(64, timeout=timeout)
            except (ChannelTimeout, ChannelEmpty, TimeoutError):
                batch = ()
            for data in batch:
                try:
                    self.dispatch(m.decode(data))
                except Exception:
                    self.log.exception("failed to handle a message")
            if self.timers:
                self._fire_timers()

    def dispatch(self, msg):
        t = type(msg)
        if t is m.Response:
            pending = self.pending.pop(msg.tag, None)
            if pending is None:
                self.log.warning("reply with unknown tag %s", msg.tag)
            else:
                pending[1](msg)
        elif t is m.SHProcessExit:
            self.on_exit(msg)
        elif t is m.GSNodeDown:
            self.on_node_down(msg)
        else:
            handler = self.handlers.get(t)
            if handler is None:
                self.log.error("no handler for %s", t.__name__)
                if getattr(msg, "reply", None):
                    self.answer(msg, m.ERR_INTERNAL, f"GS does not handle {t.__name__}")
                return
            try:
                res = handler(msg)
            except _Fail as e:
                self.answer(msg, e.kind, str(e))
                return
            except Exception as e:
                self.log.exception("handler %s failed", t.__name__)
                self.answer(msg, m.ERR_INTERNAL, f"global services failed on {t.__name__}: {e!r}")
                return
            if res is not DEFER:
                self.answer(msg, m.OK, None, res)

    def answer(self, to, err, text, result=None):
        """Answer the request ``to`` (a request message or a waiter: has reply, tag, caller); never blocks."""
        reply = to.reply
        if not reply:
            return
        ch = self.replies.get(reply)
        try:
            if ch is None:
                ch = self.replies[reply] = Channel.attach(reply)
            ch.send(m.encode(m.Response(to.tag, err, text, result)), timeout=0)
        except ChannelFull:
            self.log.error("reply channel full: dropped the answer to request %s", to.tag)
        except ChannelError as e:
            self.log.error("cannot answer request %s: %s", to.tag, e)

    def _node_of(self, caller):
        """The node of a caller: its managed process's node (a process it started itself runs there too); the
        launcher (caller 0) is on node 0. Where a create puts its object when the caller names no node."""
        p = self.procs.get(caller)
        return p.node if p is not None else 0

    def ask_shepherd(self, node, msg, cont):
        msg.tag = next(self.tags)
        msg.reply = self.inbox_sdesc
        if node in self.down:
            cont(m.Response(msg.tag, m.ERR_INTERNAL, f"node {node} is down", None))
            return
        self.pending[msg.tag] = (node, cont)
        try:
            self.shepherds[node].send(m.encode(msg), timeout=SHEP_SEND_TIMEOUT)
        except ChannelError as e:
            self.pending.pop(msg.tag, None)
            cont(m.Response(msg.tag, m.ERR_INTERNAL, f"shepherd of node {node} unreachable: {e}", None))

    def tell_shepherd(self, node, msg):
        if node in self.down:
            return
        try:
            self.shepherds[node].send(m.encode(msg), timeout=SHEP_SEND_TIMEOUT)
        except ChannelError as e:
            self.log.error("cannot reach the shepherd of node %d: %s", node, e)

    def _owe(self, w, timeout):
        """Remember a deferred answer (by the channel it goes to) and its deadline."""
        self.owed.setdefault(w.reply, set()).add(w)
        if timeout is not None:
            heapq.heappush(self.timers, (time.monotonic() + timeout, next(self.seq), w))
            if (
                len(self.timers) > self.compact_at
            ):  # drop deadlines of joins that ended early (amortized O(1))
                self.timers = [t for t in self.timers if not t[2].done]
                heapq.heapify(self.timers)
                self.compact_at = max(1024, 2 * len(self.timers))

    def _done(self, w):
        w.done = True
        owed = self.owed.get(w.reply)
        if owed is not None:
            owed.discard(w)
            if not owed:
                del self.owed[w.reply]

    def _fire_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, w = heapq.heappop(self.timers)
            if not w.done:
                self._expire(w)

    def _expire(self, w):
        self._done(w)
        if w.kind == "join":
            self.answer(w, m.OK, None, None)
        elif w.kind == "multi":
            self.answer(w, m.OK, None, self._multi_result(w.targets))
        elif w.kind == "chjoin":
            lst = self.chan_joiners.get(w.targets)
            if lst is not None:
                lst[:] = [x for x in lst if x is not w]
                if not lst:
                    del self.chan_joiners[w.targets]
            self.answer(w, m.ERR_TIMEOUT, f"channel {w.targets!r} was not created in time")

    # ---- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_timeout(timeout, fail):
        if timeout is None:
            return None
        if (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0  # also NaN
        ):
            raise fail(f"timeout must be None or a number >= 0, not {timeout!r}")
        return float(timeout)

    def _check_node(self, node, kind, what):
        if node is None:
            return None
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < len(self.nodes):
            raise _Fail(kind, f"{what}: no node {node!r} (the job has nodes 0..{len(self.nodes) - 1})")
        return node

    def _proc(self, ident):
        return _lookup(ident, self.procs, self.proc_names, m.ERR_PROCESS, "process", "p_uid")

    def _pdesc(self, p):
        return {
            "p_uid": p.p_uid,
            "user_name": p.name,
            "node": p.node,
            "hostname": self.nodes[p.node]["hostname"],
            "state": p.state,
            "retval": p.retval,
            "pid": p.pid,
            "exe": p.exe,
            "args": p.args,
        }

    # ---- processes ----------------------------------------------------------------------------------------
    def process_create(self, msg):
        exe, run_dir, args, env, name, opts = (
            msg.exe,
            msg.run_dir,
            msg.args,
            msg.env,
            msg.user_name,
            msg.options,
        )
        if not isinstance(exe, str) or not exe:
            raise _pfail(f"exe must be a non-empty str, not {exe!r}")
        if not isinstance(run_dir, str):
            raise _pfail(f"run_dir must be a str, not {run_dir!r}")
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _pfail(f"args must be a list of str, not {args!r}")
        if env is not None and (
            not isinstance(env, dict)
            or not all(
                isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
            )
        ):
            raise _pfail(f"env must be a dict of str to str, not {env!r}")
        if name is not None and not isinstance(name, str):
            raise _pfail(f"user_name must be a str, not {name!r}")
        opts = opts or {}
        node = self._check_node(opts.get("node"), m.ERR_PROCESS, "process.create")
        if node is None:
            node = self._node_of(msg.caller)
        if name:
            p_uid = self.proc_names.get(name)
            if p_uid is not None:
                if msg.soft:
                    return self._pdesc(self.procs[p_uid])
                raise _pfail(f"a process named {name!r} already exists (p_uid {p_uid})")
        elif msg.soft:
            raise _pfail("soft create needs a user_name")
        p_uid = self.next_puid
        self.next_puid += 1
        named = bool(name)
        if not named:
            name = f"proc_{p_uid}"
            while name in self.proc_names:
                name += "_"
        p = _Proc(p_uid, name, named, node, exe, args, bool(msg.head))
        self.procs[p_uid] = p
        self.proc_names[name] = p_uid

        def created(resp):
            if resp.err:
                del self.procs[p_uid]
                del self.proc_names[name]
                self.answer(msg, m.ERR_PROCESS, resp.msg)
                return
            if p.state == PENDING:
                p.state = RUNNING
            p.pid = resp.result["pid"]
            p.reply_cd = resp.result["reply_cd"]
            self.answer(msg, m.OK, None, self._pdesc(p))

        self.ask_shepherd(
            node,
            m.SHProcessCreate(
                p_uid=p_uid,
                exe=exe,
                run_dir=run_dir,
                args=args,
                env=env or {},
                # with several nodes, output lines also say where they come from: [name@node]
                label=(name if named else str(p_uid)) + (f"@{node}" if len(self.nodes) > 1 else ""),
                stdout=opts.get("stdout", "forward"),
                stderr=opts.get("stderr", "forward"),
                head=bool(msg.head),
            ),
            created,
        )
        return DEFER

    def process_list(self, msg):
        return [[p.p_uid, p.name] for p in self.procs.values() if p.state != EXITED]

    def process_query(self, msg):
        return self._pdesc(self._proc(msg.ident))

    def process_kill(self, msg):
        p = self._proc(msg.ident)
        sig = msg.sig
        if isinstance(sig, bool) or not isinstance(sig, int) or sig not in _VALID_SIGNALS or sig == 0:
            raise _pfail(f"not a signal: {sig!r}")
        if p.state == EXITED:
            raise _pfail(f"process {p.p_uid} ({p.name!r}) has already exited (exit code {p.retval})")

        def done(resp):
            self.answer(msg, m.ERR_PROCESS if resp.err else m.OK, resp.msg)

        self.ask_shepherd(p.node, m.SHProcessKill(p_uid=p.p_uid, sig=sig), done)
        return DEFER

    def process_join(self, msg):
        p = self._proc(msg.ident)
        timeout = self._check_timeout(msg.timeout, _pfail)
        if p.p_uid == msg.caller:
            raise _pfail(f"process {p.p_uid} cannot join itself")
        if p.state == EXITED:
            return p.retval
        if timeout == 0:
            return None
        w = _Waiter("join", msg, [p.p_uid])
        p.joiners.append(w)
        self._owe(w, timeout)
        return DEFER

    def _multi_result(self, p_uids):
        exited = [[u, self.procs[u].retval] for u in p_uids if self.procs[u].state == EXITED]
        return {"exited": exited or None, "status": {u: self._pdesc(self.procs[u]) for u in p_uids}}

    def process_multi_join(self, msg):
        idents = msg.idents
        if not isinstance(idents, list) or not idents:
            raise _pfail(f"multi_join needs a non-empty list of identifiers, not {idents!r}")
        timeout = self._check_timeout(msg.timeout, _pfail)
        p_uids = []
        for ident in idents:
            p = self._proc(ident)
            if p.p_uid == msg.caller:
                raise _pfail(f"process {p.p_uid} cannot join itself")
            if p.p_uid not in p_uids:
                p_uids.append(p.p_uid)
        if timeout == 0 or any(self.procs[u].state == EXITED for u in p_uids):
            return self._multi_result(p_uids)
        w = _Waiter("multi", msg, p_uids)
        for u in p_uids:
            self.procs[u].joiners.append(w)
        self._owe(w, timeout)
        return DEFER

    def on_exit(self, msg):
        p = self.procs.get(msg.p_uid)
        if p is None:
            self.log.warning("exit of unknown p_uid %s", msg.p_uid)
            return
        p.state = EXITED
        p.retval = msg.exit_code
        # forget every deferred answer owed to the dead process before its reply channel goes away
        if p.reply_cd is not None:
            for w in self.owed.pop(p.reply_cd, ()):
                w.done = True
            ch = self.replies.pop(p.reply_cd, None)
            if ch is not None:
                try:
                    ch.close()
                except Exception:
                    pass
        for w in p.joiners:
            if not w.done:
                self._done(w)
                if w.kind == "join":
                    self.answer(w, m.OK, None, p.retval)
                else:
                    self.answer(w, m.OK, None, self._multi_result(w.targets))
        p.joiners = []
        for c_uid, n in list(p.chan_refs.items()):
            self._unref(c_uid, p, n)
        self.tell_shepherd(p.node, m.SHProcessReaped(p_uid=p.p_uid))
        if p.head and self.launcher is not None:
            try:
                self.launcher.send(m.encode(m.LAHeadExit(p.p_uid, p.retval)), timeout=SHEP_SEND_TIMEOUT)
            except ChannelError as e:
                self.log.error("cannot tell the launcher that the program exited: %s", e)

    def on_node_down(self, msg):
        """A node is gone: every process still running there is reported exited with msg.exit_code (joins
        return), and its shepherd is no longer asked anything."""
        self.log.error("node %s is down: %s", msg.node, msg.reason)
        code = -9 if msg.exit_code is None else msg.exit_code
        self.down.add(msg.node)
        for p in [p for p in self.procs.values() if p.node == msg.node and p.state != EXITED]:
            self.on_exit(m.SHProcessExit(msg.node, p.p_uid, code))
        for tag, (node, cont) in list(self.pending.items()):  # requests that node will never answer
            if node == msg.node:
                del self.pending[tag]
                cont(m.Response(tag, m.ERR_INTERNAL, f"node {msg.node} is down: {msg.reason}", None))

    # ---- pools --------------------------------------------------------------------------------------------
    def _new_muid(self):
        u = self.next_muid
        self.next_muid += 1
        return u

    def _add_pool(self, m_uid, name, node, size, sdesc, infra=False):
        self.pools[m_uid] = {
            "m_uid": m_uid,
            "name": name,
            "node": node,
            "size": size,
            "sdesc": sdesc,
            "infra": infra,
        }
        if name:
            self.pool_names[name] = m_uid

    @staticmethod
    def _pool_wire(r):
        return {k: r[k] for k in ("m_uid", "name", "node", "size", "sdesc")}

    def _pool(self, ident):
        return _lookup(ident, self.pools, self.pool_names, m.ERR_POOL, "pool", "m_uid")

    def pool_create(self, msg):
        size, name, opts = msg.size, msg.user_name, msg.options or {}
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise _Fail(m.ERR_POOL, f"pool size must be a positive int, not {size!r}")
        if name is not None and not isinstance(name, str):
            raise _Fail(m.ERR_POOL, f"user_name must be a str or None, not {name!r}")
        node = self._check_node(opts.get("node"), m.ERR_POOL, "pool.create")
        if node is None:
            node = self._node_of(msg.caller)
        if name:
            if name in self.pool_names:
                r = self.pools[self.pool_names[name]]
                if msg.soft:
                    return self._pool_wire(r)
                raise _Fail(m.ERR_POOL, f"a pool named {name!r} already exists (m_uid {r['m_uid']})")
        else:
            if msg.soft:
                raise _Fail(m.ERR_POOL, "soft create needs a user_name")
            name = None
        m_uid = self._new_muid()
        if name:
            self.pool_names[name] = m_uid  # reserved while the shepherd makes it

        def created(resp):
            if resp.err:
                if name:
                    del self.pool_names[name]
                self.answer(msg, m.ERR_POOL, resp.msg)
                return
            self._add_pool(m_uid, name, node, size, resp.result["sdesc"])
            self.answer(msg, m.OK, None, self._pool_wire(self.pools[m_uid]))

        self.ask_shepherd(node, m.SHPoolCreate(m_uid=m_uid, size=size), created)
        return DEFER

    def pool_list(self, msg):
        return list(self.pools)

    def pool_query(self, msg):
        return self._pool_wire(self._pool(msg.ident))

    def pool_destroy(self, msg):
        r = self._pool(msg.ident)
        if r["infra"]:
            raise _Fail(
                m.ERR_POOL,
                f"pool {r['m_uid']} ({r['name']!r}) belongs to the runtime and cannot be destroyed",
            )
        inside = [c["c_uid"] for c in self.chans.values() if c["m_uid"] == r["m_uid"]]
        if inside:
            raise _Fail(m.ERR_POOL, f"pool {r['m_uid']} still holds channels {inside}: destroy them first")
        del self.pools[r["m_uid"]]
        if r["name"]:
            self.pool_names.pop(r["name"], None)

        def done(resp):
            self.answer(msg, m.ERR_POOL if resp.err else m.OK, resp.msg)

        self.ask_shepherd(r["node"], m.SHPoolDestroy(m_uid=r["m_uid"]), done)
        return DEFER

    # ---- channels -----------------------------------------------------------------------------------------
    @staticmethod
    def _chan_wire(c):
        return {
            k: c[k]
            for k in ("c_uid", "m_uid", "name", "node", "capacity", "block_size", "ref_count", "sdesc")
        }

    def _chan(self, ident):
        return _lookup(ident, self.chans, self.chan_names, m.ERR_CHANNEL, "channel", "c_uid")

    def channel_create(self, msg):
        name, opts, m_uid = msg.user_name, msg.options or {}, msg.m_uid
        if m_uid is None:  # the caller's node's default (infrastructure) pool
            node = self._node_of(msg.caller)
            m_uid = next(r["m_uid"] for r in self.pools.values() if r["infra"] and r["node"] == node)
        if isinstance(m_uid, bool) or not isinstance(m_uid, int) or m_uid not in self.pools:
            raise _Fail(m.ERR_CHANNEL, f"channel.create: no pool with m_uid {m_uid!r}")
        if name is not None and not isinstance(name, str):
            raise _Fail(m.ERR_CHANNEL, f"user_name must be a str or None, not {name!r}")
        if name:
            if name in self.chan_names:
                c = self.chans.get(self.chan_names[name])
                if c is None:
                    raise _Fail(m.ERR_CHANNEL, f"channel {name!r} is being created")
                if msg.soft:
                    self._ref(c, msg.caller)
                    return self._chan_wire(c)
                raise _Fail(m.ERR_CHANNEL, f"a channel named {name!r} already exists (c_uid {c['c_uid']})")
        else:
            if msg.soft:
                raise _Fail(m.ERR_CHANNEL, "soft create needs a user_name")
            name = None
        pool = self.pools[m_uid]
        c_uid = self.next_cuid
        self.next_cuid += 1
        if name:
            self.chan_names[name] = c_uid
        capacity, block_size = opts.get("capacity", 1024), opts.get("block_size", 1024)
        ref_count = bool(opts.get("ref_count", False))
        caller = msg.caller

        def created(resp):
            if resp.err:
                if name:
                    del self.chan_names[name]
                self.answer(msg, m.ERR_CHANNEL, resp.msg)
                return
            c = {
                "c_uid": c_uid,
                "m_uid": m_uid,
                "name": name,
                "node": pool["node"],
                "capacity": capacity,
                "block_size": block_size,
                "ref_count": ref_count,
                "sdesc": resp.result["sdesc"],
                "refs": 0,
                "holders": set(),
            }
            self.chans[c_uid] = c
            self._ref(c, caller)
            wire = self._chan_wire(c)
            self.answer(msg, m.OK, None, wire)
            for w in self.chan_joiners.pop(name, ()) if name else ():
                if not w.done:
                    self._done(w)
                    self._ref(c, w.caller)
                    self.answer(w, m.OK, None, wire)

        self.ask_shepherd(
            pool["node"],
            m.SHChannelCreate(c_uid=c_uid, m_uid=m_uid, capacity=capacity, block_size=block_size),
            created,
        )
        return DEFER

    def _ref(self, c, caller):
        """A managed process holds one more reference to a ref_count channel."""
        p = self.procs.get(caller)
        if c["ref_count"] and p is not None and p.state != EXITED:
            p.chan_refs[c["c_uid"]] = p.chan_refs.get(c["c_uid"], 0) + 1
            c["refs"] += 1
            c["holders"].add(p.p_uid)

    def _unref(self, c_uid, p, n=1):
        held = p.chan_refs.get(c_uid, 0)
        n = min(n, held)
        if held - n:
            p.chan_refs[c_uid] = held - n
        else:
            p.chan_refs.pop(c_uid, None)
        c = self.chans.get(c_uid)
        if c is None:
            return
        if not held - n:
            c["holders"].discard(p.p_uid)
        c["refs"] -= n
        if c["refs"] <= 0:
            self._remove_chan(c)
            self.ask_shepherd(c["node"], m.SHChannelDestroy(c_uid=c_uid), lambda resp: None)

    def _remove_chan(self, c):
        del self.chans[c["c_uid"]]
        if c["name"]:
            self.chan_names.pop(c["name"], None)
        for u in c["holders"]:
            self.procs[u].chan_refs.pop(c["c_uid"], None)

    def channel_list(self, msg):
        return list(self.chans)

    def channel_query(self, msg):
        return self._chan_wire(self._chan(msg.ident))

    def channel_join(self, msg):
        name = msg.name
        if not isinstance(name, str) or not name:
            raise _Fail(m.ERR_CHANNEL, f"channel.join needs a channel name (str), not {name!r}")
        timeout = self._check_timeout(msg.timeout, lambda t: _Fail(m.ERR_CHANNEL, t))
        c_uid = self.chan_names.get(name)
        if c_uid is not None and c_uid in self.chans:
            c = self.chans[c_uid]
            self._ref(c, msg.caller)
            return self._chan_wire(c)
        if timeout == 0:
            raise _Fail(m.ERR_TIMEOUT, f"no channel named {name!r}")
        w = _Waiter("chjoin", msg, name)
        self.chan_joiners.setdefault(name, []).append(w)
        self._owe(w, timeout)
        return DEFER

    def channel_destroy(self, msg):
        idents = msg.idents if isinstance(msg.idents, list) else [msg.idents]
        if not idents:
            raise _Fail(m.ERR_CHANNEL, "channel.destroy needs at least one identifier")
        chans = []
        for ident in idents:
            c = self._chan(ident)
            if c not in chans:
                chans.append(c)
        left = [len(chans)]
        errors = []

        def done(resp):
            if resp.err:
                errors.append(resp.msg)
            left[0] -= 1
            if left[0] == 0:
                self.answer(msg, m.ERR_CHANNEL if errors else m.OK, "; ".join(errors) or None)

        for c in chans:
            self._remove_chan(c)
            self.ask_shepherd(c["node"], m.SHChannelDestroy(c_uid=c["c_uid"]), done)
        return DEFER

    def channel_attach(self, msg):
        c = self._chan(msg.ident)
        self._ref(c, msg.caller)
        return self._chan_wire(c)

    def channel_detach(self, msg):
        c = self._chan(msg.ident)
        if not c["ref_count"]:
            return
        p = self.procs.get(msg.caller)
        if p is None or not p.chan_refs.get(c["c_uid"]):
            raise _Fail(m.ERR_CHANNEL, f"process {msg.caller} holds no reference to channel {c['c_uid']}")
        self._unref(c["c_uid"], p, 1)
        return

    # ---- nodes and control --------------------------------------------------------------------------------
    def node_list(self, msg):
        return [n["index"] for n in self.nodes]

    def node_query(self, msg):
        i = msg.index
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.nodes):
            raise _Fail(m.ERR_INTERNAL, f"no node {i!r} (the job has nodes 0..{len(self.nodes) - 1})")
        return dict(self.nodes[i])

    def halt(self, msg):
        self.running = False


def _tune_waits():
    """DRAGON_SPIN_NS: how long this service spins before sleeping in a blocking receive (the core's default
    if unset). Spinning lowers latency on idle cores and costs CPU on busy ones."""
    spin = os.environ.get("DRAGON_SPIN_NS")
    if spin:
        from dragon._core import core

        core.set_wait_params(spin_ns=int(spin))


def main(inbox_cd, shepherd_cds, launcher_cd, nodes, infra_pools, node=0):
    """Entry point of the GS process (forked by the launcher): serve until halted or until SIGTERM (which the
    kernel sends when the launcher dies, PR_SET_PDEATHSIG). node: see GlobalServices."""
    # Ctrl-C is the launcher's to handle; a no-op handler, not SIG_IGN, which children would inherit
    signal.signal(signal.SIGINT, lambda signum, frame: None)

    def _term(signum, frame):
        # once: under Slurm (scancel, time limit) every process of the step gets SIGTERM, maybe while this one
        # is already on its way out, where a SystemExit would only print "Exception ignored" noise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    _tune_waits()
    gs = GlobalServices(
        Channel.attach(inbox_cd),
        shepherd_cds,
        launcher_cd,
        nodes,
        infra_pools,
        node=node,
    )
    gs.log.debug("global services up (pid %d)", os.getpid())
    gs.run()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # halted: exiting anyway (see _term)
    return 0
