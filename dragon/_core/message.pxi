# ---------------------------------------------------------------------------------------------- messages
cdef class Message:
    """A received message as a writable buffer. Large messages are the pool block itself (zero copy); the
    block is freed when the Message and every view of it (memoryview, numpy array) are gone, or at
    release()."""

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
        return (f"<Message {self.n} bytes{' in pool' if self.in_pool else ''}"
                f"{' released' if self.released else ''}>")
