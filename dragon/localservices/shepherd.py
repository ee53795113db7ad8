"""Local services (the shepherd): one process per node doing the node's physical work for global services.

The main thread runs the service loop (dragon.infrastructure.service) on its inbox, which only the runtime's
services know (GS and this node's launcher; every message a control message with the job's key): start a
process (in its own session, so that its whole process group can be signalled: with one posix_spawn call,
dragon.localservices.spawn; a Python child forked from the node's zygote; else subprocess.Popen), signal one,
make or destroy a pool or channel, tear everything down. An IO thread waits (selectors, no polling) on a pidfd
per process and on the pipes of forwarded output: it prints each line labelled ``[user_name or p_uid]`` and
reports exits (a signal death as ``-signum``), after the process's output has been drained so that a joiner
sees it first: straight into global services' inbox when GS is on this node and that takes no wait, else
through the shepherd's own inbox: the loop forwards them to global services without ever blocking on it.

Before starting a process the shepherd makes its reply channel (so the child needs no set-up round trip); it
is destroyed once GS acknowledges the exit (SHProcessReaped, for a batch of processes), when nothing can
answer into it any more.
"""

import os
import select
import selectors
import signal
import subprocess
import threading
import time

from dragon import env as E
from dragon._core.core import Channel, Pool
from dragon.errors import ChannelError, ChannelTimeout, DragonError, PoolError, ProcessError
from dragon.infrastructure import jobprocs
from dragon.infrastructure import messages as m
from dragon.infrastructure.log import get_logger
from dragon.infrastructure.service import DEFER, Service, handles, service_process
from dragon.localservices import spawn as _spawn
from dragon.localservices import zygote as _zygote

DRAIN_AFTER_EXIT = 0.5  # how long output pipes may stay open (held by grandchildren) after a process exits
REPLY_CAPACITY = 64  # answers a process can have waiting (its threads share one reply channel)
REPLY_BLOCK = 256  # bigger answers (long lists) travel in pool blocks
# longest the loop waits for a pool's lock to make a channel: another process holds it for microseconds unless
# it is stopped (SIGSTOP, a debugger) inside an allocation; then the request fails instead of the whole node
LOCK_WAIT = 1.0


class _Managed:
    __slots__ = (
        "p_uid",
        "popen",
        "pidfd",
        "label",
        "open_streams",
        "partial",
        "exit_code",
        "reported",
        "deadline",
        "reply_ch",
        "files",
    )

    def __init__(self, p_uid, popen, label, reply_ch):
        self.p_uid, self.popen, self.label, self.reply_ch = p_uid, popen, label, reply_ch
        self.pidfd = None
        self.open_streams = 0
        self.partial = {}
        self.exit_code = None
        self.reported = False
        self.deadline = None
        self.files = []


