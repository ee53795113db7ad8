"""The node's zygote: a Python process that has imported dragon (and dragon.mp) once and forks a child for
each managed process the shepherd asks it to start, so that a Python child costs a fork, not an interpreter
start and its imports (about 50 ms each; the stdlib's forkserver does the same for multiprocessing).

A request is eligible when the program is this interpreter run as ``python -c CODE [args]`` or ``python -m
MODULE [args]`` with no interpreter option the zygote lacks (it has those its environment implies, e.g.
``-B``), and its environment sets the variables that shape an interpreter's start (``PYTHONPATH``,
``PYTHONHASHSEED``, ...) as the zygote's own. The forked child becomes what that command line would have been:
its own session, stdin from /dev/null, the stdout/stderr the shepherd chose, ``run_dir``, the environment
replaced, ``sys.argv`` and ``sys.path[0]`` as the interpreter sets them, a fresh ``__main__``; then the
interpreter exits normally after the program (threads joined, atexit handlers run, exit code from SystemExit).
What differs from an exec: the modules the zygote preloaded are already imported, and the hash seed is the
zygote's. Anything else is started by the shepherd with Popen as before, and so is everything while the zygote
is still starting (it is started at the first eligible request).

Two SOCK_SEQPACKET socket pairs join the shepherd and the zygote: requests (the shepherd's main thread sends
one and waits for its answer: the child's pid, and a pidfd of it passed with SCM_RIGHTS) and exit reports (the
shepherd's IO thread reads them: the zygote is the children's parent and reaps them). The pidfd is opened by
the zygote before it can reap the child, so the shepherd watches exactly that process even if it has already
exited. The shepherd keeps its own bookkeeping unchanged: a ``ZygoteChild`` has the part of
``subprocess.Popen``'s interface it uses (``pid``, ``stdout``, ``stderr``, ``wait``, ``send_signal``).

The zygote follows the shepherd: it exits when its request socket closes, and gets SIGTERM when the shepherd
dies (PR_SET_PDEATHSIG). Its children are in their own sessions and are the shepherd's to terminate, as any
other managed process.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack

from dragon import env as E
from dragon.localservices.spawn import child_ends, own_group

# what the zygote imports before it says it is ready (DRAGON_ZYGOTE_PRELOAD adds a comma-separated list)
PRELOAD = ("dragon.mp._child",)
# environment variables that change how an interpreter starts: a child whose environment sets one differently
# from the zygote's is started with Popen (PYTHONUNBUFFERED is handled in the child)
_STARTUP_VARS = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONHASHSEED",
    "PYTHONOPTIMIZE",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONNOUSERSITE",
    "PYTHONSAFEPATH",
    "PYTHONWARNINGS",
    "PYTHONDEVMODE",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONIOENCODING",
    "PYTHONUTF8",
    "PYTHONMALLOC",
    "PYTHONFAULTHANDLER",
    "PYTHONTRACEMALLOC",
    "PYTHONPLATLIBDIR",
    "PYTHONINTMAXSTRDIGITS",
)
MAX_MSG = 1 << 20  # a request (environment included) must fit one datagram
READY_TIMEOUT = 30.0  # a zygote that has not said it is ready by then is given up
EXIT_REPORT_WAIT = 5.0  # after a child's pidfd fired, how long its exit report may take


def _units(options):
    """Interpreter options as units (``-X dev`` and ``-W arg`` are one), or None if they do not parse."""
    units, i = [], 0
    while i < len(options):
        if options[i] in ("-X", "-W"):
            if i + 1 >= len(options):
                return None
            units.append((options[i], options[i + 1]))
            i += 2
        else:
            units.append(options[i])
            i += 1
    return units


def eligible(argv, flags=()):
    """(kind, payload, rest) for ``python [options] -c CODE ...`` / ``... -m MOD ...`` run by this interpreter
    whose options the zygote already has (``flags``, what its environment implies), else None."""
    try:
        k = next(i for i, a in enumerate(argv) if a in ("-c", "-m"))
    except StopIteration:
        return None
    if k + 1 >= len(argv):
        return None
    have = _units(list(flags)) or []
    asked = _units(list(argv[1:k]))
    if asked is None or any(u not in have for u in asked):
        return None
    try:
        same = os.path.realpath(argv[0]) == os.path.realpath(sys.executable)
    except OSError:
        return None
    return (argv[k], argv[k + 1], list(argv[k + 2 :])) if same else None


class ZygoteChild:
    """A child the zygote forked, with the part of subprocess.Popen's interface the shepherd uses."""

    def __init__(self, zygote, pid, pidfd, stdout, stderr):
        self._zygote = zygote
        self.pid = pid
        self.pidfd = pidfd  # the shepherd's IO thread watches (and closes) this one
        self._sigfd = os.dup(pidfd)  # signals go through our own pidfd: never to a reused pid
        self.stdout, self.stderr = stdout, stderr
        self.returncode = None

    def wait(self):
        """The exit code (-N for signal N), once the pidfd said the child exited (the zygote reaps it)."""
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid)
            os.close(self._sigfd)
        return self.returncode

    def send_signal(self, sig):
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._sigfd, sig)
            except ProcessLookupError:  # it ended and the zygote reaped it; its end is on its way here
                pass  # (nothing left to signal, as subprocess.Popen.send_signal after an exit)


