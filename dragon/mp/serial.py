"""How objects travel through this package's channels (queues, pipes, pool tasks, process start).

A message is one channel message, whose first byte says what it holds:

- ``0x80``: a pickle (the pickle's own PROTO opcode), sent inline or, when big, in a pool block by the
  channel;
- ``FRAMED``: a pickle whose large buffers (numpy arrays, bytearrays: protocol 5's out-of-band buffers) follow
  it in the same pool block, 64-byte aligned. The sender copies each buffer once, into the block, and hands
  the block over (``send_block``); the receiver unpickles straight from the block (``recv_message``): a
  received array is a view of the block, which is freed when the array is gone. A framed message may also
  carry raw bytes (``Connection.send_bytes`` of a large buffer) instead of a pickle;
- ``RAW``: raw bytes (``Connection.send_bytes``) follow;
- other values are control markers of the connection layer (see ``connection.py``).

Everything read from a channel is checked before it is used: a frame whose lengths do not fit its message
raises ``ChannelError``. (Unpickling itself trusts the sender, as multiprocessing does: every process of a job
is the same user's.)
"""

import builtins
import copyreg
import io
import os
import pickle
import socket
import struct
import sys
import threading
import types
from multiprocessing import connection as _mpconn
from multiprocessing.reduction import ForkingPickler

from dragon.channels import Channel
from dragon.errors import ChannelError, PoolError

PROTOCOL = 5
FRAMED = 0x01
RAW = 0x02
OOB_MIN = 4096  # buffers smaller than this are pickled in-band
RAW_FRAME_MIN = 64 * 1024  # send_bytes payloads above this go framed (one copy instead of two)
ALIGN = 64
_HDR = struct.Struct(
    "<BBHIQ"
)  # kind, flags (1: raw bytes instead of a pickle), 0, number of buffers, main length
_LEN = struct.Struct("<Q")
F_RAW = 1

_overrides = {}  # type -> reducer: what this package pickles differently from ForkingPickler (see override())
_table_key = None
_table = None


def override(cls, reducer):
    """Pickle ``cls`` with ``reducer`` in this package's pickler (e.g. refuse what cannot cross nodes)."""
    global _table_key
    _overrides[cls] = reducer
    _table_key = None  # rebuilt at the next use (the key counts entries, not replacements)


def _reduce_fd_connection(conn):
    from dragon.mp import relay

    return relay.reduce_fd_connection(conn)


def _refuse_socket(sock):
    from dragon.errors import NotSupported

    raise NotSupported(
        f"{sock!r} cannot be sent to a dragon process: a socket is a file descriptor, and the process may "
        "run on another node"
    )


override(_mpconn.Connection, _reduce_fd_connection)
override(socket.socket, _refuse_socket)


_copyreg_table, _forking_table = copyreg.dispatch_table, ForkingPickler._extra_reducers


def _live_key():
    # (the modules count: an import may define a subclass of a stdlib queue, see _dispatch_table)
    return len(_copyreg_table) + (len(_forking_table) << 20) + (len(_overrides) << 40) + (len(_modules) << 60)


_modules = sys.modules


def _dispatch_table():
    """ForkingPickler's table plus ours, rebuilt only when a registry changed or a module was imported (it
    is read by every pickler). The stdlib's queues and their subclasses known by then are pickled by
    relay.reduce_stdlib_queue (a subclass defined later in an already imported module goes the stdlib's way:
    correct, with a shared lock per read)."""
    global _table, _table_key
    key = _live_key()
    if key != _table_key:
        from dragon.mp import relay

        t = dict(copyreg.dispatch_table)
        t.update(ForkingPickler._extra_reducers)
        for cls in relay.stdlib_queue_classes():
            t.setdefault(cls, relay.reduce_stdlib_queue)
        t.update(_overrides)
        _table, _table_key = t, _live_key()
    return _table


