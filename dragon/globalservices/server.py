"""Global services: one process per job that owns every name and unique id (p_uid, m_uid, c_uid; never reused)
and the rules of the user API. It never forks and never touches users' shared memory: each node's shepherd
does the physical work, addressed by node index. It runs the one service loop (dragon.infrastructure.service):
its handlers return a result, raise the API's error class, or return ``DEFER`` and answer later (when a
shepherd replies, a process exits, a channel appears or a deadline passes: joins, multi_joins and
channel.joins have server-side deadlines). It never blocks on a shepherd: what does not fit a shepherd's inbox
waits in its outbox.

Clients (processes outside the job that ``dragon.init()`` attached) register first (``GSClientRegister``):
GS has node 0's launcher watch the client's pid, and gives it an id (< 0) that its requests carry as
``caller``. Every process, pool and channel records who made it (``owner``); when a client says goodbye
(``GSClientBye``) or the launcher reports it gone (``GSClientGone``, any ending), what it made is
destroyed, unless it registered with ``keep``.
"""

import os
import signal

from dragon._core.core import Channel
from dragon.errors import ChannelError, ChannelTimeout, DragonError, PoolError, ProcessError, code_of
from dragon.infrastructure import checks
from dragon.infrastructure import messages as m
from dragon.infrastructure.descriptors import ChannelDescriptor, NodeDescriptor, PoolDescriptor
from dragon.infrastructure.log import get_logger
from dragon.infrastructure.service import DEFER, Service, handles, service_process

PENDING, RUNNING, EXITED = "pending", "running", "exited"  # as ProcessDescriptor.state


def _lookup(ident, table, names, err, what, uid):
    """The record of a process, pool or channel by its uid (int) or name (str); err naming it if none."""
    r = table.get(ident) if type(ident) is int else table.get(names.get(checks.ident(ident, err, what, uid)))
    if r is None:
        raise err(f"no {what} named {ident!r}" if isinstance(ident, str) else f"no {what} with {uid} {ident}")
    return r


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
        "owner",
    )

    def __init__(self, p_uid, name, named, node, exe, args, head, owner=0):
        self.p_uid, self.name, self.named, self.node, self.owner = p_uid, name, named, node, owner
        self.exe, self.args, self.head = exe, args, head
        self.state = PENDING
        self.retval = None
        self.pid = None
        self.reply_cd = None
        self.joiners = {}  # _Waiter -> None: the joins and multi_joins waiting for this process
        self.chan_refs = {}  # c_uid -> count of references this process holds


class _Client:
    """A registered client: its process (pid), its reply channel, whether what it makes outlives it."""

    __slots__ = ("cid", "keep", "pid", "reply")

    def __init__(self, cid, pid, keep, reply):
        self.cid, self.pid, self.keep, self.reply = cid, pid, keep, reply


class _Waiter:
    """A deferred answer: a join, multi_join or channel.join waiting for an event or its deadline."""

    __slots__ = ("caller", "done", "kind", "reply", "tag", "targets", "timer")

    def __init__(self, kind, msg, targets):
        self.kind, self.reply, self.tag, self.caller = kind, msg.reply, msg.tag, msg.caller
        self.targets = targets
        self.done = False
        self.timer = None


