"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and Barrier between processes on any node.

A semaphore is a channel of tokens in its creator's heap: ``acquire`` receives a token, ``release`` sends one.
On the creator's node that is shared memory and a futex; from another node the same channel is a RemoteChannel
(through the transport agents), with the same semantics. A lock is a semaphore of capacity 1. When the maximum
value fits a channel (MAX_UNITS), the channel's capacity is that maximum, so releasing a full bounded
semaphore (or a lock that is not held) raises ValueError at once, as with the stdlib. A semaphore with a
larger (or no) maximum keeps its tokens as counts: a release that finds the channel full merges two tokens, so
any value fits. (A release from another node is sent without waiting for the channel: releasing too often
there is not detected.)

Ownership (``RLock``'s recursion, ``_is_mine`` for Condition.wait) is kept per process, as the stdlib's
SemLock does. Condition and Event are the stdlib's classes on these semaphores (they need nothing else);
Barrier is threading.Barrier over a Condition and a shared RawArray.
"""

import os
import struct
import threading
from multiprocessing import synchronize as _mpsync

from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout
from dragon.mp import heap

SEM_VALUE_MAX = _mpsync.SEM_VALUE_MAX
MAX_UNITS = 4096  # bounded semaphores up to this maximum are exact (one token per unit)
COUNTED_CAPACITY = 1024  # channel capacity of a semaphore with a larger maximum
_TOKEN = struct.Struct("<Q")
_ONE = _TOKEN.pack(1)
_EMPTY = (ChannelEmpty, ChannelTimeout)


def _me():
    return (os.getpid(), threading.get_ident())


class _TokenSemaphore:
    """What every lock and semaphore of this module is: tokens in a channel."""

    _kind = "semaphore"
    _repr_max = False  # (a bounded semaphore shows its maximum too, as the stdlib's does)

    def __init__(self, value=1, maxvalue=SEM_VALUE_MAX):
        if value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        if maxvalue < 0 or value > maxvalue:
            raise ValueError("semaphore initial value is larger than its maximum")
        exact = maxvalue <= MAX_UNITS
        ch = heap.channel(max(1, maxvalue) if exact else COUNTED_CAPACITY, 8)
        self._setup(bytes(ch.sdesc), maxvalue, ch)
        self._owned = heap.Owned([ch])
        if value:
            self._put(value)

    def _setup(self, sdesc, maxvalue, ch=None):
        self._sdesc, self._maxvalue = sdesc, maxvalue
        self._exact = maxvalue <= MAX_UNITS
        self._ch = ch if ch is not None else heap.attach(sdesc)
        self._owned = None
        self._owner = None  # (pid, thread id) that holds it, for locks
        self._depth = 0
        if maxvalue == 0:  # BoundedSemaphore(0): its channel has room for one token, which it never takes
            self._put = self._refuse

    @staticmethod
    def _refuse(n):
        raise ValueError("semaphore or lock released too many times")

    def __reduce__(self):
        if self._owned is not None:
            self._owned.shared = True
        return (_rebuild, (type(self), self._sdesc, self._maxvalue))

    # ---- the stdlib's SemLock surface (Condition, JoinableQueue and tests use it) -----------------------
    @property
    def _semlock(self):
        return self

    def _is_mine(self):
        return self._depth > 0 and self._owner == _me()

    def _count(self):
        return self._depth if self._owner == _me() else 0

    def _get_value(self):
        return len(self._ch)

    def _is_zero(self):
        return len(self._ch) == 0

    def get_value(self):
        """The current value (exact for a bounded semaphore; for a larger maximum, exact while no release
        found its channel full)."""
        return self._get_value()

    # ---- acquire / release ------------------------------------------------------------------------------
    def _take(self, block, timeout):
        if not block:
            t = 0
        else:
            t = None if timeout is None else max(0.0, timeout)
        try:
            data = self._ch.recv(timeout=t)
        except _EMPTY:
            return False
        except ChannelError as e:
            raise OSError(f"{self._kind} is gone: {e}") from e
        if not self._exact and data != _ONE:
            n = _TOKEN.unpack(data)[0] if len(data) == _TOKEN.size else 1
            if n > 1:
                self._put(n - 1)
        return True

    def _put(self, n):
        """Add n units as unit tokens while they fit (so get_value() stays exact); raise ValueError if a
        bounded semaphore would exceed its maximum; past the capacity, merge the rest into one token."""
        while n > 0:
            try:
                self._ch.send(_ONE, timeout=0)
                n -= 1
                continue
            except ChannelFull:
                if self._exact:
                    raise ValueError("semaphore or lock released too many times") from None
            try:  # full of tokens: merge one into ours and send that
                data = self._ch.recv(timeout=0)
            except _EMPTY:
                continue
            m = _TOKEN.unpack(data)[0] if len(data) == _TOKEN.size else 1
            try:
                self._ch.send(_TOKEN.pack(m + n), timeout=0)
                n = 0
            except ChannelFull:  # someone filled the slot we freed: keep what we hold and try again
                n += m

    def acquire(self, block=True, timeout=None):
        if not self._take(block, timeout):
            return False
        self._owner, self._depth = _me(), self._depth + 1
        return True

    def release(self):
        self._put(1)
        if self._depth:
            self._depth -= 1
        if not self._depth:
            self._owner = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *args):
        self.release()

    def __repr__(self):
        try:
            value = self._get_value()
        except Exception:
            value = "unknown"
        bound = f", maxvalue={self._maxvalue}" if self._repr_max else ""
        return f"<{type(self).__name__}(value={value}{bound})>"


class Semaphore(_TokenSemaphore):
    def __init__(self, value=1):
        super().__init__(value, SEM_VALUE_MAX)


class BoundedSemaphore(_TokenSemaphore):
    _repr_max = True

    def __init__(self, value=1):
        super().__init__(value, value)


class Lock(_TokenSemaphore):
    _kind = "lock"

    def __init__(self):
        super().__init__(1, 1)

    def __repr__(self):
        if self._is_mine():
            return f"<Lock(owner={_owner_name()})>"
        try:
            held = self._is_zero()
        except Exception:
            return "<Lock(owner=unknown)>"
        return f"<Lock(owner={'SomeOtherProcess' if held else None})>"


def _owner_name():
    """As the stdlib's locks name their owner: the process's name, and its thread's if not the main one."""
    from multiprocessing import process

    name = process.current_process().name
    if threading.current_thread().name != "MainThread":
        name += "|" + threading.current_thread().name
    return name


class RLock(_TokenSemaphore):
    _kind = "lock"

    def __init__(self):
        super().__init__(1, 1)

    def acquire(self, block=True, timeout=None):
        if self._owner == _me() and self._depth:
            self._depth += 1
            return True
        return super().acquire(block, timeout)

    def release(self):
        if self._owner != _me() or not self._depth:
            raise AssertionError("attempt to release recursive lock not owned by thread")
        self._depth -= 1
        if not self._depth:
            self._owner = None
            self._put(1)

    def __repr__(self):
        if self._is_mine():
            return f"<RLock({_owner_name()}, {self._depth})>"
        try:
            held = self._is_zero()
        except Exception:
            return "<RLock(unknown, unknown)>"
        return "<RLock(SomeOtherProcess, nonzero)>" if held else "<RLock(None, 0)>"


class Condition(_mpsync.Condition):
    """The stdlib's Condition on this module's locks and semaphores; also picklable outside Process.start."""

    def __getstate__(self):
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore)


class Event(_mpsync.Event):
    """The stdlib's Event on this module's Condition and Semaphore."""


class Barrier(threading.Barrier):
    """threading.Barrier whose state (phase, count) is a shared RawArray and whose Condition is this
    module's."""

    def __init__(self, parties, action=None, timeout=None, *, ctx):
        from dragon.mp.sharedctypes import RawArray

        if parties < 1:
            raise ValueError("parties must be > 0")
        self.__setstate__((parties, action, timeout, ctx.Condition(), RawArray("i", 2)))
        self._state = 0
        self._count = 0

    def __setstate__(self, state):
        (self._parties, self._action, self._timeout, self._cond, self._array) = state

    def __getstate__(self):
        return (self._parties, self._action, self._timeout, self._cond, self._array)

    @property
    def _state(self):
        return self._array[0]

    @_state.setter
    def _state(self, value):
        self._array[0] = value

    @property
    def _count(self):
        return self._array[1]

    @_count.setter
    def _count(self, value):
        self._array[1] = value


def _rebuild(cls, sdesc, maxvalue):
    obj = cls.__new__(cls)
    obj._setup(sdesc, maxvalue)
    return obj
