"""This process's heap: the pool its multiprocessing objects (channels of queues, pipes and locks; shared
values) live in, and the rules of their lifetime.

Each process that makes such an object makes one pool on its node the first time (a POSIX segment of
``DRAGON_MP_HEAP_SIZE`` bytes, default 1 GiB: sparse, only what is used costs memory) and destroys it when it
exits (the last of multiprocessing's exit steps, after its children were joined); objects a process made are
its heap's: they live as long as the process (as multiprocessing's do in practice: a parent outlives the
children it shares them with). An object that was never sent to another process is freed as soon as it is
garbage. The heap of a process that ended without destroying it (killed; a Pool's terminated worker) is
unlinked by whoever watched it end: its shepherd (a managed process) or node 0's launcher (a client of the
runtime); it is named for that (``jobprocs.heap_name``: the process's p_uid or client id, and its pid). What
else a crashed process leaves is unlinked when the job ends (dragon-launch removes every segment of the
job).

Channels made here are the core's channels (no global-services round trip): any process of the job attaches
one by its sdesc, and on another node that gives a RemoteChannel (through the transport agents).
"""

import os
import sys
import threading
from multiprocessing import util

from dragon import env as E

DEFAULT_HEAP = 1 << 30
MIN_HEAP = 16 << 20

_lock = threading.Lock()
_pool = None
_pid = None
_final = None  # the exit step that destroys the heap (cancelled when _forget destroys it first)


def heap_size():
    return E.size_setting(E.MP_HEAP_SIZE, DEFAULT_HEAP)


def pool():
    """This process's heap pool (made on first use)."""
    global _pool, _pid, _final
    p = _pool
    if p is not None and _pid == os.getpid():
        return p
    from dragon.mp.util import runtime

    runtime()  # the heap's channels reach other nodes through the runtime's agents
    with _lock:
        if _pool is None or _pid != os.getpid():
            _pool = _create(heap_size())
            _pid = os.getpid()
            # after multiprocessing's exit function has joined the children (they may still use our objects)
            _final = util.Finalize(None, _destroy, args=(_pid,), exitpriority=-100)
        return _pool


def _create(size):
    """A pool of size bytes, or of a quarter as much while /dev/shm has not room for it (a small tmpfs: the
    heap is sparse, but the core checks the free space for the whole size), down to MIN_HEAP. Named so that
    the runtime can remove it if this process ends without destroying it (see jobprocs.heap_name); should
    that name be taken (a heap left by an earlier process of the same uid whose pid this one got), by the
    core's default name instead."""
    from dragon._core.core import job_prefix
    from dragon.errors import PoolError
    from dragon.infrastructure import jobprocs
    from dragon.pools import Pool

    name: str | None = jobprocs.heap_name(_uid(), os.getpid())
    while True:
        try:
            return Pool.create(size, name=name)
        except PoolError:
            if name is not None and os.path.exists(f"/dev/shm/{job_prefix()}{name}"):
                name = None
                continue
            if size // 4 < MIN_HEAP:
                raise
            size //= 4


def _uid():
    """The id the runtime watches this process under: a client's id (dragon.init()), else its p_uid (a
    managed process, or a descendant of one, which inherited it). Read where it is, without a connection to
    global services: a Pool worker that makes its inbox here asks global services nothing."""
    attach = sys.modules.get("dragon.attach")
    h = attach.current() if attach is not None else None
    if h is not None and h.client is not None:
        return h.client
    return int(os.environ.get(E.PUID, "0") or 0)


def channel(capacity, block_size):
    """A new channel in this process's heap."""
    from dragon.channels import Channel

    return Channel.create(pool(), capacity=capacity, block_size=block_size)


def _forget(handle):
    """This process leaves its runtime (``dragon.shutdown()``; see ``dragon.mp.util``): its heap, if it
    made one, is destroyed now (a process of that runtime that still runs keeps its mapping of what it
    uses), and the next object is made in a heap of the runtime this process is in then (a heap of the one
    it left cannot be reached there)."""
    global _pool, _final
    with _lock:
        p, _pool = _pool, None
        if p is not None and _pid == os.getpid():
            if _final is not None:  # (one exit step per heap ever made would stay registered until exit)
                _final.cancel()
                _final = None
            try:
                p.destroy()
            except Exception:
                pass


def _destroy(pid):
    global _pool
    if pid != os.getpid() or _pool is None:
        return
    try:
        _pool.destroy()
    except Exception:
        pass
    _pool = None


def here():
    """This process's node index."""
    return int(os.environ.get(E.NODE, "0"))


def attach(sdesc):
    """A handle of the channel sdesc names (a RemoteChannel if it is on another node)."""
    from dragon.channels import Channel

    return Channel.attach(sdesc)


class Owned:
    """The channels (and blocks) one object made in this heap. When the object is garbage they are destroyed,
    unless the object was sent to another process (``shared``): then they live as long as the heap."""

    __slots__ = ("chans", "blocks", "shared", "pid", "__weakref__")

    def __init__(self, chans=(), blocks=()):
        self.chans, self.blocks = list(chans), list(blocks)
        self.shared = False
        self.pid = os.getpid()

    def __del__(self):
        if self.shared or self.pid != os.getpid() or _pool is None:
            return
        for ch in self.chans:
            try:
                ch.destroy()
            except Exception:
                pass
        for blk in self.blocks:
            try:
                _pool.free(blk)
            except Exception:
                pass