def _printable(label):
    """A label as it is printed before each line of output: control characters escaped (a name may hold
    any)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in label).encode(errors="backslashreplace")


class Shepherd(Service):
    NAME = "local services"

    def __init__(self, node, job, inbox, gs_cd, infra_pool, key, out_fd=1, err_fd=2):
        """node: this node's index; gs_cd: sdesc of the GS input channel (on whichever node: Channel.attach
        reaches it through the transport); key: the job's key; out_fd/err_fd: where forwarded output goes."""
        super().__init__(inbox, key, get_logger("shepherd", node))
        self.NAME = f"local services of node {node}"
        self.node, self.job = node, job
        self.gs_cd = gs_cd
        self.gs = Channel.attach(gs_cd)
        self.infra_pool = infra_pool
        self.out_fds = {1: out_fd, 2: err_fd}
        # the environment every process starts from: the shepherd's own, which does not change once it runs
        # (copied once here, not decoded from os.environ again at every start)
        self.base_env = dict(os.environ)
        self.procs = {}  # p_uid -> _Managed (until GS acknowledges the exit)
        self.lock = threading.Condition()
        self.pools = {}  # m_uid -> Pool
        self.chans = {}  # c_uid -> Channel
        self.tearing = False
        self.zygote = _zygote.Zygote(self.log, os.environ)  # started at the first request that asks for it
        _spawn.seal_inherited()  # (no child may get what this process inherited; see spawn)
        self.sel = selectors.EpollSelector()  # epoll: other threads may register while it waits
        self.io_thread = threading.Thread(target=self._io_loop, name="shepherd-io", daemon=True)

    def serve(self, until=None, timeout=None):
        if not self.io_thread.is_alive():
            self.io_thread.start()
        return super().serve(until, timeout)

    def _stream(self, how, run_dir, head, for_stderr):
        """-> (Popen argument, file to close after spawn or None)."""
        if how == "stdout" and for_stderr:
            return subprocess.STDOUT, None
        if how == "forward":
            return (None if head else subprocess.PIPE), None
        if how == "inherit":
            return None, None
        if how == "devnull":
            return subprocess.DEVNULL, None
        f = open(os.path.join(run_dir, how), "ab")  # noqa: SIM115 (closed after the spawn)
        return f, f

    @handles(m.SHProcessCreate)
    def process_create(self, msg):
        run_dir = msg.run_dir or os.getcwd()
        if not os.path.isdir(run_dir):
            raise ProcessError(f"cannot start {msg.exe!r}: run_dir {run_dir!r} is not a directory")
        try:
            reply_ch = Channel.create(
                self.infra_pool, capacity=REPLY_CAPACITY, block_size=REPLY_BLOCK, timeout=LOCK_WAIT
            )
        except DragonError as e:
            raise ProcessError(f"cannot start {msg.exe!r}: its reply channel: {e}") from None
        files = []
        try:
            env = self.base_env.copy()
            if msg.stdout == "forward" and not msg.head:
                env["PYTHONUNBUFFERED"] = "1"  # forwarded output shows as it comes, not at exit
            env.update(msg.env)
            env.update(
                E.contract(
                    self.job,
                    msg.p_uid,
                    self.node,
                    self.gs_cd,
                    reply_ch.sdesc,
                    self.infra_pool.sdesc,
                    os.getpid(),
                )
            )
            out, f1 = self._stream(msg.stdout, run_dir, msg.head, False)
            err, f2 = self._stream(msg.stderr, run_dir, msg.head, True)
            files = [f for f in (f1, f2) if f is not None]
            popen = None
            if msg.zygote:  # a Python child forked from the node's zygote (None: not eligible, or not up yet)
                popen = self.zygote.spawn([msg.exe, *msg.args], env, run_dir, out, err)
            if popen is None and _spawn.eligible(msg.exe, run_dir):  # (a program by path, in our cwd)
                popen = _spawn.spawn([msg.exe, *msg.args], env, not msg.head, out, err)
            popen = popen or subprocess.Popen(
                [msg.exe, *msg.args],
                cwd=run_dir,
                env=env,
                close_fds=True,
                stdin=None if msg.head else subprocess.DEVNULL,
                **_spawn.own_group(not msg.head),
                stdout=out,
                stderr=err,
            )
        except BaseException as e:  # nothing started: nothing may be left behind (the reply channel)
            reply_ch.destroy()
            if isinstance(e, (OSError, ValueError, TypeError)):
                raise ProcessError(f"cannot start {msg.exe!r} (run_dir {run_dir!r}): {e}") from None
            raise
        finally:
            for f in files:
                f.close()
        rec = _Managed(msg.p_uid, popen, _printable(msg.label), reply_ch)
        rec.pidfd = _zygote.pidfd_of(popen)
        with self.lock:
            self.procs[msg.p_uid] = rec
        # answer first, so that GS hears of the process before its exit
        self.answer(msg, {"pid": popen.pid, "reply_cd": bytes(reply_ch.sdesc)})
        self._io_add(rec)
        self.log.debug("started p_uid %d pid %d: %s", msg.p_uid, popen.pid, [msg.exe, *msg.args])
        return DEFER  # (answered above)

    @handles(m.SHProcessKill)
    def process_kill(self, msg):
        with self.lock:
            rec = self.procs.get(msg.p_uid)
        if rec is None or rec.exit_code is not None:
            raise ProcessError(f"process {msg.p_uid} is not running on node {self.node}")
        try:
            rec.popen.send_signal(msg.sig)
        except (OSError, ValueError) as e:
            raise ProcessError(f"cannot signal process {msg.p_uid}: {e}") from None

    @handles(m.SHProcessExit)
    def process_exit(self, msg):
        """An exit the IO thread reported (through this inbox): on to global services, without blocking."""
        self.send(self.gs, msg)

    @handles(m.SHProcessReaped)
    def process_reaped(self, msg):
        with self.lock:
            recs = [(u, self.procs.pop(u, None)) for u in msg.p_uids]
        for p_uid, rec in recs:
            if rec is not None and rec.reply_ch is not None:
                try:
                    rec.reply_ch.destroy()
                except ChannelError as e:
                    self.log.warning("destroying the reply channel of %d: %s", p_uid, e)
                rec.reply_ch = None

    @handles(m.SHPoolCreate)
    def pool_create(self, msg):
        try:
            # (a random part: a process of the job may have named a pool of its own "m<n>" with Pool.create)
            pool = Pool.create(msg.size, name=f"m{msg.m_uid}-{os.urandom(4).hex()}")
        except DragonError as e:
            raise PoolError(f"cannot make a pool of {msg.size} bytes on node {self.node}: {e}") from None
        self.pools[msg.m_uid] = pool
        return {"sdesc": bytes(pool.sdesc)}

    @handles(m.SHPoolDestroy)
    def pool_destroy(self, msg):
        pool = self.pools.pop(msg.m_uid, None)
        if pool is None:
            raise PoolError(f"no pool {msg.m_uid} on node {self.node}")
        pool.destroy()

    def _pool_of(self, m_uid):
        pool = self.pools.get(m_uid)
        if pool is None:
            return (
                self.infra_pool
            )  # the node's infrastructure pool is the only one GS knows that we did not make
        return pool

    @handles(m.SHChannelCreate)
    def channel_create(self, msg):
        try:
            ch = Channel.create(
                self._pool_of(msg.m_uid), capacity=msg.capacity, block_size=msg.block_size, timeout=LOCK_WAIT
            )
        except DragonError as e:
            raise ChannelError(
                f"cannot make a channel (capacity {msg.capacity}, block_size {msg.block_size}) "
                f"in pool {msg.m_uid} on node {self.node}: {e}"
            ) from None
        self.chans[msg.c_uid] = ch
        return {"sdesc": bytes(ch.sdesc)}

    @handles(m.SHChannelDestroy)
    def channel_destroy(self, msg):
        ch = self.chans.pop(msg.c_uid, None)
        if ch is None:
            raise ChannelError(f"no channel {msg.c_uid} on node {self.node}")
        ch.destroy()

    @handles(m.SHTeardown)
    def teardown_request(self, msg):
        self.teardown(msg.grace if msg.grace is not None else 1.0)
        self.stop()

    def teardown(self, grace=1.0, unlink=False):
        """SIGTERM every managed process group, SIGKILL what is left after grace, destroy every pool and
        channel. unlink (when the launcher is gone): also kill every process of the job found by its
        environment, and unlink every segment of the job on this node."""
        self.tearing = True  # (exits are not reported any more: GS is being halted)
        with self.lock:
            recs = list(self.procs.values())
        self.log.debug("teardown: %d managed processes, grace %.1f s", len(recs), grace)
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
            live = [r for r in recs if r.exit_code is None]
            for r in recs:  # the whole group: also what a process started itself
                try:
                    os.killpg(r.popen.pid, sig)
                except OSError:
                    pass
            if unlink:  # no launcher to catch what left its process group: find it by its environment
                jobprocs.kill_all(jobprocs.job_pids(self.job), sig)
            if not live:
                break
            deadline = time.monotonic() + wait
            with self.lock:
                while any(r.exit_code is None for r in live) and time.monotonic() < deadline:
                    self.lock.wait(deadline - time.monotonic())
        for r in recs:
            if r.exit_code is None:
                self.log.error("p_uid %d (pid %d) survived SIGKILL", r.p_uid, r.popen.pid)
        self.zygote.close()
        for what in (self.chans, self.pools):
            for obj in what.values():
                try:
                    obj.destroy()
                except Exception as e:
                    self.log.warning("teardown: %s", e)
            what.clear()
        for r in recs:
            if r.reply_ch is not None:
                try:
                    r.reply_ch.destroy()
                except Exception:
                    pass
                r.reply_ch = None
        if unlink:
            from dragon._core import core

            try:
                core.unlink_job_segments(self.job)
            except Exception as e:
                self.log.error("unlinking the segments of job %s: %s", self.job, e)

    # ---- IO thread: exits and output ----------------------------------------------------------------------
    def _io_add(self, rec):
        """Hand a new process to the IO thread. Registering with the epoll selector from this thread is safe
        (the key is in the selector's table before the fd is in the kernel's set) and spares a wake-up per
        process."""
        streams = [(n, st) for n, st in ((1, rec.popen.stdout), (2, rec.popen.stderr)) if st is not None]
        rec.open_streams = len(streams)
        # the pidfd first: the thread may handle the exit at the last EOF (unregistering the pidfd)
        self.sel.register(rec.pidfd, selectors.EVENT_READ, ("pid", rec, None))
        for n, st in streams:
            self.sel.register(st.fileno(), selectors.EVENT_READ, ("out", rec, n))

    def _io_loop(self):
        # this thread's own handles: exits go straight to global services when it is on this node (see
        # _report), else through the loop
        inbox = Channel.attach(self.inbox_sdesc)
        gs = Channel.attach(self.gs_cd)
        if not isinstance(gs, Channel):  # (a RemoteChannel: GS is on another node)
            gs = None
        draining = []
        while True:
            try:
                self._io_step(inbox, gs, draining)
            except Exception:  # never let one bad event stop exit reports (joins would hang)
                self.log.exception("IO thread")

    def _io_step(self, inbox, gs, draining):
        sel = self.sel
        timeout = None
        if draining:
            timeout = max(0.0, min(r.deadline for r in draining) - time.monotonic())
        for key, _ in sel.select(timeout):
            kind, rec, which = key.data
            if kind == "pid":
                if rec.pidfd is not None:  # (else handled at its last EOF, earlier in this round)
                    self._exited(rec, inbox, gs, draining)
            elif kind == "out":
                fd = key.fd
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if data:
                    self._emit(rec, which, data)
                else:
                    sel.unregister(fd)
                    self._emit(rec, which, b"", final=True)
                    (rec.popen.stdout if which == 1 else rec.popen.stderr).close()
                    rec.open_streams -= 1
                    if rec.open_streams == 0 and rec.exit_code is None:
                        # a process closes its files before it becomes a zombie: by the time its last EOF is
                        # read here it usually has, and its exit is handled now rather than at one more
                        # wake-up of this thread for its pidfd
                        if select.select([rec.pidfd], [], [], 0)[0]:
                            self._exited(rec, inbox, gs, draining)
                    elif rec.open_streams == 0 and not rec.reported:
                        self._report(inbox, gs, rec)
                        if rec in draining:
                            draining.remove(rec)
        if draining:
            now = time.monotonic()
            for r in [r for r in draining if r.deadline <= now]:
                draining.remove(r)
                self._report(inbox, gs, r)  # its pipes stay registered: grandchildren may still print

    def _exited(self, rec, inbox, gs, draining):
        """rec's pidfd is readable: reap it, and report its exit once its output is drained (or in
        DRAIN_AFTER_EXIT: grandchildren may hold its pipes)."""
        self.sel.unregister(rec.pidfd)
        os.close(rec.pidfd)
        rec.pidfd = None
        # the multiprocessing heap it did not destroy (killed, a terminated Pool worker; one unlink, ENOENT
        # after a clean exit). The name holds its p_uid as well as its pid: a zygote's child may be reaped,
        # and its pid reused, before this runs: the pid's new owner names its heap by its own p_uid (unless
        # it is a descendant of this process that the kernel gave this very pid in between)
        jobprocs.unlink_heap(self.job, rec.p_uid, rec.popen.pid)
        code = rec.popen.wait()
        with self.lock:
            rec.exit_code = code
            self.lock.notify_all()
        if rec.open_streams == 0:
            self._report(inbox, gs, rec)
        else:
            rec.deadline = time.monotonic() + DRAIN_AFTER_EXIT
            draining.append(rec)

    def _emit(self, rec, which, data, final=False):
        buf = rec.partial.get(which, b"") + data
        if final:
            lines, rest = ([buf] if buf else []), b""
        else:
            *lines, rest = buf.split(b"\n")
        rec.partial[which] = rest
        if lines:
            prefix = b"[" + rec.label + b"] "
            out = b"".join(prefix + line + b"\n" for line in lines)
            _write_all(self.out_fds[which], out)

    def _report(self, inbox, gs, rec):
        """Report an exit to global services. Straight into its inbox (gs: this thread's handle, None if GS is
        on another node) when that takes no wait and nothing the loop sent waits in its outbox: the loop
        answered the create before this thread heard of the process, so the exit cannot overtake that
        answer, and the join it ends is answered without a round of the loop (one wake-up and one decode
        less per process). Otherwise through this shepherd's own inbox (the loop drains it, so this waits
        only while the loop is busy; it forwards the report to GS without blocking, in order)."""
        rec.reported = True
        self.log.debug("p_uid %d (pid %d) exited with %s", rec.p_uid, rec.popen.pid, rec.exit_code)
        data = m.encode(m.SHProcessExit(self.key, self.node, rec.p_uid, rec.exit_code))
        if gs is not None and not self.outbox and not self.tearing:
            try:
                gs.send(data, timeout=0)
                return
            except ChannelError:  # full (or gone): the loop's way
                pass
        while not self.tearing:
            try:
                inbox.send(data, timeout=1.0)
                return
            except ChannelTimeout:
                continue
            except ChannelError as e:
                self.log.error("cannot report the exit of p_uid %d: %s", rec.p_uid, e)
                return


def _write_all(fd, data):
    """Write every byte of data to fd, as a blocking file would take it: a write may take only part of it, and
    a non-blocking fd (its flag is shared with every process holding the same stdout, the program's too) says
    EAGAIN when full: wait until it takes more instead of dropping the rest. A closed reader (EPIPE) or a
    bad fd drops the output, as before."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        except InterruptedError:
            continue
        except OSError:
            return
        view = view[n:]


def main(node, job, inbox_cd, gs_cd, infra_pd, key):
    """Entry point of the shepherd process (started by the launcher). Serves until SHTeardown; on SIGTERM
    (which the kernel sends when the launcher dies, PR_SET_PDEATHSIG) it tears the node down and unlinks the
    job's segments itself."""
    with service_process():
        shep = None
        try:
            shep = Shepherd(node, job, Channel.attach(inbox_cd), gs_cd, Pool.attach(infra_pd), key)
            shep.serve()
        except SystemExit:
            if shep is not None:
                shep.log.debug("parent gone or SIGTERM: tearing node %d down", node)
                shep.teardown(1.0, unlink=True)
    return 0
