"""The client side of requests to global services: one connection per process, safe to use from many threads.

All threads of a process share its one reply channel. Whichever waiting thread finds nobody reading becomes
the reader: it receives replies and hands each to the thread whose tag it carries (leader/follower), so a
thread blocked in ``join(timeout=None)`` never holds up another thread's ``query``.

A managed process uses the reply channel its shepherd made before starting it. Any other process of the job
(a child a managed process forked itself, a client that ``dragon.init()`` attached) makes its own in the
infrastructure pool and destroys it at exit. A client registers (``register``): its requests then carry its
client id as ``caller``, and global services releases what it made when it leaves (``bye``) or is gone.
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
    DragonError,
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
MAX_REQUEST = 4 << 20  # bytes of one encoded request (a bigger one is refused before it is sent)


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
                "not running under the dragon runtime (no global services to talk to): call dragon.init() "
                "first, or start the program with dragon-launch, e.g. `dragon-launch app.py`"
            )
        from dragon._core.core import Channel

        self.pid = os.getpid()
        self.p_uid = int(environ.get(E.PUID, "0"))
        self.node = int(environ.get(E.NODE, "0"))
        self.gs = Channel.attach(E.dec(environ[E.GS_CD]))  # (through the transport if GS is on another node)
        if E.spin_ns() is not None:  # (as the services: dragon.infrastructure.service.service_process)
            from dragon._core import core

            core.set_wait_params(spin_ns=E.spin_ns())
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
        # the lock is taken directly (a C call; Condition's own __enter__ and notify_all are Python code) and
        # waiting threads are counted, so that the usual case, one thread with nobody to wake, pays neither
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiting = 0
        self.reading = False
        self.results = {}
        self.abandoned = set()
        self.tags = itertools.count(1)

    def register(self, keep):
        """Become a client of global services (see dragon.attach): -> the client id, which later requests
        carry."""
        from dragon._core.remote import start_time

        self.p_uid = call(
            m.GSClientRegister, DragonError, pid=self.pid, start=start_time(self.pid) or 0, keep=bool(keep)
        )["client"]
        return self.p_uid

    def bye(self, timeout):
        """A registered client leaves: global services releases what it made (unless kept); waits up to
        timeout."""
        msg = m.GSClientBye()
        resp = self.request(msg, timeout)
        if resp.err:
            raise from_code(resp.err)(resp.msg)

    def close(self):
        if self.own_reply is not None and os.getpid() == self.pid:
            import atexit

            atexit.unregister(self.close)  # (dragon.shutdown(): this connection is not kept alive until exit)
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
        self.gs.send(encode_request(msg), timeout=SEND_TIMEOUT)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            try:
                while tag not in self.results:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError
                    if self.reading:
                        self.waiting += 1
                        try:
                            self.cond.wait(remaining)
                        finally:
                            self.waiting -= 1
                        continue
                    self.reading = True
                    self.lock.release()
                    data = None
                    try:
                        data = self.reply.recv(timeout=remaining)
                    except (TimeoutError, ChannelEmpty):
                        data = None
                    finally:
                        self.lock.acquire()
                        self.reading = False
                        if self.waiting:
                            self.cond.notify_all()
                    if data is not None:
                        try:
                            resp = m.decode(data)
                        except ValueError:  # (only global services writes here: garbage is dropped)
                            continue
                        if type(resp) is not m.Response:
                            continue
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


class _Unsendable(ValueError):
    pass


def encode_request(msg):
    """The bytes of a request, or _Unsendable saying why it cannot be sent (nothing is sent then)."""
    try:
        data = m.encode(msg)
    except (OverflowError, UnicodeError, TypeError, ValueError) as e:  # ints beyond 64 bits, lone surrogates
        raise _Unsendable(f"cannot be sent: {type(e).__name__}: {e}") from None
    if len(data) > MAX_REQUEST:
        raise _Unsendable(f"is too large to send ({len(data)} bytes; the limit is {MAX_REQUEST} bytes)")
    return data


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


def reset():
    """Forget this process's connection (dragon.shutdown(): the next call finds the runtime of the environment
    anew); its own reply channel is destroyed."""
    global _conn
    with _conn_lock:
        c, _conn = _conn, None
    if c is not None:
        c.close()


def call(msg_class, err_class, server_wait=False, **fields):
    """One request to global services; returns the Response's result or raises err_class (or the matching
    timeout class, also a TimeoutError) with the server's message. With server_wait, the request's own
    ``timeout`` field is how long the server may take (None: forever) and the client waits that much
    longer."""
    conn = connection()
    if server_wait:
        t = fields.get("timeout")
        wait = None if t is None else t + request_timeout()
    else:
        wait = request_timeout()
    msg = msg_class(**fields)
    try:
        resp = conn.request(msg, wait)
    except _Unsendable as e:
        raise err_class(f"{msg_class.__name__}: the request {e}") from None
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
