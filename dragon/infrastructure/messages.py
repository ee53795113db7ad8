"""The one message module of the runtime: every infrastructure message, its fixed type id, and the one codec.

A message is a small class that declares its fields with their types, once; on the wire it is the msgpack
array ``[TYPE, field0, field1, ...]`` in declaration order. Type ids are explicit integers that never change
meaning (never ``enum.auto``), so that a runtime of one version can at least recognise what another sends.

The declared types are checked when a message is decoded: ``decode`` raises ``ValueError`` (and only that) for
anything that is not a well-formed message of a known type, so a service never acts on a field of the wrong
shape, however the bytes were made. What a value means (a timeout >= 0, a known p_uid) is the handler's to
check (``dragon.infrastructure.checks``).

Requests carry ``tag`` (chosen by the sender, echoed in the ``Response``) and ``reply`` (the serialized
descriptor of the channel the answer goes to); requests to global services also ``caller`` (the sender's
p_uid; for a client, a process outside the job that ``dragon.init()`` attached, the negative id its
``GSClientRegister`` got; 0 for anything else). ``Response.err`` is 0 or the code of a ``dragon.errors``
class.

Messages marked ``control`` are sent only by the runtime's own services (the launchers, GS, the shepherds).
They carry the job's ``key`` as their first field: random bytes the launcher makes and gives to the services
only, never to a managed process, so a service can tell its peers' messages from anything else that reaches
its inbox (see ``dragon.infrastructure.service``). Who handles a message is found with one grep:
``@handles(<Class>``.
"""

from typing import Any, ClassVar, Optional, Union, get_args, get_origin

from msgpack import Packer as _Packer
from msgpack import unpackb as _unpackb

_TABLE: dict[int, type["Message"]] = {}
Ident = Union[int, str]  # a p_uid / m_uid / c_uid, or a user_name


class Message:
    """Base class. A subclass passes its fixed ``type_id`` (and ``control=True`` for service-only messages) as
    class keywords and declares its fields as annotations; fields of base classes come first.

    ``__init__`` (every field a keyword defaulting to None), the wire form and the type check are generated
    the first time a class is used: requests are on the critical path of every runtime call, and a process
    compiles only the few classes it really uses (importing this module stays cheap for every managed
    process)."""

    TYPE: ClassVar[int] = -1
    FIELDS: ClassVar[tuple] = ()
    CONTROL: ClassVar[bool] = False
    REQUEST: ClassVar[bool] = False  # answered with a (Control)Response

    def __init_subclass__(cls, type_id=None, control=None, **kw):
        super().__init_subclass__(**kw)
        own = [f for f in cls.__dict__.get("__annotations__", {}) if f.upper() != f]
        cls.FIELDS = tuple(f for f in cls.FIELDS if f not in own) + tuple(own)
        if control and not cls.CONTROL:  # the job's key comes first
            cls.__annotations__ = {"key": bytes, **cls.__dict__.get("__annotations__", {})}
            cls.FIELDS = ("key", *cls.FIELDS)
            cls.CONTROL = True
        if type_id is None:  # an abstract base (Request, GSRequest)
            return
        if type_id in _TABLE:
            raise RuntimeError(
                f"message type id {type_id} used twice ({_TABLE[type_id].__name__}, {cls.__name__})"
            )
        cls.TYPE = type_id
        _TABLE[type_id] = cls

    def __init__(self, *args, **kw):
        _specialize(type(self))
        type(self).__init__(self, *args, **kw)

    def _wire(self):
        _specialize(type(self))
        return type(self)._wire(self)

    def _bad_field(self):
        """The name of the first field whose value does not have its declared type, or None."""
        _specialize(type(self))
        return type(self)._bad_field(self)

    @classmethod
    def _decode(cls, items):
        """The wire list [TYPE, *fields] -> (message, name of its first field of the wrong type or None);
        ValueError if the number of fields is wrong (see decode)."""
        _specialize(cls)
        return cls._decode(items)

    def __repr__(self):
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.FIELDS if f != "reply")
        return f"{type(self).__name__}({body})"

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, f) == getattr(other, f) for f in self.FIELDS)


def _hints(cls):
    out = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get("__annotations__", {}))
    return out


