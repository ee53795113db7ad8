"""dragon._core.core: shared-memory pools and lock-free channels (see include/dshm.h for the data layout).

Objects, buffers, GIL handling and errors live here; atomics, futexes, the allocator and the ring live in C.
Every C return code goes through ``_raise`` (one place), which picks the documented exception from dragon.errors.
"""
import os
import struct
import weakref

cimport cython

from libc.stdint cimport uint32_t, uint64_t, int64_t, UINT64_MAX
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EEXIST, ENOENT, EINTR
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES)
from cpython.exc cimport PyErr_CheckSignals
from cpython.number cimport PyNumber_Index
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from posix.mman cimport mmap, munmap, shm_open, shm_unlink, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.fcntl cimport O_RDWR, O_CREAT, O_EXCL, O_CLOEXEC
from posix.unistd cimport close, ftruncate
from posix.stat cimport fstat, struct_stat

from dragon._core.cdefs cimport *

from dragon.errors import (ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout, PoolError, PoolFull,
                           PoolTimeout)

__all__ = ["Pool", "Block", "Channel", "Message", "job_id", "job_prefix", "unlink_job_segments",
           "set_pdeathsig", "set_child_subreaper", "set_wait_params", "wait_stats",
           "local_node",
           "SDESC_VERSION"]

if ds_init() != 0:
    raise ImportError("dragon._core: pthread_atfork failed")

# ---------------------------------------------------------------------------------------------- constants
DEF NAME_MAX = 255
cdef int64_t DL_FOREVER = -1   # deadline encodings: block forever / never block / CLOCK_MONOTONIC ns
cdef int64_t DL_NONBLOCK = 0
cdef int K_POOL = 0
cdef int K_CHAN = 1
cdef int MODE_SEND = 0
cdef int MODE_RECV = 1
cdef int MODE_POLL = 2
cdef Py_ssize_t BIG_COPY = 65536   # copies at least this big run without the GIL

SDESC_VERSION = 2
cdef char *FMT_B = "B"
cdef bytes SD_MAGIC = b"DRGN"
cdef int SD_POOL = 1
cdef int SD_CHANNEL = 2
# magic, version, kind, name length, pool generation, pool size, channel offset, channel generation, node (the
# index of the node whose /dev/shm holds the segment); then name
_SD = struct.Struct("<4sBBHQQQQH")


def local_node():
    """The index of the node this process runs on: env DRAGON_NODE (set by the runtime), default 0."""
    try:
        node = int(os.environ.get("DRAGON_NODE") or 0)
    except ValueError:
        return 0
    return node if 0 <= node <= 0xFFFF else 0



_segments = weakref.WeakValueDictionary()  # (segment name, generation) -> _Segment: one mapping per process
_counter = 0


# ---------------------------------------------------------------------------------------------- errors
cdef str _rc_name(int rc):
    return {DS_OK: "OK", DS_FULL: "FULL", DS_EMPTY: "EMPTY", DS_TIMEOUT: "TIMEOUT", DS_TOO_BIG: "TOO_BIG",
            DS_DESTROYED: "DESTROYED", DS_CORRUPT: "CORRUPT", DS_INTR: "INTR", DS_BADARG: "BADARG",
            DS_TOO_SMALL: "TOO_SMALL", DS_STALE: "STALE"}.get(rc, str(rc))


cdef int _raise(int rc, int kind, str what, uint64_t detail=0) except -1:
    """The one place that turns a C return code into the documented exception."""
    if kind == K_POOL:
        if rc == DS_FULL:
            raise PoolFull(f"{what}: no room for {detail} bytes right now")
        if rc == DS_TIMEOUT:
            raise PoolTimeout(f"{what}: no room for {detail} bytes before the timeout")
        if rc == DS_TOO_BIG:
            raise PoolError(f"{what}: {detail} bytes is more than the pool could ever hold")
        if rc == DS_DESTROYED:
            raise PoolError(f"{what} was destroyed")
        if rc == DS_BADARG:
            raise PoolError(f"{what}: offset {detail} is not an allocated block")
        if rc == DS_STALE:
            raise PoolError(f"{what}: stale sdesc (the pool was destroyed and recreated)")
        if rc == DS_CORRUPT:
            raise PoolError(f"{what}: corrupt pool header or mutex")
        raise PoolError(f"{what}: error {_rc_name(rc)}")
    if rc == DS_FULL:
        raise ChannelFull(f"{what} is full")
    if rc == DS_EMPTY:
        raise ChannelEmpty(f"{what} is empty")
    if rc == DS_TIMEOUT:
        raise ChannelTimeout(f"{what}: timed out")
    if rc == DS_TOO_BIG:
        raise ChannelError(f"{what}: a {detail}-byte message is more than its pool could ever hold")
    if rc == DS_DESTROYED:
        raise ChannelError(f"{what} was destroyed")
    if rc == DS_TOO_SMALL:
        raise ChannelError(f"{what}: receive buffer too small for the next message ({detail} bytes); "
                           f"the message stays queued")
    if rc == DS_STALE:
        raise ChannelError(f"{what}: stale sdesc (the channel or its pool was destroyed and recreated)")
    if rc == DS_BADARG:
        raise ChannelError(f"{what}: the sdesc does not point at an allocated block of its pool")
    if rc == DS_CORRUPT:
        raise ChannelError(f"{what}: corrupt channel header or slot state")
    raise ChannelError(f"{what}: error {_rc_name(rc)}")


cdef long long _int(object value, object err, str what) except? -1:
    """An integer argument: TypeError for non-integers, ``err`` for integers that do not fit in 64 bits."""
    try:
        return PyNumber_Index(value)  # no silent truncation of floats
    except OverflowError:
        raise err(f"{what} {value} is out of range") from None


cdef inline int64_t _deadline(object timeout, object err=ChannelError) except -2:
    """None: block forever; <= 0: never block; t: block up to t seconds (CLOCK_MONOTONIC deadline in ns)."""
    if timeout is None:
        return DL_FOREVER
    cdef double t = timeout
    if t != t:
        raise err(f"timeout must be None or a number of seconds, not {timeout!r}")
    if t <= 0:
        return DL_NONBLOCK
    if t > 1e9:
        return DL_FOREVER
    return ds_now() + <int64_t>(t * 1e9)


