"""A channel that lives on another node, used through this node's transport agent with the Channel API.

``Channel.attach(sdesc)`` of a channel whose sdesc names another node returns a ``RemoteChannel``: it has the
API of a local ``dragon._core.core.Channel`` (both satisfy ``ChannelLike``) (send / send_block / send_many /
recv / recv_message / recv_many / recv_into / poll / len / flush / close / destroy, capacity / block_size /
name / pool) with the same timeouts and exceptions. Where a remote channel differs:

- ``pool`` is this node's *staging* pool (the node's infrastructure pool), not the channel's own pool (which
  lives on the other node and cannot be mapped here): ``send_block`` takes a block of it, so
  ``ch.pool.alloc(n)``, fill, ``ch.send_block(blk)`` is zero-copy on this side for a local and a remote
  channel alike. A block sent this way belongs to the transport (the agent sends it over MPI straight from the
  block and frees it); the core gives Python no way to mark the Block object as sent, so using or freeing it
  afterwards is a bug this handle cannot catch (small blocks are copied and freed at once, which does mark
  them).
- ``recv_message`` returns a core ``Message``: a payload that arrives over MPI lands in a block of the staging
  pool and the Message is that block (zero copy, freed at ``release()``), as for a local channel.
- ``destroy()`` destroys the channel on its node (the remote agent calls ``Channel.destroy``); like the local
  call it bypasses global services' bookkeeping, so channels made through global services should be destroyed
  with ``dragon.globalservices.channel.destroy``.

Each handle is one *stream* (random 64-bit id): its frames go into this node's gateway channel, the agent
ships them to the channel's node, whose agent performs them on the real channel and sends the answers back
into this process's transport reply channel. Sends above ``PTR_MIN`` are copied once into a staging block (or
handed over as one, ``send_block``) whose offset the gateway frame carries; the agent ships it from there.

Sends are windowed: a send returns once its message is in the gateway (it will be delivered exactly once, in
order, unless the channel is destroyed or its node dies; that is then reported by a later call on the handle),
whatever the process does next: the agent ships what is in the gateway after the process is gone too, and
closes its streams only behind their last frames. A clean exit (atexit) waits, bounded, until every send has
landed (``Endpoint.flush_all``), so that a join of the process finds its messages in their channels; a
handle closed with sends unacknowledged keeps its stream open until they are. At most ``WINDOW`` messages
(and ``WINDOW_BYTES``) of a stream are unacknowledged; a send that finds the window full waits for the remote
agent's acknowledgements, so a full remote channel stops the sender after at most a window (timeout 0:
ChannelFull, t: ChannelTimeout, None: wait). Receives, poll and len are request/answer: the remote agent
applies the timeout on its side and always answers exactly once (data, or timeout), so no message is lost
when a receive times out. A message taken for a receive that nobody waits for any more (interrupted by Ctrl-C
or an exception, or its handle closed, or its process gone) goes back into its channel (PUTBACK), at its
tail: it is received once, by someone, never dropped.

Every process has one ``Endpoint``: the gateway handle and its reply channel (in the node's infrastructure
pool). All threads share it (leader/follower: whoever waits and finds nobody reading reads the reply channel
and hands answers out). The process never destroys its reply channel: its node's agent does, once the process
is gone (it learns the pid from the streams' OPEN frames), after putting back what was left in it.
"""

import atexit
import itertools
import operator
import os
import sys
import threading
import time

import msgpack

from dragon import env as E
from dragon._core import frames as W
from dragon._core.core import (
    KEEP_AFTER,
    Block,
    Channel,
    Message,
    Pool,
    keep_freed_memory,
    sdesc_info,
    timeout_seconds,
)
from dragon.errors import (
    ChannelEmpty,
    ChannelError,
    ChannelFull,
    ChannelTimeout,
    PoolError,
    PoolFull,
    PoolTimeout,
)

WINDOW = 512  # unacknowledged messages per stream
WINDOW_BYTES = 8 << 20  # unacknowledged payload bytes per stream
ANSWER_GRACE = 30.0  # how much longer than its own timeout a request waits for the remote answer
# a NEXT header's payload is put right behind it by the agent: waiting this long for it means the agent died
NEXT_WAIT = 30.0
PTR_MIN = 16 * 1024  # sends above this go through a staging block the agent sends from (no copy into frames)
GW_SEND_TIMEOUT = 30.0  # a gateway that stays full this long means the agent is gone
# a send with timeout 0 waits at most this long for the handle's other sends (as for a pool's lock): a thread
# that waits for room in the window holds them up for as long as it waits
LOCK_WAIT = 0.005
EXIT_FLUSH = 60.0  # at exit, wait at most this long for sends to land (DRAGON_EXIT_FLUSH_TIMEOUT)
EXIT_NOTICE = 5.0  # ... and say so once it has waited this long
REPLY_CAPACITY = 256
REPLY_BLOCK = 512

