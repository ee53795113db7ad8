"""Lock-free shared-memory channels (implemented in dragon._core)."""

from dragon._core.core import Channel, Message

__all__ = ["Channel", "Message"]
