"""RawValue, RawArray, Value and Array: ctypes objects in a block of their creator's heap.

On the creator's node a shared object is a real ctypes object over the block (shared memory: ``np.frombuffer``
works on it). On another node it is a ``RemoteCData``: the same ``.value`` / indexing / slicing / ``len`` /
field access, each a request to a thread of the creating process (``MemoryServer``, started when an object is
first sent away) that reads or writes the block; it is not a ctypes object. ``Value`` and ``Array`` wrap
either one with a lock (an RLock by default) as the stdlib does; unlike the stdlib's, these objects may also
be sent through queues and pipes.
"""

import ctypes
import os
import threading
import weakref
from multiprocessing import sharedctypes as _mpshared

import msgpack

from dragon.errors import ChannelEmpty, ChannelError, ChannelTimeout, PoolError
from dragon.mp import heap

typecode_to_type = _mpshared.typecode_to_type
REQUEST_TIMEOUT = 60.0
# channel handles a memory server (its clients' reply channels) or a client (the servers) keeps attached: past
# this many the oldest is closed (one per peer ever served, before: a dead peer sends nothing that fails)
HANDLE_CACHE = 64

_classes = weakref.WeakKeyDictionary()


def _shared_class(type_):
    """type_'s subclass that pickles as a reference to the block (cached)."""
    cls = _classes.get(type_)
    if cls is None:
        cls = _classes[type_] = type(
            type_.__name__, (type_,), {"__reduce__": _reduce_raw, "__module__": __name__}
        )
    return cls


def _new(type_):
    size = ctypes.sizeof(type_)
    pool = heap.pool()
    blk = pool.alloc(max(size, 1))
    # over the block's address, not a view of it: a view would still be held when the object's Owned frees
    # the block (the object's attributes go before its buffer), the free would fail and every Value ever
    # made would stay in the heap. The Owned keeps the block (and so the mapping) as long as the object.
    view = ctypes.c_char.from_buffer(blk)
    addr = ctypes.addressof(view)
    del view  # (its view of the block is released with it)
    obj = _shared_class(type_).from_address(addr)
    ctypes.memset(addr, 0, size)
    obj._dragon_loc = (bytes(pool.sdesc), blk.offset)
    obj._dragon_owned = heap.Owned(blocks=[blk])
    return obj