class _Pickler(pickle.Pickler):
    """multiprocessing's ForkingPickler with this package's overrides, protocol 5, optional out-of-band
    buffers."""

    def __init__(self, file, buffer_callback=None):
        super().__init__(file, PROTOCOL, buffer_callback=buffer_callback)
        self.dispatch_table = _dispatch_table()


def _by_value(pickler, obj):
    """reducer_override of a process whose main module is a notebook, a REPL or ``python -c``: the functions
    and classes it defines cannot be imported by name in a child (spawn's children fail there: "Can't get
    attribute 'f' on <module '__main__'>"), so they go by value (cloudpickle: code, the globals they use,
    defaults, closures); everything else as usual."""
    if getattr(obj, "__module__", None) == "__main__" and isinstance(obj, (types.FunctionType, type)):
        import cloudpickle

        return cloudpickle.loads, (cloudpickle.dumps(obj, protocol=PROTOCOL),)
    return NotImplemented


class _InteractivePickler(_Pickler):
    reducer_override = _by_value


THAW_KEEP = 64  # functions a process keeps loaded from by_value_once's pickles (the most recent)
_thawed: dict = {}


class _ByValue:
    """A function (or class) of an interactive __main__ as the tasks of one Pool call carry it: pickled by
    value once for the call (not once per batch of its tasks: ~60 us each), and loaded once per process that
    runs them (_thaw keeps it by the call's key). Calling it calls the function."""

    __slots__ = ("data", "func", "key")

    def __init__(self, func):
        self.func, self.key, self.data = func, os.urandom(8), None

    def __call__(self, *args, **kwds):
        return self.func(*args, **kwds)

    def __reduce__(self):
        if self.data is None:
            import cloudpickle

            self.data = cloudpickle.dumps(self.func, protocol=PROTOCOL)
        return _thaw, (self.key, self.data)


def _thaw(key, data):
    f = _thawed.get(key)
    if f is None:
        import cloudpickle

        f = _thawed[key] = cloudpickle.loads(data)
        if len(_thawed) > THAW_KEEP:
            del _thawed[next(iter(_thawed))]
    return f


def by_value_once(func):
    """func as the tasks of one Pool call should carry it: a _ByValue if it goes by value (a function or class
    of an interactive __main__), else func itself (it goes by name, as with spawn)."""
    if (
        isinstance(func, (types.FunctionType, type))
        and getattr(func, "__module__", None) == "__main__"
        and _interactive()
    ):
        return _ByValue(func)
    return func


def _interactive():
    """Whether this process's __main__ is interactive (a Jupyter/IPython kernel, a REPL, ``python -c``): its
    definitions exist in no file a child could run."""
    main = sys.modules.get("__main__")
    return main is None or not getattr(main, "__file__", None) or hasattr(builtins, "__IPYTHON__")


# What goes through multiprocessing's own pickler in such a process (concurrent.futures' call queue, a
# multiprocessing.queues.Queue made with the dragon context) needs the same: its ForkingPickler gets the
# override too (it returns NotImplemented for anything else, and a child of another start method gains)
if _interactive() and "reducer_override" not in ForkingPickler.__dict__:
    ForkingPickler.reducer_override = _by_value  # type: ignore[attr-defined]


def Pickler(file, buffer_callback=None):
    """A pickler for this process (by value for what an interactive __main__ defines: _InteractivePickler)."""
    cls = _InteractivePickler if _interactive() else _Pickler
    return cls(file, buffer_callback=buffer_callback)


def dumps(obj):
    """bytes of obj (in-band only)."""
    f = io.BytesIO()
    _dump(Pickler(f), obj)
    return f.getvalue()


def on_failed_pickle(undo):
    """Have undo() called if the pickle this thread is making with this module fails: for a reducer with a
    side effect (a pipe's writer announces its copy to the reader, which would wait for it for good)."""
    stack = getattr(_tls, "undo", None)
    if stack:
        if stack[-1] is None:
            stack[-1] = []
        stack[-1].append(undo)


