"""Pipe and Connection over dragon channels (``multiprocessing.connection``'s API), usable from any node.

``Pipe(duplex)`` makes one channel per direction in this process's heap. A Connection is picklable (as a
Process argument, or through a queue) and works wherever it lands: on another node its channels are
RemoteChannels.

End of file, as with a pipe: ``recv()`` raises EOFError once every handle of the other end is closed and what
they sent has been read. Handles are counted in-band: each writing handle has a token; pickling a handle
announces the token of the copy it makes (HELLO, before the pickle exists, so before the copy can send or
close), and closing one (explicitly, when it is garbage, or when its process exits) sends BYE. A reader that
has seen the BYE of every token it knows raises EOFError. A writer killed by a signal sends no BYE: each
copy also says which process holds it (CLAIM, when it is unpickled), and a reader that has waited GONE_CHECK
seconds twice in a row while global services reports every one of those processes exited is at end of file.
Connections without end-of-file (the two ends of a SimpleQueue, queues' readers) send no markers.

``fileno()`` is a real descriptor (an eventfd made readable by a watcher thread while something can be read),
so ``multiprocessing.connection.wait()`` works on these connections, mixed with sockets, pipes and sentinels.
"""

import errno
import functools
import os
import pickle
import struct
import threading
import weakref
from multiprocessing import util
from multiprocessing.context import BufferTooShort

from dragon import env as E
from dragon.errors import ChannelEmpty, ChannelError, ChannelTimeout
from dragon.mp import heap, serial

HELLO, BYE, CLAIM = 0x10, 0x11, 0x12
_MARK = struct.Struct("<BQ")  # HELLO or BYE, token
_CLAIM = struct.Struct("<BQQ")  # CLAIM, token, p_uid of the process that holds it
GONE_CHECK = 1.0  # a reader that waited this long for data asks whether its writers' processes still run
CAPACITY = 1024  # messages in flight per direction (a full channel blocks the sender, like a full pipe)
BLOCK = 512  # messages up to this size are stored inline in the channel's slots
CLOSE_WAIT = 5.0  # how long a close waits for room to say BYE (a reader that no longer reads)
_MARKER_SIZES = (_MARK.size, _CLAIM.size)

_open_writers = weakref.WeakSet()  # writing handles of this process: told BYE at exit
_exit_hooked = None


def _hook_exit():
    global _exit_hooked
    if _exit_hooked != os.getpid():
        _exit_hooked = os.getpid()
        util.Finalize(None, _close_writers, exitpriority=20)


def _close_writers():
    for c in list(_open_writers):
        c._say_bye()


def _token():
    return int.from_bytes(os.urandom(8), "little") or 1


