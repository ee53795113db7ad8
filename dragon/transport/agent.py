"""The transport agent: one per node, the only code of the runtime that speaks MPI.

Processes of this node put frames (see ``dragon._core.frames``) into the node's gateway channel. The
agent batches the frames for each destination node into one MPI packet (payloads above ``BIG_MIN`` follow as
their own MPI message, sent straight from the staging pool block), and delivers what other agents send it:

- SEND frames go into the target channel, in arrival order per stream; a full channel keeps the rest of the
  stream queued here (bounded by the sender's window) and retried; cumulative ACKs go back as messages land.
- RECV-type requests are served in order per stream; one that cannot be served yet waits here (not blocking
  the loop) until it can or until its timeout, and is answered exactly once.
- Answers (ACK, DATA, RESULT, ERR) coming back are put into the requesting process's reply channel; an answer
  that does not fit waits here (ACKs coalesce, so that too is bounded).

Nothing a process sent is lost with the process, and nothing taken from a channel for it is dropped: the agent
owns what each process of its node leaves in the transport. It knows the process from its streams' OPEN frames
(pid and start time) and watches it (a pidfd); once the process is gone, by any ending, or its reply channel is,
the agent *retires* it: when the gateway has been read past every frame the process wrote (the ring's tail at
that moment), it closes the process's streams behind those frames, puts back into their channels the messages
received for it that it never took (PUTBACK), and destroys its reply channel. A closed stream stays known here
(a tombstone) until nothing more can come for it, so an answer that arrives late goes back to its channel too.

The loop never blocks in MPI. It spins (yielding the CPU) while there is work or an MPI send in flight; while it
only ships big payloads out and hears only acknowledgements back (this node streams out, no answer is awaited) it
sleeps ``NAP`` between polls instead, leaving the core to the processes it serves; when idle it backs off to
sleeping on the gateway channel's futex (a local request wakes it at once; a remote one is noticed within
``MAX_IDLE_WAIT``, or ``LONG_IDLE_WAIT`` after a second of idleness), so an idle agent costs about 1% of a core.

A payload in a staging block (PTR frame) up to ``BIG_MIN`` is copied into the packet and the block freed at once;
a bigger one goes as its own MPI message straight from the block, and the receiving agent posts its receive
straight into a block of the target channel's pool, which it then hands to the channel (``send_block``): no copy
but MPI's own. Several such payloads are in flight at once (up to the sender's window).
"""

import collections
import os
import select
import threading
import time

import msgpack

from dragon import env
from dragon._core import frames as W
from dragon._core.core import Channel
from dragon._core.remote import pid_namespace, start_time
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout, PoolError

SPIN = 0.002  # keep polling this long after the last piece of work
MAX_IDLE_WAIT = 0.002  # longest sleep of an idle agent (latency of the first remote frame after a pause)
LONG_IDLE_WAIT = 0.01  # ... once it has been idle for a second
PENDING_WAIT = 0.0005  # longest sleep while requests wait here for their channel
ACK_EVERY = 64  # acknowledge a stream's deliveries once this many are unacknowledged ...
ACK_DELAY = 0.0002  # ... or the oldest has waited this long, or a packet goes to its node anyway
ACK_BYTES = 2 << 20  # ... or this many bytes of big payloads (a quarter of the sender's byte window) landed
MAX_INFLIGHT = 256  # MPI sends in flight before the agent waits for some to finish
MPI_BUDGET = 0.00005  # longest run of incoming packets handled before the agent acks and sends what it has
MAX_ERRORS_IN_ROW = 100  # a step that raises this often in a row stops the agent (the launcher says so)
NAP = 0.00005  # a spinning agent that hears only acks from other nodes sleeps this long between polls instead
REAP_EVERY = 0.05  # how often the agent looks for processes of its node that are gone (a poll of pidfds)
SWEEP_EVERY = 1.0  # ... and, for processes it could not open a pidfd for, reads their /proc/<pid>/stat

_HDR = W.HDR
_HS = W.HSIZE
_PIDNS = pid_namespace()
_FROM_PROCESSES = frozenset((W.OPEN, W.SEND, W.RECV, W.CLOSE, W.PUTBACK, W.BYE))  # what a gateway accepts
_ack_pack = W.HDR.pack


class _In:
    """A stream arriving here: a remote process's handle to a channel of this node."""

    __slots__ = (
        "ack_bytes",
        "ack_t",
        "acked",
        "ch",
        "closing",
        "delivered",
        "err",
        "recvq",
        "sendq",
        "sid",
        "src",
    )

    def __init__(self, src, sid):
        self.src, self.sid = src, sid
        self.ch = None
        self.err = None
        self.sendq = collections.deque()
        self.recvq = collections.deque()
        self.delivered = 0
        self.acked = 0
        self.ack_t = 0.0  # when the oldest delivery not yet acknowledged was seen by _acks
        self.ack_bytes = 0  # big payload bytes delivered since the last ack (the byte window is tight)
        self.closing = False


class _Out:
    """A stream leaving here: where its answers go, and where a message received for it goes back to (target).

    Once closed (by the process, or when the process is gone) it stays as a tombstone until nothing more can come
    for it: the channel's agent has answered CLOSED (far_closed), and the process has read past the CLOSED frame
    put into its reply channel (read_past), or the process was retired."""

    __slots__ = ("closed", "dest", "ep", "far_closed", "read_past", "reply", "sid", "target", "until")

    def __init__(self, sid, dest, target, ep):
        self.sid, self.dest, self.target, self.ep = sid, dest, target, ep
        self.reply = ep.reply
        self.closed = False
        self.far_closed = False
        self.read_past = False
        self.until = None  # the reply channel's tail once the CLOSED frame is in it


class _Ep:
    """A process of this node that uses remote channels: its reply channel, its streams, how it is watched."""

    __slots__ = ("fd", "foreign", "mark", "pid", "reply", "sids", "start")

    def __init__(self, reply, pid, start):
        self.reply, self.pid, self.start = reply, pid, start
        self.sids = set()
        self.fd = None  # a pidfd (readable once the process has exited)
        self.foreign = False  # in another pid namespace than this agent: not watched by pid
        self.mark = None  # retiring: the gateway's tail when the process was found gone


