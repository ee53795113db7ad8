"""The one message module of the runtime: every infrastructure message, its fixed type id, and the one codec.

A message is a small class whose ``FIELDS`` are listed once; on the wire it is the msgpack array
``[TYPE, field0, field1, ...]``. Type ids are explicit integers that never change meaning (never ``enum.auto``),
so that a runtime of one version can at least recognise what another sends. Services route with a dict
``{MessageClass: handler}`` (see ``route``).

Requests carry ``tag`` (chosen by the sender, echoed in the ``Response``) and ``reply`` (the serialized
descriptor of the channel the answer goes to; receivers attach it once and cache the handle) and, for requests to
global services, ``caller`` (the sender's p_uid, 0 when it is not a managed process).
"""

from msgpack import packb as _packb
from msgpack import unpackb as _unpackb

from dragon.errors import ChannelError, ChannelTimeout, DragonError, PoolError, ProcessError, code_of

# Response.err: 0 (no error) or the wire code of a dragon.errors class, which the client raises (from_code).
# These names are the codes the services answer with today.
OK = 0
ERR_PROCESS = code_of(ProcessError)
ERR_POOL = code_of(PoolError)
ERR_CHANNEL = code_of(ChannelError)
ERR_TIMEOUT = code_of(ChannelTimeout)  # a server-side timeout the caller sees as TimeoutError (channel.join)
ERR_INTERNAL = code_of(DragonError)

_TABLE = {}


class Message:
    """Base class: subclasses set TYPE (a fixed int) and FIELDS (names, in wire order).

    A class's ``__init__`` (every field a keyword defaulting to None) and ``_wire`` are generated the first time
    it is used: requests are on the critical path of every runtime call, and a process compiles only the few
    classes it really uses (importing this module stays cheap for every managed process)."""

    __slots__ = ()
    TYPE = -1
    FIELDS = ()

    def __init__(self, *args, **kw):
        _specialize(type(self))
        type(self).__init__(self, *args, **kw)

    def _wire(self):
        _specialize(type(self))
        return type(self)._wire(self)

    def __repr__(self):
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS if f != "reply")
        return f"{type(self).__name__}({body})"

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)


def _specialize(cls):
    """Give cls its own fast __init__ and _wire (fields as named parameters / a list display)."""
    fields = cls.FIELDS
    params = "".join(f", {f}=None" for f in fields)
    body = "".join(f"    self.{f} = {f}\n" for f in fields) or "    pass\n"
    values = "".join(f", self.{f}" for f in fields)
    src = f"def __init__(self{params}):\n{body}\ndef _wire(self):\n    return [{cls.TYPE}{values}]\n"
    ns = {}
    exec(src, ns)  # noqa: S102 (source built from this module's own field names)
    cls.__init__ = ns["__init__"]
    cls._wire = ns["_wire"]


def _define(name, type_id, *fields):
    """A message class with these fields (every one defaulting to None) under a fixed type id."""
    if type_id in _TABLE:
        raise RuntimeError(f"message type id {type_id} used twice")
    cls = type(
        name, (Message,), {"__slots__": fields, "TYPE": type_id, "FIELDS": fields, "__module__": __name__}
    )
    _TABLE[type_id] = cls
    return cls


_REQ = ("tag", "reply", "caller")  # every request to global services starts with these

# ---- generic reply (to every request, from GS or a shepherd) -------------------------------------------------
Response = _define("Response", 1, "tag", "err", "msg", "result")

# ---- requests to global services -----------------------------------------------------------------------------
GSProcessCreate = _define(
    "GSProcessCreate", 10, *_REQ, "exe", "run_dir", "args", "env", "user_name", "options", "soft", "head"
)
GSProcessList = _define("GSProcessList", 11, *_REQ)
GSProcessQuery = _define("GSProcessQuery", 12, *_REQ, "ident")
GSProcessKill = _define("GSProcessKill", 13, *_REQ, "ident", "sig")
GSProcessJoin = _define("GSProcessJoin", 14, *_REQ, "ident", "timeout")
GSProcessMultiJoin = _define("GSProcessMultiJoin", 15, *_REQ, "idents", "timeout")

GSPoolCreate = _define("GSPoolCreate", 20, *_REQ, "size", "user_name", "options", "soft")
GSPoolList = _define("GSPoolList", 21, *_REQ)
GSPoolQuery = _define("GSPoolQuery", 22, *_REQ, "ident")
GSPoolDestroy = _define("GSPoolDestroy", 23, *_REQ, "ident")

