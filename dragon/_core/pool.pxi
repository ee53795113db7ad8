# ---------------------------------------------------------------------------------------------- pool
cdef class Pool:
    """A shared-memory pool: one POSIX segment with a process-shared allocator working in offsets."""

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
            raise PoolError(f"pool {name!r} lives on node {node}: a pool can only be attached on its own "
                            f"node (this is node {local_node()}); use its channels from here")
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
        """Allocate a block of ``nbytes``; timeout None waits for room, 0 raises PoolFull, t > 0
        PoolTimeout."""
        cdef char *base = self._live()
        cdef _Segment seg = self.seg  # keeps the mapping while the GIL is released, even if close() runs
        cdef long long n = _int(nbytes, PoolError, "allocation size")
        cdef uint64_t off = 0
        if n < 0:
            raise PoolError(f"cannot allocate {n} bytes")
        cdef int rc = ds_pool_try_alloc(base, <uint64_t>n, &off)
        if rc == DS_FULL or rc == DS_BUSY:
            rc = _alloc_wait(base, <uint64_t>n, &off, rc, _deadline(timeout, PoolError))
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

    def _debug_lock(self, hold, timeout=None):
        """Take (``hold`` true; waiting per timeout, without the GIL) or release this pool's lock: for tests
        of what other processes do while one holds it (and is stopped). Never use it otherwise."""
        cdef char *base = self._live()
        cdef ds_op op
        if not hold:
            ds_pool_unlock(base)
            return
        memset(&op, 0, sizeof(op))
        op.kind = DS_OP_LOCK
        op.base = base
        cdef int rc = _wait(&op, _deadline(timeout, PoolError))
        if rc != DS_OK:
            _raise(rc, K_POOL, f"pool {self._name!r}")

    def close(self):
        """Release this handle (idempotent); the mapping goes when nothing in this process uses it."""
        self.seg = None
        self.base = NULL

    def destroy(self):
        """Unlink the segment (once). Later use of any handle of this pool in this process raises
        PoolError."""
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
        if (self.creator and self.creator_pid == os.getpid() and self.seg is not None
                and not self.seg.destroyed
                and not ds_ph(self.base).destroyed):  # not already destroyed by another process
            self.destroy()
        else:
            self.close()

    def __reduce__(self):
        return (Pool.attach, (self.sdesc,))

    def __repr__(self):
        state = "closed" if self.seg is None else ("destroyed" if self.seg.destroyed else "open")
        return f"<Pool {self._name!r} size={self._size} {state}>"


cdef int _alloc_wait(char *base, uint64_t n, uint64_t *off, int rc, int64_t deadline) except -1:
    """Finish an allocation whose first (GIL-held, non-waiting) attempt returned rc: no room (DS_FULL) or
    the pool's lock held by another process (DS_BUSY). Waits without the GIL per deadline; a non-blocking call
    does not wait for room, and waits for the lock a short grace at most (ds_lock_grace_ns). Returns the C
    outcome; ``off`` is the block's offset if it is DS_OK."""
    if rc == DS_FULL and deadline == DL_NONBLOCK:
        return rc
    cdef ds_op op
    memset(&op, 0, sizeof(op))
    op.kind = DS_OP_ALLOC
    op.base = base
    op.n = n
    rc = _wait(&op, deadline)
    off[0] = op.off
    return rc


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