def _deadline(timeout):
    import time

    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _left(deadline):
    import time

    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Connection:
    """One end of a Pipe (readable, writable or both)."""

    def __init__(self, send_sd=None, recv_sd=None, *, token=None, live=None, owned=None):
        """send_sd/recv_sd: sdesc of the channel written / read. token: this handle's writing token (None: it
        sends no markers). live: the tokens of the writers of recv_sd this reader waits for (None: no
        end-of-file). owned: the heap's record of the channels (in the process that made them)."""
        self._send_sd, self._recv_sd = send_sd, recv_sd
        self._send = heap.attach(send_sd) if send_sd is not None else None
        self._recv = heap.attach(recv_sd) if recv_sd is not None else None
        self._token = token
        self._live = live
        self._early = set()  # tokens whose BYE came before their HELLO (from different nodes)
        self._claims = {}  # token -> p_uid of the process holding it (CLAIM)
        self._gone = False  # the last check found every writer's process gone (EOF if the next one does too)
        self._eof = False
        self._pending = None  # a message read ahead (by poll, or the readiness watcher)
        # poll reads the message ahead and holds it for this process even on this node: a copy of a stdlib
        # queue (dragon.mp.relay) polls and then reads under a lock of its process only, so no other
        # process may take what its poll found
        self._poll_holds = False
        self._rlock = threading.RLock()
        self._closed = False
        self._unreadable = False  # a message was longer than recv_bytes' maxlength: reading is over
        self._ready = None
        self._owned = owned
        if token is not None:
            _open_writers.add(self)
            _hook_exit()

    # ---- attributes -------------------------------------------------------------------------------------
    @property
    def closed(self):
        return self._closed

    @property
    def readable(self):
        return self._recv_sd is not None and not self._unreadable

    @property
    def writable(self):
        return self._send_sd is not None

    def _check_closed(self):
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self):
        if self._recv_sd is None or self._unreadable:
            raise OSError("connection is write-only")

    def _check_writable(self):
        if self._send_sd is None:
            raise OSError("connection is read-only")

    def _check_peer(self):
        # a duplex end that has seen the end of file knows every handle of the other end is closed, and those
        # are the readers of what it sends: BrokenPipeError, as with a pipe (not looked for here: a thread of
        # this process may be waiting in recv with the reader's lock)
        if self._eof and self._recv is not None:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def fileno(self):
        """A descriptor that is readable while this connection has something to read (or is at end of
        file)."""
        self._check_closed()
        self._check_readable()
        if self._ready is None:
            self._ready = _Readiness(self)
        # exact now, not when the watcher next looks: wait() asks for the descriptor as it starts, and must
        # not return another ready object without this one when a message is already here (as with a pipe)
        self._ready.refresh(self, block=False)
        return self._ready.fd

    # ---- writing ----------------------------------------------------------------------------------------
    def send(self, obj):
        """Send a picklable object (large buffers travel in a pool block, unpickled without a copy)."""
        if self._closed:
            raise OSError("handle is closed")
        ch = self._send
        if ch is None:
            raise OSError("connection is read-only")
        self._check_peer()
        data, bufs = serial.dumps_oob(obj)
        try:
            if bufs:
                serial._send_framed(ch, data, bufs, 0, None)
            else:
                ch.send(data)
        except ChannelError as e:
            raise OSError(f"send failed: {e}") from e

    def send_bytes(self, buf, offset=0, size=None):
        """Send the bytes of a bytes-like object (or a slice of it)."""
        self._check_closed()
        self._check_writable()
        self._check_peer()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        try:
            serial.send_raw(self._send, m[offset : offset + size])
        except ChannelError as e:
            raise OSError(f"send failed: {e}") from e

    # ---- reading ----------------------------------------------------------------------------------------
    def _marker(self, msg):
        """Account for a HELLO/BYE/CLAIM; True if msg was one."""
        k = serial.kind(msg)
        if k == CLAIM and len(msg) == _CLAIM.size:
            _, tok, p_uid = _CLAIM.unpack(memoryview(msg))
            self._claims[tok] = p_uid
            return True
        if k not in (HELLO, BYE):
            return False
        if len(msg) != _MARK.size:
            raise ChannelError(f"corrupt marker of {len(msg)} bytes")
        _, tok = _MARK.unpack(memoryview(msg))
        if self._live is not None:
            if k == HELLO:
                if tok in self._early:
                    self._early.discard(tok)
                else:
                    self._live[tok] = 0
            elif tok in self._live:
                del self._live[tok]
                self._claims.pop(tok, None)
            else:
                self._early.add(tok)
            if not self._live and not self._early:
                self._eof = True
        return True

    def _idle_check(self):
        """The end-of-file check of a reader that waited (for the readiness watcher, which waits without the
        reader's lock)."""
        with self._rlock:
            if self._live is None or self._eof or self._pending is not None:
                return
            self._waited()

    def _waited(self):
        """A reader (holding _rlock) waited GONE_CHECK seconds for data: end of file once two such checks in a
        row find every writer's process gone (the second lets what a writer sent just before it died arrive
        first)."""
        gone = self._writers_gone()
        if gone and self._gone:
            self._eof = True
        self._gone = gone

    def _writers_gone(self):
        """True if every writing handle this reader waits for is held by a process that has exited (a writer
        killed by a signal says no BYE). A handle not yet claimed by a process counts as alive."""
        if self._early or not self._live:
            return False
        me = _my_puid()
        uids = set()
        for tok, p_uid in self._live.items():
            p_uid = self._claims.get(tok) or p_uid
            if not p_uid or p_uid == me:
                return False
            uids.add(p_uid)
        from dragon.globalservices import process

        try:
            exited, _ = process.multi_join(sorted(uids), timeout=0)
        except Exception:  # not under the runtime, or GS busy: not known to be gone
            return False
        return exited is not None and {u for u, _ in exited} >= uids

    def _take(self, timeout):
        """The next data message (caller holds _rlock); EOFError at end of file; None on timeout."""
        if self._pending is not None:
            msg, self._pending = self._pending, None
            return msg
        deadline = _deadline(timeout)
        recv = self._recv.recv_message
        while True:
            if self._eof:
                raise EOFError
            left = None if deadline is None else _left(deadline)
            watch = self._live is not None and (left is None or left > GONE_CHECK)
            try:
                msg = recv(timeout=GONE_CHECK if watch else left)
            except (ChannelEmpty, ChannelTimeout):
                if not watch:
                    return None
                self._waited()
                continue
            except ChannelError as e:
                raise OSError(f"receive failed: {e}") from e
            self._gone = False
            if len(msg) not in _MARKER_SIZES or not self._marker(msg):  # skip the look at ordinary data
                return msg

    def _next(self):
        self._check_closed()
        self._check_readable()
        with self._rlock:
            msg = self._take(None)
        if self._ready is not None:
            self._ready.refresh(self)
        return msg

    def recv(self):
        """Receive an object sent with send() (or the unpickled bytes of send_bytes())."""
        msg = self._next()
        try:
            if not msg.in_pool:
                mv = memoryview(msg)
                if mv.nbytes and mv[0] == 0x80:  # a pickle that fit a slot: the common case
                    return pickle.loads(mv)
            return serial.load(msg)
        finally:
            msg.release()

    def recv_bytes(self, maxlength=None):
        """Receive the bytes of one message."""
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        msg = self._next()
        data = serial.load_bytes(msg)
        msg.release()
        if maxlength is not None and len(data) > maxlength:
            # as with the stdlib: this handle reads no more (the message is lost); one that also writes stays
            # open, so the other end does not see an end of file, a read-only one is closed
            if self._send is None:
                self.close()
            else:
                self._unreadable = True
            raise OSError("bad message length")
        return data

    def recv_bytes_into(self, buf, offset=0):
        """Receive one message into a writable buffer, ``offset`` bytes in; returns its length in bytes
        (BufferTooShort if it does not fit: the exception's args[0] is the whole message)."""
        with memoryview(buf) as m:
            size = m.nbytes
            if offset < 0:
                raise ValueError("negative offset")
            if offset > size:
                raise ValueError("offset too large")
            data = self.recv_bytes()
            if len(data) > size - offset:
                raise BufferTooShort(data)
            m.cast("B")[offset : offset + len(data)] = data
        return len(data)

    def poll(self, timeout=0.0):
        """Whether there is something to read (or end of file) within timeout seconds (None: wait)."""
        self._check_closed()
        self._check_readable()
        return self._poll(timeout)

    def _poll(self, timeout):
        if self._live is None:  # no markers: look without taking (other processes may read the same channel)
            if self._pending is not None:
                return True
            try:
                return bool(self._recv.poll(timeout=timeout))
            except ChannelError as e:
                raise OSError(f"poll failed: {e}") from e
        with self._rlock:
            if self._pending is not None or self._eof:
                return True
            if not self._poll_holds and getattr(self._recv, "_peek", None) is not None:
                return self._poll_here(timeout)
            # (a channel of another node cannot be looked into, and a stdlib queue's copy needs what its poll
            # found kept for it: the message is read ahead and held for this process's next recv)
            try:
                msg = self._take(timeout)
            except EOFError:
                return True
            if msg is None:
                return False
            self._pending = msg
            return True

    def _poll_here(self, timeout):
        """poll of a reader whose channel is on this node (caller holds _rlock): the markers at the channel's
        head are taken and accounted for, a data message is left there. Another process reading the same
        channel (children given the same reader end) may take it next, as with a pipe; one that polls and
        never reads takes nothing from them, and a message it polled is not lost with it."""
        deadline = _deadline(timeout)
        ch = self._recv
        try:
            while not self._eof:
                head = ch._peek(1)
                if head is not None:
                    first, n = head
                    if n not in _MARKER_SIZES or first[0] not in (HELLO, BYE, CLAIM):
                        return True
                    try:
                        msg = ch.recv_message(timeout=0)
                    except ChannelEmpty:  # (another reader took it)
                        continue
                    self._gone = False
                    if not self._marker(msg):  # (another reader took the marker: this is what came next)
                        self._pending = msg
                        return True
                    continue
                left = _left(deadline)
                watch = left is None or left > GONE_CHECK
                if ch.poll(timeout=GONE_CHECK if watch else left):
                    continue
                if not watch:
                    return False
                self._waited()
        except ChannelError as e:
            raise OSError(f"poll failed: {e}") from e
        return True

    # ---- closing ----------------------------------------------------------------------------------------
    def _say_bye(self):
        tok, self._token = self._token, None
        if tok is None or self._send is None:
            return
        try:
            self._send.send(_MARK.pack(BYE, tok), timeout=CLOSE_WAIT)
        except ChannelError:
            pass  # the reader's channel is gone or stuck full: nobody is waiting for this end of file
        _open_writers.discard(self)

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._say_bye()
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.stop()
        for ch in (self._send, self._recv):
            if ch is not None:
                try:
                    ch.close()
                except ChannelError:
                    pass
        self._pending = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit, or a half-built handle
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        self._check_closed()
        token = None
        if self._token is not None:  # the copy is a new writer: announce it before anything can come from it
            token = _token()
            self._send.send(_MARK.pack(HELLO, token))
            # if the pickle it is part of fails, no copy will ever say BYE: say it for the copy
            serial.on_failed_pickle(functools.partial(_retract, self._send, token))
        if self._owned is not None:
            self._owned.shared = True
        with self._rlock:
            live = None if self._live is None else dict(self._live)
        return (_rebuild, (self._send_sd, self._recv_sd, token, live))

    def __repr__(self):
        what = "rw" if self.readable and self.writable else ("r" if self.readable else "w")
        return f"<dragon Connection {what}{' closed' if self._closed else ''}>"


