"""dragon.globalservices.channel: channels managed by global services (the spec's Channel Services).

Use a channel by attaching to it: ``dragon.channels.Channel.attach(desc.sdesc)``.

Reference counting (``ChannelOptions(ref_count=True)``): the creating process holds one reference, and so does
every process that gets the channel through ``join``, ``attach`` or a soft ``create``; ``detach`` gives one
back, and a process that exits gives back all of its. When the count reaches zero GS destroys the channel.
"""

from dragon.errors import ChannelError, ChannelTimeout
from dragon.infrastructure import checks
from dragon.infrastructure import client as _client
from dragon.infrastructure import messages as _m
from dragon.infrastructure.descriptors import ChannelDescriptor, ChannelOptions

__all__ = [
    "create",
    "list",
    "query",
    "join",
    "destroy",
    "attach",
    "detach",
    "ChannelDescriptor",
    "ChannelOptions",
    "ChannelTimeout",
    "ChannelError",
]

_list = list


def _ident(identifier):
    return checks.ident(identifier, ChannelError, "channel", "c_uid")


def create(m_uid, user_name=None, channel_options=None, soft=False):
    """Make a channel in the pool ``m_uid`` (None: the caller's node's infrastructure pool). The name, if
    given, must be unique (``soft=True`` returns the existing channel of that name). Returns a
    ChannelDescriptor."""
    if m_uid is not None and (isinstance(m_uid, bool) or not isinstance(m_uid, int)):
        raise ChannelError(f"m_uid must be a pool's m_uid (int), not {m_uid!r}")
    checks.name_soft(user_name, soft, ChannelError)
    opts = ChannelOptions.make(channel_options)
    return ChannelDescriptor.from_wire(
        _client.call(
            _m.GSChannelCreate,
            ChannelError,
            m_uid=m_uid,
            user_name=user_name or None,
            options=opts.to_wire(),
            soft=soft,
        )
    )


def list():
    """The c_uid of every channel currently alive."""
    return _list(_client.call(_m.GSChannelList, ChannelError))


def query(identifier):
    """The ChannelDescriptor of a channel by c_uid (int) or name (str); ChannelError if there is none."""
    return ChannelDescriptor.from_wire(
        _client.call(_m.GSChannelQuery, ChannelError, ident=_ident(identifier))
    )


def join(identifier, timeout=None):
    """The ChannelDescriptor of the channel named ``identifier``, waiting until some process creates it.
    Raises ChannelTimeout (a TimeoutError) if it does not appear within ``timeout`` seconds (None: wait
    forever; measured by global services)."""
    if not isinstance(identifier, str) or not identifier:
        raise ChannelError(f"channel.join needs a channel name (str), not {identifier!r}")
    timeout = checks.timeout(timeout, ChannelError)
    return ChannelDescriptor.from_wire(
        _client.call(
            _m.GSChannelJoin,
            ChannelError,
            server_wait=True,
            name=identifier,
            timeout=timeout,
        )
    )


def destroy(identifier):
    """Destroy one channel, or several (a list of identifiers). ChannelError if any is unknown (then none is
    destroyed)."""
    if isinstance(identifier, (_list, tuple)):
        idents = checks.idents(identifier, ChannelError, "channel", "c_uid", "channel.destroy")
    else:
        idents = _ident(identifier)
    _client.call(_m.GSChannelDestroy, ChannelError, idents=idents)


def attach(identifier):
    """Take a reference to a ref_count channel (no effect on others); returns its ChannelDescriptor."""
    return ChannelDescriptor.from_wire(
        _client.call(_m.GSChannelAttach, ChannelError, ident=_ident(identifier))
    )


def detach(identifier):
    """Give back one reference to a ref_count channel; the last one destroys it."""
    _client.call(_m.GSChannelDetach, ChannelError, ident=_ident(identifier))