_HDR = W.HDR


def _channel_error(payload):
    """(class, text) of an ERR frame's payload; a code that is not a channel error's reads as ChannelError."""
    cls, text = W.parse_err(payload)
    return (cls if issubclass(cls, ChannelError) else ChannelError), text


def _payload(data):
    """A bytes-like object as send() ships it: a flat byte view (a copy if it is not contiguous); TypeError
    if it is not bytes-like."""
    data = memoryview(data)
    if not data.c_contiguous:
        return data.tobytes()
    if data.itemsize != 1 or data.ndim != 1:
        return data.cast("B")
    return data


def _deadline_of(t):
    """A send's deadline from its timeout in seconds (timeout_seconds): None for ever, 0 for now, else a
    time.monotonic() time, which every wait of the call shares (no wait gets the whole timeout again)."""
    if t is None or t == 0:
        return t
    return time.monotonic() + t


def _left(t, end):
    """What is left of the call's timeout t by the deadline end (_deadline_of): a timeout in seconds for the
    next wait. A timeout that ran out leaves a positive sliver, not 0, so that the wait reports a timeout
    (ChannelTimeout), not a full channel (ChannelFull, the answer of timeout 0)."""
    if not end:
        return end if end == 0 else t
    return max(1e-6, end - time.monotonic())


def _timeout_arg(timeout):
    """A timeout by the core's rule (``core.timeout_seconds``, as a local channel reads it) -> seconds, or
    -1.0 for forever (the REQ frame's encoding)."""
    t = timeout_seconds(timeout)
    return -1.0 if t is None else t


class _Stream:
    __slots__ = (
        "abandoned",
        "acked",
        "acked_bytes",
        "close_due",
        "closed",
        "err",
        "err_cls",
        "lock",
        "node",
        "req",
        "results",
        "sdesc",
        "sent",
        "sent_bytes",
        "sid",
        "sizes",
    )

    def __init__(self, sid, node, sdesc):
        self.sid, self.node, self.sdesc = sid, node, sdesc
        self.closed = False  # the handle closed it: forgotten once the agent's CLOSED comes back
        self.close_due = False  # closed with sends unacknowledged: CLOSE goes once they are (see Endpoint)
        self.sent = 0
        self.acked = 0
        self.sent_bytes = 0
        self.acked_bytes = 0
        self.sizes = []  # payload sizes of the unacknowledged sends (window in bytes)
        self.results = {}  # request id -> (kind, flags, payload memoryview, Message)
        self.abandoned = set()  # request ids nobody waits for: their data goes back into the channel
        self.err = None
        self.err_cls = ChannelError
        self.lock = threading.Lock()
        self.req = itertools.count(1)


