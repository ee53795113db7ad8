"""Lock-free shared-memory channels (implemented in dragon._core).

A channel's sdesc names the node that holds it. ``Channel.attach(sdesc)`` of a channel on another node returns a
``dragon.infrastructure.remote_channel.RemoteChannel``: the same API, through the node's transport agent.
"""

from dragon._core import core as _core
from dragon._core.core import Channel, Message


def _remote_attach(sdesc, node):
    from dragon.infrastructure.remote_channel import RemoteChannel

    return RemoteChannel(sdesc, node)


_core.set_remote_attach(_remote_attach)

__all__ = ["Channel", "Message"]