def _undo_stack():
    """This thread's stack of the pickles being made, each with what to undo if it fails (None: nothing, the
    common case, costs no list)."""
    try:
        return _tls.undo
    except AttributeError:
        _tls.undo = []
        return _tls.undo


def _failed(undos):
    for undo in undos or ():
        try:
            undo()
        except Exception:  # (the pickle's own error is the one to report)
            pass


def _succeeded(stack, undos):
    if stack:  # a pickle made while making another: undone if that one fails
        if stack[-1] is None:
            stack[-1] = []
        stack[-1].extend(undos)


class undo_if_failed:
    """A with block whose pickles (made with this module) are undone (on_failed_pickle) if the block raises:
    for a pickle whose use can still fail after it was made (a Process's, until the process exists)."""

    def __enter__(self):
        self.stack = _undo_stack()
        self.stack.append(None)
        return self

    def __exit__(self, exc_type, exc, tb):
        undos = self.stack.pop()
        if exc_type is not None:
            _failed(undos)
        elif undos:
            _succeeded(self.stack, undos)


def _dump(p, obj, stack=None):
    """p.dump(obj); if it raises, run what reducers asked to undo (on_failed_pickle). stack: this thread's
    (_undo_stack(), which a caller may keep)."""
    if stack is None:
        stack = _undo_stack()
    stack.append(None)
    try:
        p.dump(obj)
    except BaseException:
        _failed(stack.pop())
        raise
    undos = stack.pop()
    if undos:
        _succeeded(stack, undos)


class _Reusable:
    """A pickler kept per thread: making one (with its dispatch table) costs 3 us, three times the pickling of
    a small object; reusing it costs a memo clear."""

    __slots__ = ("f", "p", "bufs", "busy", "key", "undo")

    def __init__(self):
        self.f = io.BytesIO()
        self.bufs = []
        self.busy = False
        self.p = Pickler(self.f, buffer_callback=self._keep)
        self.key = _live_key()
        self.undo = _undo_stack()  # (made in the thread that uses it)

    def _keep(self, pb):
        try:
            n = pb.raw().nbytes
        except BufferError:  # not contiguous: in-band
            return True
        if n < OOB_MIN:
            return True
        self.bufs.append(pb)
        return False

    def dump(self, obj):
        key = (
            len(_copyreg_table)
            + (len(_forking_table) << 20)
            + (len(_overrides) << 40)
            + (len(_modules) << 60)
        )  # _live_key(), inline
        if key != self.key:
            self.p.dispatch_table = _dispatch_table()
            self.key = key
        f = self.f
        f.seek(0)
        f.truncate()
        self.bufs = []
        self.busy = True
        try:
            self.p.clear_memo()
            _dump(self.p, obj, self.undo)
            return f.getvalue(), self.bufs
        finally:
            self.busy = False


_tls = threading.local()


def dumps_oob(obj):
    """(pickle bytes, [PickleBuffer]): buffers of at least OOB_MIN bytes are left out of the pickle."""
    r = getattr(_tls, "r", None)
    if r is None or r.busy:  # first use in this thread, or a reducer that pickles while we pickle
        r = _Reusable()
        if getattr(_tls, "r", None) is None:
            _tls.r = r
    return r.dump(obj)


def _align(n):
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def _send_framed(ch, main, bufs, flags, timeout):
    """One pool block: header, main (pickle or raw bytes), buffers; handed to the channel without a copy."""
    sizes = [b.raw().nbytes for b in bufs]
    head = _HDR.size + _LEN.size * len(sizes)
    off = _align(head)
    offs = []
    pos = _align(off + len(main))
    for n in sizes:
        offs.append(pos)
        pos = _align(pos + n)
    total = max(pos, off + len(main))
    pool = ch.pool
    try:
        blk = pool.alloc(total, timeout=timeout)
    except PoolError as e:
        if isinstance(ch, Channel):
            raise
        raise PoolError(
            f"a {total}-byte message for node {ch.node} must fit in this node's staging pool ({pool.size} "
            f"bytes; DRAGON_INFRA_POOL_SIZE sets it): {e}"
        ) from e
    try:
        mv = memoryview(blk)
        _HDR.pack_into(mv, 0, FRAMED, flags, 0, len(sizes), len(main))
        for i, n in enumerate(sizes):
            _LEN.pack_into(mv, _HDR.size + _LEN.size * i, n)
        mv[off : off + len(main)] = main
        for b, o, n in zip(bufs, offs, sizes):
            mv[o : o + n] = b.raw().cast("B")
        mv.release()
        ch.send_block(blk, nbytes=total, timeout=timeout)
    except BaseException:
        if not blk.freed:
            pool.free(blk)
        raise