def _check_expr(tp, v, depth=0):
    """Python source of a test that value ``v`` has type ``tp`` (int excludes bool; float accepts int)."""
    if tp is Any:
        return "True"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        return "(" + " or ".join(_check_expr(a, v, depth) for a in args) + ")"
    if tp is type(None):
        return f"{v} is None"
    if tp is float:
        return f"(type({v}) is float or type({v}) is int)"
    if tp in (int, str, bytes, bool, list, dict):
        return f"type({v}) is {tp.__name__}"
    x = f"_x{depth}"
    if origin is list:
        return f"(type({v}) is list and all({_check_expr(args[0], x, depth + 1)} for {x} in {v}))"
    if origin is dict:
        k, val = f"_k{depth}", f"_v{depth}"
        return (
            f"(type({v}) is dict and all({_check_expr(args[0], k, depth + 1)} and "
            f"{_check_expr(args[1], val, depth + 1)} for {k}, {val} in {v}.items()))"
        )
    raise TypeError(f"unsupported field type {tp!r}")


def _specialize(cls):
    """Give cls its own fast __init__, _wire, _bad_field and _decode (fields as named parameters, a list
    display, one unpacking of the wire list)."""
    if "_wire" in cls.__dict__:
        return
    fields, hints = cls.FIELDS, _hints(cls)
    params = "".join(f", {f}=None" for f in fields)
    body = "".join(f"    self.{f} = {f}\n" for f in fields) or "    pass\n"
    values = "".join(f", self.{f}" for f in fields)
    checks = "".join(
        f"    if not {_check_expr(hints[f], 'self.' + f)}:\n        return {f!r}\n" for f in fields
    )
    # _decode: the fields are unpacked, set and checked in one call, from locals
    names = "".join(f", {f}" for f in fields)
    sets = "".join(f"    self.{f} = {f}\n" for f in fields)
    local_checks = "".join(
        f"    if not {_check_expr(hints[f], f)}:\n        return self, {f!r}\n" for f in fields
    )
    src = (
        f"def __init__(self{params}):\n{body}\n"
        f"def _wire(self):\n    return [{cls.TYPE}{values}]\n\n"
        f"def _bad_field(self):\n{checks}    return None\n\n"
        f"def _decode(items):\n    _type{names}, = items\n    self = _new(_cls)\n{sets}{local_checks}"
        "    return self, None\n"
    )
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    exec(src, ns)  # noqa: S102 (source built from this module's own declarations)
    cls.__init__, cls._wire, cls._bad_field = ns["__init__"], ns["_wire"], ns["_bad_field"]
    cls._decode = staticmethod(ns["_decode"])


class Request(Message):
    """Every request: answered with a Response carrying its tag, into its reply channel."""

    REQUEST = True
    tag: int
    reply: bytes


class GSRequest(Request):
    """A request to global services: ``caller`` is the sender's p_uid, a client's id (< 0), or 0."""

    caller: int


# ---- generic reply (to every request, from GS, a shepherd or the launcher's own services)
# -------------------
class Response(Message, type_id=1):
    tag: int
    err: int  # 0, or the code of a dragon.errors class (dragon.errors.from_code)
    msg: Optional[str]
    result: Any


class ControlResponse(Message, type_id=2, control=True):
    """The answer to a control request (one service asking another): a Response that carries the job's key, so
    that no process can answer in a service's name."""

    tag: int
    err: int
    msg: Optional[str]
    result: Any


# ---- requests to global services (its public inbox)
# ---------------------------------------------------------
class GSProcessCreate(GSRequest, type_id=10):
    exe: str
    run_dir: str
    args: list[str]
    env: Optional[dict[str, str]]
    user_name: Optional[str]
    options: Optional[dict[str, Any]]
    soft: bool
    head: bool


class GSProcessList(GSRequest, type_id=11):
    pass


class GSProcessQuery(GSRequest, type_id=12):
    ident: Ident


class GSProcessKill(GSRequest, type_id=13):
    ident: Ident
    sig: int


class GSProcessJoin(GSRequest, type_id=14):
    ident: Ident
    timeout: Optional[float]


