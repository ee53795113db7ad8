"""File-descriptor connections sent to a dragon process: what the stdlib builds on os pipes (its own Queue,
``multiprocessing.connection.Pipe``, and so ``concurrent.futures``' call queue) still works with dragon
processes, on any node.

A dragon process cannot receive a file descriptor (it may run on another node). When such a Connection is
pickled, this process relays it through a channel of its heap instead, with a thread per direction: what
arrives on the descriptor is sent into the channel, and what the other processes send into the channel is
written to the descriptor, message by message. The receiving process gets a dragon Connection on that channel.
The end of file of the descriptor reaches the channel's readers. One relay serves every copy of the same
descriptor (by inode). It copies every message once more, so a dragon Pipe or Queue is the faster choice.

An inbound relay ends at the descriptor's end of file. An outbound one counts the writing copies it was sent
as (each has a token: HELLO when pickled, BYE when closed, as a dragon Pipe's writers) and ends, closing its
descriptor and destroying its channel, once every copy said BYE: it held the pipe's write end open, so the
inbound relay of the same pipe (a stdlib Queue sent away, as concurrent.futures' call queue is) never saw
its end of file, and two threads and two descriptors stayed per such pipe for the life of the process. A
copy killed by a signal says no BYE: its relay stays.

The stdlib's queues (``multiprocessing.queues.Queue``, ``JoinableQueue``, ``SimpleQueue`` and their
subclasses, ``concurrent.futures``' call queue among them) take a lock around each read of their pipe and each
write, because a pipe may split a message; a copy of such a queue in a dragon process reads and writes a
channel instead, where a message is received and sent whole. So the copy takes a lock of its own process there
(its threads still take turns), not the queue's shared lock, which from another node costs a round trip
through the transport per acquire (and made the readers of every node wait for each other's round trips). The
shared locks travel on with the copy when it is pickled again. Other processes' readers cannot take a message
this process polled: a relayed reader's ``poll`` holds the message it found for this process's next read.
"""

import functools
import os
import threading
from multiprocessing import connection as _mpconn
from multiprocessing import queues as _mpqueues

from dragon.errors import ChannelError
from dragon.mp import heap, serial
from dragon.mp.connection import (
    _CLAIM,
    _MARK,
    BLOCK,
    BYE,
    CAPACITY,
    CLAIM,
    CLOSE_WAIT,
    HELLO,
    Connection,
    _my_puid,
    _retract,
    _token,
)

_lock = threading.Lock()
_relays = {}  # (pid, dev, inode, direction) -> (sdesc, token of an inbound relay, or its channel if outbound)


def _key(fd, direction):
    st = os.fstat(fd)
    return (os.getpid(), st.st_dev, st.st_ino, direction)


def _inbound(conn):
    """Messages arriving on conn's descriptor, relayed into a channel. -> (sdesc, token of the relay)."""
    key = _key(conn.fileno(), "in")
    with _lock:
        if key not in _relays:
            ch = heap.channel(CAPACITY, BLOCK)
            tok = _token()
            src = _mpconn.Connection(os.dup(conn.fileno()), writable=False)
            threading.Thread(
                target=_pump_in, args=(src, ch, tok, key), name="dragon-mp-relay-in", daemon=True
            ).start()
            _relays[key] = (bytes(ch.sdesc), tok)
        return _relays[key]


def _pump_in(src, ch, tok, key):
    try:
        while True:
            try:
                data = src.recv_bytes()
            except (EOFError, OSError):
                break
            serial.send_raw(ch, data)
        with _lock:  # (a copy pickled from now on gets a relay of its own)
            _relays.pop(key, None)
        ch.send(_MARK.pack(BYE, tok), timeout=5)
    except ChannelError:
        pass  # this process's heap is gone: it is exiting
    finally:
        src.close()


def _outbound(conn):
    """A channel whose messages are written to conn's descriptor, and the token of the new writing copy
    (announced in it). -> (sdesc, token)."""
    key = _key(conn.fileno(), "out")
    with _lock:  # (the relay cannot end between its lookup and the HELLO: it ends under this lock)
        if key not in _relays:
            ch = heap.channel(CAPACITY, BLOCK)
            dst = _mpconn.Connection(os.dup(conn.fileno()), readable=False)
            threading.Thread(
                target=_pump_out, args=(ch, dst, key), name="dragon-mp-relay-out", daemon=True
            ).start()
            _relays[key] = (bytes(ch.sdesc), ch)
        sdesc, ch = _relays[key]
        tok = _token()
        ch.send(_MARK.pack(HELLO, tok), timeout=CLOSE_WAIT)
    # if the pickle it is part of fails, no copy will ever say BYE: say it for the copy
    serial.on_failed_pickle(functools.partial(_retract, ch, tok))
    return sdesc, tok