def send_obj(ch, obj, timeout=None):
    """Pickle obj into one message of ch (framed when it has large buffers)."""
    data, bufs = dumps_oob(obj)
    if bufs:
        _send_framed(ch, data, bufs, 0, timeout)
    else:
        ch.send(data, timeout=timeout)


def send_raw(ch, buf, timeout=None):
    """Raw bytes (a bytes-like object) as one message."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes >= RAW_FRAME_MIN:
        _send_framed(ch, mv, (), F_RAW, timeout)
    else:
        ch.send(b"\x02" + mv, timeout=timeout)


def _frame(mv):
    """-> (flags, main view, [buffer views]) of a framed message, every length checked against the message."""
    n = mv.nbytes
    if n < _HDR.size:
        raise ChannelError(f"corrupt message: {n} bytes is shorter than a frame header")
    _, flags, _, nbufs, main_len = _HDR.unpack_from(mv, 0)
    head = _HDR.size + _LEN.size * nbufs
    if head > n:
        raise ChannelError(f"corrupt message: {nbufs} buffers do not fit {n} bytes")
    off = _align(head)
    if off + main_len > n:
        raise ChannelError(f"corrupt message: a {main_len}-byte body does not fit {n} bytes")
    main = mv[off : off + main_len]
    pos = _align(off + main_len)
    bufs = []
    for i in range(nbufs):
        (size,) = _LEN.unpack_from(mv, _HDR.size + _LEN.size * i)
        if pos + size > n:
            raise ChannelError(f"corrupt message: buffer {i} ({size} bytes) does not fit {n} bytes")
        bufs.append(mv[pos : pos + size])
        pos = _align(pos + size)
    return flags, main, bufs


def kind(msg):
    """The first byte of a received message (a bytes-like object); ChannelError if it is empty."""
    if not len(msg):
        raise ChannelError("corrupt message: empty")
    return memoryview(msg)[0]


def load(msg):
    """The object in a received message (bytes or a core Message). Raw bytes come back as bytes."""
    if type(msg) is not bytes and not msg.in_pool:  # a message small enough for a slot: a pickle or raw bytes
        mv = memoryview(msg)
        return pickle.loads(mv) if mv[0] == 0x80 else _load_other(mv)
    return _load_other(memoryview(msg))


def _load_other(mv):
    if not mv.nbytes:
        raise ChannelError("corrupt message: empty")
    k = mv[0]
    if k == 0x80:
        return pickle.loads(mv)
    if k == RAW:
        return pickle.loads(mv[1:])
    if k == FRAMED:
        flags, main, bufs = _frame(mv)
        return pickle.loads(main, buffers=bufs) if not flags & F_RAW else pickle.loads(main)
    raise ChannelError(f"corrupt message: unknown kind {k:#x}")


def load_bytes(msg):
    """The message as bytes, the way a pipe would hand them over: a pickle's bytes, or the raw payload."""
    k = kind(msg)
    if k == 0x80:
        return bytes(msg)
    if k == RAW:
        return bytes(memoryview(msg)[1:])
    if k == FRAMED:
        flags, main, bufs = _frame(memoryview(msg))
        if flags & F_RAW:
            return bytes(main)
        return dumps(pickle.loads(main, buffers=bufs))  # rare: the bytes of a pickle whose buffers were apart
    raise ChannelError(f"corrupt message: unknown kind {k:#x}")
