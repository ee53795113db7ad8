"""The runtime of one job as one launcher sees it: start the node's services, run the program (node 0), watch
the services, tear everything down. ``Runtime`` is the single-node launcher;
``launcher.multinode.NodeRuntime`` adds the world of an MPI job. Both are services
(dragon.infrastructure.service) on the launcher's own inbox: the answers of global services and the shepherd,
the program's exit (LAHeadExit) and, across nodes, the other launchers' control messages all go through the
one loop and its handlers.

The launcher watches its node's services: one that exits, or stops answering its pings (SIGSTOP, a debugger, a
wedged loop) for DRAGON_SERVICE_TIMEOUT seconds (default 30), is named (which service, which node, its pid)
and ends the job (exit status 70): SIGKILL works on a stopped process, and nothing is left in /dev/shm.

Instead of a program, a launcher may serve clients (``dragon-launch --serve``, ``dragon.init()``: see
launcher.serve): processes outside the job that registered with global services. Node 0's launcher watches
each client's pid (a pidfd) at GS's request (``LAClientWatch``) and tells GS when it is gone
(``GSClientGone``), so that GS releases what the client made; then it destroys the client's reply channel.
The runtime of ``dragon.init()`` also has an owner, the process that started it: when that one ends, so
does the runtime.
"""

import os
import select
import signal
import sys
import time

from dragon import env
from dragon.errors import DragonError
from dragon.infrastructure import jobprocs
from dragon.infrastructure import messages as m
from dragon.infrastructure.log import get_logger
from dragon.infrastructure.service import Service, handles

GRACE = 1.0  # seconds between SIGTERM and SIGKILL at teardown
EXIT_SERVICE_FAILED = 70  # the runtime itself failed (a service died, the program could not start)
PING_EVERY = 1.0  # seconds between the launcher's pings to each service it watches
SERVICE_TIMEOUT = 30.0  # default of DRAGON_SERVICE_TIMEOUT


class NodeInfo:
    """One node of the job as the launcher sees it."""

    __slots__ = ("index", "hostname", "cpus")

    def __init__(self, index, hostname, cpus):
        self.index, self.hostname, self.cpus = index, hostname, cpus

    def to_wire(self):
        return {"index": self.index, "hostname": self.hostname, "cpus": self.cpus}


def local_world():
    """The single-node world: (nodes, this node's index)."""
    return [NodeInfo(0, os.uname().nodename, len(os.sched_getaffinity(0)))], 0


class Terminated(BaseException):
    def __init__(self, signum):
        self.signum = signum


class ServiceDied(Exception):
    pass