class GlobalServices(Service):
    NAME = "global services"
    # a shepherd hears which exited processes' reply channels may go in batches of at most REAP_BATCH, sent
    # at the latest REAP_AFTER seconds after the first exit of a batch: one message per process cost a serial
    # create+join about two more context switches of the shepherd and two of GS (5.9-9.3 -> 4.3-5.2 and
    # 7.3-11.1 -> 6.2-7.7 per process, measured)
    REAP_BATCH = 64
    REAP_AFTER = 0.05

    def __init__(self, inbox, shepherd_cds, launcher_cd, nodes, infra_pools, key, node=0):
        """inbox: this service's input Channel; shepherd_cds[i]: sdesc of node i's shepherd input channel;
        launcher_cd: node 0's launcher's channel; nodes: list of dicts {index, hostname, cpus}; infra_pools:
        list of sdescs of each node's infra pool; key: the job's key (control messages); node: the transport
        index GS runs on (a channel's sdesc names its node: Channel.attach reaches the others through the
        transport)."""
        super().__init__(inbox, key, get_logger("gs", 0))
        self.node = node
        self.shepherds = [Channel.attach(sd) for sd in shepherd_cds]
        self.launcher = Channel.attach(launcher_cd) if launcher_cd else None
        self.nodes = list(nodes)
        self.asked = {}  # tag of a request to a shepherd -> its node (requests a dead node will never answer)
        self.down = set()  # nodes that are gone
        self.procs, self.proc_names = {}, {}
        # p_uid -> None for every process not yet exited, in creation order; exited ones stay in procs for
        # query and join, and a list or a node lost must not scan every process the job ever had
        self.live_procs = {}
        self.pools, self.pool_names = {}, {}
        self.chans, self.chan_names = {}, {}
        self.infra = {}  # node -> m_uid of its infrastructure pool
        self.in_pool = {}  # m_uid -> set of the c_uids of the channels in it (no scan of every channel)
        self.chan_joiners = {}  # channel name -> [waiter]
        self.owed = {}  # reply sdesc -> set of waiters owing an answer into it
        self.reaped = {}  # node -> p_uids whose reply channels its shepherd may destroy (sent in batches)
        self.reap_timer = None
        self.next_puid, self.next_muid, self.next_cuid = 1, 1, 1
        self.clients = {}  # client id (< 0) -> _Client
        self.next_client = 1
        for i, sd in enumerate(infra_pools):  # each node's infrastructure pool, usable as a default pool
            self._add_pool(self._new_muid(), f"dragon_infra_{i}", i, 0, bytes(sd), infra=True)

    def _node_of(self, caller):
        """The node of a caller: its managed process's node (a process it started itself runs there too); the
        launcher (caller 0) is on node 0. Where a create puts its object when the caller names no node."""
        p = self.procs.get(caller)
        return p.node if p is not None else 0

    def ask_shepherd(self, node, msg, cont):
        """Ask node's shepherd; cont(ControlResponse) gets its answer (an error one if the node is down)."""
        if node in self.down:
            cont(m.ControlResponse(None, 0, code_of(DragonError), f"node {node} is down", None))
            return
        tag = self.ask(self.shepherds[node], msg, cont)
        self.asked[tag] = node

    def _response(self, msg):
        self.asked.pop(msg.tag, None)
        super()._response(msg)

    def _owe(self, w, timeout):
        """Remember a deferred answer (by the channel it goes to) and its deadline."""
        self.owed.setdefault(w.reply, set()).add(w)
        if timeout is not None:
            w.timer = self.later(timeout, lambda: self._expire(w))

    def _done(self, w):
        w.done = True
        if w.timer is not None:
            w.timer.cancel()
        owed = self.owed.get(w.reply)
        if owed is not None:
            owed.discard(w)
            if not owed:
                del self.owed[w.reply]
        self._unlink(w)

    def _unlink(self, w):
        """A join or multi_join that is over leaves the processes it waited for: a multi_join repeated over
        thousands of pending processes would otherwise leave one waiter per call on each of them."""
        if w.kind != "chjoin":
            for u in w.targets:
                p = self.procs.get(u)
                if p is not None:
                    p.joiners.pop(w, None)

    def _expire(self, w):
        if w.done:
            return
        self._done(w)
        if w.kind == "join":
            self.answer(w, None)
        elif w.kind == "multi":
            self.answer(w, self._multi_result(w.targets))
        elif w.kind == "chjoin":
            lst = self.chan_joiners.get(w.targets)
            if lst is not None:
                lst[:] = [x for x in lst if x is not w]
                if not lst:
                    del self.chan_joiners[w.targets]
            self.fail(w, ChannelTimeout(f"channel {w.targets!r} was not created in time"))

    # ---- helpers ------------------------------------------------------------------------------------------
    def _node(self, opts, err, what):
        """The node an options dict names (validated), or the caller's when it names none."""
        if not isinstance(opts, dict):
            raise err(f"{what}: options must be a dict, not {type(opts).__name__}")
        return checks.node(opts.get("node"), err, len(self.nodes), what)

    def _proc(self, ident):
        return _lookup(ident, self.procs, self.proc_names, ProcessError, "process", "p_uid")

    def _pdesc(self, p):
        # positional, in ProcessDescriptor.__slots__ order (a list decodes in a third of a map's time)
        return [
            p.p_uid,
            p.name,
            p.node,
            self.nodes[p.node]["hostname"],
            p.state,
            p.retval,
            p.pid,
            p.exe,
            p.args,
        ]

    # ---- processes ----------------------------------------------------------------------------------------
    @handles(m.GSProcessCreate)
    def process_create(self, msg):
        name, opts = msg.user_name, msg.options or {}
        checks.command(msg.exe, msg.args, msg.env, ProcessError)
        checks.name_soft(name, msg.soft, ProcessError)
        node = self._node(opts, ProcessError, "process.create")
        if node is None:
            node = self._node_of(msg.caller)
        stdout, stderr = opts.get("stdout", "forward"), opts.get("stderr", "forward")
        if type(stdout) is not str or type(stderr) is not str:
            raise ProcessError(f"stdout and stderr must be str, not {stdout!r} and {stderr!r}")
        if name:
            p_uid = self.proc_names.get(name)
            if p_uid is not None:
                if msg.soft:
                    return self._pdesc(self.procs[p_uid])
                raise ProcessError(f"a process named {name!r} already exists (p_uid {p_uid})")
        p_uid = self.next_puid
        self.next_puid += 1
        named = bool(name)
        if not named:
            name = f"proc_{p_uid}"
            while name in self.proc_names:
                name += "_"
        p = _Proc(p_uid, name, named, node, msg.exe, msg.args, msg.head, owner=msg.caller)
        self.procs[p_uid] = p
        self.proc_names[name] = p_uid
        self.live_procs[p_uid] = None

        def created(resp):
            if resp.err:
                del self.procs[p_uid]
                del self.proc_names[name]
                self.live_procs.pop(p_uid, None)
                self.fail(msg, ProcessError(resp.msg))
                return
            if p.state == PENDING:
                p.state = RUNNING
            p.pid = resp.result["pid"]
            p.reply_cd = resp.result["reply_cd"]
            self.answer(msg, self._pdesc(p))

        self.ask_shepherd(
            node,
            m.SHProcessCreate(
                p_uid=p_uid,
                exe=msg.exe,
                run_dir=msg.run_dir,
                args=msg.args,
                env=msg.env or {},
                # with several nodes, output lines also say where they come from: [name@node]
                label=(name if named else str(p_uid)) + (f"@{node}" if len(self.nodes) > 1 else ""),
                stdout=stdout,
                stderr=stderr,
                head=msg.head,
                zygote=opts.get("zygote") is True,
            ),
            created,
        )
        return DEFER

    @handles(m.GSProcessList)
    def process_list(self, msg):
        return [[u, self.procs[u].name] for u in self.live_procs]

    @handles(m.GSProcessQuery)
    def process_query(self, msg):
        return self._pdesc(self._proc(msg.ident))

    @handles(m.GSProcessKill)
    def process_kill(self, msg):
        p = self._proc(msg.ident)
        sig = checks.signum(msg.sig, ProcessError)
        if p.state == EXITED:
            raise ProcessError(f"process {p.p_uid} ({p.name!r}) has already exited (exit code {p.retval})")

        def done(resp):
            if resp.err:
                self.fail(msg, ProcessError(resp.msg))
            else:
                self.answer(msg, None)

        self.ask_shepherd(p.node, m.SHProcessKill(p_uid=p.p_uid, sig=sig), done)
        return DEFER

    @handles(m.GSProcessJoin)
    def process_join(self, msg):
        p = self._proc(msg.ident)
        timeout = checks.timeout(msg.timeout, ProcessError)
        if p.p_uid == msg.caller:
            raise ProcessError(f"process {p.p_uid} cannot join itself")
        if p.state == EXITED:
            return p.retval
        if timeout == 0:
            return None
        w = _Waiter("join", msg, [p.p_uid])
        p.joiners[w] = None
        self._owe(w, timeout)
        return DEFER

    def _multi_result(self, p_uids):
        exited = [[u, self.procs[u].retval] for u in p_uids if self.procs[u].state == EXITED]
        return {"exited": exited or None, "status": {u: self._pdesc(self.procs[u]) for u in p_uids}}

    @handles(m.GSProcessMultiJoin)
    def process_multi_join(self, msg):
        idents = checks.idents(msg.idents, ProcessError)
        timeout = checks.timeout(msg.timeout, ProcessError)
        once: dict[int, None] = {}  # each process once, in the order named (a list's test was quadratic)
        for ident in idents:
            p = self._proc(ident)
            if p.p_uid == msg.caller:
                raise ProcessError(f"process {p.p_uid} cannot join itself")
            once[p.p_uid] = None
        p_uids = list(once)
        if timeout == 0 or any(self.procs[u].state == EXITED for u in p_uids):
            return self._multi_result(p_uids)
        w = _Waiter("multi", msg, p_uids)
        for u in p_uids:
            self.procs[u].joiners[w] = None
        self._owe(w, timeout)
        return DEFER

    @handles(m.SHProcessExit)
    def on_exit(self, msg):
        p = self.procs.get(msg.p_uid)
        if p is None:
            self.log.warning("exit of unknown p_uid %s", msg.p_uid)
            return
        if p.state == EXITED:
            return
        p.state = EXITED
        p.retval = msg.exit_code
        self.live_procs.pop(p.p_uid, None)
        # forget every deferred answer owed to the dead process before its reply channel goes away
        if p.reply_cd is not None:
            for w in self.owed.pop(p.reply_cd, ()):
                w.done = True
                if w.timer is not None:
                    w.timer.cancel()
                self._unlink(w)
            self.forget(p.reply_cd)
        for w in list(p.joiners):
            if not w.done:
                self._done(w)
                self.answer(w, p.retval if w.kind == "join" else self._multi_result(w.targets))
        p.joiners = {}
        for c_uid, n in list(p.chan_refs.items()):
            self._unref(c_uid, p, n)
        if p.node not in self.down:
            self._reaped(p.node, p.p_uid)
        if p.head and self.launcher is not None:
            self.send(self.launcher, m.LAHeadExit(p_uid=p.p_uid, exit_code=p.retval))

    def _reaped(self, node, p_uid):
        """Tell node's shepherd that p_uid's reply channel may go: in batches (at most REAP_BATCH processes,
        or what REAP_AFTER seconds gathered), not one message and one wake-up of the shepherd per process."""
        batch = self.reaped.setdefault(node, [])
        batch.append(p_uid)
        if len(batch) >= self.REAP_BATCH:
            self._send_reaped(node)
        elif self.reap_timer is None:
            self.reap_timer = self.later(self.REAP_AFTER, self._flush_reaped)

    def _send_reaped(self, node):
        batch = self.reaped.pop(node, None)
        if batch and node not in self.down:
            self.send(self.shepherds[node], m.SHProcessReaped(p_uids=batch))

    def _flush_reaped(self):
        self.reap_timer = None
        for node in list(self.reaped):
            self._send_reaped(node)

    @handles(m.GSNodeDown)
    def on_node_down(self, msg):
        """A node is gone: every process still running there is reported exited with msg.exit_code (joins
        return), and its shepherd is no longer asked anything."""
        self.log.error("node %s is down: %s", msg.node, msg.reason)
        code = -9 if msg.exit_code is None else msg.exit_code
        self.down.add(msg.node)
        for p in [self.procs[u] for u in self.live_procs if self.procs[u].node == msg.node]:
            self.on_exit(m.SHProcessExit(None, msg.node, p.p_uid, code))
        for tag, node in list(self.asked.items()):  # requests that node will never answer
            if node == msg.node:
                self._response(
                    m.ControlResponse(
                        None, tag, code_of(DragonError), f"node {node} is down: {msg.reason}", None
                    )
                )

    # ---- pools --------------------------------------------------------------------------------------------
    def _new_muid(self):
        u = self.next_muid
        self.next_muid += 1
        return u

    def _add_pool(self, m_uid, name, node, size, sdesc, infra=False, owner=0):
        self.pools[m_uid] = {
            "m_uid": m_uid,
            "name": name,
            "node": node,
            "size": size,
            "sdesc": sdesc,
            "infra": infra,
            "owner": owner,
        }
        if name:
            self.pool_names[name] = m_uid
        if infra:
            self.infra[node] = m_uid

    @staticmethod
    def _pool_wire(r):  # (positional, in PoolDescriptor.__slots__ order, as _pdesc)
        return [r[k] for k in PoolDescriptor.__slots__]

    def _pool(self, ident):
        return _lookup(ident, self.pools, self.pool_names, PoolError, "pool", "m_uid")

    @handles(m.GSPoolCreate)
    def pool_create(self, msg):
        size, name, opts = msg.size, msg.user_name, msg.options or {}
        checks.positive_int(size, PoolError, "pool size")
        checks.name_soft(name, msg.soft, PoolError)
        node = self._node(opts, PoolError, "pool.create")
        if node is None:
            node = self._node_of(msg.caller)
        if name:
            if name in self.pool_names:
                r = self.pools.get(self.pool_names[name])
                if r is None:
                    raise PoolError(f"pool {name!r} is being created")
                if msg.soft:
                    return self._pool_wire(r)
                raise PoolError(f"a pool named {name!r} already exists (m_uid {r['m_uid']})")
        else:
            name = None
        m_uid = self._new_muid()
        if name:
            self.pool_names[name] = m_uid  # reserved while the shepherd makes it

        def created(resp):
            if resp.err:
                if name:
                    del self.pool_names[name]
                self.fail(msg, PoolError(resp.msg))
                return
            self._add_pool(m_uid, name, node, size, resp.result["sdesc"], owner=msg.caller)
            self.answer(msg, self._pool_wire(self.pools[m_uid]))

        self.ask_shepherd(node, m.SHPoolCreate(m_uid=m_uid, size=size), created)
        return DEFER

    @handles(m.GSPoolList)
    def pool_list(self, msg):
        return list(self.pools)

    @handles(m.GSPoolQuery)
    def pool_query(self, msg):
        return self._pool_wire(self._pool(msg.ident))

    @handles(m.GSPoolDestroy)
    def pool_destroy(self, msg):
        r = self._pool(msg.ident)
        if r["infra"]:
            raise PoolError(
                f"pool {r['m_uid']} ({r['name']!r}) belongs to the runtime and cannot be destroyed"
            )
        inside = sorted(self.in_pool.get(r["m_uid"], ()))
        if inside:
            raise PoolError(f"pool {r['m_uid']} still holds channels {inside[:20]}: destroy them first")
        del self.pools[r["m_uid"]]
        if r["name"]:
            self.pool_names.pop(r["name"], None)

        def done(resp):
            if resp.err:
                self.fail(msg, PoolError(resp.msg))
            else:
                self.answer(msg, None)

        self.ask_shepherd(r["node"], m.SHPoolDestroy(m_uid=r["m_uid"]), done)
        return DEFER

    # ---- channels -----------------------------------------------------------------------------------------
    @staticmethod
    def _chan_wire(c):  # (positional, in ChannelDescriptor.__slots__ order, as _pdesc)
        return [c[k] for k in ChannelDescriptor.__slots__]

    def _chan(self, ident):
        return _lookup(ident, self.chans, self.chan_names, ChannelError, "channel", "c_uid")

    @handles(m.GSChannelCreate)
    def channel_create(self, msg):
        name, opts, m_uid = msg.user_name, msg.options or {}, msg.m_uid
        checks.name_soft(name, msg.soft, ChannelError)
        if not isinstance(opts, dict):
            raise ChannelError(f"channel.create: options must be a dict, not {type(opts).__name__}")
        capacity, block_size = opts.get("capacity", 1024), opts.get("block_size", 1024)
        checks.positive_int(capacity, ChannelError, "capacity")
        checks.positive_int(block_size, ChannelError, "block_size")
        if m_uid is None:  # the caller's node's default (infrastructure) pool
            node = self._node_of(msg.caller)
            m_uid = self.infra[node]
        if m_uid not in self.pools:
            raise ChannelError(f"channel.create: no pool with m_uid {m_uid!r}")
        if name:
            if name in self.chan_names:
                c = self.chans.get(self.chan_names[name])
                if c is None:
                    raise ChannelError(f"channel {name!r} is being created")
                if msg.soft:
                    self._ref(c, msg.caller)
                    return self._chan_wire(c)
                raise ChannelError(f"a channel named {name!r} already exists (c_uid {c['c_uid']})")
        else:
            name = None
        pool = self.pools[m_uid]
        c_uid = self.next_cuid
        self.next_cuid += 1
        if name:
            self.chan_names[name] = c_uid
        ref_count = bool(opts.get("ref_count", False))
        caller = msg.caller

        def created(resp):
            if resp.err:
                if name:
                    del self.chan_names[name]
                self.fail(msg, ChannelError(resp.msg))
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
                "owner": caller,
            }
            self.chans[c_uid] = c
            self.in_pool.setdefault(m_uid, set()).add(c_uid)
            self._ref(c, caller)
            wire = self._chan_wire(c)
            self.answer(msg, wire)
            for w in self.chan_joiners.pop(name, ()) if name else ():
                if not w.done:
                    self._done(w)
                    self._ref(c, w.caller)
                    self.answer(w, wire)

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
        inside = self.in_pool.get(c["m_uid"])
        if inside is not None:
            inside.discard(c["c_uid"])
            if not inside:
                del self.in_pool[c["m_uid"]]
        if c["name"]:
            self.chan_names.pop(c["name"], None)
        for u in c["holders"]:
            self.procs[u].chan_refs.pop(c["c_uid"], None)

    @handles(m.GSChannelList)
    def channel_list(self, msg):
        return list(self.chans)

    @handles(m.GSChannelQuery)
    def channel_query(self, msg):
        return self._chan_wire(self._chan(msg.ident))

    @handles(m.GSChannelJoin)
    def channel_join(self, msg):
        name = msg.name
        if not name:
            raise ChannelError(f"channel.join needs a channel name (str), not {name!r}")
        timeout = checks.timeout(msg.timeout, ChannelError)
        c_uid = self.chan_names.get(name)
        if c_uid is not None and c_uid in self.chans:
            c = self.chans[c_uid]
            self._ref(c, msg.caller)
            return self._chan_wire(c)
        if timeout == 0:
            raise ChannelTimeout(f"no channel named {name!r}")
        w = _Waiter("chjoin", msg, name)
        self.chan_joiners.setdefault(name, []).append(w)
        self._owe(w, timeout)
        return DEFER

    @handles(m.GSChannelDestroy)
    def channel_destroy(self, msg):
        idents = msg.idents if isinstance(msg.idents, list) else [msg.idents]
        idents = checks.idents(idents, ChannelError, "channel", "c_uid", "channel.destroy")
        chans = {}  # c_uid -> record: each channel once (a membership test in a list was quadratic)
        for ident in idents:
            c = self._chan(ident)
            chans[c["c_uid"]] = c
        left = [len(chans)]
        errors = []

        def done(resp):
            if resp.err:
                errors.append(resp.msg)
            left[0] -= 1
            if left[0] == 0:
                if errors:
                    self.fail(msg, ChannelError("; ".join(errors)))
                else:
                    self.answer(msg, None)

        for c in chans.values():
            self._remove_chan(c)
            self.ask_shepherd(c["node"], m.SHChannelDestroy(c_uid=c["c_uid"]), done)
        return DEFER

    @handles(m.GSChannelAttach)
    def channel_attach(self, msg):
        c = self._chan(msg.ident)
        self._ref(c, msg.caller)
        return self._chan_wire(c)

    @handles(m.GSChannelDetach)
    def channel_detach(self, msg):
        c = self._chan(msg.ident)
        if not c["ref_count"]:
            return None
        p = self.procs.get(msg.caller)
        if p is None or not p.chan_refs.get(c["c_uid"]):
            raise ChannelError(f"process {msg.caller} holds no reference to channel {c['c_uid']}")
        self._unref(c["c_uid"], p, 1)
        return None

    # ---- clients ------------------------------------------------------------------------------------------
    @handles(m.GSClientRegister)
    def client_register(self, msg):
        if msg.pid <= 0 or msg.start < 0:
            raise DragonError(
                f"a client is named by its pid and start time, not {msg.pid!r} and {msg.start!r}"
            )
        if self.launcher is None:
            raise DragonError("this global services has no launcher to watch clients")
        cid = -self.next_client
        self.next_client += 1

        def watched(resp):
            if resp.err:
                self.fail(msg, DragonError(f"cannot attach process {msg.pid}: {resp.msg}"))
                return
            self.clients[cid] = _Client(cid, msg.pid, msg.keep, msg.reply)
            self.answer(msg, {"client": cid})

        self.ask(
            self.launcher,
            m.LAClientWatch(client=cid, pid=msg.pid, start=msg.start, reply_cd=msg.reply),
            watched,
        )
        return DEFER

    @handles(m.GSClientBye)
    def client_bye(self, msg):
        c = self.clients.get(msg.caller)
        if c is None:
            raise DragonError(f"{msg.caller} is not a registered client")
        if self.launcher is not None:  # (it is gone for good: its pid no longer needs watching)
            self.send(self.launcher, m.LAClientUnwatch(client=c.cid))

        def done():
            # the last answer into its reply channel, which the client destroys next: no handle to it stays
            # in the cache (one per client that ever left, up to REPLY_CACHE)
            self.answer(msg, None)
            self.forget_answered(c.reply)

        self._release(c, done)
        return DEFER

    @handles(m.GSClientGone)
    def client_gone(self, msg):
        c = self.clients.get(msg.client)
        if c is None:  # it said goodbye already
            return None
        self.log.debug("client %d (pid %d) is gone", c.cid, c.pid)
        self._release(c, lambda: self.answer(msg, None))
        return DEFER

    def _release(self, c, done):
        """Forget client c; unless it asked to keep what it made, SIGKILL its running processes and destroy
        its channels (and every channel inside its pools), then its pools. done() once the shepherds
        answered."""
        del self.clients[c.cid]
        for w in self.owed.pop(c.reply, ()):  # deferred answers nobody will read
            w.done = True
            if w.timer is not None:
                w.timer.cancel()
            self._unlink(w)
        self.forget(c.reply)
        if c.keep:
            done()
            return
        left = [1]

        def one(resp=None):
            left[0] -= 1
            if left[0] == 0:
                done()

        for p in [self.procs[u] for u in self.live_procs]:
            if p.owner == c.cid:
                left[0] += 1
                self.ask_shepherd(p.node, m.SHProcessKill(p_uid=p.p_uid, sig=int(signal.SIGKILL)), one)
        pools = [r for r in self.pools.values() if r["owner"] == c.cid and not r["infra"]]
        inside = {r["m_uid"] for r in pools}
        for ch in [x for x in self.chans.values() if x["owner"] == c.cid or x["m_uid"] in inside]:
            self._remove_chan(ch)
            left[0] += 1
            self.ask_shepherd(ch["node"], m.SHChannelDestroy(c_uid=ch["c_uid"]), one)
        for r in pools:  # (a shepherd serves its inbox in order: the channels inside go first)
            del self.pools[r["m_uid"]]
            if r["name"]:
                self.pool_names.pop(r["name"], None)
            left[0] += 1
            self.ask_shepherd(r["node"], m.SHPoolDestroy(m_uid=r["m_uid"]), one)
        one()

    # ---- nodes and control --------------------------------------------------------------------------------
    @handles(m.GSNodeList)
    def node_list(self, msg):
        return [n["index"] for n in self.nodes]

    @handles(m.GSNodeQuery)
    def node_query(self, msg):
        i = msg.index
        if not 0 <= i < len(self.nodes):
            raise DragonError(f"no node {i!r} (the job has nodes 0..{len(self.nodes) - 1})")
        n = self.nodes[i]
        return [n[k] for k in NodeDescriptor.__slots__]  # (positional, as _pdesc)

    @handles(m.GSHalt)
    def halt(self, msg):
        self.stop()


def main(inbox_cd, shepherd_cds, launcher_cd, nodes, infra_pools, key, node=0):
    """Entry point of the GS process (started by the launcher): serve until halted or until SIGTERM (which the
    kernel sends when the launcher dies, PR_SET_PDEATHSIG). key: the job's key; node: see GlobalServices."""
    with service_process():
        gs = GlobalServices(
            Channel.attach(inbox_cd), shepherd_cds, launcher_cd, nodes, infra_pools, key, node=node
        )
        gs.log.debug("global services up (pid %d)", os.getpid())
        gs.serve()
    return 0
