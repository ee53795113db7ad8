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


class RuntimeNotFound(DragonError):
    """The caller is not running under dragon-launch, so there is no global services to talk to."""


# ---- the one error-code registry: the code of each class travels in Response.err and the transport's ERR frames
_CODES = {
    DragonError: 1,
    PoolError: 10,
    PoolFull: 11,
    PoolTimeout: 12,
    ChannelError: 20,
    ChannelFull: 21,
    ChannelEmpty: 22,
    ChannelTimeout: 23,
    ProcessError: 30,
    ProcessTimeout: 31,
    RuntimeNotFound: 40,
}
_CLASSES = {code: cls for cls, code in _CODES.items()}


def code_of(error):
    """The code of an error class or instance (that of its nearest registered base; DragonError's for others)."""
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        code = _CODES.get(klass)
        if code is not None:
            return code
    return _CODES[DragonError]


def from_code(code):
    """The error class of a code (DragonError for an unknown one)."""
    return _CLASSES.get(code, DragonError)
