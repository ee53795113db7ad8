"""Lock-free shared-memory channels (implemented in dragon._core).

A channel's sdesc names the node that holds it. ``Channel.attach(sdesc)`` of a channel on another node returns
a ``dragon._core.remote.RemoteChannel``: the same API (``ChannelLike``), through the node's transport agent.
"""

from dragon._core.api import ChannelLike
from dragon._core.core import Channel, Message

__all__ = ["Channel", "ChannelLike", "Message"]