# ---------------------------------------------------------------------------------------------- OS helpers
def job_id():
    """This job's id: env DRAGON_JOB if set (the launcher sets it), else ``u<uid>``."""
    job = os.environ.get("DRAGON_JOB") or f"u{os.getuid()}"
    if "/" in job or "\0" in job:
        raise PoolError(f"DRAGON_JOB {job!r} must not contain '/' or NUL")
    return job


def job_prefix(job=None):
    """Prefix of every shared-memory segment of the job: ``dragon-<job>-`` (a file name in /dev/shm)."""
    return f"dragon-{job_id() if job is None else job}-"


def unlink_job_segments(job=None):
    """Unlink every /dev/shm/dragon-<job>-* segment (default: this job); returns how many were removed."""
    prefix = job_prefix(job)
    n = 0
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                n += 1
            except FileNotFoundError:
                pass
    return n


def set_pdeathsig(int signum):
    """prctl(PR_SET_PDEATHSIG): get ``signum`` when the parent thread dies."""
    cdef int e = ds_set_pdeathsig(signum)
    if e:
        raise OSError(e, os.strerror(e))


def set_child_subreaper():
    """prctl(PR_SET_CHILD_SUBREAPER, 1): orphaned descendants are reparented to this process."""
    cdef int e = ds_set_child_subreaper()
    if e:
        raise OSError(e, os.strerror(e))


def _claim_id():
    """This process's claim id as stored in slots it claims: pid | start-time tag << 22 (for tests/debugging)."""
    return ds_me()


def _claim_dead(claim_id):
    """Would a slot claimed with ``claim_id`` be taken over (owner gone, zombie, or pid reused)? For tests."""
    return bool(ds_pid_dead(<uint32_t>claim_id))


def set_wait_params(spin_ns=None, chunk_ns=None, yield_ns=None, spin_max_ns=None):
    """Tune blocking waits in this process (every channel handle learns within these bounds, per direction).

    A blocked call keeps the CPU for a budget between ``spin_ns`` and ``spin_max_ns`` (learned from its recent
    waits: twice their length, down to ``spin_ns`` after a wait longer than ``spin_max_ns``), then sleeps on the
    futex in chunks of ``chunk_ns``. Within the budget it polls, calling sched_yield every ``yield_ns`` (at every
    poll when the peer last ran on this CPU). Giving ``spin_ns`` without ``spin_max_ns`` fixes the budget at
    ``spin_ns`` (no learning, no yield-at-once; 0: sleep at once).
    Returns the old (spin_ns, chunk_ns, yield_ns, spin_max_ns)."""
    global ds_spin_ns, ds_wait_chunk_ns, ds_yield_ns, ds_spin_max_ns
    old = (ds_spin_ns, ds_wait_chunk_ns, ds_yield_ns, ds_spin_max_ns)
    cdef int64_t lo = ds_spin_ns if spin_ns is None else _ns(spin_ns, 0, "spin_ns")
    cdef int64_t hi = ds_spin_max_ns
    if spin_max_ns is not None:
        hi = _ns(spin_max_ns, 0, "spin_max_ns")
    elif spin_ns is not None:
        hi = lo
    if hi < lo:
        raise ValueError(f"spin_max_ns ({hi}) must not be less than spin_ns ({lo})")
    cdef int64_t chunk = ds_wait_chunk_ns if chunk_ns is None else _ns(chunk_ns, 1000000, "chunk_ns")
    cdef int64_t yld = ds_yield_ns if yield_ns is None else _ns(yield_ns, 0, "yield_ns")
    ds_spin_ns, ds_spin_max_ns, ds_wait_chunk_ns, ds_yield_ns = lo, hi, chunk, yld
    return old


cdef int64_t _ns(object value, int64_t lo, str what) except -1:
    """A duration in ns for set_wait_params: a number (TypeError otherwise), clamped to [lo, 1 s]."""
    if isinstance(value, float) and value == value:
        value = int(value)
    try:
        v = PyNumber_Index(value)
    except TypeError:
        raise TypeError(f"{what} must be a number of nanoseconds, not {type(value).__name__}") from None
    return max(lo, min(v, 1000000000))


def wait_stats(reset=False):
    """Counters of this process's blocking waits since import, fork or the last reset: ``waits`` (calls that had
    to wait), ``yields`` (sched_yield calls), ``switches`` (yields that let another task run), ``sleeps``
    (FUTEX_WAIT calls), ``wakes`` (FUTEX_WAKE calls: one per sleep of a peer, none when nobody sleeps)."""
    out = dict(waits=ds_stats.waits, yields=ds_stats.yields, switches=ds_stats.switches, sleeps=ds_stats.sleeps,
               wakes=ds_stats.wakes)
    if reset:
        memset(&ds_stats, 0, sizeof(ds_stats))
    return out


# ---------------------------------------------------------------------------------------------- segments
cdef inline void _fill_buffer(Py_buffer *buf, object owner, char *p, Py_ssize_t n, Py_ssize_t *shape,
                              Py_ssize_t *strides, int flags):
    """A writable 1-D unsigned-byte buffer of n bytes at p, exported by owner (Block and Message)."""
    shape[0] = n
    strides[0] = 1
    buf.buf = p
    buf.obj = owner
    buf.len = n
    buf.readonly = 0
    buf.itemsize = 1
    buf.format = FMT_B if flags & PyBUF_FORMAT else NULL
    buf.ndim = 1
    buf.shape = shape if flags & PyBUF_ND else NULL
    buf.strides = strides if flags & PyBUF_STRIDES == PyBUF_STRIDES else NULL
    buf.suboffsets = NULL
    buf.internal = NULL


@cython.auto_pickle(False)  # never pickle raw pointers; see __reduce__
cdef class _Segment:
    """One mapping of one pool segment in this process; unmapped when the last Pool/Channel/Block/Message goes."""
    cdef char *base
    cdef uint64_t map_size
    cdef readonly str name
    cdef uint64_t generation
    cdef uint64_t data_size
    cdef bint destroyed      # destroy() was called in this process
    cdef int node            # the node whose /dev/shm holds it
    cdef object __weakref__

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.map_size)
            self.base = NULL


