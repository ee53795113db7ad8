"""Queue, JoinableQueue and SimpleQueue over a dragon channel, usable from processes on any node.

A Queue is one channel in its creator's heap: ``put`` pickles in the caller and sends (no feeder thread on the
way, unless the channel is full), ``get`` receives and unpickles; several producers and consumers on any nodes
share it (each message is received exactly once). Large buffers (numpy arrays) travel in a pool block and are
received without a copy (see ``serial``).

A bounded queue (``maxsize`` up to MAX_CAPACITY) is a channel of that capacity: ``put`` blocks, or raises
``queue.Full``, exactly when the queue holds maxsize items. An unbounded queue's channel holds CAPACITY items;
past that, ``put`` keeps items in this process and a feeder thread sends them as room appears, so ``put``
never blocks (as with the stdlib, a process waits at exit until its buffered items are sent, unless
``cancel_join_thread()``). A larger maxsize is an unbounded queue whose ``put`` waits (or raises
``queue.Full``) while the queue holds maxsize items as this process sees it (the channel's items and its own
buffered ones, not those other producers still buffer). From another node, a send returns once the transport
has the message (a full channel stops a sender only after the transport's window of messages), so a bounded
queue's ``put`` there first waits (or raises ``queue.Full``) while the channel holds maxsize items. It looks
at the channel's length (a round trip through the transport) only when it must: after a look that found room
for k more, the next puts of the handle need none while they are fewer than k (and than LOOK_EVERY): readers
only take, so for one producer what it saw plus what it put since is at least the length. Exact for one
producer; several producers on other nodes may overshoot by what they have in flight and what they put since
their last look (under LOOK_EVERY each). As with the stdlib, an object that cannot be pickled
is reported by ``_on_queue_feeder_error`` (printed), not raised by ``put``.

Unlike the stdlib's, these queues can also be sent through other queues and pipes, and passed to Pool tasks.
"""

import collections
import pickle
import queue as _queue
import threading
import time
import weakref
from multiprocessing import util

from dragon.channels import Channel
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout
from dragon.mp import heap, serial
from dragon.mp.connection import Connection

CAPACITY = 1024
MAX_CAPACITY = 1 << 16
BLOCK = 512
SPILL_WAIT = (
    0.001  # an unbounded queue's put waits this long for room before it keeps the item for the feeder
)
_FULL = (ChannelFull, ChannelTimeout)
ROOM_POLL = 0.005  # how often the put of a queue bounded above MAX_CAPACITY looks for room
LOOK_EVERY = 64  # from another node, a bounded queue's put looks at its length at least every this many puts


def _timeout(block, timeout):
    if not block:
        return 0
    return None if timeout is None else max(0.0, timeout)


def _send(ch, data, bufs, timeout):
    if bufs:
        serial._send_framed(ch, data, bufs, 0, timeout)
    else:
        ch.send(data, timeout=timeout)


class _Feed:
    """What a queue's put() and its feeder thread share (the thread is given this, not the queue)."""

    __slots__ = ("buffer", "ch", "closed", "cond", "on_error", "sending", "stopping")

    def __init__(self, ch, on_error):
        self.ch, self.on_error = ch, on_error
        self.buffer = collections.deque()
        self.cond = threading.Condition(threading.Lock())
        self.closed = False
        self.sending = False  # the feeder is sending the buffer's head (outside the lock)
        self.stopping = []  # non-empty: the process is exiting, or the queue was garbage collected


def _flush_locked(f):
    """Send what this process keeps, in order, while it fits (the caller holds f.cond; nobody is sending)."""
    buf = f.buffer
    while buf:
        data, bufs = buf[0]
        try:
            _send(f.ch, data, bufs, 0)
        except _FULL:
            return
        buf.popleft()


def _feed(f):
    """A queue's feeder thread: send what put() kept while the channel was full, in order; ends once the queue
    is closed, garbage or the process exits, and what it holds is sent. put() itself sends what fits whenever
    it runs; this thread waits for room when nobody puts."""
    while True:
        with f.cond:
            while not f.buffer and not f.closed and not f.stopping:
                f.cond.wait()
            _flush_locked(f)
            if not f.buffer:
                if f.closed or f.stopping:
                    return
                continue
            data, bufs = f.buffer[0]
            f.sending = True
        sent = False
        try:
            _send(f.ch, data, bufs, 0.05)
            sent = True
        except _FULL:
            pass
        except ChannelError as e:  # the queue is gone: nothing can be delivered
            if not f.stopping:  # (its creator exited; not: this process dropped a queue it never shared)
                f.on_error(e, None)
            with f.cond:
                f.buffer.clear()
                f.sending = False
            return
        with f.cond:
            f.sending = False
            if sent:
                f.buffer.popleft()


