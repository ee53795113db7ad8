"""dragon: processes, shared-memory pools and lock-free channels across the nodes of an HPC allocation."""

__version__ = "0.1.0"


def init(connect=None, keep=False):
    """Make this process part of a dragon runtime (start one on this node, or attach to ``dragon-launch
    --serve``'s with ``connect=FILE``); idempotent. See dragon.attach."""
    from dragon.attach import init as _init

    return _init(connect=connect, keep=keep)


def shutdown():
    """Leave the runtime init() started or attached (see dragon.attach)."""
    from dragon.attach import shutdown as _shutdown

    _shutdown()
