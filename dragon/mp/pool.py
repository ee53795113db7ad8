"""Pool: multiprocessing.pool.Pool's API with workers on every node of the runtime.

How it works. Each worker makes an inbox channel on its own node and says READY on the pool's result channel.
One scheduler thread in the pool's process owns everything: it hands tasks to workers (one at a time while
they are long, so that they spread over the workers as these finish; up to CREDITS in one message while they
are short, so that round trips overlap; a lazy iterable is only read as fast as workers take it), and receives
results, worker exits (from a reaper thread that waits on the workers'
sentinels) and wake-ups from user threads on that one channel. Because the pool knows which tasks each worker
holds, a worker that dies is replaced and the task it was running fails with ``WorkerLostError`` naming the
worker and its exit (the stdlib's Pool waits for ever); its other tasks go to other workers. An exception in a
task comes back with its remote traceback (as ``__cause__``), as with the stdlib.

The result objects (AsyncResult, MapResult, IMapIterator) and the task helpers are the stdlib's, so results,
callbacks, timeouts and chunking behave exactly as there. ``terminate()`` (and leaving a ``with`` block) ends
the workers at once; results still pending then raise ``WorkerLostError``.
"""

import collections
import itertools
import os
import pickle
import sys
import threading
import time
import warnings
from multiprocessing import pool as _mpool
from multiprocessing import util
from multiprocessing.context import ProcessError

from dragon.channels import Channel
from dragon.errors import ChannelEmpty, ChannelError, ChannelTimeout
from dragon.mp import heap, serial

RUN, CLOSE, TERMINATE = _mpool.RUN, _mpool.CLOSE, _mpool.TERMINATE
CREDITS = (
    4  # at most, tasks a worker may hold (the one it runs and the next ones), handed over in one message
)
# ... for a worker on another node, whose answers take a round trip through the transport agents: enough held
# tasks to keep it busy for one (an answer waits ~0.1-0.3 ms there, a trivial task runs in ~10 us)
REMOTE_CREDITS = 16
FAST_TASK = 0.002  # a task answered this soon earns its worker one more held task (up to CREDITS)
SLOW_TASK = 0.02  # a task that took longer brings its worker back to one
RESULTS_CAPACITY = 4096
BLOCK = 512

ApplyResult = AsyncResult = _mpool.ApplyResult
MapResult = _mpool.MapResult
IMapIterator = _mpool.IMapIterator
IMapUnorderedIterator = _mpool.IMapUnorderedIterator
ExceptionWithTraceback = _mpool.ExceptionWithTraceback
MaybeEncodingError = _mpool.MaybeEncodingError


class WorkerLostError(ProcessError):
    """The worker that was running a task exited before it finished (or the pool was terminated)."""


def _describe_exit(code):
    if code is None:
        return "an unknown exit"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _report(text):
    try:
        sys.stderr.write(text.rstrip("\n") + "\n")
        sys.stderr.flush()
    except Exception:
        pass


# ---- the worker ----------------------------------------------------------------------------------------
def _run(task):
    job, i, func, args, kwds = task
    try:
        return (job, i, (True, func(*args, **kwds)))
    except Exception as e:
        return (job, i, (False, _loadable(ExceptionWithTraceback(e, e.__traceback__), e)))


def _loadable(wrapped, e):
    """The task's exception as the pool can rebuild it: one that pickles but cannot be unpickled (an __init__
    whose arguments are not its args) would fail the whole batch of results in the pool's process; it comes
    back as MaybeEncodingError naming it instead (the stdlib's pool hangs there)."""
    try:
        pickle.loads(pickle.dumps(wrapped))
        return wrapped
    except Exception as err:
        return MaybeEncodingError(err, f"{type(e).__qualname__}: {e}")


def _answer(results, wid, done):
    """Send finished tasks' results in one message (a result that cannot be pickled: MaybeEncodingError)."""
    try:
        serial.send_obj(results, ("done", wid, done))
    except ChannelError:
        raise
    except Exception:
        fixed = []
        for job, i, result in done:
            try:
                serial.dumps_oob(result)
            except Exception as e:
                result = (False, MaybeEncodingError(e, result[1]))
            fixed.append((job, i, result))
        serial.send_obj(results, ("done", wid, fixed))