def _pump_out(ch, dst, key):
    live, early = set(), set()  # writing copies announced; BYEs that came before their HELLO
    done = False
    try:
        while not done:
            msg = ch.recv_message()
            k, n = serial.kind(msg), len(msg)
            if k in (HELLO, BYE) and n == _MARK.size:
                _, tok = _MARK.unpack(memoryview(msg))
                if k == HELLO:
                    (early.discard if tok in early else live.add)(tok)
                elif tok in live:
                    live.discard(tok)
                else:
                    early.add(tok)
                if not live and not early:
                    with _lock:  # every copy is closed, and no new one is announced while we hold this
                        if len(ch) == 0:
                            del _relays[key]
                            done = True
            elif not (k == CLAIM and n == _CLAIM.size):
                dst.send_bytes(serial.load_bytes(msg))
            msg.release()
    except (ChannelError, OSError):
        pass  # the heap is gone (exit), or nobody reads the descriptor any more
    finally:
        dst.close()
    if done:  # (no copy can send into it any more)
        try:
            ch.destroy()
        except ChannelError:
            pass


_RELAY = 0  # the relay's token is held by a thread of the relaying process: its BYE comes at the fd's EOF


def reduce_fd_connection(conn):
    """Pickle a stdlib Connection as a dragon Connection on relay channels."""
    recv_sd = tok = send_sd = wtok = None
    if conn.readable:
        recv_sd, tok = _inbound(conn)
    if conn.writable:
        send_sd, wtok = _outbound(conn)
    return (_rebuild, (send_sd, recv_sd, tok, wtok))


def _rebuild(send_sd, recv_sd, tok, wtok=None):
    """The copy: a reader waiting for the inbound relay's BYE (tok); a writer with its token (wtok)."""
    c = Connection(send_sd, recv_sd, token=wtok, live=None if tok is None else {tok: _RELAY})
    if wtok is not None and _my_puid():  # (as a dragon Pipe's writer: which process holds it)
        try:
            c._send.send(_CLAIM.pack(CLAIM, wtok, _my_puid()), timeout=CLOSE_WAIT)
        except ChannelError:
            pass
    return c


# ---- the stdlib's queues --------------------------------------------------------------------------------
class _ProcessLock:
    """A lock of this process with the acquire signature of multiprocessing's locks (what a copy of a stdlib
    queue takes around its reads and writes of a channel: see the module's docstring)."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, block=True, timeout=None):
        if not block:
            return self._lock.acquire(False)
        if timeout is None:
            return self._lock.acquire()
        return self._lock.acquire(True, max(0.0, timeout))

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def reduce_stdlib_queue(q):
    """Pickle a stdlib queue as its own __getstate__ does (the same checks), with its shared locks."""
    state = q.__getstate__()
    shared = q.__dict__.get("_dragon_shared_locks")
    if shared is not None:  # (a copy: what it holds in their place are this process's)
        mine = (q._rlock, q._wlock)
        state = tuple(shared[mine.index(x)] if any(x is m for m in mine) else x for x in state)
    return (_rebuild_stdlib_queue, (type(q), state))


def _rebuild_stdlib_queue(cls, state):
    q = cls.__new__(cls)
    q.__setstate__(state)
    q._dragon_shared_locks = (q._rlock, q._wlock)
    q._rlock = _ProcessLock()
    if q._wlock is not None:
        q._wlock = _ProcessLock()
    if isinstance(q._reader, Connection):  # (its get polls, then reads: what the poll found is kept for it)
        q._reader._poll_holds = True
    return q


def stdlib_queue_classes():
    """The stdlib's queue classes and every subclass defined so far (concurrent.futures' _SafeQueue once it
    is imported), but those that say how they pickle themselves (their own __reduce__ or __reduce_ex__)."""
    todo = [_mpqueues.Queue, _mpqueues.SimpleQueue]
    seen = []
    while todo:
        cls = todo.pop()
        if cls in seen or "__reduce__" in cls.__dict__ or "__reduce_ex__" in cls.__dict__:
            continue
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen
