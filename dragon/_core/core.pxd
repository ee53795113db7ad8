# Object layouts of dragon._core.core (the fields and C-level methods of every cdef class); the behaviour is
# in the .pxi files that core.pyx includes, the C declarations in cdefs.pxd.
from libc.stdint cimport uint32_t, uint64_t, int64_t

from dragon._core.cdefs cimport ds_chan, ds_msg, ds_slot


cdef class _Segment:
    cdef char *base
    cdef uint64_t map_size
    cdef readonly str name
    cdef uint64_t generation
    cdef uint64_t data_size
    cdef bint destroyed      # destroy() was called in this process
    cdef int node            # the node whose /dev/shm holds it
    cdef object __weakref__


cdef class Pool:
    cdef _Segment seg
    cdef char *base
    cdef readonly bint creator
    cdef int creator_pid
    cdef str _name
    cdef uint64_t _size
    cdef uint64_t _gen
    cdef int _node

    cdef inline char *_live(self) except NULL


cdef class Block:
    cdef _Segment seg
    cdef readonly Pool pool
    cdef readonly uint64_t offset
    cdef readonly Py_ssize_t size
    cdef readonly bint owner
    cdef bint freed
    cdef int exports
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]


cdef class Message:
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

    cdef void _free(self)


cdef class Channel:
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

    cdef int _unusable(self) except -1
    cdef inline int _check(self) except -1
    cdef int _block(self, int mode, int rc, uint64_t maxlen, ds_slot **slot, uint32_t *lap, uint64_t *st,
                    ds_msg *m, int64_t deadline) except -1
    cdef int _send(self, const char *p, Py_ssize_t n, int64_t deadline) except -1
    cdef int _fits(self, Py_ssize_t n) except -1
    cdef int _check_item(self, object data, Py_ssize_t i) except -1
    cdef int _send_obj(self, object data, int64_t deadline) except -1
    cdef object _take_bytes(self, ds_slot *slot, uint32_t lap, const ds_msg *m)