class _Free:
    """Keeps a block of the infrastructure pool for an MPI send; release() frees it."""

    __slots__ = ("off", "pool")

    def __init__(self, pool, off):
        self.pool, self.off = pool, off

    def release(self):
        if self.off is not None:
            try:
                self.pool.free(self.pool.block(self.off))
            except Exception:
                pass
            self.off = None


class _Pending:
    """A big payload still arriving (MPI Irecv) in a stream's queue: later messages of the stream wait behind it."""

    __slots__ = ("buf", "req")

    def __init__(self, req, buf):
        self.req, self.buf = req, buf


class _Body:
    """The payload of a NEXT header that went into a reply channel, waiting here for room behind it (the header is
    kept for the case where the payload must go back to its channel instead)."""

    __slots__ = ("body", "hdr")

    def __init__(self, hdr, body):
        self.hdr, self.body = hdr, body


class _Req:
    __slots__ = ("deadline", "max_n", "maxlen", "mode", "nonblock", "seq")

    def __init__(self, seq, mode, max_n, maxlen, timeout):
        self.seq, self.mode, self.max_n, self.maxlen = seq, mode, max_n, maxlen
        self.nonblock = timeout == 0
        self.deadline = None if timeout < 0 else time.monotonic() + timeout


class Agent:
    def __init__(self, comm, node, node_ranks, gateway, pool, log=None):
        """comm: an MPI communicator; node: this node's index; node_ranks[k]: the rank of node k's agent;
        gateway: this node's gateway Channel; pool: this node's infrastructure Pool (reply channels live there)."""
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm
        self.node = node
        self.ranks = list(node_ranks)
        self.node_of = {r: k for k, r in enumerate(self.ranks)}
        self.gw = gateway
        self.pool = pool
        self.log = log
        self.out = {}  # dest node -> bytearray: the packet being built
        self.bigs = {}  # dest node -> [(buffer, keepalive)] to send after that packet
        self.sends = []  # [(Request, keepalive)] MPI sends in flight
        self.irecvs = []  # [_Pending] big payloads being received
        self.ins = {}  # (src node, sid) -> _In
        self.outs = {}  # sid -> _Out
        self.replies = {}  # reply sdesc -> Channel
        self.pending_in = set()  # _In with queued sends or waiting requests
        self.pending_rep = collections.OrderedDict()  # reply Channel -> deque of frames that did not fit
        self.ack_due = set()
        self.dead = set()
        self.posted = collections.deque()
        self.eps = {}  # reply sdesc -> _Ep: the processes of this node with streams
        self.ep_fds = {}  # pidfd -> _Ep
        self.poller = select.poll()
        self.next_reap = 0.0
        self.next_sweep = 0.0
        self.retiring = []  # _Ep found gone, retired once the gateway is read past their mark
        self.lingering = set()  # closed _Out whose far end has closed, waiting for the process to read past
        self.backq = {}  # channel sdesc -> deque of messages to put back into that channel of this node
        self.back_chs = {}  # channel sdesc -> Channel (attached for PUTBACK)
        self.on_ctrl = None  # callback(src node, bytes) for CTRL frames (the launcher decodes them)
        self.on_node_down = None  # callback(node) when a node is announced dead
        self.heartbeat = None  # (interval, dead_after) seconds: beat to every node, declare silent ones down
        self.next_beat = 0.0
        self.last_seen = {}  # node -> monotonic time of its last packet
        self.down_why = {}  # node -> why this agent declared it down
        self.running = False
        self.failed = None  # why the loop ended by itself (None: stopped, or still running)
        self.urgent_at = 0.0  # last time a frame someone waits on came in or went out (not acks, big ones)
        self.rbuf = bytearray(1 << 20)
        self.tmp = bytearray(0)
        self.status = MPI.Status()
        self.stats = collections.Counter()

    # ---- outside threads --------------------------------------------------------------------------------
    def post(self, fn, *args):
        """Run fn(*args) in the agent's loop (thread-safe); the loop notices within MAX_IDLE_WAIT."""
        self.posted.append((fn, args))

    def send_ctrl(self, dest, data):
        """Send an encoded infrastructure message (a launcher's control message, with the job's key) to the
        launcher beside node dest's agent (thread-safe). The agent carries the bytes opaquely in a CTRL frame;
        only the launchers send and read them (on_ctrl(src, bytes)): no process can, through its gateway."""
        self.post(self._ctrl, dest, data)

    def stop(self):
        self.post(self._stop)

    def _stop(self):
        self.running = False

    # ---- loop ---------------------------------------------------------------------------------------------
    def run(self):
        from dragon._core import core

        core.set_wait_params(spin_ns=0)  # the loop spins itself; its sleeps on the gateway should only sleep
        _timer_slack(10_000)
        self.running = True
        perf = time.perf_counter
        sleep = time.sleep
        yield_cpu = os.sched_yield
        idle_since = perf()
        in_row = 0  # steps in a row that raised
        while self.running:
            try:
                work = self._step()
                in_row = 0
            except Exception as e:  # a bug must not silently stop the node's transport ...
                self.stats["errors"] += 1
                in_row += 1
                if in_row <= 3:
                    if self.log:
                        self.log.exception("transport agent")
                    else:
                        import traceback

                        traceback.print_exc()
                if in_row >= MAX_ERRORS_IN_ROW:  # ... nor fill the log with one error, every step, forever
                    self.failed = f"{type(e).__name__}: {e} (in {in_row} steps in a row)"
                    break
                work = 1
            if work:
                idle_since = perf()
                continue
            if self.irecvs:
                # MPI progress is what moves big payloads into our blocks (MPI's one copy, done by this thread):
                # keep calling it without giving the core away, this is the stream's bottleneck
                continue
            now = perf()
            if self.sends or now - idle_since < SPIN:
                if now - self.urgent_at < SPIN:
                    yield_cpu()  # spinning, but let the processes we serve have the core (2 cores, 4 busy ones)
                else:
                    # only acks come from other nodes (this node streams out): nobody there waits on this
                    # agent, so it leaves the core to the processes it serves (2 cores: the sender's copies
                    # and the receiving agent's MPI progress are the stream's work) and takes what piled up in
                    # its gateway, the acks and finished MPI sends every NAP, in batches. A plain sleep, not
                    # the gateway's futex: a wake-up per frame would cost each sender a syscall.
                    self.stats["naps"] += 1
                    sleep(NAP)
                continue
            idle = now - idle_since
            wait = min(MAX_IDLE_WAIT if idle < 1.0 else LONG_IDLE_WAIT, idle * 0.25)
            if self.heartbeat is not None:
                wait = min(wait, max(0.0, self.next_beat - time.monotonic()))
            if self.pending_in or self.pending_rep or self.backq:
                wait = min(wait, PENDING_WAIT)
            if self.ack_due:
                wait = min(wait, ACK_DELAY)
            self.stats["sleeps"] += 1
            try:
                self.gw.poll(timeout=wait)
            except ChannelError as e:
                if self.running:
                    self.failed = f"its gateway channel is gone ({e})"
                self.running = False
        self._finish_sends(5.0)
        for fd in self.ep_fds:
            os.close(fd)
        self.ep_fds.clear()

    def _step(self):
        work = self._gateway() + self._mpi()
        if self.heartbeat is not None:
            self._beat()
        posted = self.posted
        while posted:
            fn, args = posted.popleft()
            fn(*args)
            work += 1
        if self.pending_in:
            work += self._retry_in()
        if self.pending_rep:
            self._retry_replies()
        if self.ack_due:
            self._acks()
        if self.backq:
            work += self._retry_back()
        if (self.eps or self.lingering) and time.monotonic() >= self.next_reap:
            self._reap()
        if self.retiring:
            self._retire_due()
        if self.out:
            work += self._flush_all()
        if self.sends:
            self._test_sends()
        return work

    def _beat(self):
        now = time.monotonic()
        if now < self.next_beat:
            return
        interval, dead_after = self.heartbeat
        self.next_beat = now + interval
        for k in range(len(self.ranks)):
            if k == self.node or k in self.dead:
                continue
            seen = self.last_seen.setdefault(k, now)
            if now - seen > dead_after:
                self.down_why.setdefault(k, f"no word from its transport agent for {now - seen:.0f} s")
                self._node_down(k)
            else:
                self._emit(k, _HDR.pack(W.HEARTBEAT, 0, k, 0, 0, 0))

    def _finish_sends(self, timeout):
        deadline = time.monotonic() + timeout
        while self.sends and time.monotonic() < deadline:
            self._test_sends()
        for req, keep in self.sends:
            try:
                req.Cancel()
            except Exception:
                pass
        self.sends = []

    # ---- MPI ----------------------------------------------------------------------------------------------
    def _flush_all(self):
        loop = self.node in self.out
        for dest in list(self.out):
            self._flush(dest)
        return loop

    def _flush(self, dest):
        pkt = self.out.pop(dest, None)
        bigs = self.bigs.pop(dest, None)
        if dest == self.node:  # loopback (a stream to a channel of this very node)
            if pkt:
                self._packet(self.node, memoryview(bytes(pkt)), bigs and collections.deque(bigs))
            return
        rank = self.ranks[dest]
        MPI = self.MPI
        if pkt:  # the packet itself (a new one is started for the next frames): no copy
            self.sends.append((self.comm.Isend([pkt, len(pkt), MPI.BYTE], rank, W.TAG_PKT), pkt))
        for buf, keep in bigs or ():
            self.sends.append((self.comm.Isend([buf, len(buf), MPI.BYTE], rank, W.TAG_BIG), keep))
        self.stats["packets"] += 1
        if len(self.sends) > MAX_INFLIGHT:
            while len(self.sends) > MAX_INFLIGHT // 2:
                self._test_sends()

    def _test_sends(self):
        sends = self.sends
        reqs = [r for r, _ in sends]
        done = self.MPI.Request.Testsome(reqs)
        if done:
            keep = set(done)
            left = []
            for i, (r, k) in enumerate(sends):
                if i in keep:
                    if hasattr(k, "release"):
                        k.release()
                else:
                    left.append((r, k))
            self.sends = left

    def _mpi(self):
        """Take the packets other agents sent, for at most MPI_BUDGET seconds: the rest of the step (acks, the
        packets this node sends) must not wait behind a queue of big payloads, each one MPI copy long."""
        comm, st, MPI = self.comm, self.status, self.MPI
        n = 0
        until = time.perf_counter() + MPI_BUDGET
        while True:
            if n and time.perf_counter() > until:
                return n
            msg = comm.Improbe(MPI.ANY_SOURCE, W.TAG_PKT, st)
            if msg is None:
                return n
            count = st.Get_count(MPI.BYTE)
            src_rank = st.Get_source()
            if count > len(self.rbuf):
                self.rbuf = bytearray(count)
            msg.Recv([self.rbuf, count, MPI.BYTE])
            n += 1
            src = self.node_of.get(src_rank)
            if src is None:
                continue
            self.last_seen[src] = time.monotonic()
            self._packet(src, memoryview(self.rbuf)[:count], src_rank)

    def _big_into(self, src, bigsrc, dst, n):
        """Receive the next BIG payload from src into dst (a writable buffer of n bytes)."""
        if isinstance(bigsrc, collections.deque):  # loopback: (buffer, keepalive) in order
            buf, keep = bigsrc.popleft()
            if dst is not None:
                memoryview(dst)[:n] = buf
            if hasattr(keep, "release"):
                keep.release()
            return
        if dst is None:
            dst = bytearray(n)
        self.comm.Recv([dst, n, self.MPI.BYTE], bigsrc, W.TAG_BIG)

    # ---- the gateway: frames from this node's processes ---------------------------------------------------
    def _gateway(self):
        if not self.gw.poll(timeout=0):  # (cheaper than the exception of an empty recv_many, every loop)
            return 0
        try:
            frames = self.gw.recv_many(256, timeout=0)
        except ChannelEmpty:
            return 0
        unpack = _HDR.unpack_from
        out = self.out
        nbig = 0
        for data in frames:
            try:
                kind, flags, dest, ln, sid, seq = unpack(data)
                if kind not in _FROM_PROCESSES:  # (frames only agents send: a process may not forge them)
                    self._refuse(data, f"a process may not send {kind=} frames")
                    continue
                if len(data) != _HS + (8 if flags & W.PTR else ln):  # (it would misframe the packet it joins)
                    self._refuse(data, f"a {len(data)}-byte frame whose header says {ln} bytes of payload")
                    continue
                if kind == W.OPEN:
                    self._open_out(sid, dest, data[_HS : _HS + ln])
                elif kind == W.CLOSE:
                    self._close_out(self.outs.get(sid), forward=False)
                elif kind == W.BYE:  # the process ends: nothing of it comes after this
                    ep = self.eps.get(bytes(data[_HS : _HS + ln]))
                    if ep is not None:
                        self._retire(ep)
                    continue
                if dest in self.dead or dest >= len(self.ranks):
                    if flags & W.PTR:
                        self._free_ptr(data)
                    if kind != W.CLOSE and kind != W.PUTBACK:
                        self._fail_local(
                            sid,
                            seq if kind == W.RECV else 0,
                            f"node {dest} is down" if dest in self.dead else f"there is no node {dest}",
                        )
                    continue
                if flags & W.PTR:  # a payload in a pool block: the packet gets the header, MPI the block
                    off = W.U64.unpack_from(data, _HS)[0]
                    blk = self.pool.block(off)
                    if ln > blk.size:
                        raise ValueError(f"a staging block of {blk.size} bytes cannot hold the {ln} it claims")
                    if ln <= W.BIG_MIN:  # not worth an MPI message (and its handling) of its own: into the packet
                        hdr = bytearray(data[:_HS])
                        hdr[1] = flags & ~W.PTR
                        pkt = out.get(dest)
                        if pkt is None:
                            pkt = out[dest] = bytearray()
                        pkt += hdr
                        mv = memoryview(blk)
                        pkt += mv[:ln]
                        mv.release()
                        self.pool.free(blk)
                        if len(pkt) > W.PACKET_MAX:
                            self._flush(dest)
                        continue
                    hdr = bytearray(data[:_HS])
                    hdr[1] = (flags & ~W.PTR) | W.BIG
                    pkt = out.get(dest)
                    if pkt is None:
                        pkt = out[dest] = bytearray()
                    pkt += hdr
                    self.bigs.setdefault(dest, []).append((memoryview(blk)[:ln], _Free(self.pool, off)))
                    nbig += 1
                else:
                    pkt = out.get(dest)
                    if pkt is None:
                        out[dest] = bytearray(data)
                    else:
                        pkt += data
                        if len(pkt) > W.PACKET_MAX:
                            self._flush(dest)
            except Exception as e:  # a bad frame drops itself only (logged), never the rest of the batch
                self._refuse(data, f"{type(e).__name__}: {e}")
        if nbig < len(frames):  # a request or small message went out: its answer may be on its way back
            self.urgent_at = time.perf_counter()
        return len(frames)

    def _open_out(self, sid, dest, payload):
        """A process opened a stream (OPEN frame): note where its answers go, and the process, to watch it."""
        target, rest = W.split_sdesc(payload)
        pid, start, pidns = W.OPENER.unpack_from(rest)
        reply = bytes(rest[W.OPENER.size :])
        ep = self.eps.get(reply)
        if ep is None:
            ep = self.eps[reply] = _Ep(reply, pid, start)
            if pidns == _PIDNS:
                self._watch(ep)
            else:  # its pid means another process here: it is retired by its BYE (or its reply channel's end)
                ep.foreign = True
        self.outs[sid] = _Out(sid, dest, target, ep)
        ep.sids.add(sid)

    def _close_out(self, o, forward):
        """A stream of this node ends: by the process's CLOSE frame (which goes on to the channel's node as it
        is: forward=False), or because the process is gone (the agent sends CLOSE itself). It stays as a
        tombstone until the channel's agent has answered CLOSED."""
        if o is None or o.closed:
            return
        o.closed = True
        if o.dest in self.dead or o.dest >= len(self.ranks):
            o.far_closed = True
        elif forward:
            self._emit(o.dest, _HDR.pack(W.CLOSE, 0, o.dest, 0, o.sid, 0))
        if o.ep.mark is None:  # the process is there: it forgets the stream when it reads this
            self._to_reply(o, _HDR.pack(W.CLOSED, 0, 0, 0, o.sid, 0))
        else:
            o.read_past = True
        self._forget_if_done(o)

    def _forget_if_done(self, o):
        if not o.far_closed:
            return
        if not o.read_past and o.until is not None:
            ch = self.replies.get(o.reply)
            if ch is None:
                o.read_past = True
            else:
                try:
                    o.read_past = ch._positions()[0] >= o.until
                except ChannelError:
                    o.read_past = True
        if o.read_past:
            self.lingering.discard(o)
            if self.outs.get(o.sid) is o:
                del self.outs[o.sid]
            o.ep.sids.discard(o.sid)
        else:
            self.lingering.add(o)

    def _refuse(self, data, why):
        """A frame the agent will not act on (from a process, or a process's payload that another agent
        forwarded): logged (the first few, then every 1000th)."""
        self.stats["refused"] += 1
        n = self.stats["refused"]
        if self.log and (n <= 10 or n % 1000 == 0):
            self.log.error("refused a frame (%d so far): %s", n, why)

    def _free_ptr(self, data):
        _Free(self.pool, W.U64.unpack_from(data, _HS)[0]).release()

    def _fail_local(self, sid, seq, text):
        o = self.outs.get(sid)
        if o is not None:
            self._to_reply(o, W.err_frame(sid, seq, ChannelError, text))

    # ---- frames from other agents -------------------------------------------------------------------------
    def _emit(self, dest, frame):
        pkt = self.out.get(dest)
        if pkt is None:
            self.out[dest] = bytearray(frame)
        else:
            pkt += frame

    def _packet(self, src, mv, bigsrc):
        end = len(mv)
        pos = 0
        unpack = _HDR.unpack_from
        run_sid, run = None, None  # consecutive small SENDs of one stream go into its channel in one call
        urgent = False
        ack, beat = W.ACK, W.HEARTBEAT
        while pos < end:
            kind, flags, node, n, sid, seq = unpack(mv, pos)
            if not urgent and kind != ack and kind != beat:
                urgent = True
            hpos = pos
            pos += _HS
            big = flags & W.BIG
            if big:
                payload = None
            else:
                payload = mv[pos : pos + n]
                pos += n
            if kind == W.SEND and not big:
                if sid == run_sid:
                    run.append(payload)
                else:
                    if run:
                        self._in_send_run(src, run_sid, run)
                    run_sid, run = sid, [payload]
                continue
            if run:
                self._in_send_run(src, run_sid, run)
                run_sid, run = None, None
            try:
                if kind == W.SEND:
                    self._in_send(src, sid, payload, n, bigsrc)
                elif kind == W.RECV:
                    self._in_recv(src, sid, seq, payload)
                elif kind == W.OPEN:
                    self._in_open(src, sid, payload)
                elif kind == W.CLOSE:
                    self._in_close(src, sid)
                elif kind in (W.ACK, W.DATA, W.RESULT, W.ERR):
                    self._answer(sid, mv[hpos : hpos + _HS], payload, n, big, src, bigsrc)
                elif kind == W.CLOSED:
                    o = self.outs.get(sid)
                    if o is not None and o.closed:
                        o.far_closed = True
                        self._forget_if_done(o)
                elif kind == W.PUTBACK:
                    self._in_putback(payload, flags)
                elif kind == W.NODE_DOWN:
                    self._node_down(node)
                elif kind == W.CTRL and self.on_ctrl is not None:
                    self.on_ctrl(src, bytes(payload))
            except Exception as e:  # (a process wrote the payload: a bad one costs its own frame, not the packet)
                self._refuse(payload, f"kind {kind} from node {src}: {type(e).__name__}: {e}")

        if run:
            self._in_send_run(src, run_sid, run)
        if urgent:
            self.urgent_at = time.perf_counter()

    def _in_send_run(self, src, sid, run):
        s = self.ins.get((src, sid))
        if s is None or s.err is not None:
            return
        k = 0
        if not s.sendq:
            try:
                k = s.ch.send_many(run, timeout=0)
            except ChannelFull:
                k = 0
            except ChannelError as e:
                self._stream_error(s, str(e))
                return
            if k:
                s.delivered += k
                self.ack_due.add(s)
        if k < len(run):
            s.sendq.extend(bytes(x) for x in run[k:])
            self.pending_in.add(s)

    def _in_open(self, src, sid, payload):
        s = self.ins[(src, sid)] = _In(src, sid)
        k = W.U16.unpack_from(payload, 0)[0]
        try:
            s.ch = Channel.attach(bytes(payload[2 : 2 + k]))
        except (ChannelError, TypeError) as e:
            self._stream_error(s, f"cannot attach the channel: {e}")

    def _in_close(self, src, sid):
        """A stream from another node ends: its queued sends are still delivered; requests still waiting are
        answered with an error (no receive takes a message for it any more); CLOSED goes back behind every
        answer sent on it."""
        s = self.ins.get((src, sid))
        if s is not None:
            s.closing = True
            for r in s.recvq:
                self._err(s, r.seq, ChannelError, "the handle was closed")
            s.recvq.clear()
            if not s.sendq:
                self._drop_in(s)
        self._emit(src, _HDR.pack(W.CLOSED, 0, src, 0, sid, 0))

    def _in_putback(self, payload, flags):
        """Messages that were taken from a channel of this node and that nobody will receive through the
        transport: back into the channel (at its tail), in order, as room allows."""
        sdesc, body = W.split_sdesc(payload)
        msgs = W.unpack_many(body) if flags & W.MANY else [bytes(body)]
        q = self.backq.get(sdesc)
        if q is None:
            q = self.backq[sdesc] = collections.deque()
        q.extend(msgs)

    def _retry_back(self):
        work = 0
        for sdesc in list(self.backq):
            q = self.backq[sdesc]
            try:
                ch = self._back_ch(sdesc)
                while q:
                    ch.send(q[0], timeout=0)
                    q.popleft()
                    work += 1
            except ChannelFull:
                continue
            except (ChannelError, TypeError) as e:  # destroyed: there is nowhere to put them
                if self.log:
                    self.log.warning("%d message(s) could not be put back into their channel: %s", len(q), e)
                self.back_chs.pop(sdesc, None)
            del self.backq[sdesc]
        return work

    def _back_ch(self, sdesc):
        ch = self.back_chs.get(sdesc)
        if ch is None:
            if len(self.back_chs) >= 64:  # keep a few handles for the next put-backs, not every one
                self.back_chs.pop(next(iter(self.back_chs))).close()
            ch = self.back_chs[sdesc] = Channel.attach(sdesc)
        return ch

    def _putback(self, o, body, flags=0):
        """A message received for stream o that its process will not take: back to its channel's node."""
        if o.dest in self.dead or o.dest >= len(self.ranks):
            return  # the channel went with its node
        payload = W.prefix_sdesc(o.target, body)
        self._emit(o.dest, _HDR.pack(W.PUTBACK, flags & W.MANY, o.dest, len(payload), 0, 0) + payload)

    def _stream_error(self, s, text):
        if s.err is None:
            s.err = text
            self._emit(s.src, W.err_frame(s.sid, 0, ChannelError, text))
        for item in s.sendq:
            if type(item) is _Pending:
                item.req.Wait()
                self.irecvs.remove(item)
                item = item.buf
            if hasattr(item, "pool"):
                try:
                    item.pool.free(item)
                except Exception:
                    pass
        s.sendq.clear()
        for r in s.recvq:
            self._emit(s.src, W.err_frame(s.sid, r.seq, ChannelError, text))
        s.recvq.clear()
        self.pending_in.discard(s)

    def _drop_in(self, s):
        self.ins.pop((s.src, s.sid), None)
        self.pending_in.discard(s)
        self.ack_due.discard(s)
        if s.ch is not None:
            s.ch.close()

    def _in_send(self, src, sid, payload, n, bigsrc):
        s = self.ins.get((src, sid))
        if s is None or s.err is not None:
            if payload is None:
                self._big_into(src, bigsrc, None, n)
            return
        if payload is None:  # BIG: receive straight into a block of the target channel's pool
            s.ack_bytes += n
            try:
                item = s.ch.pool.alloc(n, timeout=0)
            except PoolError:
                item = bytearray(n)
            if not isinstance(bigsrc, collections.deque):  # from MPI: a non-blocking receive
                req = self.comm.Irecv([item, n, self.MPI.BYTE], bigsrc, W.TAG_BIG)
                if s.sendq or not req.Test():  # (MPI's copy is usually done by the time Irecv returns)
                    pend = _Pending(req, item)  # the stream waits for it
                    self.irecvs.append(pend)
                    s.sendq.append(pend)
                    self.pending_in.add(s)
                    return
            else:
                self._big_into(src, bigsrc, item, n)
        else:
            item = payload
        if not s.sendq:
            try:
                if payload is None and not isinstance(item, bytearray):
                    s.ch.send_block(item, timeout=0)
                else:
                    s.ch.send(item, timeout=0)
                s.delivered += 1
                self.ack_due.add(s)
                return
            except ChannelFull:
                pass
            except ChannelError as e:
                if hasattr(item, "pool"):
                    item.pool.free(item)
                self._stream_error(s, str(e))
                return
        s.sendq.append(bytes(item) if payload is not None else item)
        self.pending_in.add(s)

    def _in_recv(self, src, sid, seq, payload):
        mode, max_n, maxlen, timeout = W.REQ.unpack_from(payload)
        s = self.ins.get((src, sid))
        if s is None:
            self._emit(src, W.err_frame(sid, seq, ChannelError, "unknown stream"))
            return
        if s.err is not None:
            self._emit(src, W.err_frame(sid, seq, ChannelError, s.err))
            return
        s.recvq.append(_Req(seq, mode, max_n, maxlen, timeout))
        if not self._serve(s):
            self.pending_in.add(s)

    def _serve(self, s):
        """Try the stream's waiting requests in order; True when none is left waiting."""
        ch = s.ch
        q = s.recvq
        while q:
            r = q[0]
            mode = r.mode
            try:
                if mode == W.M_RECV or mode == W.M_INTO:
                    if mode == W.M_INTO:
                        if len(self.tmp) < r.maxlen:
                            self.tmp = bytearray(r.maxlen)
                        k = ch.recv_into(memoryview(self.tmp)[: r.maxlen], timeout=0)
                        self._data(s, r.seq, 0, memoryview(self.tmp)[:k], None)
                    else:
                        m = ch.recv_message(timeout=0)
                        self._data(s, r.seq, 0, memoryview(m), m)
                elif mode == W.M_MANY:
                    msgs = ch.recv_many(max(1, r.max_n), timeout=0)
                    self._data(s, r.seq, W.MANY, W.pack_many(msgs), None)
                elif mode == W.M_POLL:
                    if ch.poll(timeout=0):
                        self._result(s, r.seq, True)
                    elif r.nonblock or (r.deadline is not None and time.monotonic() >= r.deadline):
                        self._result(s, r.seq, False)
                    else:
                        return False
                elif mode == W.M_LEN:
                    self._result(s, r.seq, len(ch))
                elif mode == W.M_DESTROY:
                    ch.destroy()
                    self._result(s, r.seq, True)
                elif mode == W.M_INFO:
                    self._result(
                        s, r.seq, {"capacity": ch.capacity, "block_size": ch.block_size, "name": ch.name}
                    )
                else:
                    raise ChannelError(f"unknown request mode {mode}")
            except ChannelEmpty:
                if r.nonblock:
                    self._err(s, r.seq, ChannelEmpty, "is empty")
                elif r.deadline is not None and time.monotonic() >= r.deadline:
                    self._err(s, r.seq, ChannelTimeout, "timed out")
                else:
                    return False
            except ChannelError as e:
                self._err(s, r.seq, e, str(e))
            q.popleft()
        return True

    def _data(self, s, seq, flags, data, keep):
        n = len(data)
        if n > W.BIG_MIN:
            if keep is None and not isinstance(data, bytes):
                data = bytes(data)  # a view of a buffer the agent reuses
            self._emit(s.src, _HDR.pack(W.DATA, flags | W.BIG, 0, n, s.sid, seq))
            self.bigs.setdefault(s.src, []).append((data, keep if keep is not None else data))
        else:
            self._emit(s.src, _HDR.pack(W.DATA, flags, 0, n, s.sid, seq))
            self.out[s.src] += data
            if keep is not None:
                keep.release()

    def _result(self, s, seq, value):
        body = msgpack.packb(value)
        self._emit(s.src, _HDR.pack(W.RESULT, 0, 0, len(body), s.sid, seq) + body)

    def _err(self, s, seq, err, text):
        """Answer request seq of stream s with an error (an exception or a class: it travels as its code)."""
        self._emit(s.src, W.err_frame(s.sid, seq, err, text))

    def _retry_in(self):
        work = 0
        for s in list(self.pending_in):
            q = s.sendq
            while q:
                item = q[0]
                if type(item) is _Pending:
                    if not item.req.Test():
                        break
                    self.irecvs.remove(item)
                    item = q[0] = item.buf
                try:
                    if isinstance(item, (bytes, bytearray)):
                        s.ch.send(item, timeout=0)
                    else:
                        s.ch.send_block(item, timeout=0)
                except ChannelFull:
                    break
                except ChannelError as e:
                    self._stream_error(s, str(e))
                    break
                q.popleft()
                s.delivered += 1
                self.ack_due.add(s)
                work += 1
            if s.recvq and s.err is None:
                before = len(s.recvq)
                self._serve(s)
                work += before - len(s.recvq)
            if not s.sendq and not s.recvq:
                self.pending_in.discard(s)
                if s.closing:
                    self._drop_in(s)
        return work

    def _acks(self):
        """Acknowledge deliveries, lazily: an ack rides along with other frames to the stream's node when there
        are any, else it waits for ACK_EVERY deliveries, ACK_BYTES of big payloads or ACK_DELAY (the sender's
        window is 512 messages / 8 MiB, so a late ack costs it nothing while it keeps sending; a round trip pays
        no ack packets, a stream of big payloads one per ACK_BYTES)."""
        now = time.perf_counter()
        out = self.out
        done = []
        for s in self.ack_due:
            k = s.delivered - s.acked
            if k <= 0:
                done.append(s)
                continue
            if not s.ack_t:
                s.ack_t = now
            if s.ack_bytes >= ACK_BYTES or k >= ACK_EVERY or s.src in out or now - s.ack_t >= ACK_DELAY:
                s.acked = s.delivered
                s.ack_t = 0.0
                s.ack_bytes = 0
                self._emit(s.src, _ack_pack(W.ACK, 0, 0, 0, s.sid, s.delivered))
                done.append(s)
        for s in done:
            self.ack_due.discard(s)

    # ---- answers for this node's processes ----------------------------------------------------------------
    def _answer(self, sid, hdr, payload, n, big, src, bigsrc):
        o = self.outs.get(sid)
        if o is None or o.closed:
            if o is None or hdr[0] != W.DATA:  # (no stream: nothing is waiting for it, and no data comes)
                if big:
                    self._big_into(src, bigsrc, None, n)
                return
            if big:  # a receive of a stream that is closed took this message: back into its channel
                payload = bytearray(n)
                self._big_into(src, bigsrc, payload, n)
            self._putback(o, payload, hdr[1])
            return
        if hdr[0] == W.DATA and not hdr[1] & W.MANY:
            # a header (NEXT) and the payload as the next message: the process gets the payload as a Message
            # of its own (recv_message), a big one in the pool block it was received into (no copy)
            head = bytearray(hdr)
            head[1] = (head[1] & ~W.BIG) | W.NEXT
            if big:
                try:
                    body = self.pool.alloc(n, timeout=0)
                    mv = memoryview(body)
                    self._big_into(src, bigsrc, mv, n)
                    mv.release()
                except PoolError:
                    body = bytearray(n)
                    self._big_into(src, bigsrc, body, n)
            else:
                body = bytearray(payload)  # (never bytes: queued ACKs, which are, coalesce)
            self._to_reply(o, bytes(head), body)
            return
        if big:
            try:
                blk = self.pool.alloc(_HS + n, timeout=0)
                mv = memoryview(blk)
                mv[:_HS] = hdr
                mv[1] = mv[1] & ~W.BIG
                self._big_into(src, bigsrc, mv[_HS:], n)
                mv.release()
                frame = blk
            except PoolError:
                buf = bytearray(_HS + n)
                buf[:_HS] = hdr
                buf[1] &= ~W.BIG
                self._big_into(src, bigsrc, memoryview(buf)[_HS:], n)
                frame = bytes(buf)
        else:
            frame = bytes(hdr) + bytes(payload)
        self._to_reply(o, frame)

    def _reply_ch(self, o):
        ch = self.replies.get(o.reply)
        if ch is None:
            ch = self.replies[o.reply] = Channel.attach(o.reply)
        return ch

    def _to_reply(self, o, frame, body=None):
        """Put a frame (and, for a NEXT header, its payload right behind it) into the process's reply channel;
        what does not fit waits here, in order."""
        try:
            ch = self._reply_ch(o)
        except ChannelError:
            self._lost_answers([frame, body])
            self._reply_gone(o.reply)
            return
        q = self.pending_rep.get(ch)
        if q:
            self._queue_reply(q, frame)
            if body is not None:
                q.append(body)
            return
        try:
            for i, f in enumerate((frame, body)):
                if f is None:
                    break
                if isinstance(f, (bytes, bytearray)):
                    ch.send(f, timeout=0)
                else:
                    ch.send_block(f, timeout=0)
            if type(frame) is bytes and frame[0] == W.CLOSED:
                self._closed_sent(ch, frame)
        except ChannelFull:
            q = [frame] if body is None else [frame, body] if i == 0 else [_Body(frame, body)]
            self.pending_rep[ch] = collections.deque(q)
        except ChannelError:  # the reply channel is gone
            self._lost_answers([frame, body])
            self._reply_gone(o.reply)

    def _reply_gone(self, reply):
        """A process's reply channel is gone (or was never valid): retire the process."""
        ep = self.eps.get(reply)
        if ep is not None:
            self._retire(ep)

    # ---- the processes of this node: watched, and retired when gone -----------------------------------------
    def _watch(self, ep):
        """Watch ep's process with a pidfd (readable once it exits); without one (no pidfd support, no file
        descriptor left) it is found gone by the slower /proc sweep."""
        if start_time(ep.pid) != ep.start:  # gone already, or the pid is another process's now
            self._retire(ep)
            return
        try:
            fd = os.pidfd_open(ep.pid)
        except (OSError, AttributeError):
            return
        if start_time(ep.pid) != ep.start:  # (the pid may have been reused before the pidfd opened)
            os.close(fd)
            self._retire(ep)
            return
        ep.fd = fd
        self.ep_fds[fd] = ep
        self.poller.register(fd, select.POLLIN)

    def _reap(self):
        """Retire the processes that are gone; forget the closed streams that nothing more can come for."""
        now = time.monotonic()
        self.next_reap = now + REAP_EVERY
        if self.ep_fds:
            for fd, _ev in self.poller.poll(0):
                ep = self.ep_fds.get(fd)
                if ep is not None:
                    self._retire(ep)
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_EVERY
            for ep in list(self.eps.values()):
                if (
                    ep.fd is None
                    and not ep.foreign
                    and ep.mark is None
                    and start_time(ep.pid) != ep.start
                ):
                    self._retire(ep)
        for o in list(self.lingering):
            self._forget_if_done(o)

    def _retire(self, ep):
        """ep's process is gone (or its reply channel is): retire it once the gateway has been read past every
        frame it wrote, i.e. past the gateway's tail now."""
        if ep.mark is not None:
            return
        ep.mark = self.gw._positions()[1]
        self.retiring.append(ep)
        if ep.fd is not None:
            self.poller.unregister(ep.fd)
            del self.ep_fds[ep.fd]
            os.close(ep.fd)
            ep.fd = None

    def _retire_due(self):
        head = self.gw._positions()[0]
        for ep in [ep for ep in self.retiring if head >= ep.mark]:
            self.retiring.remove(ep)
            self._retire_now(ep)

    def _retire_now(self, ep):
        """Close the streams of a process that is gone (behind all its frames, which are shipped now), put back
        into their channels the messages received for it that it never took, destroy its reply channel."""
        for sid in list(ep.sids):
            o = self.outs.get(sid)
            if o is not None:
                self._close_out(o, forward=True)
        ch = self.replies.pop(ep.reply, None)
        if ch is None:
            try:
                ch = Channel.attach(ep.reply)
            except (ChannelError, TypeError):
                ch = None
        if ch is not None:
            items = []  # what is in the reply channel, then what waited here to go in, as bytes
            while True:
                try:
                    m = ch.recv_message(timeout=0)
                except (ChannelEmpty, ChannelError):
                    break
                items.append(bytes(m))
                m.release()
            self._putback_answers(items)
            self._lost_answers(self.pending_rep.pop(ch, ()))
            try:
                ch.destroy()
            except ChannelError:
                ch.close()
        for sid in list(ep.sids):
            o = self.outs.get(sid)
            if o is not None:
                o.read_past = True
                self._forget_if_done(o)
        del self.eps[ep.reply]

    def _lost_answers(self, frames):
        """Answers that cannot go into their reply channel (bytes or pool blocks; a NEXT header's payload is the
        one behind it): the data among them goes back to its channels, the blocks are freed."""
        items = []
        for f in frames:
            for x in (f.hdr, f.body) if type(f) is _Body else (f,):
                if x is not None:
                    items.append(bytes(x) if isinstance(x, (bytes, bytearray)) else bytes(memoryview(x)))
                    self._free(x)
        self._putback_answers(items)

    def _putback_answers(self, items):
        """The answers a process never read (frames as bytes; a NEXT header's payload is the item behind it): the
        data among them goes back to the channels it was taken from."""
        i = 0
        while i < len(items):
            kind, flags, _node, n, sid, _seq = _HDR.unpack_from(items[i])
            if flags & W.NEXT:
                body = items[i + 1] if i + 1 < len(items) else None
                i += 2
            else:
                body = memoryview(items[i])[_HS : _HS + n]
                i += 1
            o = self.outs.get(sid)
            if kind == W.DATA and body is not None and o is not None:
                self._putback(o, body, flags)

    def _closed_sent(self, ch, frame):
        """A CLOSED frame went into a process's reply channel: once the process has read up to here, it has
        seen every answer of that stream."""
        o = self.outs.get(W.U64.unpack_from(frame, 8)[0])
        if o is not None:
            o.until = ch._positions()[1]
            self._forget_if_done(o)

    def _queue_reply(self, q, frame):
        if isinstance(frame, bytes) and frame[0] == W.ACK:  # coalesce: a later ACK covers an earlier one
            sid = frame[8:16]
            for i, f in enumerate(q):
                if isinstance(f, bytes) and f[0] == W.ACK and f[8:16] == sid:
                    q[i] = frame
                    return
        q.append(frame)

    @staticmethod
    def _free(frame):
        if frame is not None and not isinstance(frame, (bytes, bytearray)):
            try:
                frame.pool.free(frame)
            except Exception:
                pass

    def _retry_replies(self):
        for ch in list(self.pending_rep):
            q = self.pending_rep[ch]
            try:
                if len(ch) >= ch.capacity:  # still full: do not pay for a ChannelFull every loop
                    continue
            except ChannelError:
                pass  # gone: the send below says so and cleans up
            while q:
                f = q[0]
                try:
                    m = f.body if type(f) is _Body else f
                    if isinstance(m, (bytes, bytearray)):
                        ch.send(m, timeout=0)
                    else:
                        ch.send_block(m, timeout=0)
                except ChannelFull:
                    break
                except ChannelError:  # the reply channel is gone
                    self._lost_answers(q)
                    q.clear()
                    for reply, c in list(self.replies.items()):
                        if c is ch:
                            self._reply_gone(reply)
                    break
                q.popleft()
                if type(f) is bytes:
                    if f[1] & W.NEXT and q:  # its payload is next: keep the header with it until it is in
                        q[0] = _Body(f, q[0])
                    elif f[0] == W.CLOSED:
                        self._closed_sent(ch, f)
            if not q:
                del self.pending_rep[ch]

    # ---- nodes and control --------------------------------------------------------------------------------
    def _ctrl(self, dest, body):
        self._emit(dest, _HDR.pack(W.CTRL, 0, dest, len(body), 0, 0) + body)

    def announce_down(self, node):
        """Tell every agent (this one too) that node is dead (thread-safe)."""
        self.post(self._announce_down, node)

    def _announce_down(self, node):
        for k in range(len(self.ranks)):
            if k != node and k not in self.dead:
                self._emit(k, _HDR.pack(W.NODE_DOWN, 0, node, 0, 0, 0))

    def _node_down(self, node):
        if node in self.dead:
            return
        self.dead.add(node)
        text = f"node {node} is down"
        for o in list(self.outs.values()):
            if o.dest == node:
                if o.closed:  # nothing more comes from there
                    o.far_closed = True
                    self._forget_if_done(o)
                else:
                    self._fail_local(o.sid, 0, text)
        for key, s in list(self.ins.items()):
            if s.src == node:
                for item in s.sendq:  # big payloads that will never finish arriving
                    if type(item) is _Pending:
                        try:
                            item.req.Cancel()
                        except Exception:
                            pass
                        if item in self.irecvs:
                            self.irecvs.remove(item)
                s.sendq.clear()
                self._drop_in(s)
        self.out.pop(node, None)
        self.bigs.pop(node, None)
        if self.on_node_down is not None:
            try:
                self.on_node_down(node)
            except Exception:
                if self.log:
                    self.log.exception("node-down callback")


