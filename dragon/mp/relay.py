"""File-descriptor connections sent to a dragon process: what the stdlib builds on os pipes (its own Queue,
``multiprocessing.connection.Pipe``, and so ``concurrent.futures``' call queue) still works with dragon
processes, on any node.

A dragon process cannot receive a file descriptor (it may run on another node). When such a Connection is
pickled, this process relays it through a channel of its heap instead, with a thread per direction: what
arrives on the descriptor is sent into the channel, and what the other processes send into the channel is
written to the descriptor, message by message. The receiving process gets a dragon Connection on that channel.
The end of file of the descriptor reaches the channel's readers. One relay serves every copy of the same
descriptor (by inode). The relay lives as long as this process; it copies every message once more, so a dragon
Pipe or Queue is the faster choice.
"""

import os
import threading
from multiprocessing import connection as _mpconn

from dragon.errors import ChannelError
from dragon.mp import heap, serial
from dragon.mp.connection import _MARK, BLOCK, BYE, CAPACITY, Connection, _token

_lock = threading.Lock()
_relays = {}  # (pid, dev, inode, direction) -> (sdesc, token)


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
                target=_pump_in, args=(src, ch, tok), name="dragon-mp-relay-in", daemon=True
            ).start()
            _relays[key] = (bytes(ch.sdesc), tok)
        return _relays[key]


def _pump_in(src, ch, tok):
    try:
        while True:
            try:
                data = src.recv_bytes()
            except (EOFError, OSError):
                break
            serial.send_raw(ch, data)
        ch.send(_MARK.pack(BYE, tok), timeout=5)
    except ChannelError:
        pass  # this process's heap is gone: it is exiting
    finally:
        src.close()


def _outbound(conn):
    """A channel whose messages are written to conn's descriptor. -> sdesc."""
    key = _key(conn.fileno(), "out")
    with _lock:
        if key not in _relays:
            ch = heap.channel(CAPACITY, BLOCK)
            dst = _mpconn.Connection(os.dup(conn.fileno()), readable=False)
            threading.Thread(
                target=_pump_out, args=(ch, dst), name="dragon-mp-relay-out", daemon=True
            ).start()
            _relays[key] = (bytes(ch.sdesc), None)
        return _relays[key][0]


def _pump_out(ch, dst):
    try:
        while True:
            msg = ch.recv_message()
            if serial.kind(msg) in (BYE,):
                continue
            dst.send_bytes(serial.load_bytes(msg))
            msg.release()
    except (ChannelError, OSError):
        pass  # the heap is gone (exit), or nobody reads the descriptor any more
    finally:
        dst.close()


_RELAY = 0  # the relay's token is held by a thread of the relaying process: its BYE comes at the fd's EOF


def reduce_fd_connection(conn):
    """Pickle a stdlib Connection as a dragon Connection on relay channels."""
    recv_sd = tok = send_sd = None
    if conn.readable:
        recv_sd, tok = _inbound(conn)
    if conn.writable:
        send_sd = _outbound(conn)
    return (_rebuild, (send_sd, recv_sd, tok))


def _rebuild(send_sd, recv_sd, tok):
    return Connection(send_sd, recv_sd, live=None if tok is None else {tok: _RELAY})