def worker(results_sd, wid, initializer, initargs, maxtasks, credits):
    """A pool worker: take tasks from its own inbox (in batches: what the pool could hand out at once), answer
    each on the pool's result channel before it starts the next one (so the oldest unanswered task of a worker
    that died is the one it was running)."""
    results = heap.attach(results_sd)
    inbox = heap.channel(credits + 1, BLOCK)
    if initializer is not None:
        initializer(*initargs)
    serial.send_obj(results, ("ready", wid, bytes(inbox.sdesc)))
    completed = 0
    tasks = collections.deque()
    while maxtasks is None or completed < maxtasks:
        if not tasks:
            msg = inbox.recv_message()
            batch = serial.load(msg)
            msg.release()
            if batch is None:
                break
            tasks.extend(batch)
        _answer(results, wid, [_run(tasks.popleft())])
        completed += 1


class _Worker:
    __slots__ = ("wid", "process", "inbox", "held", "sent", "ready", "stopping", "credits", "most", "since")

    def __init__(self, wid, process):
        self.wid, self.process = wid, process
        self.inbox = None
        self.held = collections.deque()  # tasks sent and not answered, oldest first
        self.sent = 0
        self.ready = False
        self.stopping = False
        self.credits = 1  # how many tasks it may hold: more while its tasks are short (see answered())
        self.most = CREDITS  # the most it may earn (REMOTE_CREDITS once its inbox is known to be remote)
        self.since = 0.0  # when its oldest held task could start (sent, or the previous one answered)

    def answered(self, now):
        """A task came back: short tasks earn the worker more held tasks (their round trips overlap), a long
        one brings it back to one (so that long tasks spread over every worker)."""
        took = now - self.since
        self.since = now
        if took < FAST_TASK:
            self.credits = min(self.most, self.credits + 1)
        elif took > SLOW_TASK:
            self.credits = 1


class _Notifier:
    """What the stdlib's _PoolCache calls when the cache empties: wake the scheduler."""

    def __init__(self, state):
        self.state = state

    def put(self, _):
        self.state.wake()


class _Tasks:
    """The stdlib's task generation (an exception of the iterable becomes the failed task at its index),
    counting the tasks for IMapIterator's length."""

    def __init__(self, job, func, iterable):
        self.job, self.func = job, func
        self.it = enumerate(iterable)
        self.count = 0
        self.done = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        try:
            i, x = next(self.it)
        except StopIteration:
            self.done = True
            raise
        except Exception as e:
            self.done = True
            self.count += 1
            return (self.job, self.count - 1, _mpool._helper_reraises_exception, (e,), {})
        self.count = i + 1
        return (self.job, i, self.func, (x,), {})