class Zygote:
    """The shepherd's side of its node's zygote (one per shepherd, started lazily)."""

    def __init__(self, log, env):
        self.log = log
        self.env = dict(env)
        self.proc = None
        self.req = self.exits = None
        self.ready = False
        self.failed = False
        self.flags = []  # the zygote's interpreter options (as subprocess._args_from_interpreter_flags says)
        self.started_at = 0.0
        self.codes = {}  # pid -> exit code, reported but not yet asked for
        self.exit_lock = threading.Lock()

    def _start(self):
        req_a, req_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ex_a, ex_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(self.env, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dragon.localservices.zygote",
                    str(req_b.fileno()),
                    str(ex_b.fileno()),
                ],
                pass_fds=(req_b.fileno(), ex_b.fileno()),
                env=env,
                stdin=subprocess.DEVNULL,
                **own_group(True),  # (its children get process groups of their own in this session)
            )
        except OSError as e:
            self.log.error("cannot start the zygote: %s", e)
            self.failed = True
            for s in (req_a, req_b, ex_a, ex_b):
                s.close()
            return
        req_b.close()
        ex_b.close()
        req_a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MSG)
        self.req, self.exits = req_a, ex_a
        self.started_at = time.monotonic()

    def _check_ready(self):
        """True once the zygote said it is ready (never waits)."""
        if self.ready:
            return True
        if self.failed:
            return False
        if self.proc is None:
            self._start()
            return False
        try:
            data = self.req.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if time.monotonic() - self.started_at > READY_TIMEOUT:
                self.log.error(
                    "the zygote did not start within %.0f s; starting processes without it", READY_TIMEOUT
                )
                self._give_up()
            return False
        if not data.startswith(b"ready"):
            self.log.error("the zygote failed to start (%r); starting processes without it", data)
            self._give_up()
            return False
        self.flags = msgpack.unpackb(data[5:])
        self.ready = True
        return True

    def _give_up(self):
        self.failed = True
        self.ready = False
        self.close()

    def spawn(self, argv, env, run_dir, stdout, stderr):
        """Fork ``argv`` from the zygote if it is eligible and the zygote is up; else None (use Popen).
        stdout/stderr: what subprocess.Popen would take (None: inherit, PIPE, DEVNULL, STDOUT, a file)."""
        if not self._check_ready():
            self.log.debug("zygote: not ready yet")
            return None
        prog = eligible(argv, self.flags)
        if prog is None:
            self.log.debug("zygote: not eligible: %s", argv[:2])
            return None
        differs = [k for k in _STARTUP_VARS if env.get(k) != self.env.get(k)]
        if differs:
            self.log.debug("zygote: not eligible: the environment sets %s differently", differs)
            return None
        env = dict(
            env, **{E.SHEP_PID: str(self.proc.pid)}
        )  # its parent: how a process tells itself from a child
        out_r, out_w, err_r, err_w = child_ends(stdout, stderr)  # (None: the zygote's own)
        sent = [fd for fd in (out_w, err_w) if fd is not None]
        try:
            body = msgpack.packb(
                {
                    "prog": list(prog),
                    "env": env,
                    "cwd": run_dir,
                    "out": out_w is not None,
                    "err": err_w is not None,
                },
                use_bin_type=True,
            )
            socket.send_fds(self.req, [body], sent)
            data, fds, _, _ = socket.recv_fds(self.req, MAX_MSG, 1)
            if not data:
                raise OSError("the zygote closed its request socket")
            ans = msgpack.unpackb(data, raw=False)
            if "error" in ans or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise OSError(ans.get("error", "no pidfd in the zygote's answer"))
        except (OSError, ValueError) as e:
            for fd in (out_r, err_r):
                if fd is not None:
                    os.close(fd)
            self.log.error("the zygote failed (%s); starting processes without it", e)
            self._give_up()
            return None
        finally:
            for fd in sent:
                os.close(fd)
        wrap = [None if fd is None else open(fd, "rb", buffering=0) for fd in (out_r, err_r)]  # noqa: SIM115
        return ZygoteChild(self, ans["pid"], fds[0], *wrap)

    def exit_code(self, pid):
        """The exit code the zygote reports for pid (its pidfd has fired: the report comes at once)."""
        deadline = time.monotonic() + EXIT_REPORT_WAIT
        with self.exit_lock:
            while pid not in self.codes:
                left = deadline - time.monotonic()
                if self.exits is None or left <= 0:
                    self.log.error("no exit report for pid %d from the zygote", pid)
                    return 255
                self.exits.settimeout(left)
                try:
                    data = self.exits.recv(64)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.log.error("the zygote is gone: the exit code of pid %d is unknown", pid)
                    return 255
                p, code = msgpack.unpackb(data)
                self.codes[p] = code
            return self.codes.pop(pid)

    def close(self):
        """Stop the zygote (its children are managed processes: the shepherd ends them, not this)."""
        for s in (self.req, self.exits):
            if s is not None:
                s.close()
        self.req = self.exits = None
        if self.proc is not None:
            try:
                self.proc.terminate()
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def pidfd_of(popen):
    """The pidfd the shepherd watches for a process it started (a zygote's or spawn's child comes with
    one)."""
    return os.pidfd_open(popen.pid) if isinstance(popen, subprocess.Popen) else popen.pidfd