def _retract(ch, token):
    try:
        ch.send(_MARK.pack(BYE, token), timeout=CLOSE_WAIT)
    except ChannelError:
        pass


def _rebuild(send_sd, recv_sd, token, live):
    c = Connection(send_sd, recv_sd, token=token, live=live)
    if token is not None and _my_puid():  # say which process holds the new writer (see _writers_gone)
        try:
            c._send.send(_CLAIM.pack(CLAIM, token, _my_puid()), timeout=CLOSE_WAIT)
        except ChannelError:
            pass
    return c


def _my_puid():
    return int(os.environ.get(E.PUID, "0"))


def Pipe(duplex=True):
    """Two Connections joined by channels of this process's heap: (a, b), a's sends reach b and (if duplex)
    b's reach a. With duplex=False, a only reads and b only writes."""
    a = heap.channel(CAPACITY, BLOCK)
    if not duplex:
        owned = heap.Owned([a])
        t = _token()
        return (
            Connection(None, bytes(a.sdesc), live={t: _my_puid()}, owned=owned),
            Connection(bytes(a.sdesc), None, token=t, owned=owned),
        )
    b = heap.channel(CAPACITY, BLOCK)
    owned = heap.Owned([a, b])
    ta, tb = _token(), _token()
    return (
        Connection(bytes(a.sdesc), bytes(b.sdesc), token=ta, live={tb: _my_puid()}, owned=owned),
        Connection(bytes(b.sdesc), bytes(a.sdesc), token=tb, live={ta: _my_puid()}, owned=owned),
    )


