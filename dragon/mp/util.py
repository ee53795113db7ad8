"""Small things of the start method: the runtime's CPU count, the Manager."""

import threading

_cpus = None
_lock = threading.Lock()


def cpu_count():
    """The CPUs of every node of the runtime (asked once)."""
    global _cpus
    with _lock:
        if _cpus is None:
            from dragon.globalservices import node

            _cpus = sum(node.query(i).cpus or 1 for i in node.get_list())
        return _cpus


def start_manager(ctx):
    """multiprocessing's SyncManager with its server on this process's node.

    Its server is a dragon Process placed on this node; it listens on a Unix socket, so processes on this
    node's host can use its proxies. A proxy used on another host fails when it connects (the socket is not
    there)."""
    from multiprocessing.managers import SyncManager

    from dragon.mp import heap
    from dragon.mp.context import placement

    m = SyncManager(ctx=ctx)
    with placement(heap.here()):
        m.start()
    return m