class _PoolState:
    """Everything the pool's threads use (the Pool object itself is only the API, so that it can be garbage
    collected while they run, as the stdlib's can)."""

    def __init__(self, ctx, processes, initializer, initargs, maxtasksperchild):
        self.ctx = ctx
        self.processes = processes
        self.initializer, self.initargs = initializer, initargs
        self.maxtasks = maxtasksperchild
        self.state = RUN
        self.pool = []  # the worker Process objects
        ch = heap.channel(RESULTS_CAPACITY, BLOCK)
        self.results = ch
        self.results_sd = bytes(ch.sdesc)
        self.owned = heap.Owned([ch])
        self.cache = _mpool._PoolCache(notifier=_Notifier(self))
        self.lock = threading.Lock()
        self.sources = collections.deque()  # task iterators not yet fully handed out
        self.requeued = collections.deque()  # tasks of lost workers, handed out first
        self.workers = {}  # wid -> _Worker
        self.wids = itertools.count(1)
        self.sentinels = {}  # sentinel -> wid (read by the reaper)
        self.wake_r, self.wake_w = os.pipe()  # (-1 once closed, under wake_lock: see close_wake())
        self.wake_lock = threading.Lock()
        self.stopped = threading.Event()
        self.scheduler = threading.Thread(target=self.schedule, name="dragon-pool-scheduler", daemon=True)
        self.reaper = threading.Thread(target=self.reap, name="dragon-pool-reaper", daemon=True)

    # ---- workers --------------------------------------------------------------------------------------
    def repopulate(self):
        with self.lock:
            for _ in range(self.processes - len(self.pool)):
                self.start_worker()
        self.kick_reaper()

    def start_worker(self):
        wid = next(self.wids)
        p = self.ctx.Process(
            target=worker,
            args=(self.results_sd, wid, self.initializer, self.initargs, self.maxtasks, REMOTE_CREDITS),
        )
        p.name = p.name.replace("Process", "PoolWorker")
        p.daemon = True
        p.start()
        self.pool.append(p)
        self.workers[wid] = _Worker(wid, p)
        self.sentinels[p.sentinel] = wid

    def kick_reaper(self):
        with self.wake_lock:
            if self.wake_w < 0:
                return
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass

    def close_wake(self):
        """Close the reaper's wake-up pipe, once: join_threads() may run twice (join, then terminate at exit),
        and a second close of the same numbers would close whatever descriptors got them meanwhile (another
        Process's sentinel), as a write into them would write there."""
        with self.wake_lock:
            fds = [fd for fd in (self.wake_r, self.wake_w) if fd >= 0]
            self.wake_r = self.wake_w = -1
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def reap(self):
        """Wait on the workers' sentinels; tell the scheduler of each exit."""
        from multiprocessing.connection import wait

        while not self.stopped.is_set():
            with self.lock:
                sentinels = dict(self.sentinels)
            for s in wait([*sentinels, self.wake_r]):
                if s == self.wake_r:
                    os.read(self.wake_r, 4096)
                    continue
                wid = sentinels[s]
                with self.lock:
                    self.sentinels.pop(s, None)
                    w = self.workers.get(wid)
                code = None
                if w is not None:
                    code = w.process._popen.wait(5)
                self.post(("dead", wid, code))

    # ---- talking to the scheduler ---------------------------------------------------------------------
    def post(self, msg):
        try:
            serial.send_obj(self.results, msg, timeout=30)
        except ChannelError:
            pass  # the pool is gone

    def wake(self):
        self.post(("wake",))

    def add(self, tasks, set_length=None):
        with self.lock:
            self.sources.append((tasks, set_length))
        self.wake()

    # ---- the scheduler --------------------------------------------------------------------------------
    def schedule(self):
        try:
            while self.state != TERMINATE:
                self.dispatch()
                if self.state == CLOSE and self.finished():
                    break
                try:
                    batch = self.results.recv_many(64, timeout=1.0)
                except (ChannelEmpty, ChannelTimeout):
                    continue
                except ChannelError:
                    break
                for data in batch:
                    try:
                        msg = serial.load(data)
                    except Exception as e:  # (the thread must not die: every later call would hang)
                        _report(f"dragon pool: a message from a worker cannot be unpickled ({e!r}); dropped")
                        continue
                    self.handle(msg)
        finally:
            self.stopped.set()
            self.kick_reaper()
            self.fail_all(WorkerLostError("the pool was terminated before this task finished"))

    def work_left(self):
        with self.lock:
            return bool(self.sources or self.requeued)

    def finished(self):
        """close(): every task handed out and answered, every worker told to stop and gone."""
        with self.lock:
            if self.sources or self.requeued:
                return False
        if any(w.held for w in self.workers.values()):
            return False
        for w in self.workers.values():
            if w.ready and not w.stopping:
                w.stopping = True
                try:
                    serial.send_obj(w.inbox, None, timeout=5)
                except ChannelError:
                    pass
        return not self.workers

    def next_task(self):
        if self.requeued:
            return self.requeued.popleft()
        with self.lock:
            while self.sources:
                tasks, set_length = self.sources[0]
                try:
                    return next(tasks)
                except StopIteration:
                    self.sources.popleft()
                    if set_length is not None:
                        set_length(tasks.count)
        return None

    def dispatch(self):
        """Hand tasks to every ready worker with room (one message per worker), until tasks or room run
        out."""
        limit = self.maxtasks
        for w in list(self.workers.values()):
            if not w.ready or w.stopping:
                continue
            room = w.credits - len(w.held)
            if limit is not None:
                room = min(room, limit - w.sent)
            batch = []
            while len(batch) < room:
                task = self.next_task()
                if task is None:
                    break
                batch.append(task)
            if not batch:
                if room > 0:
                    return  # no task left for anyone
                continue
            try:
                serial.send_obj(w.inbox, batch)
            except ChannelError as e:  # the worker's inbox is gone: it is dying; the reaper will say
                self.requeued.extendleft(reversed(batch))
                w.ready = False
                util.debug(f"pool worker {w.wid} cannot take tasks: {e}")
                continue
            except Exception:  # a task cannot be pickled: fail it, hand out the others
                good = []
                for task in batch:
                    try:
                        serial.dumps_oob(task)
                        good.append(task)
                    except Exception as e:
                        self.set(task[0], task[1], (False, e))
                if good:
                    self.requeued.extendleft(reversed(good))
                continue
            if not w.held:
                w.since = time.monotonic()
            w.held.extend(batch)
            w.sent += len(batch)

    def set(self, job, i, obj):
        try:
            result = self.cache[job]
        except KeyError:
            return
        try:
            result._set(i, obj)  # (runs the caller's callback or error_callback, once the result is complete)
        except Exception:  # a callback that raised must not end the scheduler (every later call would hang)
            import traceback

            _report("dragon pool: a result callback raised (the pool goes on):\n" + traceback.format_exc())
            # the result is complete (its callback runs last): finish what _set did not get to, or get() hangs
            self.cache.pop(job, None)
            event = getattr(result, "_event", None)
            if event is not None:
                event.set()
            result._pool = None

    def handle(self, msg):
        kind = msg[0]
        if kind == "done":
            _, wid, done = msg
            w = self.workers.get(wid)
            now = time.monotonic()
            for job, i, result in done:
                if w is not None and w.held:
                    w.held.popleft()
                    w.answered(now)
                self.set(job, i, result)
        elif kind == "ready":
            _, wid, inbox = msg
            w = self.workers.get(wid)
            if w is not None:
                try:
                    w.inbox = heap.attach(inbox)
                except ChannelError:  # it ended since, its heap with it: its "dead" comes from the reaper
                    return  # (this thread must not die: every later call would hang)
                if not isinstance(w.inbox, Channel):  # (a RemoteChannel: the worker is on another node)
                    w.most = REMOTE_CREDITS
                w.ready = True
        elif kind == "dead":
            self.lost(msg[1], msg[2])

    def lost(self, wid, code):
        w = self.workers.pop(wid, None)
        if w is None:
            return
        p = w.process
        with self.lock:
            if p in self.pool:
                self.pool.remove(p)
        if w.held:
            job, i, *_ = w.held.popleft()
            where = f"pid {p.pid} on node {getattr(p._popen, 'node', '?')}"
            err = WorkerLostError(
                f"pool worker {p.name} ({where}) ended with {_describe_exit(code)} while running this task"
            )
            self.set(job, i, (False, err))
            self.requeued.extendleft(reversed(w.held))
        if self.state == RUN or (self.state == CLOSE and self.work_left()):
            with self.lock:
                self.start_worker()
            self.kick_reaper()

    def fail_all(self, err):
        for w in self.workers.values():
            for job, i, *_ in w.held:
                self.set(job, i, (False, err))
            w.held.clear()
        for task in self.requeued:
            self.set(task[0], task[1], (False, err))
        self.requeued.clear()
        with self.lock:
            sources, self.sources = list(self.sources), collections.deque()
        for tasks, _ in sources:
            for task in tasks:
                self.set(task[0], task[1], (False, err))

    def terminate(self):
        """terminate() and exit: the scheduler stops; every worker is ended."""
        if self.state == TERMINATE and self.stopped.is_set() and not self.reaper.is_alive():
            return
        self.state = TERMINATE
        self.wake()
        for p in list(self.pool):
            if p.exitcode is None:
                try:
                    p.terminate()
                except Exception as e:  # gone already
                    util.debug(f"terminating {p.name}: {e}")
        if threading.current_thread() is self.scheduler:
            return  # terminate() in a result callback: the scheduler ends after it, Pool.join() joins
        self.join_threads()

    def join_threads(self):
        if self.scheduler.is_alive():
            self.scheduler.join()
        if self.reaper.is_alive():
            self.reaper.join()
        if self.state == TERMINATE:  # a worker the scheduler started after terminate() listed them (a lost
            for p in list(self.pool):  # worker's replacement): ended too, or its join waits for good
                if p.exitcode is None:
                    try:
                        p.terminate()
                    except Exception as e:
                        util.debug(f"terminating {p.name}: {e}")
        for p in list(self.pool):
            p.join()
        self.close_wake()