cdef _Segment _map_segment(str name, bint create, uint64_t nbits, uint64_t generation, int node):
    cdef bytes bname = ("/" + name).encode()
    cdef int fd
    cdef struct_stat stt
    cdef uint64_t bo, lo, do, ss
    cdef void *p
    cdef int rc, e
    ds_pool_layout(nbits, &bo, &lo, &do, &ss)
    if create:
        fd = shm_open(bname, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0:
            e = errno
            if e == EEXIST:
                raise PoolError(f"pool {name!r} already exists")
            raise PoolError(f"pool {name!r}: shm_open failed: {os.strerror(e)}")
        if ftruncate(fd, <long>ss) != 0:
            e = errno
            close(fd)
            shm_unlink(bname)
            raise PoolError(f"pool {name!r}: cannot size the segment to {ss} bytes: {os.strerror(e)}")
    else:
        fd = shm_open(bname, O_RDWR | O_CLOEXEC, 0)
        if fd < 0:
            e = errno
            if e == ENOENT:
                raise PoolError(f"pool {name!r} does not exist (destroyed, or a stale sdesc)")
            raise PoolError(f"pool {name!r}: shm_open failed: {os.strerror(e)}")
        if fstat(fd, &stt) != 0 or <uint64_t>stt.st_size != ss:
            close(fd)
            raise PoolError(f"pool {name!r}: segment size does not match the sdesc (stale or corrupt sdesc)")
    p = mmap(NULL, ss, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    e = errno
    close(fd)
    if p == MAP_FAILED:
        if create:
            shm_unlink(bname)
        raise PoolError(f"pool {name!r}: mmap of {ss} bytes failed: {os.strerror(e)}")
    cdef _Segment seg = _Segment.__new__(_Segment)
    seg.base = <char *>p
    seg.map_size = ss
    seg.name = name
    seg.generation = generation
    seg.data_size = nbits * DS_GRANULE
    seg.node = node
    if create:
        rc = ds_pool_init(seg.base, nbits, generation)
        if rc != 0:
            shm_unlink(bname)
            raise PoolError(f"pool {name!r}: cannot initialise its robust mutex: {os.strerror(rc)}")
    else:
        rc = ds_pool_check(seg.base, ss, generation)
        if rc != DS_OK:
            _raise(rc, K_POOL, f"pool {name!r}")
    _segments[(name, generation)] = seg
    return seg


cdef _Segment _attach_segment(str name, uint64_t size, uint64_t generation, int node):
    cdef _Segment seg = _segments.get((name, generation))
    if seg is not None and not seg.destroyed:
        if seg.data_size != size:
            raise PoolError(f"pool {name!r}: segment size does not match the sdesc (stale or corrupt sdesc)")
        return seg
    if size == 0 or size % DS_GRANULE or size // DS_GRANULE > DS_MAX_GRANULES:
        raise PoolError(f"pool {name!r}: invalid size {size} in sdesc")
    return _map_segment(name, False, size // DS_GRANULE, generation, node)


cdef tuple _parse_sdesc(object sdesc, object err):
    if not isinstance(sdesc, (bytes, bytearray, memoryview)):
        raise TypeError(f"sdesc must be bytes, not {type(sdesc).__name__}")
    sdesc = bytes(sdesc)
    if len(sdesc) < _SD.size:
        raise err(f"truncated sdesc ({len(sdesc)} bytes)")
    magic, version, kind, namelen, pgen, psize, choff, chgen, node = _SD.unpack_from(sdesc)
    if magic != SD_MAGIC:
        raise err("not a dragon sdesc (bad magic)")
    if version != SDESC_VERSION:
        raise err(f"unsupported sdesc version {version}")
    if len(sdesc) != _SD.size + namelen:
        raise err(f"truncated or oversized sdesc ({len(sdesc)} bytes, expected {_SD.size + namelen})")
    try:
        name = sdesc[_SD.size:].decode()
    except UnicodeDecodeError:
        raise err("corrupt sdesc (segment name is not UTF-8)") from None
    if not name.startswith("dragon-") or "/" in name or "\0" in name or len(sdesc) - _SD.size > NAME_MAX:
        raise err(f"corrupt sdesc (bad segment name {name!r})")
    return kind, name, pgen, psize, choff, chgen, node


# ---------------------------------------------------------------------------------------------- pool
@cython.auto_pickle(False)  # never pickle raw pointers; see __reduce__
cdef class Pool:
    """A shared-memory pool: one POSIX segment with a process-shared allocator working in offsets."""
    cdef _Segment seg
    cdef char *base
    cdef readonly bint creator
    cdef int creator_pid
    cdef str _name
    cdef uint64_t _size
    cdef uint64_t _gen
    cdef int _node

    def __init__(self, *args, **kwargs):
        raise TypeError("use Pool.create() or Pool.attach()")

    @staticmethod
    def create(size, name=None):
        """Create a pool of ``size`` bytes (rounded up to 256). The handle that creates it may destroy it."""
        global _counter
        cdef long long req = _int(size, PoolError, "pool size")
        if req <= 0:
            raise PoolError(f"pool size must be > 0, not {req}")
        cdef uint64_t nbits = (<uint64_t>req + DS_GRANULE - 1) // DS_GRANULE
        if nbits > DS_MAX_GRANULES:
            raise PoolError(f"pool size {req} is too large")
        if name is None:
            _counter += 1
            name = f"{os.getpid()}-{_counter}-{os.urandom(4).hex()}"
        elif not isinstance(name, str):
            raise TypeError(f"pool name must be a str, not {type(name).__name__}")
        if not name or "/" in name or "\0" in name:
            raise PoolError(f"invalid pool name {name!r} (empty, or contains '/' or NUL)")
        segname = job_prefix() + name
        if len(segname.encode()) > NAME_MAX:
            raise PoolError(f"pool name {name!r} is too long (segment name over {NAME_MAX} bytes)")
        cdef uint64_t bo, lo, do, ss
        ds_pool_layout(nbits, &bo, &lo, &do, &ss)
        try:
            st = os.statvfs("/dev/shm")
            if ss > <uint64_t>st.f_bavail * <uint64_t>st.f_frsize:
                raise PoolError(f"pool {name!r}: {ss} bytes do not fit in /dev/shm "
                                f"({st.f_bavail * st.f_frsize} bytes free)")
        except OSError:
            pass
        gen = int.from_bytes(os.urandom(8), "little") | 1
        cdef _Segment seg = _map_segment(segname, True, nbits, gen, local_node())
        return _pool_handle(seg, True)

    @staticmethod
    def attach(sdesc):
        """Attach to a pool from its sdesc (any process on the node)."""
        kind, name, pgen, psize, choff, chgen, node = _parse_sdesc(sdesc, PoolError)
        if kind != SD_POOL:
            raise PoolError("not a pool sdesc (kind %d)" % kind)
        if node != local_node():
            raise PoolError(f"pool {name!r} lives on node {node}: a pool can only be attached on its own node "
                            f"(this is node {local_node()}); use its channels from here")
        return _pool_handle(_attach_segment(name, psize, pgen, node), False)

    cdef inline char *_live(self) except NULL:
        if self.seg is None:
            raise PoolError(f"pool {self._name!r}: this handle is closed")
        if self.seg.destroyed:
            raise PoolError(f"pool {self._name!r} was destroyed")
        return self.base

    @property
    def sdesc(self):
        return _SD.pack(SD_MAGIC, SDESC_VERSION, SD_POOL, len(self._name.encode()), self._gen, self._size, 0,
                        0, self.seg.node if self.seg is not None else self._node) + self._name.encode()

    @property
    def node(self):
        """The index of the node that holds the pool."""
        return self._node

    @property
    def name(self):
        """The segment's name (a file in /dev/shm): ``dragon-<job>-<name>``."""
        return self._name

    @property
    def size(self):
        """Bytes of data the pool can hold (the requested size rounded up to 256)."""
        return self._size

    @property
    def closed(self):
        return self.seg is None

    def alloc(self, nbytes, timeout=None):
        """Allocate a block of ``nbytes``; timeout None waits for room, 0 raises PoolFull, t > 0 PoolTimeout."""
        cdef char *base = self._live()
        cdef _Segment seg = self.seg  # keeps the mapping while the GIL is released, even if close() runs
        cdef long long n = _int(nbytes, PoolError, "allocation size")
        cdef uint64_t off = 0
        cdef int64_t deadline
        if n < 0:
            raise PoolError(f"cannot allocate {n} bytes")
        cdef int rc = ds_pool_try_alloc(base, <uint64_t>n, &off)
        if rc == DS_FULL:
            deadline = _deadline(timeout, PoolError)
            if deadline != DL_NONBLOCK:
                while True:
                    with nogil:
                        rc = ds_pool_alloc_wait(base, <uint64_t>n, &off, deadline)
                    if rc != DS_INTR:
                        break
                    PyErr_CheckSignals()
        if rc != DS_OK:
            _raise(rc, K_POOL, f"pool {self._name!r}", <uint64_t>n)
        return _block(self, off, n, True)

    def free(self, block):
        """Free a block (an allocated Block of this pool, or one resolved with ``pool.block(offset)``)."""
        cdef char *base = self._live()
        if not isinstance(block, Block):
            raise TypeError(f"free() takes a Block, not {type(block).__name__}")
        cdef Block b = block
        if b.seg is not self.seg:
            raise PoolError(f"block at offset {b.offset} belongs to another pool")
        if b.freed:
            raise PoolError(f"block at offset {b.offset} was already freed (or sent)")
        if b.exports:
            raise PoolError(f"block at offset {b.offset} still has {b.exports} live buffer view(s)")
        cdef int rc = ds_pool_free(base, b.offset)
        if rc != DS_OK:
            _raise(rc, K_POOL, f"pool {self._name!r}", b.offset)
        b.freed = True

    def block(self, offset):
        """A non-owning Block over the allocated block at ``offset`` (e.g. received from another process)."""
        cdef char *base = self._live()
        cdef long long off = _int(offset, PoolError, "offset")
        cdef uint64_t cap = 0
        if off < 0 or ds_pool_block_capacity(base, <uint64_t>off, &cap) != DS_OK:
            raise PoolError(f"pool {self._name!r}: offset {offset} is not an allocated block")
        return _block(self, <uint64_t>off, <Py_ssize_t>cap, False)

    def stats(self):
        cdef char *base = self._live()
        cdef uint64_t free_bytes = 0, blocks = 0, repairs = 0
        cdef int rc = ds_pool_stats(base, &free_bytes, &blocks, &repairs)
        if rc != DS_OK:
            _raise(rc, K_POOL, f"pool {self._name!r}")
        return dict(size=self._size, free_bytes=free_bytes, allocated_blocks=blocks, repairs=repairs)

    def close(self):
        """Release this handle (idempotent); the mapping goes when nothing in this process uses it."""
        self.seg = None
        self.base = NULL

    def destroy(self):
        """Unlink the segment (once). Later use of any handle of this pool in this process raises PoolError."""
        cdef char *base = self._live()
        if ds_ph(base).destroyed:
            raise PoolError(f"pool {self._name!r} was already destroyed")
        ds_pool_mark_destroyed(base)
        self.seg.destroyed = True
        _segments.pop((self._name, self._gen), None)
        shm_unlink(("/" + self._name).encode())
        self.close()

    def __enter__(self):
        self._live()
        return self

    def __exit__(self, *exc):
        if (self.creator and self.creator_pid == os.getpid() and self.seg is not None and not self.seg.destroyed
                and not ds_ph(self.base).destroyed):  # not already destroyed by another process
            self.destroy()
        else:
            self.close()

    def __reduce__(self):
        return (Pool.attach, (self.sdesc,))

    def __repr__(self):
        state = "closed" if self.seg is None else ("destroyed" if self.seg.destroyed else "open")
        return f"<Pool {self._name!r} size={self._size} {state}>"


cdef Pool _pool_handle(_Segment seg, bint creator):
    cdef Pool p = Pool.__new__(Pool)
    p.seg = seg
    p.base = seg.base
    p.creator = creator
    p.creator_pid = os.getpid()
    p._name = seg.name
    p._size = seg.data_size
    p._gen = seg.generation
    p._node = seg.node
    return p


# ---------------------------------------------------------------------------------------------- blocks
@cython.auto_pickle(False)  # never pickle raw pointers; see __reduce__
cdef class Block:
    """A pool block: a writable buffer (memoryview/numpy without copying) named by an offset valid everywhere."""
    cdef _Segment seg
    cdef readonly Pool pool
    cdef readonly uint64_t offset
    cdef readonly Py_ssize_t size
    cdef readonly bint owner
    cdef bint freed
    cdef int exports
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __init__(self, *args, **kwargs):
        raise TypeError("blocks come from pool.alloc() or pool.block()")

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.freed:
            raise PoolError(f"block at offset {self.offset} was freed (or sent)")
        if self.seg.destroyed:
            raise PoolError(f"pool {self.seg.name!r} was destroyed")
        _fill_buffer(buf, self, self.seg.base + self.offset, self.size, self.shape, self.strides, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def freed(self):
        return self.freed

    def __reduce__(self):
        # another process gets a non-owning view of the same block (it may free it: ownership is the caller's)
        return (_resolve_block, (self.pool.sdesc, self.offset))

    def __repr__(self):
        return f"<Block offset={self.offset} size={self.size}{' freed' if self.freed else ''}>"


def _resolve_block(sdesc, offset):
    return Pool.attach(sdesc).block(offset)


cdef Block _block(Pool pool, uint64_t off, Py_ssize_t size, bint owner):
    cdef Block b = Block.__new__(Block)
    b.seg = pool.seg
    b.pool = pool
    b.offset = off
    b.size = size
    b.owner = owner
    return b


# ---------------------------------------------------------------------------------------------- messages
@cython.auto_pickle(False)  # never pickle raw pointers; see __reduce__
cdef class Message:
    """A received message as a writable buffer. Large messages are the pool block itself (zero copy); the block
    is freed when the Message and every view of it (memoryview, numpy array) are gone, or at release()."""
    cdef _Segment seg
    cdef char *ptr
    cdef Py_ssize_t n
    cdef uint64_t off
    cdef bint in_pool
    cdef bint released
    cdef bint freed
    cdef int exports
    cdef uint32_t owner_pid  # a forked child's copy must not free the parent's block
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __init__(self, *args, **kwargs):
        raise TypeError("messages come from Channel.recv_message()")

    cdef void _free(self):
        if self.freed:
            return
        self.freed = True
        if self.in_pool:
            if self.seg is not None and self.seg.base != NULL and self.owner_pid == ds_me():
                ds_pool_free(self.seg.base, self.off)
        elif self.ptr != NULL:
            PyMem_Free(self.ptr)
        self.ptr = NULL

    def __dealloc__(self):
        self._free()

    def release(self):
        """Give the message back (the pool block is freed once no view of it is left). Idempotent."""
        self.released = True
        if self.exports == 0:
            self._free()

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.released:
            raise ChannelError("message was released")
        _fill_buffer(buf, self, self.ptr, self.n, self.shape, self.strides, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1
        if self.released and self.exports == 0:
            self._free()

    def __bytes__(self):
        if self.released:
            raise ChannelError("message was released")
        return PyBytes_FromStringAndSize(self.ptr, self.n)

    def __len__(self):
        return self.n

    def __reduce__(self):
        return (bytes, (self.__bytes__(),))  # a copy of the payload

    @property
    def nbytes(self):
        return self.n

    @property
    def in_pool(self):
        """True if the payload is a pool block (zero copy), False if it was copied out of an inline slot."""
        return self.in_pool

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"<Message {self.n} bytes{' in pool' if self.in_pool else ''}{' released' if self.released else ''}>"


# ---------------------------------------------------------------------------------------------- channels
@cython.auto_pickle(False)  # never pickle raw pointers; see __reduce__
cdef class Channel:
    """A bounded multi-producer multi-consumer lock-free queue inside a pool."""
    cdef ds_chan c
    cdef _Segment seg
    cdef readonly Pool pool
    cdef uint64_t offset
    cdef uint64_t generation
    cdef bint usable          # not closed and not destroyed through this handle
    cdef bint destroyed
    cdef readonly bint creator
    cdef int creator_pid
    cdef str _name

    def __init__(self, *args, **kwargs):
        raise TypeError("use Channel.create() or Channel.attach()")

    @staticmethod
    def create(pool, capacity=1024, block_size=1024, name=None):
        """Create a channel in ``pool``: ``capacity`` slots, messages up to ``block_size`` bytes stored inline."""
        global _counter
        if not isinstance(pool, Pool):
            raise TypeError(f"Channel.create() needs a Pool, not {type(pool).__name__}")
        cdef Pool p = pool
        if p.seg is None or p.seg.destroyed:
            raise ChannelError(f"cannot create a channel in pool {p._name!r}: the pool handle is closed or destroyed")
        cdef long long cap = _int(capacity, ChannelError, "channel capacity")
        cdef long long bs = _int(block_size, ChannelError, "channel block_size")
        if cap < 1 or cap > 0x7fffffff:
            raise ChannelError(f"channel capacity must be between 1 and 2**31-1, not {cap}")
        if bs < 0 or bs > 0x3fffffff:
            raise ChannelError(f"channel block_size must be between 0 and 2**30-1, not {bs}")
        if name is None:
            _counter += 1
            name = f"{os.getpid()}-{_counter}"
        elif not isinstance(name, str):
            raise TypeError(f"channel name must be a str, not {type(name).__name__}")
        bname = name.encode()
        if len(bname) >= DS_CH_NAME or b"\0" in bname:
            raise ChannelError(f"channel name {name!r} is too long (max {DS_CH_NAME - 1} bytes) or has NUL")
        cdef uint64_t nbytes = ds_ch_nbytes(<uint64_t>cap, <uint64_t>bs)
        cdef uint64_t off = 0
        cdef int rc = ds_pool_try_alloc(p.base, nbytes, &off)
        if rc == DS_TOO_BIG:
            raise ChannelError(f"channel {name!r} needs {nbytes} bytes, more than pool {p._name!r} holds")
        if rc == DS_FULL:
            raise ChannelError(f"channel {name!r}: no room for {nbytes} bytes in pool {p._name!r}")
        if rc == DS_DESTROYED:
            raise ChannelError(f"channel {name!r}: pool {p._name!r} was destroyed")
        if rc != DS_OK:
            _raise(rc, K_CHAN, f"channel {name!r}")
        gen = int.from_bytes(os.urandom(8), "little") | 1
        ds_ch_init(p.base, off, <uint64_t>cap, <uint64_t>bs, gen, bname, len(bname))
        return _channel_handle(p, off, gen, True)

    @staticmethod
    def attach(sdesc):
        """Attach to a channel from its sdesc (maps its pool too). The sdesc names the node that holds the
        channel: a channel of another node is reached through this node's transport agent, and the handle is a
        ``dragon._core.remote.RemoteChannel`` with the same API (both are ``ChannelLike``)."""
        kind, name, pgen, psize, choff, chgen, node = _parse_sdesc(sdesc, ChannelError)
        if kind != SD_CHANNEL:
            raise ChannelError("not a channel sdesc (kind %d)" % kind)
        if node != local_node():
            from dragon._core.remote import RemoteChannel
            return RemoteChannel(bytes(sdesc), node)
        try:
            seg = _attach_segment(name, psize, pgen, node)
        except PoolError as e:
            raise ChannelError(f"cannot attach the channel's pool: {e}") from e
        return _channel_handle(_pool_handle(seg, False), choff, chgen, False)

    cdef int _unusable(self) except -1:
        if self.destroyed:
            raise ChannelError(f"channel {self._name!r} was destroyed")
        if not self.usable:
            raise ChannelError(f"channel {self._name!r}: this handle is closed")
        if self.seg.destroyed:
            raise ChannelError(f"channel {self._name!r}: its pool {self.seg.name!r} was destroyed")
        _raise(DS_DESTROYED, K_CHAN, f"channel {self._name!r}")

    cdef inline int _check(self) except -1:
        if not self.usable or self.seg.destroyed or not ds_ch_alive(&self.c):
            self._unusable()
        return 0

    cdef int _block(self, int mode, int rc, uint64_t maxlen, ds_slot **slot, uint32_t *lap, uint64_t *st,
                    int64_t deadline) except -1:
        """Finish a claim whose first (GIL-held) attempt returned rc: wait without the GIL, or raise."""
        cdef ds_wait_ctx w
        if rc == DS_FULL or rc == DS_EMPTY:
            if deadline == DL_NONBLOCK:
                if slot[0] != NULL and ds_ch_maybe_recover(&self.c, slot[0], st[0]):
                    slot[0] = NULL
                    if mode == MODE_SEND:
                        rc = ds_ch_claim_send(&self.c, slot, lap, st)
                    else:
                        rc = ds_ch_claim_recv(&self.c, maxlen, slot, lap, st)
            else:
                memset(&w, 0, sizeof(w))
                while True:
                    with nogil:
                        rc = ds_ch_wait(&self.c, mode, maxlen, slot, lap, st, deadline, &w)
                    if rc != DS_INTR:
                        break
                    PyErr_CheckSignals()
        if rc != DS_OK:
            if rc == DS_DESTROYED:
                self._check()
            _raise(rc, K_CHAN, f"channel {self._name!r}", st[0])
        return 0

    cdef int _send(self, const char *p, Py_ssize_t n, int64_t deadline) except -1:
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0, off = 0
        cdef int rc
        if <uint64_t>n <= self.c.block_size:
            rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
            if rc != DS_OK:
                self._block(MODE_SEND, rc, 0, &slot, &lap, &st, deadline)
            ds_slot_put_inline(slot, p, <uint32_t>n)
            ds_ch_commit_send(&self.c, slot, lap)
            return 0
        if <uint64_t>n > 0xffffffffULL:
            raise ChannelError(f"channel {self._name!r}: messages are limited to 4 GiB - 1, not {n} bytes")
        cdef char *base = self.c.base
        rc = ds_pool_try_alloc(base, <uint64_t>n, &off)
        if rc == DS_FULL and deadline != DL_NONBLOCK:
            while True:
                with nogil:
                    rc = ds_pool_alloc_wait(base, <uint64_t>n, &off, deadline)
                if rc != DS_INTR:
                    break
                PyErr_CheckSignals()
        if rc != DS_OK:
            if rc == DS_FULL:
                raise ChannelFull(f"channel {self._name!r}: no room in its pool for a {n}-byte message")
            if rc == DS_TIMEOUT:
                raise ChannelTimeout(f"channel {self._name!r}: no room in its pool for a {n}-byte message "
                                     f"before the timeout")
            if rc == DS_DESTROYED:
                raise ChannelError(f"channel {self._name!r}: its pool {self.seg.name!r} was destroyed")
            _raise(rc, K_CHAN, f"channel {self._name!r}", <uint64_t>n)
        if n >= BIG_COPY:
            with nogil:
                memcpy(base + off, p, n)
        else:
            memcpy(base + off, p, n)
        try:
            rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
            if rc != DS_OK:
                self._block(MODE_SEND, rc, 0, &slot, &lap, &st, deadline)
        except BaseException:
            ds_pool_free(base, off)
            raise
        ds_slot_put_block(slot, off, <uint32_t>n)
        ds_ch_commit_send(&self.c, slot, lap)
        return 0

    cdef int _send_obj(self, object data, int64_t deadline) except -1:
        cdef Py_buffer view
        if type(data) is bytes:
            return self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
        try:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        except (BufferError, ValueError):   # a non-contiguous buffer: one extra copy
            data = memoryview(data).tobytes()
            return self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
        try:
            self._send(<const char *>view.buf, view.len, deadline)
        finally:
            PyBuffer_Release(&view)
        return 0

    def send(self, data, timeout=None):
        """Send any bytes-like object. timeout: None blocks, 0 raises ChannelFull, t > 0 ChannelTimeout."""
        self._check()
        if type(data) is bytes:
            self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                       DL_FOREVER if timeout is None else _deadline(timeout))
        else:
            self._send_obj(data, DL_FOREVER if timeout is None else _deadline(timeout))

    def send_block(self, block, nbytes=None, timeout=None):
        """Hand an allocated Block of this channel's pool to the receiver, zero-copy; the block's ownership moves
        (this Block can no longer be used or freed here). On a timeout the block stays with the sender."""
        self._check()
        if not isinstance(block, Block):
            raise TypeError(f"send_block() takes a Block, not {type(block).__name__}")
        cdef Block b = block
        if b.seg is not self.seg:
            raise ChannelError(f"channel {self._name!r}: the block belongs to another pool")
        if b.freed:
            raise ChannelError(f"channel {self._name!r}: the block at offset {b.offset} was freed or sent")
        cdef uint64_t cap = 0
        if ds_pool_block_capacity(self.c.base, b.offset, &cap) != DS_OK:
            raise ChannelError(f"channel {self._name!r}: offset {b.offset} is not an allocated block")
        cdef long long n = b.size if nbytes is None else _int(nbytes, ChannelError, "nbytes")
        if n < 0 or <uint64_t>n > cap or <uint64_t>n > 0xffffffffULL:
            raise ChannelError(f"channel {self._name!r}: nbytes={n} does not fit the block ({cap} bytes)")
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef int rc = ds_ch_claim_send(&self.c, &slot, &lap, &st)
        if rc != DS_OK:
            self._block(MODE_SEND, rc, 0, &slot, &lap, &st, _deadline(timeout))
        ds_slot_put_block(slot, b.offset, <uint32_t>n)
        ds_ch_commit_send(&self.c, slot, lap)
        b.freed = True

    cdef object _take_bytes(self, ds_slot *slot, uint32_t lap):
        cdef uint32_t n = ds_slot_len(slot)
        cdef uint64_t off
        cdef object out
        cdef char *dst
        if not ds_slot_is_block(slot):
            try:
                out = PyBytes_FromStringAndSize(ds_slot_data(slot), n)
            finally:
                ds_ch_commit_recv(&self.c, slot, lap)
            return out
        off = ds_slot_block_off(slot)
        ds_slot_clear_block(slot)
        ds_ch_commit_recv(&self.c, slot, lap)
        try:
            out = PyBytes_FromStringAndSize(NULL, n)
            dst = PyBytes_AS_STRING(out)
            if n >= BIG_COPY:
                with nogil:
                    memcpy(dst, self.c.base + off, n)
            else:
                memcpy(dst, self.c.base + off, n)
        finally:
            ds_pool_free(self.c.base, off)
        return out

    def recv(self, timeout=None):
        """Receive one message as bytes. timeout: None blocks, 0 raises ChannelEmpty, t > 0 ChannelTimeout."""
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        self._check()
        cdef int rc = ds_ch_claim_recv(&self.c, UINT64_MAX, &slot, &lap, &st)
        if rc != DS_OK:
            self._block(MODE_RECV, rc, UINT64_MAX, &slot, &lap, &st,
                        DL_FOREVER if timeout is None else _deadline(timeout))
        return self._take_bytes(slot, lap)

    def recv_into(self, buffer, timeout=None):
        """Receive into a writable buffer; returns the message length. A message longer than the buffer raises
        ChannelError and stays queued."""
        cdef Py_buffer view
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0, n
        cdef uint64_t st = 0, off
        cdef int rc
        self._check()
        try:
            PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        except (BufferError, ValueError) as e:
            raise TypeError(f"recv_into() needs a writable contiguous buffer, not {type(buffer).__name__}: "
                            f"{e}") from None
        try:
            rc = ds_ch_claim_recv(&self.c, <uint64_t>view.len, &slot, &lap, &st)
            if rc != DS_OK:
                self._block(MODE_RECV, rc, <uint64_t>view.len, &slot, &lap, &st, _deadline(timeout))
            n = ds_slot_len(slot)
            if not ds_slot_is_block(slot):
                memcpy(view.buf, ds_slot_data(slot), n)
                ds_ch_commit_recv(&self.c, slot, lap)
            else:
                off = ds_slot_block_off(slot)
                ds_slot_clear_block(slot)
                ds_ch_commit_recv(&self.c, slot, lap)
                if n >= BIG_COPY:
                    with nogil:
                        memcpy(view.buf, self.c.base + off, n)
                else:
                    memcpy(view.buf, self.c.base + off, n)
                ds_pool_free(self.c.base, off)
        finally:
            PyBuffer_Release(&view)
        return n

    def recv_message(self, timeout=None):
        """Receive one message as a Message buffer; a message stored in a pool block is not copied."""
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0, n
        cdef uint64_t st = 0
        cdef Message m = Message.__new__(Message)
        self._check()
        cdef int rc = ds_ch_claim_recv(&self.c, UINT64_MAX, &slot, &lap, &st)
        if rc != DS_OK:
            self._block(MODE_RECV, rc, UINT64_MAX, &slot, &lap, &st, _deadline(timeout))
        n = ds_slot_len(slot)
        m.n = n
        m.seg = self.seg
        m.owner_pid = ds_me()
        if ds_slot_is_block(slot):
            m.off = ds_slot_block_off(slot)
            m.ptr = self.c.base + m.off
            m.in_pool = True
            ds_slot_clear_block(slot)
            ds_ch_commit_recv(&self.c, slot, lap)
        else:
            m.ptr = <char *>PyMem_Malloc(n if n else 1)
            if m.ptr != NULL:
                memcpy(m.ptr, ds_slot_data(slot), n)
            ds_ch_commit_recv(&self.c, slot, lap)
            if m.ptr == NULL:
                raise MemoryError()
        return m

    def send_many(self, messages, timeout=None):
        """Send each bytes-like of ``messages`` in order; returns how many were sent. The timeout covers the
        whole call; if it passes after k > 0 messages were sent, returns k (else raises ChannelFull/Timeout)."""
        self._check()
        cdef int64_t deadline = _deadline(timeout)
        cdef Py_ssize_t k = 0
        for data in messages:
            try:
                if type(data) is bytes:
                    self._send(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), deadline)
                else:
                    self._send_obj(data, deadline)
            except (ChannelFull, ChannelTimeout):
                if k == 0:
                    raise
                return k
            k += 1
        return k

    def recv_many(self, max_n, timeout=None):
        """Wait (per timeout) for one message, then take whatever else is queued, up to ``max_n`` in all."""
        cdef Py_ssize_t m = _int(max_n, ChannelError, "max_n"), k
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef int rc
        self._check()
        if m < 1:
            raise ChannelError(f"recv_many: max_n must be >= 1, not {m}")
        out = []
        rc = ds_ch_claim_recv(&self.c, UINT64_MAX, &slot, &lap, &st)
        if rc != DS_OK:
            self._block(MODE_RECV, rc, UINT64_MAX, &slot, &lap, &st, _deadline(timeout))
        out.append(self._take_bytes(slot, lap))
        for k in range(1, m):
            rc = ds_ch_claim_recv(&self.c, UINT64_MAX, &slot, &lap, &st)
            if rc != DS_OK:
                break
            out.append(self._take_bytes(slot, lap))
        return out

    def poll(self, timeout=None):
        """True once a message is ready to receive (does not consume it); False if none came in time."""
        cdef ds_slot *slot = NULL
        cdef uint32_t lap = 0
        cdef uint64_t st = 0
        cdef int rc
        self._check()
        if ds_ch_ready(&self.c, &slot, &st):
            return True
        cdef int64_t deadline = _deadline(timeout)
        if deadline == DL_NONBLOCK:
            if slot != NULL and ds_ch_maybe_recover(&self.c, slot, st):
                return bool(ds_ch_ready(&self.c, &slot, &st))
            return False
        cdef ds_wait_ctx w
        memset(&w, 0, sizeof(w))
        while True:
            with nogil:
                rc = ds_ch_wait(&self.c, MODE_POLL, 0, &slot, &lap, &st, deadline, &w)
            if rc != DS_INTR:
                break
            PyErr_CheckSignals()
        if rc == DS_OK:
            return True
        if rc == DS_TIMEOUT:
            return False
        self._check()
        _raise(rc, K_CHAN, f"channel {self._name!r}")

    def __len__(self):
        self._check()
        return ds_ch_len(&self.c)

    def _positions(self):
        """``(head, tail)``: how many messages receivers have taken from the channel since it was made, and how
        many slots senders have claimed. A message whose send has returned lies below ``tail``, and it has been
        taken (or, if its sender died mid-send, skipped) once ``head`` is past that ``tail``: a reader can wait
        for everything written before a moment this way."""
        self._check()
        cdef uint64_t head, tail
        ds_ch_positions(&self.c, &head, &tail)
        return head, tail

    def _wait_state(self):
        """What this handle learned about its blocking waits: the budget (ns of CPU kept before sleeping on the
        futex) when waiting for room (send) and for a message (recv, poll)."""
        return dict(send=dict(budget_ns=self.c.ad[0].budget), recv=dict(budget_ns=self.c.ad[1].budget))

    def _debug_state(self):
        """Snapshot of the ring for debugging: counters, waiters and (lap, phase, pid) of every slot."""
        self._check()
        cdef uint64_t *buf = <uint64_t *>PyMem_Malloc((9 + self.c.cap) * 8)
        if buf == NULL:
            raise MemoryError()
        try:
            ds_ch_snapshot(&self.c, buf, self.c.cap)
            phases = ("EMPTY", "WRITING", "FULL", "READING")
            return dict(head=buf[0], tail=buf[1], ne_seq=buf[2], ne_waiters=buf[3], nf_seq=buf[4],
                        nf_waiters=buf[5], recoveries=buf[6],
                        ne_cpu=None if buf[7] == 0xffffffff else buf[7],
                        nf_cpu=None if buf[8] == 0xffffffff else buf[8],
                        slots=[(buf[9 + i] >> 32, phases[(buf[9 + i] >> 30) & 3], buf[9 + i] & 0x3fffff)
                               for i in range(self.c.cap)])
        finally:
            PyMem_Free(buf)

    @property
    def capacity(self):
        return self.c.cap

    @property
    def block_size(self):
        return self.c.block_size

    @property
    def name(self):
        return self._name

    @property
    def closed(self):
        return not self.usable

    @property
    def sdesc(self):
        bname = self.seg.name.encode()
        return _SD.pack(SD_MAGIC, SDESC_VERSION, SD_CHANNEL, len(bname), self.seg.generation, self.seg.data_size,
                        self.offset, self.generation, self.seg.node) + bname

    @property
    def node(self):
        """The index of the node that holds the channel."""
        return self.seg.node

    def close(self):
        """Release this handle (idempotent)."""
        self.usable = False

    def destroy(self):
        """Free the channel's memory in its pool (once); blocked senders/receivers wake with ChannelError."""
        self._check()
        ds_ch_destroy(&self.c)
        ds_pool_free(self.c.base, self.offset)
        self.destroyed = True
        self.usable = False

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        if (self.creator and self.creator_pid == os.getpid() and self.usable and not self.seg.destroyed
                and ds_ch_alive(&self.c)):
            self.destroy()
        else:
            self.close()

    def __reduce__(self):
        return (Channel.attach, (self.sdesc,))

    def __repr__(self):
        return f"<Channel {self._name!r} capacity={self.c.cap} block_size={self.c.block_size}>"


cdef Channel _channel_handle(Pool pool, uint64_t off, uint64_t gen, bint creator):
    cdef Channel ch = Channel.__new__(Channel)
    cdef int rc = ds_ch_open(pool.base, off, gen, &ch.c)
    if rc != DS_OK:
        _raise(rc, K_CHAN, f"channel at offset {off} of pool {pool._name!r}")
    ch.seg = pool.seg
    ch.pool = pool
    ch.offset = off
    ch.generation = gen
    ch.usable = True
    ch.creator = creator
    ch.creator_pid = os.getpid()
    ch._name = PyBytes_FromStringAndSize(<char *>ch.c.h.name, DS_CH_NAME).split(b"\0", 1)[0].decode(
        errors="replace")
    return ch
