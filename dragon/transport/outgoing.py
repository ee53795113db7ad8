"""What this node's transport agent keeps for the processes of its node: their streams to other nodes'
channels (an ``_Out`` per stream: where its answers go), their reply channels, and the processes themselves
(an ``_Ep`` each, watched with a pidfd). Owned by the agent's thread; ``Outgoing`` is the part of ``Agent``
that keeps them.

Answers (ACK, DATA, RESULT, ERR) coming back are put into the requesting process's reply channel; an answer
that does not fit waits here (ACKs coalesce, so that too is bounded). Nothing a process sent is lost with the
process, and nothing taken from a channel for it is dropped: once the process is gone, by any ending, or says
BYE, or its reply channel is, the agent *retires* it: when the gateway has been read past every frame it wrote
(the ring's tail at that moment), it closes its streams behind those frames, puts back into their channels the
messages received for it that it never took (PUTBACK), and destroys its reply channel. A closed stream stays
known here (a tombstone) until nothing more can come for it, so an answer that arrives late goes back to its
channel too.
"""

import collections
import os
import select
import time

from dragon._core import frames as W
from dragon._core.core import Channel
from dragon._core.remote import pid_namespace, start_time
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, PoolError

REAP_EVERY = 0.05  # how often the agent looks for processes of its node that are gone (a poll of pidfds)
SWEEP_EVERY = 1.0  # ... and, for processes it could not open a pidfd for, reads their /proc/<pid>/stat

_HDR = W.HDR
_HS = W.HSIZE
_PIDNS = pid_namespace()


class _Out:
    """A stream leaving here: where its answers go, and where a message received for it goes back to (target).

    Once closed (by the process, or when the process is gone) it stays as a tombstone until nothing more can
    come for it: the channel's agent has answered CLOSED (far_closed), and the process has read past the
    CLOSED frame put into its reply channel (read_past), or the process was retired."""

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


class _Body:
    """The payload of a NEXT header that went into a reply channel, waiting here for room behind it (the
    header is kept for the case where the payload must go back to its channel instead)."""

    __slots__ = ("body", "hdr")

    def __init__(self, hdr, body):
        self.hdr, self.body = hdr, body


class Outgoing:
    """The agent's side of this node's processes (mixed into Agent: self is the agent)."""

    def _init_outgoing(self):
        self.outs = {}  # sid -> _Out
        self.replies = {}  # reply sdesc -> Channel
        self.pending_rep = collections.OrderedDict()  # reply Channel -> deque of frames that did not fit
        # reply Channel -> {position of a NEXT payload in it: its header}: a process that dies between taking
        # a header and its payload leaves the payload first in its channel, which only this says how to read
        self.next_at = {}
        self.eps = {}  # reply sdesc -> _Ep: the processes of this node with streams
        self.ep_fds = {}  # pidfd -> _Ep
        self.poller = select.poll()
        self.next_reap = 0.0
        self.next_sweep = 0.0
        self.retiring = []  # _Ep found gone, retired once the gateway is read past their mark
        self.lingering = set()  # closed _Out whose far end has closed, waiting for the process to read past

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

    def _fail_local(self, sid, seq, text):
        o = self.outs.get(sid)
        if o is not None:
            self._to_reply(o, W.err_frame(sid, seq, ChannelError, text))

    def _putback(self, o, body, flags=0):
        """A message received for stream o that its process will not take: back to its channel's node."""
        if o.dest in self.dead or o.dest >= len(self.ranks):
            return  # the channel went with its node
        payload = W.prefix_sdesc(o.target, body)
        self._emit(o.dest, _HDR.pack(W.PUTBACK, flags & W.MANY, o.dest, len(payload), 0, 0) + payload)

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
            for i, f in enumerate((frame, body)):  # noqa: B007 (i, after the loop, says which part failed)
                if f is None:
                    break
                if isinstance(f, (bytes, bytearray)):
                    ch.send(f, timeout=0)
                else:
                    ch.send_block(f, timeout=0)
                if i == 0 and body is not None:
                    self._payload_next(ch, frame)
            if type(frame) is bytes and frame[0] == W.CLOSED:
                self._closed_sent(ch, frame)
            elif not isinstance(frame, (bytes, bytearray)) or frame[0] != W.ACK:
                # an answer the process waits for (a pool block: a big one); acks it takes when it likes
                self.handed = True
        except ChannelFull:
            q = [frame] if body is None else [frame, body] if i == 0 else [_Body(frame, body)]
            self.pending_rep[ch] = collections.deque(q)
        except ChannelError:  # the reply channel is gone
            self._lost_answers([frame, body])
            self._reply_gone(o.reply)

    def _payload_next(self, ch, header):
        """A NEXT header went into reply channel ch: its payload will be the message right behind it (the
        agent is the channel's only sender and sends nothing in between). Remember where, with the header,
        and forget what the process has taken since."""
        try:
            head, tail = ch._positions()
        except ChannelError:  # (the handle is gone: nothing is put back from it)
            return
        at = self.next_at.get(ch)
        if at is None:
            at = self.next_at[ch] = {}
        at[tail] = bytes(header)
        if len(at) > 2 * ch.capacity:
            for pos in [p for p in at if p < head]:
                del at[pos]

    def _reply_gone(self, reply):
        """A process's reply channel is gone (or was never valid): retire the process."""
        ep = self.eps.get(reply)
        if ep is not None:
            self._retire(ep)

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
                if ep.fd is None and not ep.foreign and ep.mark is None and start_time(ep.pid) != ep.start:
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
        """Close the streams of a process that is gone (behind all its frames, which are shipped now), put
        back into their channels the messages received for it that it never took, destroy its reply
        channel."""
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
            at = self.next_at.pop(ch, None)
            try:
                first = ch._positions()[0]
            except ChannelError:
                first = None
            while True:
                try:
                    m = ch.recv_message(timeout=0)
                except (ChannelEmpty, ChannelError):
                    break
                items.append(bytes(m))
                m.release()
            if items and at and first in at:  # it died between a header and its payload: the header again
                items.insert(0, at[first])
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
        """Answers that cannot go into their reply channel (bytes or pool blocks; a NEXT header's payload is
        the one behind it): the data among them goes back to its channels, the blocks are freed."""
        items = []
        for f in frames:
            for x in (f.hdr, f.body) if type(f) is _Body else (f,):
                if x is not None:
                    items.append(bytes(x) if isinstance(x, (bytes, bytearray)) else bytes(memoryview(x)))
                    self._free(x)
        self._putback_answers(items)

    def _putback_answers(self, items):
        """The answers a process never read (frames as bytes; a NEXT header's payload is the item behind it):
        the data among them goes back to the channels it was taken from."""
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
                        self._payload_next(ch, f)
                    elif f[0] == W.CLOSED:
                        self._closed_sent(ch, f)
            if not q:
                del self.pending_rep[ch]