class Queue:
    """multiprocessing.Queue on a dragon channel."""

    def __init__(self, maxsize=0, *, ctx=None):
        self._maxsize = maxsize if maxsize > 0 else 0
        cap = maxsize if 0 < maxsize <= MAX_CAPACITY else CAPACITY
        ch = heap.channel(cap, BLOCK)
        self._setup(bytes(ch.sdesc), self._maxsize, ch)
        self._owned = heap.Owned([ch])

    def _setup(self, sdesc, maxsize, ch=None):
        self._sdesc = sdesc
        self._maxsize = maxsize
        self._ch = ch if ch is not None else heap.attach(sdesc)
        self._remote = not isinstance(self._ch, Channel)  # on another node (see the module's docstring)
        self._owned = None
        self._closed = False
        self._reader_conn = None
        # what put() and the feeder thread share; the thread holds this, never the queue, so that a queue
        # dropped by its program is garbage collected (and its feeder stopped) as the stdlib's is
        self._fd = _Feed(self._ch, self._on_queue_feeder_error)
        self._buffer = self._fd.buffer
        self._cond = self._fd.cond
        self._thread = None
        self._stopping = self._fd.stopping
        self._joincancelled = False
        self._finalizer = None
        # from another node (_wait_room): the room the last look at the queue's length found, and the puts
        # counted against it since (the one that looked included)
        self._room = self._unlooked = 0
        self._room_lock = threading.Lock()

    def __reduce__(self):
        if self._owned is not None:
            self._owned.shared = True
        return (_rebuild, (type(self), self._sdesc, self._maxsize, self._extra_state()))

    def _extra_state(self):
        return None

    # ---- put -------------------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def put(self, obj, block=True, timeout=None):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        try:
            data, bufs = serial.dumps_oob(obj)
        except Exception as e:
            self._on_queue_feeder_error(e, obj)
            return
        if self._maxsize:
            if self._maxsize <= MAX_CAPACITY:  # the channel's capacity is the bound
                t = _timeout(block, timeout)
                if self._remote:  # (a remote send returns before it has room)
                    t = self._wait_room(t)
                try:
                    self._send(data, bufs, t)
                except _FULL:
                    raise _queue.Full from None
                return
            self._wait_room(_timeout(block, timeout))
        if not self._buffer:  # nothing of ours waits: straight into the channel
            try:
                self._send(data, bufs, SPILL_WAIT)
                return
            except _FULL:
                pass
        with self._cond:
            self._buffer.append((data, bufs))
            if not self._fd.sending:
                _flush_locked(self._fd)
            if self._buffer:
                if self._thread is None:
                    self._start_thread()
                self._cond.notify()

    def _wait_room(self, timeout):
        """Wait until the queue holds fewer than maxsize items (queue.Full after timeout); -> what is left of
        the timeout. (A queue bounded above the channel's capacity, or a bounded queue of another node: there
        a put needs no look while the last one left room for it, see the module's docstring.)"""
        if self._remote:
            with self._room_lock:
                if self._unlooked < self._room and self._unlooked < LOOK_EVERY:
                    self._unlooked += 1
                    return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            n = self.qsize()
            if n < self._maxsize:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise _queue.Full
            time.sleep(
                ROOM_POLL if deadline is None else min(ROOM_POLL, max(0.0, deadline - time.monotonic()))
            )
        if self._remote:
            with self._room_lock:
                self._room, self._unlooked = self._maxsize - n, 1
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def put_nowait(self, obj):
        return self.put(obj, False)

    def _send(self, data, bufs, timeout):
        _send(self._ch, data, bufs, timeout)

    def _start_thread(self):
        self._thread = threading.Thread(target=_feed, args=(self._fd,), name="QueueFeederThread", daemon=True)
        self._thread.start()
        # at exit, or once the queue is garbage: the feeder stops when it has sent what it holds; at exit the
        # process waits for that (the join belongs to the thread, as the stdlib's: a queue that becomes
        # garbage does not make the thread that dropped it wait)
        util.Finalize(self, Queue._finalize_close, [self._cond, self._stopping], exitpriority=10)
        if not self._joincancelled:
            self._finalizer = util.Finalize(
                self._thread, Queue._finalize_join, [weakref.ref(self._thread)], exitpriority=-5
            )

    @staticmethod
    def _finalize_close(cond, stopping):
        with cond:
            stopping.append(True)
            cond.notify()

    @staticmethod
    def _finalize_join(twr):
        t = twr()
        if t is not None:
            t.join()

    @staticmethod
    def _on_queue_feeder_error(e, obj):
        """Called when an object cannot be pickled (or sent); override it to handle that differently."""
        import traceback

        traceback.print_exc()

    # ---- get -------------------------------------------------------------------------------------------
    def get(self, block=True, timeout=None):
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        try:
            msg = self._ch.recv_message(
                timeout=None if block and timeout is None else _timeout(block, timeout)
            )
        except (ChannelEmpty, ChannelTimeout):
            raise _queue.Empty from None
        try:
            # a message that fits a slot is a plain pickle (a queue sends nothing else inline)
            return pickle.loads(msg) if not msg.in_pool else serial.load(msg)
        finally:
            msg.release()
            r = self._reader_conn
            if r is not None and r._ready is not None:
                r._ready.refresh(r)

    def get_nowait(self):
        return self.get(False)

    def qsize(self):
        """Items in the queue (including those this process still holds for the feeder)."""
        return len(self._ch) + len(self._buffer)

    def empty(self):
        return self.qsize() == 0

    def full(self):
        return bool(self._maxsize) and self.qsize() >= self._maxsize

    @property
    def _reader(self):
        """A read-only Connection on the queue's channel (for multiprocessing.connection.wait())."""
        if self._reader_conn is None:
            self._reader_conn = Connection(None, self._sdesc)
        return self._reader_conn

    # ---- closing ---------------------------------------------------------------------------------------
    def close(self):
        """This process will put no more; the feeder (if any) sends what it holds, then stops."""
        with self._cond:
            self._closed = True
            self._fd.closed = True
            self._cond.notify()
        if self._reader_conn is not None:
            self._reader_conn.close()

    def join_thread(self):
        if not self._closed:
            raise AssertionError("join_thread() needs close() first")
        if self._thread is not None:
            self._thread.join()

    def cancel_join_thread(self):
        """Do not wait at exit for this process's buffered items to be sent (they may be lost)."""
        self._joincancelled = True
        if self._finalizer is not None:
            self._finalizer.cancel()


