"""The streams that arrive at this node's transport agent: other nodes' processes' handles to channels of this
node (an ``_In`` per stream). Owned by the agent's thread; ``Incoming`` is the part of ``Agent`` that keeps
them.

- SEND frames go into the target channel, in arrival order per stream; a full channel keeps the rest of the
  stream queued here (bounded by the sender's window) and retried; cumulative ACKs go back as messages land.
- RECV-type requests are served oldest first per stream; one that cannot be served yet waits here (not
  blocking the loop, nor the stream's later requests: another thread's) until it can or until its timeout, and
  is answered exactly once.
- PUTBACK: messages taken from a channel of this node for a receive nobody waits for any more come back and go
  into it again, at its tail.
"""

import collections
import time

import msgpack

from dragon._core import frames as W
from dragon._core.core import Channel, sdesc_info
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout, PoolError

ACK_EVERY = 64  # acknowledge a stream's deliveries once this many are unacknowledged ...
ACK_DELAY = 0.0002  # ... or the oldest has waited this long ...
ACK_RIDE = 8  # ... or a packet goes to its node anyway and this many are unacknowledged
ACK_BYTES = 2 << 20  # ... or this many bytes of big payloads (a quarter of the sender's byte window) landed

_HDR = W.HDR
_HS = W.HSIZE
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


class _Pending:
    """A big payload still arriving (MPI Irecv) in a stream's queue: later messages of the stream wait behind
    it."""

    __slots__ = ("buf", "req")

    def __init__(self, req, buf):
        self.req, self.buf = req, buf


class _Req:
    __slots__ = ("deadline", "max_n", "maxlen", "mode", "nonblock", "seq")

    def __init__(self, seq, mode, max_n, maxlen, timeout):
        self.seq, self.mode, self.max_n, self.maxlen = seq, mode, max_n, maxlen
        self.nonblock = timeout == 0
        self.deadline = None if timeout < 0 else time.monotonic() + timeout


class Incoming:
    """The agent's streams from other nodes (mixed into Agent: self is the agent)."""

    def _init_incoming(self):
        self.ins = {}  # (src node, sid) -> _In
        self.pending_in = set()  # _In with queued sends or waiting requests
        self.ack_due = set()
        self.ack_check_at = 0.0  # when the oldest waiting ack is due by ACK_DELAY (an idle step looks then)
        self.irecvs = []  # [_Pending] big payloads being received
        self.backq = {}  # channel sdesc -> deque of messages to put back into that channel of this node
        self.back_chs = {}  # channel sdesc -> Channel (attached for PUTBACK)
        self.tmp = bytearray(0)

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
                self.handed = True
        if k < len(run):
            s.sendq.extend(bytes(x) for x in run[k:])
            self.pending_in.add(s)

    def _in_open(self, src, sid, payload):
        s = self.ins[(src, sid)] = _In(src, sid)
        k = W.U16.unpack_from(payload, 0)[0]
        try:
            s.ch = self._attach_here(bytes(payload[2 : 2 + k]))
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
            ch = self.back_chs[sdesc] = self._attach_here(sdesc)
        return ch

    def _attach_here(self, sdesc):
        """Attach a channel of this node for another node's frames. One of another node is refused: attach
        would reach it through this node's agent, i.e. this thread, which would then wait on itself."""
        node = sdesc_info(sdesc)[0]
        if node != self.node:
            raise ChannelError(f"the channel is on node {node}, not on node {self.node} (a misrouted frame)")
        return Channel.attach(sdesc)

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
                self.handed = True
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
        """Try the stream's waiting requests, oldest first (the oldest waiting receive gets the next message);
        True when none is left waiting. One that must wait keeps its place but does not hold up those behind
        it: the handle's other threads may ask with timeout 0 or a shorter timeout, or ask for len."""
        q = s.recvq
        i = 0
        while i < len(q):
            if self._serve_one(s, q[i]):
                del q[i]
            else:
                i += 1
        return not q

    def _serve_one(self, s, r):
        """Answer request r of stream s, or False if it must wait (for a message, or its timeout)."""
        ch = s.ch
        mode = r.mode
        try:
            if mode == W.M_RECV or mode == W.M_INTO:
                if mode == W.M_INTO:
                    # (no message is bigger than its pool: a bigger buffer would only cost this agent memory)
                    maxlen = max(0, min(r.maxlen, ch.pool.size))
                    if len(self.tmp) < maxlen:
                        self.tmp = bytearray(maxlen)
                    k = ch.recv_into(memoryview(self.tmp)[:maxlen], timeout=0)
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
        except Exception as e:  # (a forged request): answered and dropped, not left to raise at every step
            self._refuse(None, f"request {r.seq} (mode {mode}) of a stream from node {s.src}: {e!r}")
            self._err(s, r.seq, ChannelError, f"a bad request: {type(e).__name__}")
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
                self.handed = True
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
        """Acknowledge deliveries, lazily: an ack rides along with other frames to the stream's node when
        there are any and ACK_RIDE deliveries wait for it, else it waits for ACK_EVERY deliveries, ACK_BYTES
        of big payloads or ACK_DELAY (the sender's window is 512 messages / 8 MiB, so a late ack costs it
        nothing while it keeps sending; a ping-pong pays an ack packet of its own only when ACK_DELAY passes
        before ACK_RIDE answers, a stream of big payloads one per ACK_BYTES). Not one per answer: each ack is
        a frame the far agent puts into the sender's reply channel before it yields to the sender, on the
        round trip's path (8 B ping-pong through the agents: mean round trip 12-14% shorter with ACK_RIDE 8
        than with an ack on every answer)."""
        now = time.perf_counter()
        out = self.out
        done = None
        oldest = now  # the oldest wait of the acks left due (one pass: this runs at every busy step)
        for s in self.ack_due:
            k = s.delivered - s.acked
            if k > 0:
                t = s.ack_t
                if not t:
                    t = s.ack_t = now
                if not (
                    (k >= ACK_RIDE and s.src in out)
                    or now - t >= ACK_DELAY
                    or k >= ACK_EVERY
                    or s.ack_bytes >= ACK_BYTES
                ):
                    if t < oldest:
                        oldest = t
                    continue
                s.acked = s.delivered
                s.ack_t = 0.0
                s.ack_bytes = 0
                self._emit(s.src, _ack_pack(W.ACK, 0, 0, 0, s.sid, s.delivered))
            if done is None:
                done = [s]
            else:
                done.append(s)
        if done is not None:
            for s in done:
                self.ack_due.discard(s)
        self.ack_check_at = oldest + ACK_DELAY