def _timer_slack(ns):
    """Let this thread's short sleeps end on time (Linux adds 50 us to every timed sleep by default)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
    except Exception:
        pass


def _guarded(agent):
    """The agent's thread: an exception that ends the loop is noted in agent.failed (the launcher reports it)."""
    try:
        agent.run()
    except BaseException as e:
        agent.failed = agent.failed or f"{type(e).__name__}: {e}"
        raise


def _profiled(agent, path):
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(_guarded, agent)
    finally:
        prof.dump_stats(f"{path}.{agent.node}")


def _keep_freed_memory():
    """The agent builds a packet of up to PACKET_MAX bytes for every batch and frees it when MPI has sent it: with
    glibc's defaults each one is a fresh mmap (or heap trimmed back), and the kernel faults in and zeroes every
    page of every packet again (a third of a streaming agent's time, measured). Keep freed memory in the heap."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD: blocks below 16 MiB come from the heap
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: give the heap back only above 64 MiB free
    except Exception:
        pass


def start_thread(agent):
    """Run the agent's loop in a daemon thread (DRAGON_AGENT_PROFILE=path: profile it into path.<node>)."""
    _keep_freed_memory()
    path = os.environ.get(env.AGENT_PROFILE)
    if path:
        t = threading.Thread(target=_profiled, args=(agent, path), name="dragon-transport-agent", daemon=True)
        t.start()
        return t
    t = threading.Thread(target=_guarded, args=(agent,), name="dragon-transport-agent", daemon=True)
    t.start()
    return t


def idle_cpu(seconds=1.0, pid=None):
    """CPU seconds per second that process pid (default: this one) used over the next seconds (for tests)."""
    pid = os.getpid() if pid is None else pid

    def cpu():
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    a = cpu()
    time.sleep(seconds)
    return (cpu() - a) / seconds
