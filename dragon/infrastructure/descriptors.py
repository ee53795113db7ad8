"""Descriptors (what global services knows about a process, pool, channel or node: local snapshots) and the
options objects of the create calls. Descriptors travel from GS as plain lists of their fields in
``__slots__`` order (a msgpack array decodes in a third of the time of a map with the names)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from dragon.errors import ChannelError, PoolError, ProcessError
from dragon.infrastructure import checks


def _filler(slots):
    """A function that sets the given slots of an object from a list of as many values, in one unpacking."""
    targets = ", ".join(f"o.{k}" for k in slots)
    ns: dict = {}
    exec(f"def fill(o, d):\n    {targets}, = d\n", ns)  # (slot names are this module's identifiers)
    return ns["fill"]


class _Snapshot:
    """What every descriptor shares: fields listed once in ``__slots__``, built from GS's list of them (in
    that order), and back."""

    __slots__: tuple[str, ...] = ()
    _shown: ClassVar[tuple[str, ...]] = ()  # the fields repr() shows
    _fill: ClassVar[Callable[[Any, list], None] | None] = None  # made on first use, per class (_filler)

    def __init__(self, **fields):
        for k in self.__slots__:
            setattr(self, k, fields.get(k))

    @classmethod
    def from_wire(cls, d):
        """From GS's list of the fields in ``__slots__`` order, or a dict of them (tolerant of fields a newer
        GS adds; a missing one is None). Every query and create answer comes through here: the fields are set
        directly (one unpacking for a list of the expected length), without the keyword call of __init__."""
        self = object.__new__(cls)
        if type(d) is list:  # positional, in __slots__ order (what GS sends)
            slots = cls.__slots__
            if len(d) == len(slots):
                fill = cls.__dict__.get("_fill")
                if fill is None:
                    fill = cls._fill = _filler(slots)
                fill(self, d)
                return self
            for k, v in zip(slots, d):  # (a newer GS's extra fields are ignored, missing ones are None)
                setattr(self, k, v)
            for k in slots[len(d) :]:
                setattr(self, k, None)
            return self
        get = d.get
        for k in cls.__slots__:
            setattr(self, k, get(k))
        return self

    def to_wire(self):
        return [getattr(self, k) for k in self.__slots__]

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self._shown)})"


class ProcessDescriptor(_Snapshot):
    """A snapshot of what global services knows about one managed process (from create(), query(), ...)."""

    PENDING, RUNNING, EXITED = "pending", "running", "exited"
    __slots__ = ("p_uid", "user_name", "node", "hostname", "state", "retval", "pid", "exe", "args")
    _shown = ("p_uid", "user_name", "node", "state", "retval", "pid")
    p_uid: int
    user_name: str | None
    node: int
    hostname: str
    state: str  # PENDING, RUNNING or EXITED
    retval: int | None  # the exit code (-N: killed by signal N); None while it runs
    pid: int | None  # None until it has started
    exe: str
    args: list[str]

    @property
    def name(self):
        return self.user_name

    @property
    def is_alive(self):
        """True while the process runs (or is being started), False once it has exited."""
        return self.state != self.EXITED

    @property
    def location(self):
        """Where the process runs: (node index, hostname)."""
        return (self.node, self.hostname)

    def refresh(self):
        """Update this snapshot from global services."""
        from dragon.infrastructure import client
        from dragon.infrastructure import messages as m

        fresh = self.from_wire(client.call(m.GSProcessQuery, ProcessError, ident=self.p_uid))
        for k in self.__slots__:
            setattr(self, k, getattr(fresh, k))


class PoolDescriptor(_Snapshot):
    """A snapshot of what global services knows about one pool. Attach with
    dragon.pools.Pool.attach(d.sdesc)."""

    __slots__ = ("m_uid", "name", "node", "size", "sdesc")
    _shown = ("m_uid", "name", "node", "size")
    m_uid: int
    name: str | None
    node: int
    size: int
    sdesc: bytes


class ChannelDescriptor(_Snapshot):
    """A snapshot of what GS knows about one channel. Attach with dragon.channels.Channel.attach(d.sdesc)."""

    __slots__ = ("c_uid", "m_uid", "name", "node", "capacity", "block_size", "ref_count", "sdesc")
    _shown = ("c_uid", "m_uid", "name", "node", "capacity", "block_size", "ref_count")
    c_uid: int
    m_uid: int
    name: str | None
    node: int
    capacity: int
    block_size: int
    ref_count: bool
    sdesc: bytes


class NodeDescriptor(_Snapshot):
    """One node of the job: its index, hostname and number of usable cpus."""

    __slots__ = ("index", "hostname", "cpus")
    _shown = __slots__
    index: int
    hostname: str
    cpus: int


class _Options:
    """What every options class shares: ``make`` accepts None, an instance, or a dict initializer."""

    __slots__: tuple[str, ...] = ()
    _error: ClassVar[type[Exception]] = ValueError  # the exception class of the service the options belong to
    _arg: ClassVar[str] = "options"  # the argument's name in the API, for messages

    @classmethod
    def make(cls, options):
        """An instance from None (defaults), an instance, or a dict initializer."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            try:
                return cls(**options)
            except TypeError as e:
                raise cls._error(f"bad {cls.__name__} initializer {options!r}: {e}") from None
        raise cls._error(f"{cls._arg} must be a {cls.__name__}, a dict or None, not {type(options).__name__}")