class JoinableQueue(Queue):
    """A Queue with task_done() and join()."""

    def __init__(self, maxsize=0, *, ctx=None):
        super().__init__(maxsize, ctx=ctx)
        ctx = ctx or _dragon_ctx()
        self._unfinished_tasks = ctx.Semaphore(0)
        self._jcond = ctx.Condition()

    def _extra_state(self):
        return (self._unfinished_tasks, self._jcond)

    def _set_extra(self, state):
        self._unfinished_tasks, self._jcond = state

    def put(self, obj, block=True, timeout=None):
        self._check_open()
        with self._jcond:  # counted before it can be taken (and task_done() called for it)
            self._unfinished_tasks.release()
            try:
                super().put(obj, block, timeout)
            except BaseException:
                self._unfinished_tasks.acquire(False)
                raise

    def task_done(self):
        with self._jcond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times")
            if self._unfinished_tasks._semlock._is_zero():
                self._jcond.notify_all()

    def join(self):
        with self._jcond:
            if not self._unfinished_tasks._semlock._is_zero():
                self._jcond.wait()


class SimpleQueue:
    """multiprocessing.SimpleQueue on a dragon channel (its _reader/_writer are this package's
    Connections)."""

    def __init__(self, *, ctx=None):
        ch = heap.channel(CAPACITY, BLOCK)
        sd = bytes(ch.sdesc)
        self._setup(sd)
        self._owned = heap.Owned([ch])

    def _setup(self, sdesc):
        self._sdesc = sdesc
        self._reader = Connection(None, sdesc)
        self._writer = Connection(sdesc, None)
        self._owned = None
        self._locks = None

    # The stdlib's SimpleQueue has these and its Pool class uses them (multiprocessing.pool.Pool with this
    # context: terminate() takes _rlock). Our get and put need no lock (the channel takes many readers and
    # writers): these are this handle's own, made on first use.
    @property
    def _rlock(self):
        return self._lock_pair()[0]

    @property
    def _wlock(self):
        return self._lock_pair()[1]

    def _lock_pair(self):
        if self._locks is None:
            ctx = _dragon_ctx()
            self._locks = (ctx.Lock(), ctx.Lock())
        return self._locks

    def _poll(self, timeout=0.0):
        return self._reader.poll(timeout)

    def __reduce__(self):
        if self._owned is not None:
            self._owned.shared = True
        return (_rebuild_simple, (type(self), self._sdesc))

    def get(self):
        return self._reader.recv()

    def put(self, obj):
        self._writer.send(obj)

    def empty(self):
        self._reader._check_closed()  # (a closed one says so as the stdlib's does, with OSError)
        return len(self._reader._recv) == 0

    def close(self):
        self._reader.close()
        self._writer.close()


def _dragon_ctx():
    from multiprocessing import context

    return context._concrete_contexts["dragon"]


def _rebuild(cls, sdesc, maxsize, extra):
    q = cls.__new__(cls)
    q._setup(sdesc, maxsize)
    if extra is not None:
        q._set_extra(extra)
    return q


def _rebuild_simple(cls, sdesc):
    q = cls.__new__(cls)
    q._setup(sdesc)
    return q
