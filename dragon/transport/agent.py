"""The transport agent: one per node, the only code of the runtime that speaks MPI.

Processes of this node put frames (see ``dragon._core.frames``) into the node's gateway channel. The
agent batches the frames for each destination node into one MPI packet (payloads above ``BIG_MIN`` follow as
their own MPI message, sent straight from the staging pool block), and delivers what other agents send it:

- what arrives for channels of this node (SEND, RECV-type requests, PUTBACK) is the business of
  ``dragon.transport.incoming`` (the streams from other nodes, ``Incoming``);
- what this node's processes opened, the answers that come back for them, and the processes themselves
  (watched, and retired when gone, so that nothing they sent or were sent is lost) that of
  ``dragon.transport.outgoing`` (``Outgoing``).

The ``Agent`` class is the loop, MPI, the packets and the nodes; it mixes in those two, which own their state.

The loop never blocks in MPI. It spins (yielding the CPU) while there is work or an MPI send in flight; while
it only ships big payloads out and hears only acknowledgements back (this node streams out, no answer is
awaited) it sleeps ``NAP`` between polls instead, leaving the core to the processes it serves; when idle it
backs off to sleeping on the gateway channel's futex (a local request wakes it at once; a remote one is
noticed within ``MAX_IDLE_WAIT``, or ``LONG_IDLE_WAIT`` after a second of idleness), so an idle agent costs
about 1% of a core.

A payload in a staging block (PTR frame) up to ``BIG_MIN`` is copied into the packet and the block freed at
once; a bigger one goes as its own MPI message straight from the block, and the receiving agent posts its
receive straight into a block of the target channel's pool, which it then hands to the channel
(``send_block``): no copy but MPI's own. Several such payloads are in flight at once (up to the sender's
window).
"""

import collections
import os
import threading
import time

from dragon import env
from dragon._core import core
from dragon._core import frames as W
from dragon.errors import ChannelEmpty, ChannelError
from dragon.transport import incoming
from dragon.transport.incoming import Incoming, _Pending
from dragon.transport.outgoing import Outgoing

SPIN = 0.002  # keep polling this long after the last piece of work
MAX_IDLE_WAIT = 0.002  # longest sleep of an idle agent (latency of the first remote frame after a pause)
LONG_IDLE_WAIT = 0.01  # ... once it has been idle for a second
PENDING_WAIT = 0.0005  # longest sleep while requests wait here for their channel
MAX_INFLIGHT = 256  # MPI sends in flight beyond which the agent reads no more frames from its gateway
BIG_INFLIGHT = 16  # big payloads in MPI's hands per destination node; the next ones wait here, in order
MPI_BUDGET = 0.00005  # longest run of incoming packets handled before the agent acks and sends what it has
MAX_ERRORS_IN_ROW = 100  # a step that raises this often in a row stops the agent (the launcher says so)
FINISH_WAIT = 5.0  # longest a stopping agent waits for the other agents' LAST and its sends and receives
NAP = 0.00005  # a spinning agent that hears only acks from other nodes sleeps this long between polls instead

_HDR = W.HDR
_HS = W.HSIZE
_FROM_PROCESSES = frozenset((W.OPEN, W.SEND, W.RECV, W.CLOSE, W.PUTBACK, W.BYE))  # what a gateway accepts


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


