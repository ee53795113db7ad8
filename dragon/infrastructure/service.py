"""The one loop every service of the runtime runs: global services, each node's shepherd, the launchers.

A service is a class with an inbox (a channel) and handlers declared with ``@handles(MessageClass, ...)``;
``serve()`` receives, decodes, checks and dispatches, answers, and keeps its promises:

- One handler convention: a handler gets the message; for a request it returns the result (answered with
  ``Response(err=0)``), raises an error of ``dragon.errors`` (answered with that class's code and its text),
  or returns ``DEFER`` and answers later with ``answer``/``fail``. Any other exception is a bug: logged,
  answered as a ``DragonError``, and the service goes on.
- No message stops a service. Bytes that do not decode (``messages.decode`` raises only ``ValueError``), a
  control message without the job's key, a message this service does not handle: each is logged (the first few
  of each kind, then every 1000th, with counts) and, when it is a request whose reply channel can be reached,
  answered with an error.
- No service blocks on a peer that can block on it: everything it sends (answers, requests, notices) goes out
  with ``timeout=0``; what does not fit waits in the service's outbox for that channel, in order, and is
  retried every loop, while the service keeps reading its own inbox. So two services sending bulk work at each
  other (GS and a shepherd) never deadlock, whatever the sizes of their inboxes.
- ``ask(ch, request, continuation)`` sends a request to another service and calls the continuation with its
  Response; ``later(delay, fn)`` runs fn after delay seconds (deadlines of joins); ``Ping`` is answered by the
  loop itself (the launcher's liveness probe).
"""

import contextlib
import heapq
import itertools
import signal
import time
from collections import deque
from typing import ClassVar

from dragon import env
from dragon._core import core, remote
from dragon._core.core import Channel
from dragon.errors import ChannelEmpty, ChannelError, ChannelFull, ChannelTimeout, DragonError, code_of
from dragon.infrastructure import messages as m

DEFER = object()  # a handler's return value: the answer comes later (answer / fail)
RETRY = 0.001  # how soon a service retries sending what waits in its outbox
LOG_FIRST = 10  # bad messages of one kind logged in full; after that, every LOG_EVERY-th
# reply channels a service keeps attached: a managed process's is forgotten at its exit, but nobody tells a
# service when any other client (a child a managed process forked) is gone, so past this many the oldest
# handle is closed (464 B each, one per such client ever answered: without a bound, a leak)
REPLY_CACHE = 4096


def handles(*classes):
    """Mark a method as the handler of these message classes (see the module doc)."""

    def mark(fn):
        fn.handles = classes
        return fn

    return mark


class Timer:
    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when, fn):
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self):
        self.cancelled = True

    def __lt__(self, other):
        return self.when < other.when