class _Readiness:
    """An eventfd that is readable while the connection has something to read: a watcher thread sets it when
    something arrives; whoever reads re-checks it at once (so a wait() right after a recv() is exact)."""

    PERIOD = 0.5  # the watcher looks at least this often (a reader elsewhere may have taken the message)

    def __init__(self, conn):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.is_set = False
        self.lock = threading.Lock()
        self.conn = weakref.ref(conn)
        self.woken = threading.Event()
        self.stopped = False
        threading.Thread(target=self._run, name="dragon-mp-readiness", daemon=True).start()

    def _set(self, on):
        if on and not self.is_set:
            os.eventfd_write(self.fd, 1)
        elif not on and self.is_set:
            try:
                os.eventfd_read(self.fd)
            except BlockingIOError:
                pass
        self.is_set = on

    def refresh(self, conn, block=True):
        """Make the descriptor say whether conn has something to read now (after a read). block=False: not
        if another thread holds the reader's lock (it may be waiting in recv: the watcher will look)."""
        # (the watcher holds self.lock while it waits for the reader's lock)
        if not self.lock.acquire(blocking=block):
            return
        try:
            if conn._rlock.acquire(blocking=block):
                try:
                    self._set(conn._poll(0))
                except OSError:
                    self._set(True)  # broken: let the reader find out
                finally:
                    conn._rlock.release()
        finally:
            self.lock.release()
        self.woken.set()

    def stop(self):
        self.stopped = True
        self.woken.set()

    def _run(self):
        try:
            while not self.stopped:
                conn = self.conn()
                if conn is None or conn._closed:
                    break
                with self.lock:
                    try:
                        ready = conn._poll(0)
                    except OSError:
                        ready = True
                    self._set(ready)
                if ready:
                    del conn
                    self.woken.wait(self.PERIOD / 2)
                    self.woken.clear()
                    continue
                try:  # wait for something to arrive without holding the reader's lock
                    if not conn._recv.poll(timeout=self.PERIOD):
                        conn._idle_check()
                except ChannelError:
                    pass
                del conn
        finally:
            os.close(self.fd)
