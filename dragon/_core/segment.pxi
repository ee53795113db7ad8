# ---------------------------------------------------------------------------------------------- segments
cdef char *FMT_B = "B"


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


cdef class _Segment:
    """One mapping of one pool segment in this process; unmapped when the last Pool/Channel/Block/Message
    goes."""

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
        if ds_pool_is_destroyed(seg.base):  # (by another process: this one's mapping outlived it)
            raise PoolError(f"pool {name!r} was destroyed")
        if seg.data_size != size:
            raise PoolError(f"pool {name!r}: segment size does not match the sdesc (stale or corrupt sdesc)")
        return seg
    if size == 0 or size % DS_GRANULE or size // DS_GRANULE > DS_MAX_GRANULES:
        raise PoolError(f"pool {name!r}: invalid size {size} in sdesc")
    return _map_segment(name, False, size // DS_GRANULE, generation, node)
