"""``dragon.init()`` and ``dragon.shutdown()``: use dragon from a plain ``python``, a notebook or a bigger
program.

Three ways a process can be in a runtime, one handle (``Handle``) for each:

- **managed** (``mode == "managed"``): started by the runtime (``dragon-launch``, ``process.create``) or by
  such a process; ``init()`` is a no-op that returns the same handle every time.
- **local** (``mode == "local"``): ``init()`` in a process outside any runtime starts a single-node runtime
  in the background (``python -m launcher.serve``: a launcher in a session of its own, with global services
  and the node's shepherd) and makes this process its client. The runtime ends with ``shutdown()``, at
  interpreter exit, and within seconds of a SIGKILL of this process (its launcher watches this pid).
- **connected** (``mode == "connected"``): ``init(connect=FILE)`` (or env ``DRAGON_CONNECT=FILE``) attaches
  to the runtime that ``dragon-launch --serve`` started (on one node or many) from a process on node 0's
  host. Many clients may attach at once. What a client makes (processes, pools, channels) is released when
  it leaves (``shutdown()``, interpreter exit) or dies (node 0's launcher watches its pid), unless it
  attached with ``keep=True``; a client never ends the runtime.

Either way the client is given what a managed process is given (the environment contract of
``dragon.env.CLIENT``: global services' public inbox, node 0's infrastructure pool and transport gateway),
put into ``os.environ`` so that every API (``dragon.globalservices.*``, ``dragon.channels``,
``dragon.pools``) works as under ``dragon-launch``; never the job's key.

``init()`` is idempotent and cheap once this process is in a runtime: code that needs the runtime (the
multiprocessing start method, a library) may call it before each use. It is thread-safe.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

from dragon import env as E
from dragon.errors import DragonError, RuntimeNotFound

START_TIMEOUT = 60.0  # seconds init() waits for a local runtime to come up
STOP_TIMEOUT = 30.0  # seconds shutdown() waits for a local runtime's teardown (then SIGKILL)
BYE_TIMEOUT = 10.0  # seconds a leaving client waits for global services to release what it made


class Handle:
    """This process's place in a runtime (see the module doc): mode, job, node, client (its id, or None),
    connect_file (connected mode), keep."""

    def __init__(self, mode, job, client=None, connect_file=None, keep=False, proc=None):
        self.mode, self.job, self.client = mode, job, client
        self.connect_file, self.keep = connect_file, keep
        self.node = int(os.environ.get(E.NODE, "0") or 0)
        self.pid = os.getpid()
        self._proc = proc  # local mode: the launcher's Popen
        self._saved = None  # the DRAGON_* variables init() replaced, restored by shutdown()

    def __repr__(self):
        more = f", connect_file={self.connect_file!r}" if self.connect_file else ""
        return f"<dragon runtime {self.mode}: job {self.job}{more}>"

    def shutdown(self):
        shutdown()


_handle = None
_lock = threading.RLock()
_leave_hooks: list = []  # fn(handle), called when this process leaves a runtime (on_leave)


def on_leave(fn):
    """Have fn(handle) called when this process leaves its runtime (``shutdown()``, also at interpreter exit),
    before it leaves (what it started there is still reachable): a layer above (multiprocessing) forgets
    what belongs to that runtime, so that nothing of it is used in the next one ``init()`` makes. Once per
    fn, most recent first; an exception is printed and does not keep the process in the runtime."""
    with _lock:
        if fn not in _leave_hooks:
            _leave_hooks.append(fn)


def current():
    """The handle of this process (None if init() was not called here and it is not managed)."""
    h = _handle
    return h if h is not None and h.pid == os.getpid() else None


def init(connect=None, keep=False):
    """Make this process part of a dragon runtime and return its Handle (see the module doc).

    connect: a connection file of ``dragon-launch --serve`` (default: env DRAGON_CONNECT; neither: start a
    runtime on this node in the background). keep: what this client makes outlives it (connected mode).
    Raises RuntimeNotFound if the runtime cannot be started or reached (a connection file whose runtime is
    gone, another host), DragonError if this process is already the client of another runtime."""
    global _handle
    if connect is not None and not isinstance(connect, (str, os.PathLike)):
        raise TypeError(f"connect must be a path (str) or None, not {connect!r}")
    with _lock:
        h = current()
        want = os.fspath(connect) if connect is not None else os.environ.get(E.CONNECT) or None
        if h is not None:
            if connect is not None and h.connect_file != os.path.abspath(os.path.expanduser(want)):
                raise DragonError(
                    f"this process is already in a runtime ({h!r}): "
                    "dragon.shutdown() before attaching another"
                )
            return h
        if E.in_runtime():  # started by a runtime (or forked from a client): nothing to start or attach
            _handle = Handle("managed", os.environ.get(E.JOB))
            return _handle
        if want:
            _handle = _connect(os.path.abspath(os.path.expanduser(want)), keep)
        else:
            _handle = _start_local()
        # (registered at each init(), after what init made registered its own exit steps, so that it runs
        # first; shutdown() unregisters it: one per init() would keep every handle alive until exit)
        atexit.register(_at_exit)
        _forward_ctrl_c()
        return _handle


def _forward_ctrl_c():
    """Ctrl-C in a terminal reaches a 'spawn' child too (it is in its parent's process group); this client's
    'dragon' children are the runtime's, in another session, so a program interrupted while it joins one
    waited for it for good. While this process is the terminal's foreground group, its SIGINT (left at
    Python's default) is passed on to its running children on this node, then raises KeyboardInterrupt as
    before. Not in a notebook or under a pipe: there a spawn child would not get it either."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def on_sigint(signum, frame):
        if _terminal_foreground():
            _interrupt_children()
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)