class Endpoint:
    """This process's connection to its node's transport agent."""

    def __init__(self):
        env = os.environ
        if E.GW_CD not in env or E.INF_PD not in env:
            raise ChannelError(
                "this channel lives on another node, and this process has no transport agent to reach it "
                "(DRAGON_GW_CD/DRAGON_INF_PD unset: not started by a multi-node dragon-launch)"
            )
        self.pid = os.getpid()
        self.node = int(env.get(E.NODE, "0"))
        self.gw = Channel.attach(E.dec(env[E.GW_CD]))
        self.pool = Pool.attach(E.dec(env[E.INF_PD]))
        self.reply = Channel.create(self.pool, capacity=REPLY_CAPACITY, block_size=REPLY_BLOCK)
        self.reply_sdesc = bytes(self.reply.sdesc)
        self.opener = W.OPENER.pack(self.pid, start_time(self.pid) or 0, pid_namespace())
        self.streams = {}
        self.closing = 0  # streams closed by their handle whose CLOSED has not come back yet
        self.close_due = set()  # streams closed by their handle whose CLOSE waits for their acknowledgements
        self.closed = False
        self.cond = threading.Condition()
        self.reading = False
        self.loop = None  # a private channel that turns bytes into a Message (rare: see as_message)
        atexit.register(self.close)

    def close(self, flush=True):
        """At exit: wait (bounded) until what this process sent has landed (flush), then end the streams and
        say BYE (the agent would find the process gone by its pid; this is sooner). The reply channel is the
        agent's to destroy: it may still hold data to put back."""
        if os.getpid() != self.pid or self.closed:
            return
        if flush:
            try:
                self.flush_all()
            except KeyboardInterrupt:
                pass  # Ctrl-C at exit: stop waiting; the agent still delivers what is in flight
            except ChannelError:
                pass  # the node's infrastructure is gone (the runtime ended): nothing more is acknowledged
        self.closed = True
        atexit.unregister(self.close)  # (dragon.shutdown(): a closed endpoint is not kept alive until exit)
        try:
            for st in list(self.streams.values()):
                if not st.closed or st.close_due:
                    self.gw.send(_HDR.pack(W.CLOSE, 0, st.node, 0, st.sid, 0), timeout=0)
            self.gw.send(
                _HDR.pack(W.BYE, 0, self.node, len(self.reply_sdesc), 0, 0) + self.reply_sdesc, timeout=0
            )
        except Exception:
            pass  # (a full gateway: the agent finds the process gone by its pid)
        if self.loop is not None:
            try:
                self.loop.destroy()
            except Exception:
                pass
            self.loop = None

    def flush_all(self):
        """Wait until every message this process sent to another node is in its channel (or its stream
        failed), for at most DRAGON_EXIT_FLUSH_TIMEOUT seconds; say on stderr what had not landed by then.

        A send returns once its message is in the transport, which delivers it whatever the process does
        next; waiting here at a clean exit makes the end of a process mean what it means on one node: whoever
        learns that the process ended (a join) finds every message it sent already in its channel. (A process
        that ends by os._exit or a signal skips this: its messages are still delivered, a little later.)"""

        def pending():
            return (st for st in self.streams.values() if st.acked < st.sent and st.err is None)

        def landed():
            return not any(pending())

        def say(what, tail=""):
            with self.cond:
                left: dict[int, int] = {}
                for st in pending():
                    left[st.node] = left.get(st.node, 0) + st.sent - st.acked
            where = ", ".join(f"{n} to node {k}" for k, n in sorted(left.items()))
            print(
                f"dragon: process {self.pid} {what} ({where}; is a channel full?){tail}",
                file=sys.stderr,
                flush=True,
            )

        with self.cond:
            if landed():
                return
        try:
            limit = E.seconds(E.EXIT_FLUSH, EXIT_FLUSH)
        except ValueError:
            limit = EXIT_FLUSH
        start = time.monotonic()
        # a long wait says what it waits for, once, so that an exit does not look hung
        if limit > EXIT_NOTICE:
            if self.wait(landed, start + EXIT_NOTICE):
                return
            say(
                f"is ending and waits (up to {E.EXIT_FLUSH}={limit:g} s) for messages it sent to land in "
                "their channels"
            )
        if not self.wait(landed, start + limit):
            say(
                f"ends with messages not yet in their channels after {limit:g} s",
                ": the transport still delivers them",
            )

    def as_message(self, data):
        """A Message holding data (bytes, or already a Message): what recv_message hands out for an answer
        that came inline in its frame."""
        if not isinstance(data, (bytes, bytearray)):
            return data
        with self.cond:
            if self.loop is None:
                self.loop = Channel.create(self.pool, capacity=1, block_size=REPLY_BLOCK)
            self.loop.send(data, timeout=0)
            return self.loop.recv_message(timeout=0)

    def _read(self, timeout, limit=64):
        """Read up to limit answers from the reply channel (waiting per timeout for the first) as (header,
        payload) pairs: a NEXT header's payload is the message right behind it."""
        got: list[tuple[Message, Message | bool | None]] = []
        recv = self.reply.recv_message
        try:
            m = recv(timeout=timeout)
        except (ChannelEmpty, ChannelTimeout):
            return got
        while True:
            nxt: Message | bool | None = None  # False: the NEXT payload did not come
            if m.nbytes >= W.HSIZE and memoryview(m)[1] & W.NEXT:
                try:
                    nxt = recv(timeout=NEXT_WAIT)
                except (ChannelEmpty, ChannelTimeout):
                    nxt = False
            got.append((m, nxt))
            if len(got) >= limit:
                return got
            try:
                m = recv(timeout=0)
            except ChannelEmpty:
                return got

    # ---- answers ------------------------------------------------------------------------------------------
    def _dispatch(self, msg, nxt=None):
        mv: memoryview | None  # None: msg is a NEXT header's payload, all of it the data
        mv = memoryview(msg)
        kind, flags, node, n, sid, seq = _HDR.unpack_from(mv)
        if flags & W.NEXT:  # the payload is its own Message
            mv.release()
            msg.release()
            if nxt is False:
                text = "the transport agent did not deliver a payload"
                mv = memoryview(W.err_frame(sid, seq, ChannelError, text))
                kind, flags, node, n, sid, seq = _HDR.unpack_from(mv)
                msg = _Bytes()
            else:
                msg = nxt
                mv = None
        st = self.streams.get(sid)
        if st is None:
            msg.release()
            return
        if kind == W.ACK:
            if seq > st.acked:
                k = seq - st.acked
                st.acked = seq
                st.acked_bytes += sum(st.sizes[:k])
                del st.sizes[:k]
            msg.release()
            if st.close_due and st.acked >= st.sent:
                self.send_close(st)
        elif kind == W.CLOSED:  # the agent has closed the stream: every answer of it came before this
            del self.streams[sid]
            if st.closed:  # (not one that Endpoint.close ended at exit)
                self.closing -= 1
            msg.release()
        elif kind == W.ERR and seq == 0:
            st.err_cls, st.err = _channel_error(msg if mv is None else mv[W.HSIZE : W.HSIZE + n])
            msg.release()
            if st.close_due:  # no more acknowledgements come
                self.send_close(st)
        elif seq in st.abandoned or st.closed:
            st.abandoned.discard(seq)
            if kind == W.DATA:  # taken from the channel for a receive nobody waits for: back into the channel
                self.putback(st, msg if mv is None else mv[W.HSIZE : W.HSIZE + n], flags)
            msg.release()
        else:
            st.results[seq] = (kind, flags, msg if mv is None else mv[W.HSIZE : W.HSIZE + n], msg)

    def send_close(self, st):
        """End stream st at the agents (the handle was closed). Not before its sends are acknowledged: the far
        agent acknowledges nothing on a closed stream, and an exit waits for those acknowledgements."""
        try:
            self.gw.send(_HDR.pack(W.CLOSE, 0, st.node, 0, st.sid, 0), timeout=0 if st.close_due else 1)
        except Exception:
            if st.close_due:
                return  # (a full gateway: the next drain or the exit tries again)
            # the agent closes it once this process is gone; no CLOSED comes before that
            with self.cond:
                self.closing -= 1
            return
        st.close_due = False
        self.close_due.discard(st)

    def putback(self, st, data, flags=0):
        """Return data (a message, or with flag MANY a packed list) to the channel of stream st, through the
        agents: it goes back at the channel's tail, for any receiver."""
        payload = W.prefix_sdesc(st.sdesc, data)
        frame = _HDR.pack(W.PUTBACK, flags & W.MANY, st.node, len(payload), 0, 0) + payload
        try:
            self.gw.send(frame, timeout=GW_SEND_TIMEOUT)
        except ChannelError:
            pass  # the agent has not taken anything for GW_SEND_TIMEOUT: this node is going down with it

    def drain(self):
        """Take every answer already queued (non-blocking), unless another thread is reading."""
        with self.cond:
            if self.reading:
                return
            while True:
                got = self._read(0)
                for msg, nxt in got:
                    self._dispatch(msg, nxt)
                if len(got) < 64:
                    break
            for st in [st for st in self.close_due if st.acked >= st.sent or st.err is not None]:
                self.send_close(st)  # (their last acknowledgement came while the gateway was full)
            self.cond.notify_all()

    def wait(self, pred, deadline):
        """Wait until pred() (called with the lock held) is true; False if the deadline (monotonic) passed."""
        with self.cond:
            while True:
                if pred():
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self.reading:
                    self.cond.wait(remaining)
                    continue
                self.reading = True
                self.cond.release()
                got: list[tuple[Message, Message | bool | None]] = []
                try:
                    got = self._read(remaining)
                finally:
                    self.cond.acquire()
                    self.reading = False
                    for msg, nxt in got:
                        self._dispatch(msg, nxt)
                    self.cond.notify_all()

    def new_stream(self, node, sdesc):
        if self.closing:  # take the CLOSED answers of streams closed earlier (a loop of short-lived handles)
            self.drain()
        sid = int.from_bytes(os.urandom(8), "little") | 1
        st = self.streams[sid] = _Stream(sid, node, sdesc)
        return st