class GSProcessMultiJoin(GSRequest, type_id=15):
    idents: list[Ident]
    timeout: Optional[float]


class GSPoolCreate(GSRequest, type_id=20):
    size: int
    user_name: Optional[str]
    options: Optional[dict[str, Any]]
    soft: bool


class GSPoolList(GSRequest, type_id=21):
    pass


class GSPoolQuery(GSRequest, type_id=22):
    ident: Ident


class GSPoolDestroy(GSRequest, type_id=23):
    ident: Ident


class GSChannelCreate(GSRequest, type_id=30):
    m_uid: Optional[int]
    user_name: Optional[str]
    options: Optional[dict[str, Any]]
    soft: bool


class GSChannelList(GSRequest, type_id=31):
    pass


class GSChannelQuery(GSRequest, type_id=32):
    ident: Ident


class GSChannelJoin(GSRequest, type_id=33):
    name: str
    timeout: Optional[float]


class GSChannelDestroy(GSRequest, type_id=34):
    idents: Union[Ident, list[Ident]]


class GSChannelAttach(GSRequest, type_id=35):
    ident: Ident


class GSChannelDetach(GSRequest, type_id=36):
    ident: Ident


class GSNodeList(GSRequest, type_id=40):
    pass


class GSNodeQuery(GSRequest, type_id=41):
    index: int


class GSClientRegister(GSRequest, type_id=45):
    """A process outside the job (``dragon.init()``) becomes a client: pid and start time (clock ticks since
    boot, /proc/<pid>/stat field 22) name it for node 0's launcher, which watches it; keep: what it makes
    outlives it. Answered with ``{"client": id}`` (an int < 0 that its later requests carry as ``caller``)
    once the launcher watches it."""

    pid: int
    start: int
    keep: bool


class GSClientBye(GSRequest, type_id=46):
    """A client (``caller``) leaves: what it made is destroyed unless it registered with keep. Answered when
    done."""


# ---- control of global services (its control inbox)
# ---------------------------------------------------------
class GSHalt(Message, type_id=50, control=True):
    """launcher -> GS: stop (the launcher tears the nodes down itself)."""


class LAHeadExit(Message, type_id=51, control=True):
    """GS -> launcher: the head process (the user's program) exited with exit_code."""

    p_uid: int
    exit_code: int


class GSNodeDown(Message, type_id=52, control=True):
    """launcher -> GS: node ``node`` is gone; its processes count as killed (exit_code, default -9)."""

    node: int
    exit_code: Optional[int]
    reason: Optional[str]


class Ping(Request, type_id=53, control=True):
    """launcher -> a service: answered by the service loop itself (a liveness probe: a stopped or wedged
    service stops answering)."""


class LAClientWatch(Request, type_id=54, control=True):
    """GS -> node 0's launcher: watch client ``client`` (pid and start time as in GSClientRegister; reply_cd:
    its reply channel, destroyed by the launcher once the client is gone). An error answer: it cannot be
    watched."""

    client: int
    pid: int
    start: int
    reply_cd: bytes


class GSClientGone(Request, type_id=55, control=True):
    """node 0's launcher -> GS: client ``client`` ended (any ending, SIGKILL included): release what it made
    unless it asked to keep it. Answered once GS has forgotten its reply channel."""

    client: int


class LAClientUnwatch(Message, type_id=56, control=True):
    """GS -> node 0's launcher: client ``client`` said goodbye (``GSClientBye``) and GS released it: stop
    watching its pid (a process that attaches and leaves many times would otherwise leave a pidfd and a
    record in the launcher per visit until it exits). Its reply channel is the client's to destroy."""

    client: int


# ---- requests to a node's local services (shepherd): its inbox is a control inbox -------------------------
class SHProcessCreate(Request, type_id=60, control=True):
    p_uid: int
    exe: str
    run_dir: str
    args: list[str]
    env: dict[str, str]
    label: str
    stdout: str
    stderr: str
    head: bool
    # True: fork it from the node's pre-imported Python if it is `python -c/-m ...` (else, or None, as usual)
    zygote: Optional[bool]


class SHProcessKill(Request, type_id=61, control=True):
    p_uid: int
    sig: int