def log(text):
    try:
        sys.stderr.write(f"dragon-launch: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # no stderr: nothing must stop the teardown
        pass


def _fork(module, *args):
    """Run module.main(*args) in a forked child that gets SIGTERM when this process dies; return its pid.
    The child imports the module itself, so the services load their code in parallel."""
    from dragon._core import core

    parent = os.getpid()
    for f in (sys.stdout, sys.stderr):  # (None when the launcher was started with it closed)
        if f is not None:
            f.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        core.set_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before we could ask to follow it
            os._exit(0)
        code = __import__(module, fromlist=["main"]).main(*args) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def status_text(status):
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _pidfd(pid, start):
    """A pidfd of process pid if it still has that start time (not a reused pid), else None."""
    from dragon._core.remote import start_time

    try:
        fd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return None
    if start_time(pid) != start:
        os.close(fd)
        return None
    return fd


def _destroy(sdesc):
    """Destroy a channel by its sdesc (a gone client's reply channel); it may be gone already."""
    from dragon._core.core import Channel

    try:
        Channel.attach(sdesc).destroy()
    except Exception:
        pass


class _Watched:
    """A service process the launcher watches: its exit (waitpid) and its answers to pings."""

    __slots__ = ("ch", "pid", "seen", "up", "what")

    def __init__(self, pid, what, ch):
        self.pid, self.what, self.ch = pid, what, ch
        self.seen = time.monotonic()
        self.up = False  # it answered a ping: its loop runs

    def pong(self, resp):
        self.seen = time.monotonic()
        self.up = True


class Runtime(Service):
    """The runtime of one job, seen from one launcher (here: the only one, on node 0)."""

    NAME = "the launcher"
    POLL_SLICE = 0.25  # seconds between looks at the services (and, multi-node, at the agent's events)

    def __init__(self, nodes, node_index, grace=GRACE):
        super().__init__(None, os.urandom(8), get_logger("launcher", node_index))
        self.nodes, self.node_index, self.grace = nodes, node_index, grace
        self.job = env.new_job_id()
        self.service_timeout = env.seconds(env.SERVICE_TIMEOUT, SERVICE_TIMEOUT)
        self.shep_pid = self.gs_pid = None
        self.dead = {}  # pid -> raw wait status of services that exited
        self.watched = {}  # pid -> _Watched
        self.next_ping = 0.0
        self.only = None  # during a teardown: the pids still watched (the others may be gone by then)
        self.tearing = False
        self.pool = None
        self.chans = []
        self.failed = None
        self.head_code = None  # the program's exit code, once it ended
        self.interrupt = (
            None  # while the program runs: 0, 1 once a Ctrl-C came (2 once it went to the program)
        )
        self.clients = {}  # client id -> (pidfd, its reply channel's sdesc, pid): the clients watched here
        self.client_poll = select.poll()
        self.owner_fd = None  # pidfd of the process whose end ends the runtime (dragon.init's), if any
        self.stop_why = None  # why a serving launcher stops (its owner ended)

    # ---- start --------------------------------------------------------------------------------------------
    def start(self):
        os.environ[env.JOB] = self.job
        from dragon._core import core
        from dragon._core.core import Channel, Pool

        core.set_child_subreaper()
        self.pool = Pool.create(env.infra_pool_size(), name="inf")
        # requests are small; bigger ones travel in pool blocks. Every slot is touched at creation: keep rings
        # small.
        self.gs_ch = Channel.create(self.pool, capacity=1024, block_size=512)
        self.sh_ch = Channel.create(self.pool, capacity=512, block_size=512)
        self.la_ch = Channel.create(self.pool, capacity=64, block_size=256)
        self.chans = [self.gs_ch, self.sh_ch, self.la_ch]
        self.set_inbox(self.la_ch)
        gs_cd, sh_cd, la_cd, pd = (bytes(x.sdesc) for x in (self.gs_ch, self.sh_ch, self.la_ch, self.pool))
        shep = "dragon.localservices.shepherd"
        self.shep_pid = _fork(shep, self.node_index, self.job, sh_cd, gs_cd, pd, self.key)
        nodes = [n.to_wire() for n in self.nodes]
        self.gs_pid = _fork("dragon.globalservices.server", gs_cd, [sh_cd], la_cd, nodes, [pd], self.key)
        self.watch(self.shep_pid, "local services (shepherd)", self.sh_ch)
        self.watch(self.gs_pid, "global services", self.gs_ch)
        self.client_env = {env.JOB: self.job, env.NODE: "0", env.GS_CD: gs_cd.hex(), env.INF_PD: pd.hex()}

    def watch(self, pid, what, ch):
        self.watched[pid] = _Watched(pid, what, ch)

    # ---- run ----------------------------------------------------------------------------------------------
    def run(self, exe, args, serving=None):
        """Start the runtime, run exe args as the head process, tear down. -> exit code for the launcher. With
        serving (a launcher.serve.Serving; exe None): serve clients instead, until stopped (exit code 0)."""
        code = EXIT_SERVICE_FAILED
        quiet = serving is not None and serving.owner is not None  # dragon.init's: its owner stops it

        def _term(signum, frame):
            raise Terminated(signum)

        def _int(signum, frame):
            if self.interrupt != 0:  # before the program runs, or a second Ctrl-C: tear the job down
                raise KeyboardInterrupt
            self.interrupt = 1  # the loop hands it to the program (tick)

        try:
            self.start()
            for sig in (signal.SIGTERM, signal.SIGHUP):  # scancel / time limit, a closed terminal
                signal.signal(sig, _term)
            if serving is None:
                signal.signal(signal.SIGINT, _int)
            code = self._run_head(exe, args) if serving is None else self._serve_clients(serving)
        except KeyboardInterrupt:
            if not quiet:
                log("interrupted: tearing the job down")
            code = 128 + signal.SIGINT if serving is None else 0
        except Terminated as t:
            if not quiet:
                log(f"got signal {t.signum}: tearing the job down")
            code = 128 + t.signum if serving is None else 0
        except ServiceDied as e:
            log(str(e))
            self.failed = str(e)
            code = EXIT_SERVICE_FAILED
        except Exception as e:  # e.g. no room in /dev/shm for the infrastructure pool
            log(f"the runtime failed: {type(e).__name__}: {e}")
            self.failed = str(e)
            code = EXIT_SERVICE_FAILED
        finally:
            # finish the teardown even if a second Ctrl-C or SIGTERM comes
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            self.teardown()
        return code

    def _run_head(self, exe, args):
        """Ask global services to start the program (p_uid 1) and serve until it ends -> its exit status."""
        req = m.GSProcessCreate(
            tag=0,
            reply=self.inbox_sdesc,
            caller=0,
            exe=exe,
            run_dir=os.getcwd(),
            args=list(args),
            env=None,
            user_name=None,
            options={},
            soft=False,
            head=True,
        )
        self.post(self.gs_ch, m.encode(req))
        self.interrupt = 0
        self.serve(until=lambda: self.head_code is not None)
        return self.head_code

    def _interrupt_program(self):
        """The first Ctrl-C goes to the program, as a terminal gives it to a plain python and its children
        (its foreground process group): SIGINT to every live process of the job, so that the program's own
        ``except KeyboardInterrupt`` and ``finally`` run. A second Ctrl-C tears the job down."""
        log("interrupted: SIGINT to the program (Ctrl-C again to tear the job down)")
        self.interrupt = 2

        def listed(resp):
            if resp.err:
                return
            # the program first, then its processes (each gets it as from a terminal: at about the same time)
            for p_uid, _ in sorted(resp.result):
                kill = m.GSProcessKill(tag=0, reply=b"", caller=0, ident=p_uid, sig=signal.SIGINT)
                self.ask(self.gs_ch, kill, lambda resp: None)  # (one that ended meanwhile: no matter)

        self.ask(self.gs_ch, m.GSProcessList(tag=0, reply=b"", caller=0), listed)

    def _serve_clients(self, serving):
        """Serve clients (no program) until a signal or, with an owner, until it ends. -> 0"""
        if serving.owner is not None:
            self.owner_fd = _pidfd(*serving.owner)
            if self.owner_fd is None:
                return 0  # it is gone already
            self.client_poll.register(self.owner_fd, select.POLLIN)
        if serving.owner is None:
            # a server's file means its services' loops run (a SIGKILL from then on leaves nothing behind);
            # an owner waits anyway (for GS's answer to its registration) and loads its own code meanwhile
            self.serve(until=lambda: self.stop_why is not None or all(w.up for w in self.watched.values()))
        if self.stop_why is None:
            serving.ready(self.client_info())
        self.serve(until=lambda: self.stop_why is not None)
        return 0

    def client_info(self):
        """What a client on this host needs to attach (launcher.serve writes it into the connection file)."""
        from dragon._core.remote import start_time

        return {
            "job": self.client_env[env.JOB],
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "start": start_time(os.getpid()),
            "nodes": len(self.nodes),
            "env": dict(self.client_env),
        }

    # ---- clients
    # --------------------------------------------------------------------------------------------
    @handles(m.LAClientWatch)
    def client_watch(self, msg):
        fd = _pidfd(msg.pid, msg.start)
        if fd is None:
            raise DragonError(
                f"no process {msg.pid} with start time {msg.start} here (it ended, or runs on another host "
                f"or in another pid namespace than {self.where()}'s launcher)"
            )
        self.clients[msg.client] = (fd, msg.reply_cd, msg.pid)
        self.client_poll.register(fd, select.POLLIN)

    @handles(m.LAClientUnwatch)
    def client_unwatch(self, msg):
        """A client left (it said goodbye, GS released it): its pid no longer needs watching."""
        w = self.clients.pop(msg.client, None)
        if w is not None:
            self.client_poll.unregister(w[0])
            os.close(w[0])

    def check_clients(self):
        """Tell GS of every watched client that ended; stop serving once the owner ended."""
        if not self.clients and self.owner_fd is None:
            return
        ready = {fd for fd, _ in self.client_poll.poll(0)}
        if not ready:
            return
        if self.owner_fd in ready:
            self.stop_why = "its owner ended"
        for cid, (fd, reply, pid) in list(self.clients.items()):
            if fd in ready:
                self.client_poll.unregister(fd)
                os.close(fd)
                del self.clients[cid]
                jobprocs.unlink_heap(self.job, cid, pid)  # (its multiprocessing heap, if it was killed)
                self.ask(self.gs_ch, m.GSClientGone(client=cid), lambda resp, reply=reply: _destroy(reply))

    @handles(m.Response)
    def started(self, msg):
        """global services' answer to the program's start (only an error matters: LAHeadExit tells the
        end), or to a request of _interrupt_program (a tag of its own)."""
        if msg.tag:
            cont = self.pending.pop(msg.tag, None)
            if cont is not None:
                cont(msg)
            return
        if msg.err:
            log(f"cannot start the program: {msg.msg}")
            self.head_code = EXIT_SERVICE_FAILED

    @handles(m.LAHeadExit)
    def head_exited(self, msg):
        code = msg.exit_code
        self.head_code = code if code >= 0 else 128 - code

    # ---- the loop's look at the services
    # ---------------------------------------------------------------------
    def wait_time(self):
        wait = super().wait_time()
        return self.POLL_SLICE if wait is None else min(wait, self.POLL_SLICE)

    def tick(self):
        if self.interrupt == 1:
            self._interrupt_program()
        self._reap()
        self.events()
        self.check_services()
        self.check_clients()

    def events(self):
        """Hook: what arrived besides messages (the multi-node launcher's agent events)."""

    def where(self):
        """This node, as messages name it."""
        return f"node {self.node_index}"

    def check_services(self):
        """Raise ServiceDied naming a watched service that exited or stopped answering; ping them
        meanwhile."""
        now = time.monotonic()
        for w in self.watched.values():
            if self.only is not None and w.pid not in self.only:
                continue
            if w.pid in self.dead:
                raise ServiceDied(
                    f"{w.what} of {self.where()} (pid {w.pid}) died ({status_text(self.dead[w.pid])}): "
                    "ending the job"
                )
            silent = now - w.seen
            if not self.tearing and silent > self.service_timeout:
                raise ServiceDied(
                    f"{w.what} of {self.where()} (pid {w.pid}) has not answered for {silent:.0f} s "
                    f"(stopped or hung; {env.SERVICE_TIMEOUT}={self.service_timeout:g}): ending the job"
                )
        if not self.tearing and now >= self.next_ping:
            self.next_ping = now + PING_EVERY
            for w in self.watched.values():
                if w.pid not in self.dead:
                    self.ask(w.ch, m.Ping(), w.pong)

    def _reap(self):
        """Reap exited children (services, and orphans that came back to us as child subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.watched:
                self.dead[pid] = status

    # ---- teardown -----------------------------------------------------------------------------------------
    def _alive(self, pid):
        return pid is not None and pid not in self.dead

    def teardown(self):
        """This node's processes and services, then every segment of the job on this node."""
        self._teardown_services()
        self._remove_segments()

    def _teardown_services(self):
        """Ask the shepherd to end every managed process (SIGTERM, SIGKILL after the grace) and to exit; halt
        global services; then end whatever is left of the job here (orphans, and if a service failed,
        whatever still carries the job id)."""
        from launcher import cleanup

        self.tearing = True
        self.only = (self.shep_pid,)
        abnormal = True
        if self._alive(self.shep_pid) and self.inbox is not None:
            done = []
            try:
                self.ask(self.sh_ch, m.SHTeardown(grace=self.grace), done.append)
                self.serve(until=lambda: done, timeout=self.grace + 2.0)
                abnormal = not done
            except Exception as e:  # ServiceDied, a full channel...
                if not isinstance(e, ServiceDied):
                    log(f"teardown: {e}")
        if self._alive(self.gs_pid) and self.inbox is not None:
            self.send(self.gs_ch, m.GSHalt())
            self.flush()
        for pid in (self.shep_pid, self.gs_pid):
            self._wait_or_kill(pid, 1.0)
        left = set(cleanup.children())
        if abnormal:
            left.update(cleanup.job_pids(self.job))
        if left:
            cleanup.kill_all(left, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while time.monotonic() < deadline and any(exists(p) for p in left):
                self._reap()
                time.sleep(0.02)
            cleanup.kill_all([p for p in left if exists(p)], signal.SIGKILL)
            self._reap()

    def _remove_segments(self, keep_pool=False):
        """Destroy this launcher's channels and pool (unless keep_pool: the transport agent still needs its
        gateway), then unlink every segment of the job on this node that is left."""
        for ch in self.chans:
            try:
                ch.destroy()
            except Exception:
                pass
        self.chans = []
        if keep_pool:
            return
        if self.pool is not None:
            try:
                self.pool.destroy()
            except Exception:
                pass
            self.pool = None
        try:
            from dragon._core import core

            core.unlink_job_segments(self.job)
        except Exception as e:
            log(f"teardown: could not unlink the job's segments: {e}")

    def _wait_or_kill(self, pid, timeout):
        """Wait (on a pidfd, no polling) up to timeout for a service to exit; SIGKILL it after that (SIGKILL
        also ends a stopped process)."""
        if pid is None or not self._alive(pid):
            return
        import select

        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already reaped elsewhere
            fd = None
        if fd is not None:
            try:
                select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
        self._reap()
        if self._alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            self.dead[pid] = 9