class _Bytes:
    """Stands in for a Message whose payload never came (an ERR made up by the process itself)."""

    def release(self):
        pass


_ep = None
_ep_lock = threading.Lock()
_forks = 0  # forks into this process (a child's handles must open streams of their own)


def _forked():
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


def endpoint():
    global _ep
    e = _ep
    if e is not None and e.pid == os.getpid() and not e.closed:
        return e
    with _ep_lock:
        if _ep is None or _ep.pid != os.getpid() or _ep.closed:
            _ep = Endpoint()
        return _ep


def close_endpoint(flush=True):
    """Close this process's connection to its node's agent, if it has one (says BYE); the next remote handle
    opens a new one (dragon.shutdown(): a later dragon.init() may attach another runtime). flush: first wait
    (bounded) until its sends have landed, as at exit."""
    with _ep_lock:
        e = _ep
    if e is not None and e.pid == os.getpid():
        e.close(flush)


class RemoteChannel:
    """A handle to a channel on another node (see the module doc). Same API as dragon.channels.Channel."""

    def __init__(self, sdesc, node):
        if isinstance(node, bool) or not isinstance(node, int) or node < 0 or node > 0xFFFF:
            raise ChannelError(f"bad node index {node!r}")
        self._sdesc = bytes(sdesc)
        self._node = node
        try:  # the most a message may hold (its pool's size), refused here as a local channel refuses it
            self._most = min(sdesc_info(self._sdesc)[1], 0xFFFFFFFF)  # (and a frame's length field)
        except ChannelError:
            self._most = 0xFFFFFFFF  # (a bad sdesc: the remote agent reports it at the first call)
        self._closed = False
        self._destroyed = False
        self._info = None
        self._open()

    def _open(self):
        """A new stream from this process (also after a fork: a child cannot share its parent's)."""
        self._ep = ep = endpoint()
        self._pid = ep.pid
        self._forks = _forks
        self._st = ep.new_stream(self._node, self._sdesc)
        self._gw_send = ep.gw.send
        payload = W.prefix_sdesc(self._sdesc, ep.opener + ep.reply_sdesc)
        ep.gw.send(
            _HDR.pack(W.OPEN, 0, self._node, len(payload), self._st.sid, 0) + payload, timeout=GW_SEND_TIMEOUT
        )

    def __repr__(self):
        return f"<RemoteChannel on node {self.node} sid={self._st.sid:#x}{' closed' if self._closed else ''}>"

    # ---- helpers ------------------------------------------------------------------------------------------
    def _check(self):
        if self._closed:
            if self._destroyed:
                raise ChannelError(f"channel on node {self.node} was destroyed")
            raise ChannelError(f"remote channel on node {self.node}: this handle is closed")
        if self._pid != os.getpid():
            self._open()
        st = self._st
        if st.err is not None:
            raise st.err_cls(f"channel on node {self.node}: {st.err}")

    def _gw(self, frame, deadline):
        """Put a frame into the gateway, by the deadline (None: GW_SEND_TIMEOUT; 0: now)."""
        t = GW_SEND_TIMEOUT if deadline is None else _left(0, deadline)
        try:
            self._gw_send(frame, timeout=t)
        except (ChannelFull, ChannelTimeout) as e:
            self._gw_failed(e, deadline)

    def _gw_failed(self, e, deadline):
        """The gateway stayed full (e: the channel's ChannelFull or ChannelTimeout) until deadline (None: for
        GW_SEND_TIMEOUT, the agent is stuck)."""
        if isinstance(e, ChannelFull):
            raise ChannelFull(f"channel on node {self.node}: the transport gateway is full") from None
        if deadline is None:
            raise ChannelError(
                f"channel on node {self.node}: the transport agent is not taking "
                f"requests (gateway full for {GW_SEND_TIMEOUT} s)"
            ) from None
        raise ChannelTimeout(f"channel on node {self.node}: timed out (transport gateway full)") from None

    def _lock_wait(self, lock, t):
        """Take the stream's send lock (the order of its sends) within timeout t (None: for ever). Another
        thread's send on this handle holds it while it waits for room in the window: not getting it in time
        is a full channel (ChannelFull for timeout 0, else ChannelTimeout)."""
        if t is None:
            lock.acquire()
        elif not lock.acquire(timeout=t or LOCK_WAIT):
            if t == 0:
                raise ChannelFull(f"channel on node {self.node} is full (another send on this handle waits)")
            raise ChannelTimeout(
                f"channel on node {self.node}: timed out (another send on this handle waits)"
            )

    def _too_big(self, n):
        """A message of n bytes can never be in the channel: refused by the call, as a local channel refuses
        it (sent, it would fail on the channel's node after the send returned, and break the stream)."""
        if n > 0xFFFFFFFF:
            raise ChannelError(f"channel on node {self.node}: messages are limited to 4 GiB - 1, not {n}")
        raise ChannelError(
            f"channel on node {self.node}: a {n}-byte message is more than its pool could ever hold "
            f"({self._most} bytes)"
        )

    def _window_wait(self, st, n, timeout):
        """Block (per timeout) until one more message of n bytes fits the stream's window."""

        def fits():
            return st.err is not None or (
                st.sent - st.acked < WINDOW
                and (st.sent_bytes - st.acked_bytes + n <= WINDOW_BYTES or st.sent == st.acked)
            )

        if fits():
            return
        ep = self._ep
        ep.drain()
        if fits():
            return
        if timeout == 0:
            raise ChannelFull(f"channel on node {self.node} is full (window of unacknowledged sends)")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not ep.wait(fits, deadline):
            raise ChannelTimeout(f"channel on node {self.node}: timed out (remote channel full)")
        self._check()

    def _request(self, mode, max_n, maxlen, timeout):
        """Send a RECV-type request and wait for its one answer -> (kind, flags, payload mv, Message)."""
        self._check()
        t = _timeout_arg(timeout)
        st = self._st
        req = next(st.req)
        frame = _HDR.pack(W.RECV, 0, self._node, W.REQ.size, st.sid, req) + W.REQ.pack(mode, max_n, maxlen, t)
        self._gw(frame, None)
        deadline = None if t < 0 else time.monotonic() + t + ANSWER_GRACE
        ep = self._ep
        try:
            ep.wait(lambda: req in st.results or st.err is not None, deadline)
        except BaseException:
            with ep.cond:
                if req not in st.results:
                    st.abandoned.add(req)
            raise
        with ep.cond:
            res = st.results.pop(req, None)
            if res is None:
                st.abandoned.add(req)
        if res is None:
            self._check()
            raise ChannelTimeout(f"channel on node {self.node}: no answer from the node's transport agent")
        kind, flags, payload, msg = res
        if kind == W.ERR:
            cls, text = _channel_error(payload)
            msg.release()
            raise cls(f"channel on node {self.node}: {text}")
        return kind, flags, payload, msg

    # ---- the Channel API ----------------------------------------------------------------------------------
    def send(self, data, timeout=None):
        """Send a bytes-like object. timeout: None blocks, 0 raises ChannelFull, t > 0 ChannelTimeout."""
        st = self._st
        if self._closed or st.err is not None or self._forks != _forks:  # (getpid is a syscall per send)
            self._check()
            st = self._st
        if type(data) is not bytes:
            data = _payload(data)
        n = len(data)
        if n > self._most:
            self._too_big(n)
        t = timeout_seconds(timeout)
        end = _deadline_of(t)  # (one deadline for every wait of the call)
        lock = st.lock
        if not lock.acquire(False):  # (another thread's send on this handle)
            self._lock_wait(lock, t)
        try:
            if st.sent - st.acked >= WINDOW or (
                st.sent_bytes - st.acked_bytes + n > WINDOW_BYTES and st.sent != st.acked
            ):
                self._window_wait(st, n, _left(t, end))
            if n > PTR_MIN:
                self._send_big(st, data, n, end)
            else:
                frame = _HDR.pack(W.SEND, 0, self._node, n, st.sid, st.sent) + data
                try:
                    self._gw_send(frame, timeout=GW_SEND_TIMEOUT if end is None else _left(t, end))
                except (ChannelFull, ChannelTimeout) as e:
                    self._gw_failed(e, end)
            st.sent += 1
            st.sent_bytes += n
            st.sizes.append(n)
            if not st.sent & 63 and st.sent - st.acked >= 64:
                # take the acks that came meanwhile: a sender that never waits would otherwise leave them to
                # fill its reply channel (the agent then holds them back and retries)
                self._ep.drain()
        finally:
            lock.release()

    def _send_big(self, st, data, n, end):
        """One copy, into a block of the node's staging pool; the gateway carries only its offset and the
        agent sends the block itself (and frees it). end: the call's deadline (_deadline_of)."""
        ep = self._ep
        where = f"channel on node {self.node}"
        t = None if end is None else _left(0, end)
        try:
            blk = ep.pool.alloc(n, timeout=GW_SEND_TIMEOUT if t is None else t)
        except PoolFull as e:  # (timeout 0)
            raise ChannelFull(
                f"{where}: no room now in the node's staging pool for {n} bytes ({e})"
            ) from None
        except PoolTimeout as e:
            if t is None:  # (as a gateway that stays full: the transport is stuck, waiting on would hang)
                raise ChannelError(
                    f"{where}: the node's staging pool had no room for a {n}-byte message for "
                    f"{GW_SEND_TIMEOUT} s, nothing drained it ({e})"
                ) from None
            raise ChannelTimeout(f"{where}: timed out, no room in the node's staging pool ({e})") from None
        except PoolError as e:  # (no wait can help: more than the pool could ever hold, or the pool is gone)
            raise ChannelError(f"{where}: a {n}-byte message cannot be sent: {e}") from None
        mv = memoryview(blk)
        mv[:] = data
        mv.release()
        try:
            self._send_ptr(st, blk, n, end)
        except BaseException:
            ep.pool.free(blk)
            raise

    def _send_ptr(self, st, blk, n, end):
        """The gateway frame that hands blk to the agent by the deadline end (if it raises, blk is still the
        caller's)."""
        frame = _HDR.pack(W.SEND, W.PTR, self._node, n, st.sid, st.sent) + W.U64.pack(blk.offset)
        self._gw(frame, end)

    def send_block(self, block, nbytes=None, timeout=None):
        """Hand a block of this node's staging pool (``self.pool``) to the channel without copying it: the
        agent sends it over MPI straight from the block and frees it. The block belongs to the transport from
        then on (do not use or free it); on a timeout (ChannelFull / ChannelTimeout) it stays with the
        caller."""
        self._check()
        if not isinstance(block, Block):
            raise TypeError(f"send_block() takes a Block, not {type(block).__name__}")
        ep = self._ep
        if block.pool.name != ep.pool.name:
            raise ChannelError(
                f"channel on node {self.node}: the block belongs to another pool ({block.pool.name!r}); "
                f"a remote channel sends blocks of this node's staging pool (channel.pool, {ep.pool.name!r})"
            )
        if block.freed:
            raise ChannelError(
                f"channel on node {self.node}: the block at offset {block.offset} was freed or sent"
            )
        if nbytes is None:
            n = block.size
        elif isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        else:
            n = nbytes
        if n < 0 or n > block.size or n > 0xFFFFFFFF:
            raise ChannelError(
                f"channel on node {self.node}: nbytes={n} does not fit the block ({block.size} bytes)"
            )
        if n > self._most:
            self._too_big(n)
        st = self._st
        t = timeout_seconds(timeout)
        end = _deadline_of(t)
        lock = st.lock
        if not lock.acquire(False):  # (another thread's send on this handle)
            self._lock_wait(lock, t)
        try:
            if st.sent - st.acked >= WINDOW or (
                st.sent_bytes - st.acked_bytes + n > WINDOW_BYTES and st.sent != st.acked
            ):
                self._window_wait(st, n, _left(t, end))
            if n > PTR_MIN:
                self._send_ptr(st, block, n, end)
            # small: a copy into the frame costs less than a separate MPI message; the block is freed here
            else:
                mv = memoryview(block)
                frame = _HDR.pack(W.SEND, 0, self._node, n, st.sid, st.sent) + mv[:n]
                mv.release()
                self._gw(frame, end)
                ep.pool.free(block)
            st.sent += 1
            st.sent_bytes += n
            st.sizes.append(n)
        finally:
            lock.release()

    def send_many(self, messages, timeout=None):
        """Send each message in order; returns how many were sent (the timeout covers the whole call). All or
        nothing for bad input: every item is checked first (TypeError: not bytes-like; ChannelError: over
        4 GiB - 1), so a bad one raises before anything is sent."""
        self._check()
        items = []
        for i, data in enumerate(messages):
            try:
                data = data if type(data) is bytes else _payload(data)
            except TypeError:
                kind = type(data).__name__
                raise TypeError(
                    f"send_many() takes bytes-like objects, not {kind} (item {i}): nothing was sent"
                ) from None
            if len(data) > self._most:
                raise ChannelError(
                    f"channel on node {self.node}: item {i} ({len(data)} bytes) is more than the channel's "
                    f"pool could ever hold ({self._most} bytes): nothing was sent"
                )
            items.append(data)
        t = timeout_seconds(timeout)
        deadline = None if t is None else time.monotonic() + t
        k = 0
        for data in items:
            t = None if deadline is None else max(0.0, deadline - time.monotonic())
            if timeout is not None and timeout <= 0:
                t = 0
            try:
                self.send(data, timeout=t)
            except (ChannelFull, ChannelTimeout):
                if k == 0:
                    raise
                return k
            k += 1
        return k

    def recv(self, timeout=None):
        """Receive one message as bytes. timeout: None blocks, 0 raises ChannelEmpty, t > 0 ChannelTimeout."""
        _kind, _flags, payload, msg = self._request(W.M_RECV, 1, -1, timeout)
        out = bytes(payload)
        msg.release()
        return out

    def recv_message(self, timeout=None):
        """Receive one message as a ``Message`` (a buffer; call ``release()`` when done). The payload is where
        the agent received it, a block of this node's staging pool for a large message: it is not copied
        again. timeout: None blocks, 0 raises ChannelEmpty, t > 0 ChannelTimeout."""
        _kind, flags, payload, msg = self._request(W.M_RECV, 1, -1, timeout)
        if flags & W.NEXT:
            return msg
        data = bytes(payload)
        msg.release()
        return self._ep.as_message(data)

    def recv_many(self, max_n, timeout=None):
        """Wait (per timeout) for one message, then take whatever else is queued, up to max_n in all."""
        max_n = operator.index(max_n)  # (TypeError for a float, as a local channel)
        if max_n < 1:
            raise ChannelError(f"recv_many: max_n must be >= 1, not {max_n}")
        if max_n >= 1 << 63:
            raise ChannelError(f"max_n {max_n} is out of range")  # (as a local channel)
        max_n = min(max_n, 0xFFFFFFFF)  # (the request's field; no queue holds more)
        _kind, flags, payload, msg = self._request(W.M_MANY, max_n, -1, timeout)
        if len(payload) >= KEEP_AFTER:
            keep_freed_memory()  # (as the local recv_many: a batch of big messages, each a new bytes)
        out = W.unpack_many(payload) if flags & W.MANY else [bytes(payload)]
        msg.release()
        return out

    def recv_into(self, buffer, timeout=None):
        """Receive into a writable buffer; returns the length. A message longer than the buffer raises
        ChannelError and stays queued."""
        try:
            dst = memoryview(buffer).cast("B")
        except TypeError as e:
            raise TypeError(f"recv_into() needs a writable contiguous buffer: {e}") from None
        if dst.readonly:
            raise TypeError("recv_into() needs a writable buffer")
        _kind, _flags, payload, msg = self._request(W.M_INTO, 1, len(dst), timeout)
        n = len(payload)
        dst[:n] = payload
        msg.release()
        return n

    def poll(self, timeout=None):
        """True once a message is ready to receive (does not consume it); False if none came in time."""
        _kind, _flags, payload, msg = self._request(W.M_POLL, 0, -1, timeout)
        r = msgpack.unpackb(payload)
        msg.release()
        return bool(r)

    def _info_req(self):
        if self._info is None:
            _kind, _flags, payload, msg = self._request(W.M_INFO, 0, -1, 0)
            self._info = msgpack.unpackb(payload)
            msg.release()
        return self._info

    def __len__(self):
        _kind, _flags, payload, msg = self._request(W.M_LEN, 0, -1, 0)
        r = msgpack.unpackb(payload)
        msg.release()
        return int(r)

    @property
    def capacity(self):
        return self._info_req()["capacity"]

    @property
    def block_size(self):
        return self._info_req()["block_size"]

    @property
    def name(self):
        return self._info_req()["name"]

    @property
    def sdesc(self):
        return self._sdesc

    @property
    def node(self):
        """The index of the node that holds the channel."""
        return self._node

    @property
    def creator(self):
        """Always False: a handle through the transport never made the channel."""
        return False

    @property
    def closed(self):
        return self._closed

    def flush(self, timeout=None):
        """Wait until every message sent through this handle is in the remote channel (True), or timeout."""
        self._check()
        st = self._st
        t = timeout_seconds(timeout)
        deadline = None if t is None else time.monotonic() + t
        ok = self._ep.wait(lambda: st.acked >= st.sent or st.err is not None, deadline)
        self._check()
        return ok

    def close(self):
        """Release this handle (idempotent). Messages already sent are still delivered."""
        if self._closed:
            return
        self._closed = True
        ep = self._ep
        if ep.pid == os.getpid() and not ep.closed:
            st = self._st
            with ep.cond:  # answers that come for it from now on go back (data) or are dropped
                st.closed = True
                ep.closing += 1
                if st.acked < st.sent and st.err is None:
                    st.close_due = True  # CLOSE once they are acknowledged (an exit waits for that)
                    ep.close_due.add(st)
                    return
            ep.send_close(st)

    @property
    def pool(self):
        """This node's staging pool: ``send_block`` takes its blocks (the channel's own pool is on its
        node)."""
        self._check()
        return self._ep.pool

    def destroy(self):
        """Destroy the channel on its node (once; as the local call, blocked senders and receivers there wake
        with ChannelError, later calls on any handle raise ChannelError). This handle is closed."""
        self._check()
        _kind, _flags, _payload, msg = self._request(W.M_DESTROY, 0, -1, 0)
        msg.release()
        self._destroyed = True
        self.close()

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __reduce__(self):
        return (RemoteChannel, (self._sdesc, self.node))


def start_time(pid):
    """When process pid started (clock ticks after boot, from /proc/<pid>/stat), or None if there is no such
    process. A pid with another start time than the one noted earlier is another process (the pid was
    reused)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace():
    """This process's pid namespace (an inode number; 0 if unknown): pids mean the same process only within
    one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0