# ---- the zygote process ----------------------------------------------------------------------------------
def _serve(req, exits):
    """Fork a child per request; report exits. Returns only in a forked child: (kind, payload, rest)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(req, selectors.EVENT_READ, None)
    children = {}  # pidfd -> pid
    while True:
        for key, _ in sel.select():
            if key.data is None:
                try:
                    data, fds, _, _ = socket.recv_fds(req, MAX_MSG, 2)
                except OSError:
                    data, fds = b"", []
                if not data:
                    os._exit(0)  # the shepherd is gone
                job = _fork(msgpack.unpackb(data, raw=False), fds, req, exits, sel, children)
                if job is not None:  # in the child
                    sel.close()
                    return job
            else:
                pid = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                del children[key.fd]
                _, status = os.waitpid(pid, 0)
                try:
                    exits.send(msgpack.packb([pid, os.waitstatus_to_exitcode(status)]))
                except OSError:
                    os._exit(0)


def _fork(req_msg, fds, req, exits, sel, children):
    fds = list(fds)
    out = fds.pop(0) if req_msg.get("out") else None
    err = fds.pop(0) if req_msg.get("err") else None
    # The zygote ignores SIGINT: a child would lose one sent before it has its handler (its pid is known once
    # it is forked). Blocked, a SIGINT waits for the handler instead (Linux never drops a blocked signal).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for fd in (out, err):
            if fd is not None:
                os.close(fd)
        req.send(msgpack.packb({"error": f"fork failed: {e}"}))
        return None
    if pid == 0:
        try:
            for fd in children:
                os.close(fd)
            req.close()
            exits.close()
            return _become(req_msg, out, err)
        except BaseException as e:
            import traceback

            traceback.print_exc()
            if isinstance(e, KeyboardInterrupt):  # end as the interpreter does on one: killed by SIGINT
                sys.stderr.flush()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                os.kill(os.getpid(), signal.SIGINT)
            os._exit(255)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for fd in (out, err):
        if fd is not None:
            os.close(fd)
    pidfd = os.pidfd_open(pid)  # before we could reap it: always this very process
    children[pidfd] = pid
    sel.register(pidfd, 1, pid)
    socket.send_fds(req, [msgpack.packb({"pid": pid})], [pidfd])
    return None


def _become(req_msg, out, err):
    """In the forked child: become ``python -c/-m ...`` as far as the process can tell."""
    # a process group of its own, in the zygote's session (see dragon.localservices.spawn.own_group)
    os.setpgid(0, 0)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # (a SIGINT sent since the fork arrives now)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, target in ((out, 1), (err, 2)):
        if fd is not None:
            os.dup2(fd, target)
            os.close(fd)
    os.chdir(req_msg["cwd"])
    env = req_msg["env"]
    for k in [k for k in os.environ if k not in env]:
        del os.environ[k]
    for k, v in env.items():  # only what differs from the zygote's (most of it does not)
        if os.environ.get(k) != v:
            os.environ[k] = v
    return req_msg["prog"]


def _run(kind, payload, rest):
    """Run the program as the interpreter would (at top level: the interpreter's own exit follows)."""
    import types

    if kind == "-c":
        sys.argv = ["-c", *rest]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        exec(compile(payload, "<string>", "exec"), main.__dict__)  # noqa: S102 (the program asked to run)
    else:
        import runpy

        sys.argv = [payload, *rest]
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(payload, alter_argv=True)


def main():
    req = socket.socket(fileno=int(sys.argv[1]))
    exits = socket.socket(fileno=int(sys.argv[2]))
    try:
        from dragon._core import core

        core.set_pdeathsig(signal.SIGTERM)
        signal.signal(
            signal.SIGINT, signal.SIG_IGN
        )  # Ctrl-C is the launcher's (children get the default back)
        for name in PRELOAD:
            __import__(name)
        for name in os.environ.get(E.ZYGOTE_PRELOAD, "").split(","):
            if name.strip():
                try:
                    __import__(name.strip())
                except Exception as e:  # the user's list: the zygote works without it
                    print(f"dragon zygote: cannot preload {name.strip()!r}: {e!r}", file=sys.stderr)
        import gc

        gc.freeze()  # what is here now stays out of the children's collections (no copy-on-write faults)
        req.send(b"ready" + msgpack.packb(subprocess._args_from_interpreter_flags()))
    except BaseException as e:
        try:
            req.send(f"preload failed: {e!r}".encode()[:200])
        finally:
            os._exit(1)
    kind, payload, rest = _serve(req, exits)
    del req, exits
    _run(kind, payload, rest)


if __name__ == "__main__":
    main()