class Agent(Incoming, Outgoing):
    def __init__(self, comm, node, node_ranks, gateway, pool, log=None):
        """comm: an MPI communicator; node: this node's index; node_ranks[k]: the rank of node k's agent;
        gateway: this node's gateway Channel; pool: this node's infrastructure Pool (reply channels live
        there)."""
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
        self.sends = []  # [(Request, keepalive, dest node of a big payload or -1)] MPI sends in flight
        self.big_wait = {}  # dest node -> deque of (buffer, keepalive): big payloads not yet given to MPI
        self.big_flying = collections.Counter()  # dest node -> big payloads in MPI's hands
        self.dead = set()
        self.posted = collections.deque()
        self._init_incoming()
        self._init_outgoing()
        self.on_ctrl = None  # callback(src node, bytes) for CTRL frames (the launcher decodes them)
        self.on_node_down = None  # callback(node) when a node is announced dead
        self.heartbeat = None  # (interval, dead_after) seconds: beat to every node, declare silent ones down
        self.next_beat = 0.0
        self.last_seen = {}  # node -> monotonic time of its last packet
        self.down_why = {}  # node -> why this agent declared it down
        self.running = False
        self.failed = None  # why the loop ended by itself (None: stopped, or still running)
        self.last_from = set()  # nodes whose agent sent its LAST frame (it stopped)
        self.last_peers = None  # at stop: the nodes whose LAST this agent awaits (None: every live one)
        self.handed = False  # the last step put a message or an answer into a channel of this node
        self.urgent_at = 0.0  # last time a frame someone waits on came in or went out (not acks, big ones)
        self.rbuf = bytearray(1 << 20)
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

    def stop(self, peers=None):
        """End the loop (thread-safe). The agent then sends every other agent its LAST frame behind its last
        packet and keeps receiving until it has the LAST of peers (default: every node not known dead) and
        its MPI sends and receives are done, for at most FINISH_WAIT seconds: a peer stopping later would
        otherwise still send it what no one receives (see _finish)."""
        self.post(self._stop, peers)

    def _stop(self, peers=None):
        if peers is not None:
            self.last_peers = set(peers)
        self.running = False

    # ---- loop ---------------------------------------------------------------------------------------------
    def run(self):
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
                if self.handed:
                    # a process of this node was handed what it waits for: let it run now (on a node with
                    # fewer cores than busy processes it shares our CPU; the next step would cost its answer
                    # ~1 us a hop: 8 B round trip 30.5 -> 29.3 us, 7 pairs of 8 better)
                    self.handed = False
                    yield_cpu()
                continue
            if self.irecvs:
                # MPI progress is what moves big payloads into our blocks (MPI's one copy, done by this
                # thread): keep calling it without giving the core away, this is the stream's bottleneck
                continue
            now = perf()
            if self.sends or now - idle_since < SPIN:
                if now - self.urgent_at < SPIN or len(self.sends) >= MAX_INFLIGHT:
                    # spinning, but let the processes we serve have the core (2 cores, 4 busy ones); also
                    # while the gateway waits for MAX_INFLIGHT sends to finish (see them end at once)
                    yield_cpu()
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
                wait = min(wait, incoming.ACK_DELAY)
            self.stats["sleeps"] += 1
            try:
                self.gw.poll(timeout=wait)
            except ChannelError as e:
                if self.running:
                    self.failed = f"its gateway channel is gone ({e})"
                self.running = False
        self._finish()
        for fd in self.ep_fds:
            os.close(fd)
        self.ep_fds.clear()

    def _step(self):
        # (with MAX_INFLIGHT sends in flight the gateway waits: its senders block, the agent keeps receiving)
        work = (self._gateway() if len(self.sends) < MAX_INFLIGHT else 0) + self._mpi()
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
        if self.ack_due and (work or self.out or time.perf_counter() >= self.ack_check_at):
            # (a step that delivered or sends something looks at the acks; an idle one only once one can be
            # due by time: _acks at every idle step cost a ping-pong's agents ~2 us a round trip each)
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

    def _finish(self):
        """The loop has ended: stop in step with every other agent. This agent sends each of them its LAST
        frame behind what it built, then reads no gateway and sends no packet more, but keeps taking in what
        they send and finishing its own MPI sends (big payloads announced earlier) and receives until every
        awaited peer's LAST came and nothing is in flight, for at most FINISH_WAIT seconds. An agent that
        stopped without the other's LAST would leave it sending what no one receives: a big send is sent only
        once its receiver posts the receive (MPICH's shared memory: the two agents then waited for each other
        until MPI_Cancel, which crashed the rank), and over TCP a cancelled one left a rank's final barrier
        waiting for good. What is left after the deadline (a node that stopped for good) is cancelled."""
        others = set(range(len(self.ranks))) - {self.node}
        for k in others:  # (to nodes declared down too: the launchers' goodbyes go there, so may this)
            self._emit(k, _HDR.pack(W.LAST, 0, k, 0, 0, 0))
        others -= self.dead
        try:
            self._flush_all()
        except Exception:
            if self.log:
                self.log.exception("transport agent, its last packets")
        await_ = others if self.last_peers is None else others & self.last_peers
        deadline = time.monotonic() + FINISH_WAIT
        while time.monotonic() < deadline:
            receiving = any(not p.req.Test() for p in self.irecvs)  # (a full channel may keep them listed)
            if not (self.sends or receiving or self.big_wait or await_ - self.last_from - self.dead):
                break
            try:
                work = self._mpi()
                if self.pending_in:
                    work += self._retry_in()
                if self.sends:
                    self._test_sends()
            except Exception:  # (the loop is over: what cannot finish now is cancelled below)
                if self.log:
                    self.log.exception("transport agent, finishing its sends")
                break
            self.out.clear()  # (answers and acks for agents that stop too: no packet follows LAST)
            if not work:
                os.sched_yield()
        for req, _keep, _dest in self.sends:
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
            try:
                req = self.comm.Isend([pkt, len(pkt), MPI.BYTE], rank, W.TAG_PKT)
            except MPI.Exception as e:
                self._unreachable(dest, e, bigs)
                return
            if not req.Test():  # (a small one is sent at once: it need not be tested again, step after step)
                self.sends.append((req, pkt, -1))
        if bigs:
            q = self.big_wait.get(dest)
            if q is None:
                q = self.big_wait[dest] = collections.deque()
            q.extend(bigs)
            self._send_bigs(dest)
        self.stats["packets"] += 1

    def _send_bigs(self, dest):
        """Give MPI the big payloads waiting for dest, in order, while fewer than BIG_INFLIGHT of them are in
        its hands. Their headers went ahead in packets: the receiving agent's receives for them wait until
        they come (MPI matches them in order). Handing MPI every one at once costs more than it brings: with
        ~130 sends of 64 KiB in flight to one rank, MPICH's shared-memory path moved 1.5 GB/s between two
        agents, with 16 4.2 GB/s (mpi4py alone: 41 k vs 95-102 k msg/s with 128 vs 4-32 in flight)."""
        q = self.big_wait.get(dest)
        rank = self.ranks[dest]
        byte = self.MPI.BYTE
        while q and self.big_flying[dest] < BIG_INFLIGHT:
            buf, keep = q.popleft()
            try:
                req = self.comm.Isend([buf, len(buf), byte], rank, W.TAG_BIG)
            except self.MPI.Exception as e:
                self._unreachable(dest, e, [(buf, keep)])
                return
            self.sends.append((req, keep, dest))
            self.big_flying[dest] += 1
        if not q:
            self.big_wait.pop(dest, None)

    def _unreachable(self, dest, e, bigs):
        """MPI refused a send to node dest's agent (its rank is gone, the network says so): the node is down
        now, not after the heartbeats' silence; bigs (the payloads that came with the send) are freed."""
        for _buf, keep in bigs or ():
            if hasattr(keep, "release"):
                keep.release()
        cause = [line.strip() for line in str(e).splitlines() if line.strip()]
        self.down_why.setdefault(dest, f"MPI cannot reach its transport agent: {cause[-1] if cause else e}")
        self._node_down(dest)

    def _test_sends(self):
        sends = self.sends
        reqs = [x[0] for x in sends]
        done = self.MPI.Request.Testsome(reqs)
        if done:
            keep = set(done)
            left = []
            room = False
            for i, x in enumerate(sends):
                if i in keep:
                    k = x[1]
                    if hasattr(k, "release"):
                        k.release()
                    if x[2] >= 0:
                        self.big_flying[x[2]] -= 1
                        room = True
                else:
                    left.append(x)
            self.sends = left
            if room and self.big_wait:
                for dest in list(self.big_wait):
                    self._send_bigs(dest)

    def _mpi(self):
        """Take the packets other agents sent, for at most MPI_BUDGET seconds: the rest of the step (acks, the
        packets this node sends) must not wait behind a queue of big payloads, each one MPI copy long.

        A probe that finds nothing is probed again at once: MPI's progress engine runs inside the failed probe
        and often takes a packet in from the wire only then, and only the next probe finds it. Measured with
        MPICH 5 (ch4) between two ranks of this host: a receiver polling every 10 us found a message 20 us
        after it was sent with one probe per poll, 12 us with two (every 20 us: 40 vs 16 us); the agent
        polls every 8-14 us while it shares its CPU with the processes it serves; a second probe costs 0.4 us.
        """
        comm, st, MPI = self.comm, self.status, self.MPI
        improbe, anysrc, tag = comm.Improbe, MPI.ANY_SOURCE, W.TAG_PKT
        n = 0
        busy = 0  # packets with more than heartbeats in them: the work this step did
        until = 0.0
        while True:
            if n and time.perf_counter() > until:
                return busy
            msg = improbe(anysrc, tag, st)
            if msg is None:
                if n:
                    return busy
                msg = improbe(anysrc, tag, st)
                if msg is None:
                    return 0
            if not n:
                until = time.perf_counter() + MPI_BUDGET
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
            busy += self._packet(src, memoryview(self.rbuf)[:count], src_rank)

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
                        raise ValueError(
                            f"a staging block of {blk.size} bytes cannot hold the {ln} it claims"
                        )
                    if (
                        ln <= W.BIG_MIN
                    ):  # not worth an MPI message (and its handling) of its own: into the packet
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

    def _refuse(self, data, why):
        """A frame the agent will not act on (from a process, or a process's payload that another agent
        forwarded): logged (the first few, then every 1000th)."""
        self.stats["refused"] += 1
        n = self.stats["refused"]
        if self.log and (n <= 10 or n % 1000 == 0):
            self.log.error("refused a frame (%d so far): %s", n, why)

    def _free_ptr(self, data):
        _Free(self.pool, W.U64.unpack_from(data, _HS)[0]).release()

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
        busy = False  # a packet of heartbeats only is no work: an idle agent stays idle (its CPU use)
        while pos < end:
            kind, flags, node, n, sid, seq = unpack(mv, pos)
            if not urgent and kind != ack and kind != beat:
                urgent = True
            if kind != beat:
                busy = True
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
                elif kind == W.LAST:
                    self.last_from.add(src)
                elif kind == W.CTRL and self.on_ctrl is not None:
                    self.on_ctrl(src, bytes(payload))
            except (
                Exception
            ) as e:  # (a process wrote the payload: a bad one costs its own frame, not the packet)
                self._refuse(payload, f"kind {kind} from node {src}: {type(e).__name__}: {e}")

        if run:
            self._in_send_run(src, run_sid, run)
        if urgent:
            self.urgent_at = time.perf_counter()
        return busy

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
        for _key, s in list(self.ins.items()):
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
        for _buf, keep in [*self.bigs.pop(node, ()), *self.big_wait.pop(node, ())]:  # (never to be sent)
            if hasattr(keep, "release"):
                keep.release()
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
    """The agent's thread: an exception that ends the loop is noted in agent.failed (the launcher reports
    it)."""
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


def start_thread(agent):
    """Run the agent's loop in a daemon thread (DRAGON_AGENT_PROFILE=path: profile it into path.<node>)."""
    # The agent builds a packet of up to PACKET_MAX bytes for every batch and frees it when MPI has sent it:
    # with glibc's defaults each one is a fresh mmap (or heap trimmed back), and the kernel faults in and
    # zeroes every page of every packet again (a third of a streaming agent's time, measured).
    core.keep_freed_memory(force=True)
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
