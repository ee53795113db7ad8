"""Every exception dragon raises. Imports nothing, so every layer (even dragon._core) may import it.

Timeouts are also ``TimeoutError`` so that ``except TimeoutError`` works the way Python users expect.
"""


class DragonError(Exception):
    """Base class of every dragon error."""


class PoolError(DragonError):
    """A shared-memory pool could not be created, attached, allocated from or used."""


class PoolFull(PoolError):
    """A non-blocking allocation found no room (``timeout=0``)."""


class PoolTimeout(PoolError, TimeoutError):
    """A blocking allocation found no room before its timeout."""


class ChannelError(DragonError):
    """A channel could not be created, attached or used (also the spec's globalservices ChannelError)."""


class ChannelFull(ChannelError):
    """A non-blocking send (``timeout=0``) found the channel full."""


class ChannelEmpty(ChannelError):
    """A non-blocking receive (``timeout=0``) found the channel empty."""


class ChannelTimeout(ChannelError, TimeoutError):
    """A blocking send or receive did not complete before its timeout."""


class ProcessError(DragonError):
    """A managed process could not be created, found, joined or signalled (the spec's ProcessError)."""


class ProcessTimeout(ProcessError, TimeoutError):
    """A request about processes did not get an answer in time."""


class NotSupported(DragonError, NotImplementedError):
    """What dragon cannot do by design (e.g. pass a file descriptor to a process that may run on another
    node)."""


class RuntimeNotFound(DragonError):
    """The caller is not running under dragon-launch, so there is no global services to talk to."""
