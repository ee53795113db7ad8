"""The client side of requests to global services: one connection per process, safe to use from many threads.

All threads of a process share its one reply channel. Whichever waiting thread finds nobody reading becomes the
reader: it receives replies and hands each to the thread whose tag it carries (leader/follower), so a thread
blocked in ``join(timeout=None)`` never holds up another thread's ``query``.

A managed process uses the reply channel its shepherd made before starting it. Any other process of the job (a
child a managed process forked itself) makes its own in the infrastructure pool and destroys it at exit.
"""

import itertools
import os
import threading
import time

from dragon import env as E
from dragon.errors import (
    ChannelEmpty,
    ChannelError,
    ChannelTimeout,
    PoolError,
    PoolTimeout,
    ProcessError,
    ProcessTimeout,
    RuntimeNotFound,
    from_code,
)
from dragon.infrastructure import messages as m

_TIMEOUT_OF = {ProcessError: ProcessTimeout, PoolError: PoolTimeout, ChannelError: ChannelTimeout}
SEND_TIMEOUT = 30.0


def _request_timeout():
    try:
        return float(os.environ.get(E.REQUEST_TIMEOUT, "60"))
    except ValueError:
        return 60.0


_REQUEST_TIMEOUT = _request_timeout()


def request_timeout():
    """Seconds a client waits for an answer (env DRAGON_REQUEST_TIMEOUT, read once; default 60)."""
    return _REQUEST_TIMEOUT


class Connection:
    def __init__(self):
        environ = os.environ
        if E.GS_CD not in environ:
            raise RuntimeNotFound(
                "not running under the dragon runtime (no global services to talk to): "
                "start the program with dragon-launch, e.g. `dragon-launch app.py`"
            )
        from dragon._core.core import Channel

        self.pid = os.getpid()
        self.p_uid = int(environ.get(E.PUID, "0"))
        self.node = int(environ.get(E.NODE, "0"))
        self.gs = Channel.attach(E.dec(environ[E.GS_CD]))  # (through the transport if GS is on another node)
        if environ.get("DRAGON_SPIN_NS"):  # see the services' _tune_waits
            from dragon._core import core

            core.set_wait_params(spin_ns=int(environ["DRAGON_SPIN_NS"]))
        self.own_reply = None
        if E.REPLY_CD in environ and str(os.getppid()) == environ.get(E.SHEP_PID):
            self.reply = Channel.attach(E.dec(environ[E.REPLY_CD]))
        else:  # a descendant of a managed process: the pre-made reply channel belongs to its ancestor
            from dragon._core.core import Pool

            self._pool = Pool.attach(E.dec(environ[E.INF_PD]))
            self.reply = self.own_reply = Channel.create(self._pool, capacity=64, block_size=256)
            import atexit

            atexit.register(self.close)
        self.reply_sdesc = bytes(self.reply.sdesc)
        self.cond = threading.Condition(threading.Lock())
        self.reading = False
        self.results = {}
        self.abandoned = set()
        self.tags = itertools.count(1)

    def close(self):
        if self.own_reply is not None and os.getpid() == self.pid:
            ch, self.own_reply = self.own_reply, None
            try:
                ch.destroy()
            except Exception:
                pass

    def request(self, msg, timeout):
        """Send msg (its tag, reply and caller are filled in) and return the Response; None timeout = forever.
        Raises TimeoutError (None) if no reply came in time; the caller turns that into its own class."""
        tag = next(self.tags)  # atomic under the GIL
        msg.tag, msg.reply, msg.caller = tag, self.reply_sdesc, self.p_uid
        self.gs.send(m.encode(msg), timeout=SEND_TIMEOUT)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            try:
                while tag not in self.results:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError
                    if self.reading:
                        self.cond.wait(remaining)
                        continue
                    self.reading = True
                    self.cond.release()
                    data = None
                    try:
                        data = self.reply.recv(timeout=remaining)
                    except (TimeoutError, ChannelEmpty):
                        data = None
                    finally:
                        self.cond.acquire()
                        self.reading = False
                        self.cond.notify_all()
                    if data is not None:
                        resp = m.decode(data)
                        if resp.tag in self.abandoned:
                            self.abandoned.discard(resp.tag)
                        else:
                            self.results[resp.tag] = resp
            except (
                BaseException
            ):  # timeout, Ctrl-C, a broken reply channel: the answer, if it comes, is dropped
                if self.results.pop(tag, None) is None:
                    self.abandoned.add(tag)
                raise
            return self.results.pop(tag)


_conn = None
_conn_lock = threading.Lock()


def connection():
    global _conn
    c = _conn
    if c is not None and c.pid == os.getpid():
        return c
    with _conn_lock:
        if _conn is None or _conn.pid != os.getpid():
            _conn = Connection()
        return _conn


def call(msg_class, err_class, server_wait=False, **fields):
    """One request to global services; returns the Response's result or raises err_class (or the matching
    timeout class, also a TimeoutError) with the server's message. With server_wait, the request's own
    ``timeout`` field is how long the server may take (None: forever) and the client waits that much longer."""
    conn = connection()
    if server_wait:
        t = fields.get("timeout")
        wait = None if t is None else t + request_timeout()
    else:
        wait = request_timeout()
    msg = msg_class(**fields)
    try:
        resp = conn.request(msg, wait)
    except TimeoutError:
        raise _TIMEOUT_OF.get(err_class, ProcessTimeout)(
            f"{msg_class.__name__}: no answer from global services within {wait} s"
        ) from None
    except ChannelError as e:
        raise err_class(f"{msg_class.__name__}: lost contact with global services: {e}") from e
    if resp.err:
        raise from_code(resp.err)(resp.msg)  # (Response.err is a dragon.errors wire code)
    return resp.result


def my_puid():
    return int(os.environ.get(E.PUID, "0"))
