# ---------------------------------------------------------------------------------------------- blocks
cdef class Block:
    """A pool block: a writable buffer (memoryview/numpy without copying) named by an offset valid
    everywhere."""

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