class Pool:
    """A pool of worker processes on every node of the runtime (see the module's docstring)."""

    _wrap_exception = True

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None, context=None):
        self._st = None
        if context is None:
            from dragon.mp.context import DragonContext

            context = DragonContext()
        if processes is None:
            processes = context.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int)
            or isinstance(maxtasksperchild, bool)
            or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        st = _PoolState(context, processes, initializer, initargs, maxtasksperchild)
        try:
            st.repopulate()
        except Exception:
            st.state = TERMINATE
            for p in st.pool:
                if p.exitcode is None:
                    p.terminate()
            for p in st.pool:
                p.join()
            raise
        st.scheduler.start()
        st.reaper.start()
        self._st = st
        self._terminate = util.Finalize(self, st.terminate, exitpriority=15)

    @property
    def _state(self):
        return self._st.state if self._st is not None else None

    @_state.setter
    def _state(self, value):
        self._st.state = value

    @property
    def _pool(self):
        return self._st.pool

    @property
    def _cache(self):
        return self._st.cache

    @property
    def _processes(self):
        return self._st.processes

    def _repopulate_pool(self):
        """Start workers until there are ``processes`` of them (the stdlib's name; tests call it)."""
        self._st.repopulate()

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    def apply(self, func, args=(), kwds={}):  # noqa: B006 (the stdlib's signature)
        """func(*args, **kwds) in a worker; returns its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):  # noqa: B006
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        self._st.add(iter([(result._job, 0, serial.by_value_once(func), args, kwds)]))
        return result

    def map(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, _mpool.mapstar, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, _mpool.starmapstar, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, _mpool.mapstar, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, _mpool.starmapstar, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None, error_callback=None):
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), len(self._pool) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        batches = _mpool.Pool._get_tasks(serial.by_value_once(func), iterable, chunksize)
        result = MapResult(self, chunksize, len(iterable), callback, error_callback=error_callback)
        self._st.add(_Tasks(result._job, mapper, batches))
        return result

    def _imap(self, cls, func, iterable, chunksize):
        self._check_running()
        func = serial.by_value_once(func)
        if chunksize == 1:
            result = cls(self)
            self._st.add(_Tasks(result._job, func, iterable), result._set_length)
            return result
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        result = cls(self)
        batches = _mpool.Pool._get_tasks(func, iterable, chunksize)
        self._st.add(_Tasks(result._job, _mpool.mapstar, batches), result._set_length)
        return (item for chunk in result for item in chunk)

    def imap(self, func, iterable, chunksize=1):
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=1):
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)

    def close(self):
        util.debug("closing pool")
        if self._state == RUN:
            self._st.state = CLOSE
            self._st.wake()

    def terminate(self):
        util.debug("terminating pool")
        self._terminate()

    def join(self):
        util.debug("joining pool")
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        self._st.join_threads()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __repr__(self):
        cls = type(self)
        size = len(self._pool) if self._st is not None else 0
        return f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={size}>"

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if self._st is not None and self._st.state == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)
            self._st.wake()