GSChannelCreate = _define("GSChannelCreate", 30, *_REQ, "m_uid", "user_name", "options", "soft")
GSChannelList = _define("GSChannelList", 31, *_REQ)
GSChannelQuery = _define("GSChannelQuery", 32, *_REQ, "ident")
GSChannelJoin = _define("GSChannelJoin", 33, *_REQ, "name", "timeout")
GSChannelDestroy = _define("GSChannelDestroy", 34, *_REQ, "idents")
GSChannelAttach = _define("GSChannelAttach", 35, *_REQ, "ident")
GSChannelDetach = _define("GSChannelDetach", 36, *_REQ, "ident")

GSNodeList = _define("GSNodeList", 40, *_REQ)
GSNodeQuery = _define("GSNodeQuery", 41, *_REQ, "index")

GSHalt = _define("GSHalt", 50, *_REQ)  # launcher -> GS: stop (the launcher tears the nodes down itself)
# GS -> launcher: the head process (the user's program) exited with exit_code
LAHeadExit = _define("LAHeadExit", 51, "p_uid", "exit_code")
# launcher/transport -> GS: node `node` is gone (its shepherd died): its processes count as killed (exit_code)
GSNodeDown = _define("GSNodeDown", 52, "node", "exit_code", "reason")

# ---- requests to a node's local services (shepherd) ----------------------------------------------------------
SHProcessCreate = _define(
    "SHProcessCreate",
    60,
    "tag",
    "reply",
    "p_uid",
    "exe",
    "run_dir",
    "args",
    "env",
    "label",
    "stdout",
    "stderr",
    "head",
)
SHProcessKill = _define("SHProcessKill", 61, "tag", "reply", "p_uid", "sig")
SHPoolCreate = _define("SHPoolCreate", 62, "tag", "reply", "m_uid", "size")
SHPoolDestroy = _define("SHPoolDestroy", 63, "tag", "reply", "m_uid")
SHChannelCreate = _define("SHChannelCreate", 64, "tag", "reply", "c_uid", "m_uid", "capacity", "block_size")
SHChannelDestroy = _define("SHChannelDestroy", 65, "tag", "reply", "c_uid")
# shepherd -> GS: a managed process exited (exit_code is -signum when a signal killed it)
SHProcessExit = _define("SHProcessExit", 66, "node", "p_uid", "exit_code")
# GS -> shepherd: GS has forgotten everything that pointed at p_uid's reply channel; the shepherd may destroy it
SHProcessReaped = _define("SHProcessReaped", 67, "p_uid")
# launcher -> shepherd: terminate every managed process (SIGTERM, SIGKILL after grace), destroy everything, exit
SHTeardown = _define("SHTeardown", 68, "tag", "reply", "grace")

# ---- control between the launchers of a multi-node job (carried by the transport agents as CTRL frames) --------
# node 0 -> node k: tear your node down (shepherd's teardown with this grace), then answer LATorn
LATeardown = _define("LATeardown", 70, "grace")
# node k -> node 0: node k's teardown is done
LATorn = _define("LATorn", 71, "node")
# node 0 -> node k: the job is over, leave (a node's harness: stop the agent)
LAExit = _define("LAExit", 72)
# every launcher -> every other: its last frame (stop once every other's came: no MPI message left unreceived)
LABye = _define("LABye", 73)
# node k -> node 0: node k's shepherd died (why: text for the user); node 0 declares it down
LANodeDead = _define("LANodeDead", 74, "node", "why")
# node k -> node 0 (transport harness): the program on node k exited with exit_code
LAProgramDone = _define("LAProgramDone", 75, "node", "exit_code")


def encode(msg):
    """Message -> bytes (msgpack array [TYPE, *fields])."""
    return _packb(msg._wire(), use_bin_type=True)


def decode(data):
    """bytes -> Message. Raises ValueError on anything that is not a known message."""
    try:
        items = _unpackb(data, raw=False, strict_map_key=False)
        cls = _TABLE[items[0]]
    except Exception as e:  # malformed bytes, unknown type id
        raise ValueError(f"not a dragon message: {e!r}") from None
    if len(items) - 1 != len(cls.FIELDS):
        raise ValueError(f"{cls.__name__}: {len(items) - 1} fields on the wire, expected {len(cls.FIELDS)}")
    return cls(*items[1:])


def type_table():
    """A copy of the type id -> class table (for tests and tools)."""
    return dict(_TABLE)


def route(handlers, msg):
    """Call handlers[type(msg)](msg); raise KeyError naming the message if nothing handles it."""
    try:
        handler = handlers[type(msg)]
    except KeyError:
        raise KeyError(f"no handler for {type(msg).__name__}") from None
    return handler(msg)