class SHPoolCreate(Request, type_id=62, control=True):
    m_uid: int
    size: int


class SHPoolDestroy(Request, type_id=63, control=True):
    m_uid: int


class SHChannelCreate(Request, type_id=64, control=True):
    c_uid: int
    m_uid: int
    capacity: int
    block_size: int


class SHChannelDestroy(Request, type_id=65, control=True):
    c_uid: int


class SHProcessExit(Message, type_id=66, control=True):
    """shepherd -> GS: a managed process exited (exit_code is -signum when a signal killed it)."""

    node: int
    p_uid: int
    exit_code: int


class SHProcessReaped(Message, type_id=67, control=True):
    """GS -> shepherd: GS has forgotten everything that pointed at these processes' reply channels; they may
    be destroyed (GS sends them in batches: see GlobalServices.REAP_BATCH)."""

    p_uids: list[int]


class SHTeardown(Request, type_id=68, control=True):
    """launcher -> shepherd: terminate every managed process (SIGTERM, SIGKILL after grace), destroy
    everything, exit."""

    grace: Optional[float]


# ---- control between the launchers of a multi-node job (carried by the transport agents as CTRL frames)
# -----
class LATeardown(Message, type_id=70, control=True):
    """node 0 -> node k: tear your node down (shepherd's teardown with this grace), then answer LATorn."""

    grace: Optional[float]


class LATorn(Message, type_id=71, control=True):
    """node k -> node 0: node k's teardown is done."""

    node: int


class LAExit(Message, type_id=72, control=True):
    """node 0 -> node k: the job is over, leave (a node's harness: stop the agent)."""


class LABye(Message, type_id=73, control=True):
    """every launcher -> every other: its last frame (stop once every other's came: no MPI message is left
    unreceived)."""

    node: int


class LANodeDead(Message, type_id=74, control=True):
    """node k -> node 0: node k's shepherd died (why: text for the user); node 0 declares it down."""

    node: int
    why: str


class LAProgramDone(Message, type_id=75, control=True):
    """node k -> node 0 (transport harness): the program on node k exited with exit_code."""

    node: int
    exit_code: int


class BadMessage(ValueError):
    """Bytes that are not a well-formed message. ``msg`` is the message when its type was known and only a
    field was wrong (a service answers it with an error if its reply channel is sound), else None."""

    def __init__(self, text, msg=None):
        super().__init__(text)
        self.msg = msg


# Packers ready for use: making one per call is half the cost of encoding a small message. A packer's buffer
# is its own: one is taken from this list for each call (list.pop and append are atomic), so two threads, or
# a signal handler that sends while a packer runs, each use their own.
_packers: list = []


def encode(msg):
    """Message -> bytes (msgpack array [TYPE, *fields])."""
    try:
        packer = _packers.pop()
    except IndexError:
        packer = _Packer(use_bin_type=True)
    try:
        return packer.pack(msg._wire())  # (a packer resets its buffer when pack raises)
    finally:
        _packers.append(packer)


def decode(data):
    """bytes -> Message. Raises BadMessage (a ValueError), and nothing else, on anything that is not a
    well-formed message of a known type with fields of their declared types."""
    try:
        items = _unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # malformed bytes (msgpack raises several classes)
        raise BadMessage(f"not a dragon message: {type(e).__name__}: {e}") from None
    if type(items) is not list or not items or type(items[0]) is not int:
        raise BadMessage(f"not a dragon message: a {type(items).__name__}, not [type id, fields...]")
    cls = _TABLE.get(items[0])
    if cls is None:
        raise BadMessage(f"not a dragon message: unknown type id {items[0]}")
    try:
        msg, bad = cls._decode(items)
    except ValueError:  # (raised only by the unpacking of items into the fields: their number is wrong)
        raise BadMessage(
            f"{cls.__name__}: {len(items) - 1} fields on the wire, expected {len(cls.FIELDS)}"
        ) from None
    if bad is not None:
        raise BadMessage(
            f"{cls.__name__}.{bad}: {type(getattr(msg, bad)).__name__} is not {_hints(cls)[bad]}", msg
        )
    return msg


def type_table():
    """A copy of the type id -> class table (for tests and tools)."""
    return dict(_TABLE)
