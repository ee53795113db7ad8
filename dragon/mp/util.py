"""Small things of the start method: the runtime's CPU count, the Manager."""

import sys
import threading

from dragon import env as E

_cpus = None
_lock = threading.Lock()


def runtime():
    """Make sure this process is in a runtime: under dragon-launch (or as a client) it is; in a plain python
    the first Process, queue, lock or Pool of the start method starts one on this node (``dragon.init()``,
    or attaches where ``DRAGON_CONNECT`` says), as if the program had called ``dragon.init()`` itself."""
    if not E.in_runtime():
        from dragon.attach import init

        init()
    attach = sys.modules.get("dragon.attach")  # (not loaded: a managed process, which never leaves)
    if attach is not None:
        attach.on_leave(_runtime_left)


def cpu_count():
    """The CPUs of every node of the runtime (asked once)."""
    global _cpus
    runtime()
    with _lock:
        if _cpus is None:
            from dragon.globalservices import node

            _cpus = sum(node.query(i).cpus or 1 for i in node.get_list())
        return _cpus


def _runtime_left(handle):
    """``dragon.attach.on_leave``: this process leaves the runtime it is a client of (``dragon.shutdown()``):
    what the start method keeps of that runtime is forgotten, so that nothing of it is used in the next
    one: first its children there (``popen``: none is joined or signalled through the next runtime,
    where their p_uids name other processes), then the heap their channels live in, and the CPU count."""
    global _cpus
    for name in ("dragon.mp.popen", "dragon.mp.heap"):
        mod = sys.modules.get(name)
        if mod is not None:
            mod._forget(handle)
    with _lock:
        _cpus = None


def start_manager(ctx):
    """multiprocessing's SyncManager with its server on this process's node.

    The server is a dragon Process placed on this node. It listens on TCP at this host's address when the
    hostname resolves to one that is not loopback, so its proxies work from every node; otherwise on a Unix
    socket, for processes on this node's host only (elsewhere connecting fails)."""
    import socket
    from multiprocessing.managers import SyncManager

    from dragon.mp import heap
    from dragon.mp.context import placement

    address = None
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if not ip.startswith("127."):
            address = (ip, 0)
    except OSError:
        pass
    m = SyncManager(address=address, ctx=ctx)
    with placement(heap.here()):
        m.start()
    return m