def RawValue(typecode_or_type, *args):
    """A ctypes object in shared memory (see the module's docstring for other nodes)."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    obj = _new(type_)
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array in shared memory."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    if isinstance(size_or_initializer, int):
        return _new(type_ * size_or_initializer)
    obj = _new(type_ * len(size_or_initializer))
    obj.__init__(*size_or_initializer)
    return obj


def _lock_for(lock, ctx):
    if lock in (True, None):
        return ctx.RLock()
    if not hasattr(lock, "acquire"):
        raise AttributeError(f"{lock!r} has no method 'acquire'")
    return lock


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """A RawValue behind a lock (``lock=False``: the raw object)."""
    obj = RawValue(typecode_or_type, *args)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock, ctx))


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """A RawArray behind a lock (``lock=False``: the raw array)."""
    obj = RawArray(typecode_or_type, size_or_initializer)
    if lock is False:
        return obj
    return synchronized(obj, _lock_for(lock, ctx))


# ---- pickling ------------------------------------------------------------------------------------------
def _describe(obj):
    """(base type, array length or None) of a shared object, picklable by reference."""
    cls = obj._ctype if isinstance(obj, RemoteCData) else type(obj).__mro__[1]
    if issubclass(cls, ctypes.Array):
        return cls._type_, cls._length_
    return cls, None


def _reduce_raw(obj):
    sdesc, offset = obj._dragon_loc
    owned = getattr(obj, "_dragon_owned", None)
    if owned is not None:
        owned.shared = True
    server = getattr(obj, "_dragon_server", None) or MemoryServer.get().sdesc
    return (_rebuild_raw, (*_describe(obj), sdesc, offset, server))


def _rebuild_raw(type_, length, sdesc, offset, server):
    # (no cache of the pool: the object's block keeps the creator's heap mapped as long as it lives, and a
    # second attach while it does reuses that mapping; a cache kept the heap of every process that ever sent
    # one mapped, its memory with it, long after that process had ended and its heap was unlinked)
    from dragon.pools import Pool

    if length is not None:
        type_ = type_ * length
    try:
        pool = Pool.attach(sdesc)
    except PoolError:  # on another node: a pool can only be mapped on its own
        return RemoteCData(type_, sdesc, offset, server)
    obj = _shared_class(type_).from_buffer(pool.block(offset))
    obj._dragon_loc = (sdesc, offset)
    obj._dragon_server = server
    return obj


# ---- synchronized wrappers -----------------------------------------------------------------------------
class _Picklable:
    """Synchronized wrappers that may be sent anywhere (the stdlib's only through Process.start)."""

    def __reduce__(self):
        return (synchronized, (self._obj, self._lock))


class Synchronized(_Picklable, _mpshared.Synchronized):
    pass


class SynchronizedArray(_Picklable, _mpshared.SynchronizedArray):
    pass


class SynchronizedString(_Picklable, _mpshared.SynchronizedString):
    pass


_struct_wrappers = weakref.WeakKeyDictionary()


def synchronized(obj, lock=None, ctx=None):
    """obj (a shared ctypes object or a RemoteCData) behind lock."""
    if lock is None:
        from dragon.mp.context import DragonContext

        lock = (ctx or DragonContext()).RLock()
    cls, length = _describe(obj)
    if length is not None:
        return (SynchronizedString if cls is ctypes.c_char else SynchronizedArray)(obj, lock)
    if issubclass(cls, ctypes._SimpleCData):
        return Synchronized(obj, lock)
    wrapper = _struct_wrappers.get(cls)
    if wrapper is None:
        props = {name: _mpshared.make_property(name) for name, *_ in cls._fields_}
        wrapper = _struct_wrappers[cls] = type(
            "Synchronized" + cls.__name__, (_Picklable, _mpshared.SynchronizedBase), props
        )
    return wrapper(obj, lock)


# ---- another node: the creator's memory server ---------------------------------------------------------
class RemoteCData:
    """A shared ctypes object of another node: reads and writes go to its creator's MemoryServer."""

    def __init__(self, ctype, sdesc, offset, server):
        self._ctype, self._dragon_loc, self._dragon_server = ctype, (sdesc, offset), server
        self._elem = ctype._type_ if issubclass(ctype, ctypes.Array) else None

    def _read(self, start, n):
        return _client().call(self._dragon_server, "r", self._dragon_loc[1], start, n)

    def _write(self, start, data):
        _client().call(self._dragon_server, "w", self._dragon_loc[1], start, bytes(data))

    def _whole(self):
        return self._ctype.from_buffer_copy(self._read(0, ctypes.sizeof(self._ctype)))

    # simple values and char arrays
    @property
    def value(self):
        return self._whole().value

    @value.setter
    def value(self, v):
        if issubclass(self._ctype, ctypes._SimpleCData):  # (its value is all of it: nothing to read first)
            tmp = self._ctype()
        else:  # (a char array: what follows a shorter value stays)
            tmp = self._whole()
        tmp.value = v
        self._write(0, bytes(tmp))

    @property
    def raw(self):
        return self._whole().raw

    @raw.setter
    def raw(self, v):
        tmp = self._whole()
        tmp.raw = v
        self._write(0, bytes(tmp))

    # arrays
    def __len__(self):
        if self._elem is None:
            raise TypeError(f"object of type {self._ctype.__name__} has no len()")
        return self._ctype._length_

    def __getitem__(self, i):
        if self._elem is None:
            raise TypeError(f"{self._ctype.__name__} is not subscriptable")
        size = ctypes.sizeof(self._elem)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1 or stop <= start:
                return self._whole()[i]
            n = stop - start
            return (self._elem * n).from_buffer_copy(self._read(start * size, n * size))[:]
        i = range(len(self))[i]
        return (self._elem * 1).from_buffer_copy(self._read(i * size, size))[0]

    def __setitem__(self, i, v):
        if self._elem is None:
            raise TypeError(f"{self._ctype.__name__} does not support item assignment")
        size = ctypes.sizeof(self._elem)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1 and stop > start:
                tmp = (self._elem * (stop - start))()
                tmp[:] = v
                self._write(start * size, bytes(tmp))
                return
            tmp = self._whole()
            tmp[i] = v
            self._write(0, bytes(tmp))
            return
        i = range(len(self))[i]
        tmp = (self._elem * 1)()
        tmp[0] = v
        self._write(i * size, bytes(tmp))

    # structures
    def __getattr__(self, name):
        ctype = self.__dict__.get("_ctype")
        if ctype is None or not any(f[0] == name for f in getattr(ctype, "_fields_", ())):
            raise AttributeError(name)
        return getattr(self._whole(), name)

    def __setattr__(self, name, v):
        ctype = self.__dict__.get("_ctype")
        if ctype is not None and any(f[0] == name for f in getattr(ctype, "_fields_", ())):
            field = getattr(ctype, name)
            tmp = self._whole()
            setattr(tmp, name, v)
            self._write(field.offset, bytes(tmp)[field.offset : field.offset + field.size])
        else:
            object.__setattr__(self, name, v)

    def __reduce__(self):
        return _reduce_raw(self)

    def __repr__(self):
        return f"<RemoteCData {self._ctype.__name__} at offset {self._dragon_loc[1]} of another node>"


def _cached(handles, sdesc):
    """The handle of channel sdesc from the cache handles (attached and added if missing, the oldest closed
    past HANDLE_CACHE)."""
    ch = handles.get(sdesc)
    if ch is None:
        if len(handles) >= HANDLE_CACHE:
            try:
                handles.pop(next(iter(handles))).close()
            except ChannelError:
                pass
        ch = handles[sdesc] = heap.attach(sdesc)
    return ch


class MemoryServer:
    """A thread of the creating process that reads and writes its heap's blocks for processes of other nodes.
    Requests (msgpack): [op, block offset, start, n or data, reply sdesc, tag]; answers [tag, error, data]."""

    _inst = None
    _lock = threading.Lock()

    def __init__(self):
        self.ch = heap.channel(256, 256)
        self.sdesc = bytes(self.ch.sdesc)
        self.pid = os.getpid()
        self.replies = {}
        threading.Thread(target=self._serve, name="dragon-mp-memory", daemon=True).start()

    @classmethod
    def get(cls):
        with cls._lock:
            if cls._inst is None or cls._inst.pid != os.getpid():
                cls._inst = cls()
            return cls._inst

    def _serve(self):
        pool = heap.pool()
        while True:
            try:
                msg = self.ch.recv(timeout=None)
                op, boff, start, arg, reply, tag = msgpack.unpackb(msg)
            except ChannelError:
                return  # the heap is gone: this process is exiting
            except Exception:
                continue  # garbage: no reply channel to answer to
            try:
                blk = pool.block(boff)
                n = arg if op == "r" else len(arg)
                if start < 0 or n < 0 or start + n > blk.size:
                    raise ValueError(f"bytes {start}..{start + n} are outside the {blk.size}-byte block")
                mv = memoryview(blk)
                if op == "r":
                    out = [tag, None, bytes(mv[start : start + n])]
                else:
                    mv[start : start + n] = arg
                    out = [tag, None, None]
                mv.release()
            except Exception as e:
                out = [tag, f"{type(e).__name__}: {e}", None]
            try:
                ch = _cached(self.replies, reply)
                ch.send(msgpack.packb(out), timeout=REQUEST_TIMEOUT)
            except ChannelError:
                self.replies.pop(reply, None)


class _Client:
    """This process's side of requests to memory servers (one at a time)."""

    def __init__(self):
        self.pid = os.getpid()
        self.reply = heap.channel(4, 256)
        self.reply_sdesc = bytes(self.reply.sdesc)
        self.servers = {}
        self.lock = threading.Lock()
        self.tag = 0

    def call(self, server, op, boff, start, arg):
        with self.lock:
            self.tag += 1
            ch = _cached(self.servers, server)
            try:
                ch.send(
                    msgpack.packb([op, boff, start, arg, self.reply_sdesc, self.tag]), timeout=REQUEST_TIMEOUT
                )
                while True:
                    tag, err, data = msgpack.unpackb(self.reply.recv(timeout=REQUEST_TIMEOUT))
                    if tag == self.tag:
                        break
            except (ChannelEmpty, ChannelTimeout):
                raise OSError("the process that made this shared object did not answer") from None
            except ChannelError as e:
                raise OSError(f"the process that made this shared object is gone: {e}") from e
            if err:
                raise OSError(f"shared object access failed: {err}")
            return data


_the_client = None


def _client():
    global _the_client
    if _the_client is None or _the_client.pid != os.getpid():
        _the_client = _Client()
    return _the_client