class ProcessOptions(_Options):
    """How to start a process.

    node:   index of the node to run on (None: the caller's node).
    stdout, stderr: FORWARD (default: printed by dragon-launch, each line labelled ``[user_name or p_uid]``),
            INHERIT (printed unlabelled), DEVNULL, or a file path (opened for appending, relative to run_dir);
            stderr may also be STDOUT (merged into stdout).
    zygote: for ``exe`` = this Python with args ``-c CODE ...`` or ``-m MODULE ...``: fork the process
            from the node's zygote (a Python that has imported dragon once: a fork instead of an interpreter
            start). The process is the same managed process; a request that is not eligible starts as usual.
    """

    FORWARD, INHERIT, DEVNULL, STDOUT = "forward", "inherit", "devnull", "stdout"
    __slots__ = ("node", "stdout", "stderr", "zygote")
    _error, _arg = ProcessError, "options"

    def __init__(self, node=None, stdout=FORWARD, stderr=FORWARD, zygote=False):
        checks.node(node, ProcessError)
        for what, v in (("stdout", stdout), ("stderr", stderr)):
            if not isinstance(v, str) or not v:
                raise ProcessError(
                    f"ProcessOptions.{what} must be FORWARD, INHERIT, DEVNULL or a path, not {v!r}"
                )
        if stdout == self.STDOUT:
            raise ProcessError("ProcessOptions.stdout cannot be STDOUT")
        if not isinstance(zygote, bool):
            raise ProcessError(f"ProcessOptions.zygote must be a bool, not {zygote!r}")
        self.node = node
        self.stdout = stdout
        self.stderr = stderr
        self.zygote = zygote

    def to_wire(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return (
            f"ProcessOptions(node={self.node}, stdout={self.stdout!r}, stderr={self.stderr!r}, "
            f"zygote={self.zygote})"
        )


class PoolOptions(_Options):
    """How to make a pool. node: index of the node that holds it (None: the caller's node)."""

    __slots__ = ("node",)
    _error, _arg = PoolError, "pool_options"

    def __init__(self, node=None):
        checks.node(node, PoolError)
        self.node = node

    def to_wire(self):
        return {"node": self.node}


class ChannelOptions(_Options):
    """How to make a channel.

    local_opts: options of the local library create call, a dict (or object) with ``capacity`` and/or
                ``block_size``; the same can be given directly as ``capacity=`` / ``block_size=``.
    ref_count:  if True, GS counts the processes attached to the channel (the creator, and every process
                that calls ``channel.attach``) and destroys it when the last one detaches or exits.
    """

    __slots__ = ("local_opts", "ref_count", "capacity", "block_size")
    _error, _arg = ChannelError, "channel_options"
    DEFAULT_CAPACITY = 1024
    DEFAULT_BLOCK_SIZE = 1024

    def __init__(self, local_opts=None, ref_count=False, capacity=None, block_size=None):
        if local_opts is not None:
            get = (
                local_opts.get
                if isinstance(local_opts, dict)
                else (lambda k, d=None: getattr(local_opts, k, d))
            )
            if isinstance(local_opts, dict) and set(local_opts) - {"capacity", "block_size"}:
                raise ChannelError(
                    f"unknown local_opts {sorted(set(local_opts) - {'capacity', 'block_size'})}"
                )
            capacity = get("capacity", None) if capacity is None else capacity
            block_size = get("block_size", None) if block_size is None else block_size
        capacity = self.DEFAULT_CAPACITY if capacity is None else capacity
        block_size = self.DEFAULT_BLOCK_SIZE if block_size is None else block_size
        for what, v in (("capacity", capacity), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ChannelError(f"ChannelOptions.{what} must be a positive int, not {v!r}")
        if not isinstance(ref_count, bool):
            raise ChannelError(f"ChannelOptions.ref_count must be a bool, not {ref_count!r}")
        self.local_opts = local_opts
        self.ref_count = ref_count
        self.capacity = capacity
        self.block_size = block_size

    def to_wire(self):
        return {"ref_count": self.ref_count, "capacity": self.capacity, "block_size": self.block_size}

    def __repr__(self):
        return (
            f"ChannelOptions(ref_count={self.ref_count}, capacity={self.capacity}, "
            f"block_size={self.block_size})"
        )
