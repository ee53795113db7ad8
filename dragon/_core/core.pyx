"""dragon._core.core: shared-memory pools and lock-free channels (see include/dshm.h for the data layout).

Objects, buffers, GIL handling and errors live here; atomics, futexes, the allocator and the ring live in C.
Every C return code goes through ``_raise`` (one place), which picks the documented exception from
dragon.errors.

The module is split the way mpi4py splits its own: ``cdefs.pxd`` declares the C of ``include/dshm.h``,
``core.pxd`` the object layouts (the fields of every cdef class), and the behaviour is in one ``.pxi`` per
subject, included below in dependency order. Compiler directives are set in one place: setup.py.
"""
# The names imported here are used by the included .pxi files; cython-lint reads one file at a time, so every
# import line says no-cython-lint.
import os  # no-cython-lint
import struct  # no-cython-lint
import weakref  # no-cython-lint

from libc.stdint cimport uint32_t, uint64_t, int64_t, UINT64_MAX  # no-cython-lint
from libc.string cimport memcpy, memset  # no-cython-lint
from libc.errno cimport errno, EEXIST, ENOENT  # no-cython-lint
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE  # no-cython-lint
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release  # no-cython-lint
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES  # no-cython-lint
from cpython.exc cimport PyErr_CheckSignals  # no-cython-lint
from cpython.number cimport PyNumber_Index  # no-cython-lint
from cpython.mem cimport PyMem_Malloc, PyMem_Free  # no-cython-lint
from cpython.object cimport PyObject  # no-cython-lint
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE  # no-cython-lint
from posix.mman cimport mmap, munmap, shm_open, shm_unlink  # no-cython-lint
from posix.mman cimport PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED  # no-cython-lint
from posix.fcntl cimport O_RDWR, O_CREAT, O_EXCL, O_CLOEXEC  # no-cython-lint
from posix.unistd cimport close, ftruncate  # no-cython-lint
from posix.stat cimport fstat, struct_stat  # no-cython-lint

from dragon._core.cdefs cimport *  # no-cython-lint

from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout  # no-cython-lint
from dragon.errors import PoolError, PoolFull, PoolTimeout  # no-cython-lint
from dragon import env as _env  # no-cython-lint (the names of the environment variables read here)

cdef extern from "Python.h":  # (on borrowed references: no refcounting)
    bint _is_bytes "PyBytes_CheckExact"(PyObject *o)
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject *o)

__all__ = ["Pool", "Block", "Channel", "Message", "job_id", "job_prefix", "unlink_job_segments",
           "set_pdeathsig", "set_child_subreaper", "set_wait_params", "wait_stats",
           "local_node", "timeout_seconds", "sdesc_info",
           "SDESC_VERSION"]

if ds_init() != 0:
    raise ImportError("dragon._core: pthread_atfork failed")

# ---------------------------------------------------------------------------------------------- constants
DEF NAME_MAX = 255
cdef int64_t DL_FOREVER = -1   # deadline encodings: block forever / never block / CLOCK_MONOTONIC ns
cdef int64_t DL_NONBLOCK = 0
cdef int K_POOL = 0
cdef int K_CHAN = 1
cdef Py_ssize_t BIG_COPY = 65536   # copies at least this big run without the GIL

_segments = weakref.WeakValueDictionary()  # (segment name, generation) -> _Segment: one mapping per process
_counter = 0

include "errors.pxi"     # _raise (C return code -> exception), argument and timeout checks
include "helpers.pxi"    # job ids, prctl, wait tuning and counters
include "sdesc.pxi"      # the serialized descriptor
include "segment.pxi"    # one mapping of one pool segment per process
include "pool.pxi"       # Pool
include "block.pxi"      # Block
include "message.pxi"    # Message
include "channel.pxi"    # Channel
