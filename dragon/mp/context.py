"""The ``dragon`` start method: its context (what ``mp.get_context("dragon")`` returns), its Process class,
where processes go, and the registration with multiprocessing."""

import contextlib
import contextvars
import multiprocessing
import multiprocessing.context as _mpctx
from multiprocessing import process as _mpprocess

_node_choice = contextvars.ContextVar("dragon_mp_node", default=None)


@contextlib.contextmanager
def placement(node):
    """Processes started inside this block (directly, or as Pool workers) run on node ``node`` (an index of
    ``dragon.globalservices.node.get_list()``; None: round-robin over every node, the default)."""
    if node is not None and (isinstance(node, bool) or not isinstance(node, int) or node < 0):
        raise ValueError(f"node must be None or a node index (int >= 0), not {node!r}")
    token = _node_choice.set(node)
    try:
        yield
    finally:
        _node_choice.reset(token)


class DragonProcess(_mpprocess.BaseProcess):
    """A multiprocessing Process that is a managed process of the dragon runtime.

    Like every Process of the start method, it is placed round-robin over the runtime's nodes unless
    ``node=k`` (or an enclosing ``dragon.mp.placement(node=k)``) says where."""

    _start_method = "dragon"

    def __init__(self, group=None, target=None, name=None, args=(), kwargs=None, *, daemon=None, node=None):
        super().__init__(group, target, name, args, kwargs or {}, daemon=daemon)
        if node is not None and (isinstance(node, bool) or not isinstance(node, int) or node < 0):
            raise ValueError(f"node must be None or a node index (int >= 0), not {node!r}")
        self._dragon_node = node

    @staticmethod
    def _Popen(process_obj):
        from dragon.mp.popen import DragonPopen

        return DragonPopen(process_obj)

    @staticmethod
    def _after_fork():
        pass  # the child was started afresh (unpickled), as with 'spawn': nothing inherited to fix up

    @property
    def node(self):
        """The node index the process runs on (None before start)."""
        popen = self._popen
        return getattr(popen, "node", None) if popen is not None else None


def chosen_node(process_obj):
    """The node a Process asked for (its node=, or the enclosing placement()), or None (round-robin)."""
    node = getattr(process_obj, "_dragon_node", None)
    return node if node is not None else _node_choice.get()


class DragonContext(_mpctx.BaseContext):
    """multiprocessing's API on dragon: every object works between processes on any node of the runtime."""

    _name = "dragon"
    Process = DragonProcess

    def _check_available(self):
        """Always available: outside a runtime (a plain ``python``, a notebook) the first object or Process
        that needs one starts it (``dragon.init()``, see ``dragon.mp.util.runtime``)."""

    def cpu_count(self):
        """The CPUs of the whole runtime (every node's), which is what a Pool() without a size uses."""
        from dragon.mp import util

        return util.cpu_count()

    def Pipe(self, duplex=True):
        from dragon.mp.connection import Pipe

        return Pipe(duplex)

    def Queue(self, maxsize=0):
        from dragon.mp.queues import Queue

        return Queue(maxsize, ctx=self)

    def JoinableQueue(self, maxsize=0):
        from dragon.mp.queues import JoinableQueue

        return JoinableQueue(maxsize, ctx=self)

    def SimpleQueue(self):
        from dragon.mp.queues import SimpleQueue

        return SimpleQueue(ctx=self)

    def Lock(self):
        from dragon.mp.synchronize import Lock

        return Lock()

    def RLock(self):
        from dragon.mp.synchronize import RLock

        return RLock()

    def Semaphore(self, value=1):
        from dragon.mp.synchronize import Semaphore

        return Semaphore(value)

    def BoundedSemaphore(self, value=1):
        from dragon.mp.synchronize import BoundedSemaphore

        return BoundedSemaphore(value)

    def Condition(self, lock=None):
        from dragon.mp.synchronize import Condition

        return Condition(lock, ctx=self)

    def Event(self):
        from dragon.mp.synchronize import Event

        return Event(ctx=self)

    def Barrier(self, parties, action=None, timeout=None):
        from dragon.mp.synchronize import Barrier

        return Barrier(parties, action, timeout, ctx=self)

    def RawValue(self, typecode_or_type, *args):
        from dragon.mp.sharedctypes import RawValue

        return RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type, size_or_initializer):
        from dragon.mp.sharedctypes import RawArray

        return RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type, *args, lock=True):
        from dragon.mp.sharedctypes import Value

        return Value(typecode_or_type, *args, lock=lock, ctx=self)

    def Array(self, typecode_or_type, size_or_initializer, *, lock=True):
        from dragon.mp.sharedctypes import Array

        return Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self)

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        from dragon.mp.pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self)

    def Manager(self):
        """A SyncManager whose server runs on this process's node (see dragon.mp.util.start_manager)."""
        from dragon.mp import util

        return util.start_manager(self)


# the factories multiprocessing's module functions (mp.Queue(), mp.Lock(), ...) must send to the chosen
# context
_FACTORIES = (
    "Pipe",
    "Queue",
    "JoinableQueue",
    "SimpleQueue",
    "Lock",
    "RLock",
    "Semaphore",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Barrier",
    "RawValue",
    "RawArray",
    "Value",
    "Array",
    "Pool",
    "Manager",
    "cpu_count",
)


def _delegate(name):
    base = getattr(_mpctx.BaseContext, name)

    def factory(*args, **kwargs):
        return getattr(_mpctx._default_context.get_context(), name)(*args, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = base.__doc__
    factory.__module__ = "multiprocessing"
    return factory


def register():
    """Add the 'dragon' start method to multiprocessing (idempotent).

    multiprocessing has no public way to add a start method: its contexts live in the private registry
    ``multiprocessing.context._concrete_contexts``, which ``get_context(name)`` and ``set_start_method(name)``
    read, so that is where ours goes. And the module's own factories (``mp.Queue()``, ``mp.Lock()``, ...) are
    methods of its default context that build the stdlib's objects whatever the start method; they are
    replaced by functions that ask the selected context, so that after ``mp.set_start_method("dragon")`` they
    make dragon's. For the stdlib's start methods the result is exactly what it was (their context's method is
    the one the default context used)."""
    if "dragon" in _mpctx._concrete_contexts:
        return
    _mpctx._concrete_contexts["dragon"] = DragonContext()
    default_cls = type(_mpctx._default_context)
    for name in _FACTORIES:
        fn = _delegate(name)
        setattr(default_cls, name, staticmethod(fn))
        if hasattr(multiprocessing, name):
            setattr(multiprocessing, name, fn)
    all_methods = default_cls.get_all_start_methods

    def get_all_start_methods(self):
        return [*all_methods(self), "dragon"]

    get_all_start_methods.__doc__ = all_methods.__doc__
    default_cls.get_all_start_methods = get_all_start_methods
    multiprocessing.get_all_start_methods = _mpctx._default_context.get_all_start_methods