def _terminal_foreground():
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def _interrupt_children():
    procs = sys.modules.get("multiprocessing.process")
    popen_mod = sys.modules.get("dragon.mp.popen")
    if procs is None or popen_mod is None:  # (read where loaded: this layer does not import the mp layer)
        return
    here = popen_mod.heap.here()
    for p in list(procs._children):
        po = getattr(p, "_popen", None)
        if isinstance(po, popen_mod.DragonPopen) and po.returncode is None and po.node == here:
            try:  # (its sentinel is a pidfd on this node: never a reused pid)
                signal.pidfd_send_signal(po.sentinel, signal.SIGINT)
            except (OSError, TypeError, ValueError):
                pass


def shutdown():
    """Leave the runtime: a local runtime is ended (every process it started, every segment); a connected
    client releases what it made (unless keep) and detaches, leaving the runtime running. A no-op for a
    managed process and when not initialized. Afterwards init() may start or attach again."""
    global _handle
    with _lock:
        h = current()
        if h is None or h.mode == "managed":
            return
        for fn in reversed(_leave_hooks):
            try:
                fn(h)
            except Exception as e:
                print(
                    f"dragon.shutdown: {fn.__module__}.{fn.__qualname__}: {type(e).__name__}: {e}",
                    file=sys.stderr,
                )
        _handle = None
        atexit.unregister(_at_exit)
        _leave(h)


def _at_exit():
    # multiprocessing's exit steps (joining the 'dragon' start method's children, freeing their heap) need
    # the runtime: when multiprocessing was imported before init(), its atexit handler would run after this
    # one, so run it first (it runs once)
    h = current()
    if h is None:
        return
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is not None and current() is h:
        mp_util._exit_function()
    with _lock:
        if current() is h:
            shutdown()


def _set_env(contract):
    """Put the client's contract into os.environ; -> what it replaced (for _restore_env)."""
    saved = {k: os.environ.get(k) for k in (*E.CLIENT, E.PUID, E.REPLY_CD, E.SHEP_PID)}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(contract)
    return saved


def _restore_env(saved):
    for k, v in (saved or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _register(keep):
    """Attach to global services with the contract now in os.environ and register as a client. -> client id"""
    from dragon.infrastructure import client

    try:
        conn = client.connection()
    except DragonError as e:  # a segment of the runtime is gone (it ended while we looked)
        raise RuntimeNotFound(f"cannot reach the runtime's global services: {e}") from None
    return conn.register(keep)


def _connect(path, keep):
    from dragon.infrastructure import connect

    info = connect.read(path)
    connect.check(path, info)
    saved = _set_env(info["env"])
    try:
        cid = _register(keep)
    except BaseException:
        _detach()
        _restore_env(saved)
        raise
    h = Handle("connected", info["job"], client=cid, connect_file=path, keep=bool(keep))
    h._saved = saved
    return h


def _launcher_env():
    """The environment of a local runtime's launcher: this one without any runtime's contract, and with the
    directory that holds dragon (and the launcher beside it) first on the path, as this process sees them."""
    env = {k: v for k, v in os.environ.items() if k not in (*E.ALL, *E.CLIENT, E.CONNECT)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "launcher")):
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_local():
    from dragon._core.remote import start_time

    me = os.getpid()
    r, w = os.pipe()
    try:
        cmd = [sys.executable, "-m", "launcher.serve", "--owner", str(me), str(start_time(me) or 0)]
        proc = subprocess.Popen(
            [*cmd, "--ready-fd", str(w)],
            env=_launcher_env(),
            pass_fds=(w,),
            start_new_session=True,  # Ctrl-C in this terminal is this process's, not the runtime's
            stdin=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    try:
        import dragon.infrastructure.client  # noqa: F401 (loaded while the runtime starts: two cores work)

        info = _read_ready(r, proc)
        saved = _set_env(info["env"])
        try:
            cid = _register(False)
        except BaseException:
            _restore_env(saved)
            raise
    except BaseException:
        _end_local(proc)
        raise
    finally:
        os.close(r)
    h = Handle("local", info["job"], client=cid, proc=proc)
    h._saved = saved
    return h


def _read_ready(fd, proc):
    """The launcher's connection info from the pipe (a JSON line), or RuntimeNotFound saying why it did not
    come up. Waits in short slices, so Ctrl-C gets through."""
    data = b""
    deadline = time.monotonic() + START_TIMEOUT
    while not data.endswith(b"\n"):
        if time.monotonic() > deadline:
            raise RuntimeNotFound(f"the dragon runtime did not come up within {START_TIMEOUT:g} s")
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            raise RuntimeNotFound(
                f"the dragon runtime could not start (its launcher exited {proc.returncode})"
            )
        data += chunk
    info = json.loads(data)
    if "error" in info:
        raise RuntimeNotFound(f"the dragon runtime could not start: {info['error']}")
    return info


def _end_local(proc):
    """SIGTERM a local runtime's launcher and wait for its teardown (SIGKILL after STOP_TIMEOUT)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _detach():
    """Drop this process's connections (its reply channel, its transport endpoint)."""
    from dragon._core.remote import close_endpoint
    from dragon.infrastructure import client

    client.reset()
    close_endpoint()


def _leave(h):
    try:
        if h.mode == "connected":
            from dragon.infrastructure import client

            try:
                client.connection().bye(BYE_TIMEOUT)
            except (DragonError, TimeoutError) as e:  # the runtime is gone, or busy: its launcher releases
                if not isinstance(e, RuntimeNotFound):
                    print(f"dragon.shutdown: {e}", file=sys.stderr)
        _detach()
    finally:
        if h._proc is not None:
            _end_local(h._proc)
        _restore_env(h._saved)