class Service:
    """Base of a service (see the module doc). inbox: the channel it reads; key: the job's key (the first
    field of every control message: see dragon.infrastructure.messages); log: a logger."""

    NAME = "service"
    LOG_EVERY = 1000
    _table: ClassVar[dict[type[m.Message], str]] = {}  # message class -> name of its handler method

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        table = {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                for msg_class in getattr(fn, "handles", ()):
                    table[msg_class] = name
        cls._table = table

    def __init__(self, inbox, key, log):
        self.set_inbox(inbox)
        self.key = key
        self.log = log
        self.handlers = {cls: getattr(self, name) for cls, name in self._table.items()}
        self.handlers[m.Ping] = lambda msg: None
        self.handlers[m.ControlResponse] = self._response
        self.running = True
        self.replies = {}  # reply sdesc -> attached Channel (cache)
        self.outbox = {}  # Channel -> deque of encoded messages that did not fit yet
        self.pending = {}  # tag of a request this service sent -> continuation(Response)
        self.closing = {}  # Channel -> its reply sdesc: forgotten once its outbox is sent (forget_answered)
        self.tags = itertools.count(1)
        self.timers = []  # heap of Timer
        self.compact_at = 1024
        self.bad = {}  # kind of bad message -> how many came

    def set_inbox(self, inbox):
        """The channel this service reads (and where the answers to its own requests come)."""
        self.inbox = inbox
        self.inbox_sdesc = bytes(inbox.sdesc) if inbox is not None else b""

    # ---- the loop
    # -------------------------------------------------------------------------------------------
    def serve(self, until=None, timeout=None):
        """Serve until stop() (or until ``until()`` is true, or ``timeout`` seconds have passed: then
        False)."""
        recv_many = self.inbox.recv_many
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if until is not None and until():
                return True
            wait = self.wait_time()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = left if wait is None else min(wait, left)
            try:
                batch = recv_many(64, timeout=wait)
            except (ChannelTimeout, ChannelEmpty):
                batch = ()
            for data in batch:
                self.handle(data)
            if self.outbox:
                self.flush()
            if self.timers and self.timers[0].when <= time.monotonic():
                self._fire_timers()
            self.tick()
        return True

    def stop(self):
        self.running = False

    def wait_time(self):
        """How long the loop may wait for a message (None: until one comes)."""
        wait = None
        if self.timers:
            wait = max(0.0, self.timers[0].when - time.monotonic())
        if self.outbox:
            wait = RETRY if wait is None else min(wait, RETRY)
        return wait

    def tick(self):
        """Called after every round of the loop (a hook: the launcher looks at its processes and threads)."""

    def handle(self, data):
        """Decode, check and dispatch one message; never raises (but BaseException)."""
        try:
            msg = m.decode(data)
        except m.BadMessage as e:
            self.reject(type(e.msg).__name__ if e.msg is not None else "undecodable", str(e), e.msg)
            return
        t = type(msg)
        if t.CONTROL and msg.key != self.key:
            self.reject(
                t.__name__, f"{t.__name__} without the job's key (only the runtime's services send it)", msg
            )
            return
        handler = self.handlers.get(t)
        if handler is None:
            self.reject(t.__name__, f"does not handle {t.__name__}", msg)
            return
        try:
            res = handler(msg)
        except DragonError as e:
            if t.REQUEST:
                self.fail(msg, e)
            else:
                self.log.error("%s: %s", t.__name__, e)
            return
        except Exception as e:
            self.log.exception("%s failed on %s", self.NAME, t.__name__)
            if t.REQUEST:
                self.fail(msg, DragonError(f"{self.NAME} failed on {t.__name__}: {e!r}"))
            return
        if res is not DEFER and t.REQUEST:
            self._respond(msg, 0, None, res)

    def reject(self, kind, text, msg=None):
        """A message the service will not act on: logged (rate-limited), answered with an error if it is a
        request whose reply channel can be reached."""
        n = self.bad[kind] = self.bad.get(kind, 0) + 1
        if n <= LOG_FIRST or n % self.LOG_EVERY == 0:
            self.log.error("bad message (%s, %d so far): %s", kind, n, text)
        if msg is not None and msg.REQUEST and type(msg.reply) is bytes and type(msg.tag) is int:
            self.fail(msg, DragonError(f"{self.NAME}: {text}"))

    # ---- answers and requests
    # -------------------------------------------------------------------------------
    def answer(self, to, result=None):
        """Answer the request ``to`` (anything with reply and tag) with a result."""
        self._respond(to, 0, None, result)

    def fail(self, to, error):
        """Answer the request ``to`` with an error (an exception of dragon.errors, or any: then
        DragonError)."""
        self._respond(to, code_of(error), str(error), None)

    def _respond(self, to, err, text, result):
        """A control request (another service's) gets a ControlResponse, with the job's key; others a
        Response."""
        resp: m.Message
        if getattr(to, "CONTROL", False):
            resp = m.ControlResponse(self.key, to.tag, err, text, result)
        else:
            resp = m.Response(to.tag, err, text, result)
        reply = to.reply
        if not reply:
            return
        ch = self.replies.get(reply)
        if ch is None:
            if len(self.replies) >= REPLY_CACHE:
                self._drop_oldest_reply()
            try:
                ch = self.replies[reply] = Channel.attach(reply)
            except (ChannelError, TypeError, ValueError) as e:
                self.log.error("cannot answer request %s: its reply channel: %s", to.tag, e)
                return
        try:
            data = m.encode(resp)
        except (TypeError, ValueError, OverflowError) as e:
            self.log.error("cannot encode the answer to request %s: %s", to.tag, e)
            resp.err, resp.msg, resp.result = (
                code_of(DragonError),
                f"{self.NAME}: unencodable answer: {e}",
                None,
            )
            data = m.encode(resp)
        self.post(ch, data)

    def ask(self, ch, msg, cont):
        """Send a (control) request to another service; cont(ControlResponse) is called with its answer."""
        msg.tag = tag = next(self.tags)
        msg.reply = self.inbox_sdesc
        self.pending[tag] = cont
        self.send(ch, msg)
        return tag

    def send(self, ch, msg):
        """Send a message (control messages get the job's key) without ever blocking (see post)."""
        if msg.CONTROL:
            msg.key = self.key
        self.post(ch, m.encode(msg))

    def post(self, ch, data):
        """Put encoded bytes into ch now, or, if it is full, into its outbox (sent in order as room comes)."""
        q = self.outbox.get(ch)
        if q is None:
            try:
                ch.send(data, timeout=0)
                return
            except ChannelFull:
                q = self.outbox[ch] = deque()
            except ChannelError as e:
                self.log.error("cannot send to %r: %s", ch, e)
                return
        q.append(data)

    def flush(self):
        for ch in list(self.outbox):
            q = self.outbox[ch]
            try:
                while q:
                    ch.send(q[0], timeout=0)
                    q.popleft()
            except ChannelFull:
                continue
            except ChannelError as e:  # gone: what waited for it goes nowhere
                self.log.error("cannot send %d message(s) to %r: %s", len(q), ch, e)
            del self.outbox[ch]
            if ch in self.closing:
                self.forget(self.closing.pop(ch))

    def _drop_oldest_reply(self):
        """Close the longest-attached cached reply channel that has nothing waiting in the outbox (a client
        still in use is attached again when it is next answered)."""
        for reply, ch in self.replies.items():
            if ch not in self.outbox:
                del self.replies[reply]
                try:
                    ch.close()
                except ChannelError:
                    pass
                return

    def forget(self, reply):
        """The process behind a reply channel is gone: drop its cached handle and what waits to go into it."""
        ch = self.replies.pop(reply, None)
        if ch is not None:
            self.outbox.pop(ch, None)
            self.closing.pop(ch, None)
            try:
                ch.close()
            except ChannelError:
                pass

    def forget_answered(self, reply):
        """As forget, once what waits in the outbox for that channel has gone (a last answer into it): its
        handle is dropped at once, or by the outbox's flush."""
        ch = self.replies.get(reply)
        if ch is None:
            return
        if ch in self.outbox:
            self.closing[ch] = reply
            return
        self.forget(reply)

    def _response(self, msg):
        cont = self.pending.pop(msg.tag, None)
        if cont is None:
            self.log.warning("answer with unknown tag %s", msg.tag)
        else:
            cont(msg)

    # ---- timers
    # ---------------------------------------------------------------------------------------------
    def later(self, delay, fn):
        """Run fn() after delay seconds (from the loop); returns a Timer (cancel() it if it is no longer
        due)."""
        t = Timer(time.monotonic() + delay, fn)
        heapq.heappush(self.timers, t)
        if len(self.timers) > self.compact_at:  # drop cancelled ones (amortized O(1))
            self.timers = [x for x in self.timers if not x.cancelled]
            heapq.heapify(self.timers)
            self.compact_at = max(1024, 2 * len(self.timers))
        return t

    def _fire_timers(self):
        now = time.monotonic()
        while self.timers and self.timers[0].when <= now:
            t = heapq.heappop(self.timers)
            if not t.cancelled:
                t.cancelled = True
                t.fn()


@contextlib.contextmanager
def service_process():
    """The process prelude of a service (GS, a shepherd): Ctrl-C is the launcher's to handle (a no-op handler,
    not SIG_IGN, which children would inherit); SIGTERM (the launcher died: PR_SET_PDEATHSIG; or scancel, a
    time limit) raises SystemExit once, then is ignored, since a second one would cut a teardown short or
    print noise on the way out; DRAGON_SPIN_NS tunes how long blocking receives spin before they sleep."""
    signal.signal(signal.SIGINT, lambda signum, frame: None)

    def _term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    spin = env.spin_ns()
    if spin is not None:
        core.set_wait_params(spin_ns=spin)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ending anyway
        # a service's answers to other nodes are not waited for at its exit (as a process's sends are): the
        # runtime is ending with it, and a client that stopped reading must not hold the teardown
        remote.close_endpoint(flush=False)
