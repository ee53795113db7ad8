"""Every exception dragon raises, and the one registry of their wire codes. Imports nothing, so every layer
(even dragon._core) may import it.

Timeouts are also ``TimeoutError`` so that ``except TimeoutError`` works the way Python users expect.

Wire codes. Each class below has a fixed integer ``CODE``, written out in its body (never
generated), unique, and never reused for another meaning. Wherever an error crosses a process boundary it
travels as this code: the ``err`` field of an infrastructure ``Response`` (0 there means "no error") and
the u16 that starts the payload of a transport ERR frame. ``code_of(exc)`` gives the code of an exception
or class, ``from_code(code)`` the class back; a code this version does not know (a newer peer's) reads as
``DragonError``.

The codes (stable: a runtime of one version must read another's):

- 1 DragonError, 2 RuntimeNotFound, 5 NotSupported
- 10 PoolError, 11 PoolFull, 12 PoolTimeout
- 20 ChannelError, 21 ChannelFull, 22 ChannelEmpty, 23 ChannelTimeout
- 30 ProcessError, 31 ProcessTimeout
"""

_BY_CODE: dict[int, type["DragonError"]] = {}  # code -> class


class DragonError(Exception):
    """Base class of every dragon error."""

    CODE = 1

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__module__ == __name__:  # the project's classes: an explicit, unique code each
            _register(cls)


def _register(cls):
    code = cls.__dict__.get("CODE")
    if not isinstance(code, int) or not 0 < code <= 0xFFFF:
        raise TypeError(f"{cls.__name__} must set its own CODE (an int in 1..65535), not {code!r}")
    if code in _BY_CODE:
        raise TypeError(f"{cls.__name__}: code {code} is already {_BY_CODE[code].__name__}'s")
    _BY_CODE[code] = cls


_register(DragonError)


class RuntimeNotFound(DragonError):
    """The caller is not running under dragon-launch, so there is no global services to talk to."""

    CODE = 2


class PoolError(DragonError):
    """A shared-memory pool could not be created, attached, allocated from or used."""

    CODE = 10


class PoolFull(PoolError):
    """A non-blocking allocation found no room (``timeout=0``)."""

    CODE = 11


class PoolTimeout(PoolError, TimeoutError):
    """A blocking allocation found no room before its timeout."""

    CODE = 12


class ChannelError(DragonError):
    """A channel could not be created, attached or used (also the spec's globalservices ChannelError)."""

    CODE = 20


class ChannelFull(ChannelError):
    """A non-blocking send (``timeout=0``) found the channel full."""

    CODE = 21


class ChannelEmpty(ChannelError):
    """A non-blocking receive (``timeout=0``) found the channel empty."""

    CODE = 22


class ChannelTimeout(ChannelError, TimeoutError):
    """A blocking send or receive did not complete before its timeout."""

    CODE = 23


class ProcessError(DragonError):
    """A managed process could not be created, found, joined or signalled (the spec's ProcessError)."""

    CODE = 30


class ProcessTimeout(ProcessError, TimeoutError):
    """A request about processes did not get an answer in time."""

    CODE = 31


class NotSupported(DragonError, NotImplementedError):
    """What dragon cannot do by design (e.g. pass a file descriptor to a process that may run on another
    node)."""

    CODE = 5


def from_code(code):
    """The class of wire code ``code``; ``DragonError`` for a code this version does not know."""
    return _BY_CODE.get(code, DragonError)


def code_of(err):
    """The wire code of an exception or exception class: that of the nearest dragon class it derives from (a
    user's subclass of ChannelError travels as ChannelError); any other exception travels as DragonError."""
    cls = err if isinstance(err, type) else type(err)
    for c in cls.__mro__:
        if c.__dict__.get("CODE") is not None and _BY_CODE.get(c.__dict__["CODE"]) is c:
            return c.CODE
    return DragonError.CODE
