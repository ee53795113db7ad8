"""dragon-launch across nodes: under ``mpiexec -n N dragon-launch [--virtual-nodes] app.py`` or
``srun -N N --ntasks-per-node=1 dragon-launch app.py``.

Every rank runs this. The ranks read their world from MPI (``dragon.transport.world``): ranks grouped into
nodes by host (or one node per rank with ``--virtual-nodes``, each node with its own segment namespace
``<job>n<k>``). The lowest rank of each node is its launcher: it makes the node's infrastructure pool and
channels (its shepherd's input, its own input, the transport gateway), exchanges their descriptors with the
other nodes, runs the node's transport agent in a thread (the only code that speaks MPI), and starts the
node's shepherd, and on node 0 global services too, as fresh interpreters (forking after MPI_Init is unsafe).
Node 0's launcher then runs the program like the single-node launcher; its output, and every node's forwarded
output, reach the terminal through the MPI launcher's own stdout forwarding, labelled by the shepherds.

Global services runs beside node 0's launcher, or on a rank of its own (``--gs-rank``, or automatically when
the world has exactly one rank more than hosts: the rule is in ``dragon.transport.world``). That rank is no
node: it runs a transport agent (transport index ``nnodes``, which ``DRAGON_GS_NODE`` names, so that every
client and shepherd reaches GS through the agents) and GS, in its own segment namespace ``<job>gs``. Node 0
tears it down last; if its GS process dies it announces itself down, and node 0's launcher ends the job at
once (exit status 70, naming the rank); if the rank itself dies, mpiexec ends the job, or (srun) node 0's
agent notices its silence.

Control between launchers travels as infrastructure messages (``LATeardown``, ``LATorn``, ``LAExit``,
``LABye``, ``LANodeDead`` of ``dragon.infrastructure.messages``) in CTRL frames of the transport, routed here
by message type: node 0 orders every node's teardown and the final exit; a node whose shepherd dies announces
itself down (every agent fails the streams to it, GS reports its processes killed) and tells node 0, whose
launcher exits non-zero naming the node once the program ends. Other ranks of a node only wait for the end.
"""

import json
import os
import signal
import subprocess
import sys
import time

from dragon import env
from dragon._core import remote
from dragon.infrastructure import messages as m
from dragon.infrastructure.service import handles
from dragon.localservices.spawn import own_group
from dragon.transport.world import end_rank, mpi_segments, wait_barrier
from launcher.runtime import EXIT_SERVICE_FAILED, GRACE, Runtime, ServiceDied, log, status_text

STARTED = time.time()  # before MPI_Init: every MPI segment of this rank is younger
HEARTBEAT = 1.0  # seconds between an agent's heartbeats to every other agent
DEAD_AFTER = 15.0  # a node whose agent was silent this long is declared down (its launcher rank died)
FINAL_BARRIER = 15.0  # how long the launchers wait for each other at the very end
TERM_ALONE_AFTER = (
    3.0  # a node's launcher that got SIGTERM tears its node down itself if node 0 has not by then
)


def under_mpi():
    """True when started by an MPI launcher (mpiexec, or srun with a PMI) with more than one rank."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def orphaned_mpi_segments(since):
    """MPICH segments (mpich_shm_*) made since ``since`` that no live process maps or holds any more: what a
    killed launcher rank's MPI library left (it may make more after the services started, so the list passed
    to the shepherd at its start is not enough)."""
    from launcher import cleanup

    shm = "/dev/shm"
    cands = []
    try:
        names = [n for n in os.listdir(shm) if n.startswith("mpich_shm_")]
    except OSError:
        names = []
    for n in names:
        try:
            if os.stat(os.path.join(shm, n)).st_ctime >= since - 1.0:
                cands.append(n)
        except OSError:  # gone meanwhile
            continue
    return set(cleanup.unused_segments(shm, cands))


def _service(kind, args):
    """Start a service as a fresh interpreter: python -m launcher.multinode --service KIND, its arguments (the
    job's key among them) as JSON on its stdin, not on its command line, which every process may read."""
    # its own process group: when a rank dies, mpiexec SIGKILLs the other ranks' process groups; the services
    # must get the SIGTERM of PR_SET_PDEATHSIG instead, to tear their node down. In the launcher's session,
    # not one of its own: the processes the shepherd starts then share the transport agent's CPU share under
    # the kernel's autogroup scheduling (dragon.localservices.spawn.own_group)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.multinode", "--service", kind],
        close_fds=True,
        stdin=subprocess.PIPE,
        **own_group(True),
    )
    proc.stdin.write(json.dumps(args).encode())
    proc.stdin.close()
    return proc


def service_main(kind, args):
    """Entry of a service process started by _service: follow the launcher (PR_SET_PDEATHSIG), then serve."""
    from dragon._core import core

    parent = int(args["parent"])
    core.set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        return 0
    h = bytes.fromhex
    key = h(args["key"])
    if kind == "shepherd":
        from dragon.localservices import shepherd

        try:
            return shepherd.main(
                args["node"], args["job"], h(args["inbox"]), h(args["gs"]), h(args["pool"]), key
            )
        finally:
            if _parent_died(parent):  # the launcher rank died (killed): MPICH left its segments
                _unlink_mpi(args)
    if kind == "gs":
        from dragon.globalservices import server

        try:
            return server.main(
                h(args["inbox"]),
                [h(x) for x in args["shepherds"]],
                h(args["launcher"]),
                args["nodes"],
                [h(x) for x in args["pools"]],
                key,
                node=int(args["gs_node"]),
            )
        finally:
            if args.get("job") and _parent_died(parent):  # the GS rank's launcher died: its segments are ours
                core.unlink_job_segments(args["job"])
                _unlink_mpi(args)
    raise SystemExit(f"unknown service {kind}")


def _parent_died(parent):
    """True if the launcher that started this service is dead or dying.  PR_SET_PDEATHSIG fires when the
    launcher's main thread exits, while its other threads (the agent's) may still keep the process, and so
    getppid(), alive for a moment: a launcher whose main thread is a zombie counts as dead."""
    if os.getppid() != parent:
        return True
    try:
        with open(f"/proc/{parent}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZXx"
    except (OSError, IndexError):
        return True


def _unlink_mpi(args):
    """Unlink what MPICH left of a killed launcher rank (it would have done so at MPI_Finalize)."""
    for name in set(args.get("mpi_shm", ())) | orphaned_mpi_segments(args.get("since", time.time())):
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


class _StartFailed(ServiceDied):
    """Some rank could not make its node's pool or channels; every rank knows (node 0 says it)."""


class NodeRuntime(Runtime):
    """One node's launcher in a multi-node job, or the global-services rank's (see the module doc)."""

    POLL_SLICE = 0.1  # the agent's events (a node down, control from other nodes) want a quicker look

    def __init__(self, world, leaders, job, grace):
        super().__init__([], world.endpoint, grace=grace)
        self.world, self.leaders = world, leaders
        self.k, self.n = world.endpoint, world.nnodes  # this rank's transport index; the number of nodes
        self.ne = world.endpoints  # transport endpoints: the nodes, and the GS rank if there is one
        self.gs_k = world.gs_node  # where global services runs: node 0, or the GS rank's endpoint
        self.gs_apart = world.gs_rank is not None
        self.is_gs = world.is_gs
        self.job = world.job_of_node(job)
        import queue

        self.events_q = queue.Queue()  # (kind, node, data) from the agent's thread
        self.down = {}  # endpoint -> why
        self.torn = set()
        self.byes = set()
        self.orders = []
        self.agent = None
        self.gw = None
        self.gs_ch = None
        self.lost = None  # why this rank's own service (shepherd, or GS on the GS rank) is gone
        self.gs_lost = None  # why the GS rank is gone (node 0 ends the job at once)
        self.agent_lost = None  # why this rank's transport agent stopped by itself
        self.bye_wait = 5.0  # how long _finish waits for the other agents' last frames

    # ---- start ------------------------------------------------------------------------------------------
    def start(self):
        os.environ[env.JOB] = self.job
        os.environ[env.NODE] = str(self.k)
        from dragon._core import core
        from dragon._core import frames as W
        from dragon._core.core import Channel, Pool
        from dragon.infrastructure.log import get_logger
        from dragon.transport.agent import Agent, start_thread

        core.set_child_subreaper()
        hx = lambda x: bytes(x.sdesc).hex()  # noqa: E731
        try:
            self.pool = Pool.create(env.infra_pool_size(), name="inf")
            self.gw = Channel.create(self.pool, capacity=4096, block_size=1024 + W.HSIZE, name="gateway")
            mine = {"pool": hx(self.pool), "gw": hx(self.gw), "sh": None, "la": None, "gs": None}
            mine["key"] = self.key.hex()  # (node 0's is the job's)
            self.la_ch = Channel.create(self.pool, capacity=64, block_size=256)
            self.chans.append(self.la_ch)
            mine["la"] = hx(self.la_ch)
            if not self.is_gs:  # a node: its shepherd's input
                self.sh_ch = Channel.create(self.pool, capacity=512, block_size=512)
                self.chans.append(self.sh_ch)
                mine["sh"] = hx(self.sh_ch)
            if self.k == self.gs_k:  # global services runs here (node 0, or the GS rank)
                self.gs_ch = Channel.create(self.pool, capacity=1024, block_size=512)
                self.chans.append(self.gs_ch)
                mine["gs"] = hx(self.gs_ch)
        except Exception as e:  # every rank must still reach the allgather, or the others wait in it forever
            mine = {"error": f"{self.where()}: {type(e).__name__}: {e}"}
        every = self.leaders.allgather(mine)  # by transport index (the communicator's rank)
        failed = [x["error"] for x in every if "error" in x]
        if failed:
            raise _StartFailed("the job cannot start: " + "; ".join(failed))
        self.key = bytes.fromhex(every[0]["key"])
        self.set_inbox(self.la_ch)
        gs_cd = every[self.gs_k]["gs"]
        os.environ[env.GW_CD] = mine["gw"]
        os.environ[env.INF_PD] = mine["pool"]
        os.environ[env.GS_NODE] = str(self.gs_k)
        self.agent = Agent(
            self.leaders,
            self.k,
            list(range(self.ne)),
            self.gw,
            self.pool,
            log=get_logger("transport", self.k),
        )
        self.agent.on_ctrl = lambda src, data: self.events_q.put(("ctrl", src, data))
        self.agent.on_node_down = lambda node: self.events_q.put(("down", node, None))
        self.agent.heartbeat = (HEARTBEAT, DEAD_AFTER)
        self.agent_thread = start_thread(self.agent)
        if self.k == 0 and self.gs_ch is None:  # node 0's launcher tells GS (on its rank) of lost nodes
            self.gs_ch = Channel.attach(bytes.fromhex(gs_cd))
        self.nodes = self.world.nodes()
        self.client_env = {  # (a client attaches on node 0's host: its pool and gateway)
            env.JOB: self.job,
            env.NODE: str(self.k),
            env.GS_CD: gs_cd,
            env.INF_PD: mine["pool"],
            env.GW_CD: mine["gw"],
            env.GS_NODE: str(self.gs_k),
        }
        parent = str(os.getpid())
        if not self.is_gs:
            self.shep_pid = _service(
                "shepherd",
                {
                    "parent": parent,
                    "key": self.key.hex(),
                    "node": self.k,
                    "job": self.job,
                    "inbox": mine["sh"],
                    "gs": gs_cd,
                    "pool": mine["pool"],
                    "mpi_shm": mpi_segments(),
                    "since": STARTED,
                },
            ).pid
            self.watch(self.shep_pid, "local services (shepherd)", self.sh_ch)
        if self.k == self.gs_k:
            nodes = range(self.n)
            self.gs_pid = _service(
                "gs",
                {
                    "parent": parent,
                    "key": self.key.hex(),
                    "inbox": gs_cd,
                    "shepherds": [every[k]["sh"] for k in nodes],
                    "launcher": every[0]["la"],
                    "nodes": self.world.nodes(),
                    "pools": [every[k]["pool"] for k in nodes],
                    "gs_node": self.gs_k,
                    # on a rank of its own, GS cleans that rank up if its launcher is killed
                    **({"job": self.job, "mpi_shm": mpi_segments(), "since": STARTED} if self.is_gs else {}),
                },
            ).pid
            self.watch(self.gs_pid, "global services", self.gs_ch)

    def ctrl(self, dest, msg):
        """Send a control message (with the job's key) to the launcher of transport index dest."""
        msg.key = self.key
        self.agent.send_ctrl(dest, m.encode(msg))

    def tick(self):
        if self.k == 0 and not self.is_gs:
            super().tick()
        else:  # a serving rank's loop looks at its service itself (_service_state)
            self._reap()
            self.events()

    # ---- the agent's events and the other launchers' control messages ------------------------------------
    def events(self):
        import queue

        while True:
            try:
                kind, a, data = self.events_q.get_nowait()
            except queue.Empty:
                break
            if kind == "down":
                why = self.agent.down_why.get(a) if self.agent is not None else None
                self._node_down(a, self.down.get(a) or why or f"{self.world.describe(a)} stopped answering")
            else:
                self.handle(data)  # decoded, checked (the job's key) and dispatched like any message
        # (the agent notes why whenever its loop ends by itself, never when it was told to stop)
        if self.agent_lost is None and self.agent is not None and self.agent.failed:
            self.agent_lost = f"the transport agent of {self.where()} stopped: {self.agent.failed}"
            if self.k == 0 and not self.is_gs and not self.tearing:
                raise ServiceDied(self.agent_lost + ": ending the job")
            log(self.agent_lost)
        if self.gs_lost and self.k == 0 and not self.tearing:
            raise ServiceDied(
                f"global services is gone: {self.world.describe(self.gs_k)} is down ({self.gs_lost}): "
                "ending the job"
            )

    @handles(m.LANodeDead)
    def node_dead(self, msg):
        self._node_down(msg.node, msg.why)

    @handles(m.LATorn)
    def node_torn(self, msg):
        self.torn.add(msg.node)

    @handles(m.LABye)
    def node_bye(self, msg):
        self.byes.add(msg.node)

    @handles(m.LATeardown, m.LAExit)
    def order(self, msg):
        self.orders.append(msg)

    def _node_down(self, node, why):
        if node in self.down and self.down[node] is not None:
            return
        first = node not in self.down
        self.down[node] = why
        if self.gs_apart and node == self.gs_k:
            self.gs_lost = why
        if self.k == 0 and first and self.gs_lost is None:  # (GS lost: events() ends the job, naming it)
            log(f"{self.world.describe(node)} is down: {why}")
            self.send(self.gs_ch, m.GSNodeDown(node=node, exit_code=None, reason=why))

    def where(self):
        return self.world.describe(self.k)

    # ---- node 0 --------------------------------------------------------------------------------------
    def run(self, exe, args, serving=None):
        if self.is_gs:
            return self._serve_gs()
        if self.k != 0:
            return self._serve_node()
        try:  # starts, runs the program (or serves clients), tears this node down (teardown below)
            code = super().run(exe, args, serving=serving)
        finally:
            if serving is not None:
                serving.done()
        if self.down and code == 0:
            code = EXIT_SERVICE_FAILED
        if self.down:
            log(
                "the job lost "
                + "; ".join(f"{self.world.describe(k)}: {why}" for k, why in sorted(self.down.items()))
            )
        self._finish()
        return code

    def teardown(self):
        """Every other node first (in parallel), then this one, then the GS rank; then every agent stops (in
        _finish, which also removes this rank's segments)."""
        self.tearing = True
        live = [k for k in range(1, self.n) if k not in self.down]
        if self.agent is not None:
            for k in live:
                self.ctrl(k, m.LATeardown(grace=self.grace))
        self._teardown_services()
        self._await_torn(live, self.grace + 5.0)
        if self.agent is not None and self.gs_apart and self.gs_k not in self.down:
            self.ctrl(self.gs_k, m.LATeardown(grace=self.grace))
            self._await_torn([self.gs_k], 5.0)

    def _await_torn(self, live, timeout):
        if self.agent is None or self.agent_lost:  # no agents yet, or ours is gone: no answer can come
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not set(live) <= self.torn | set(self.down):
            self.events()
            time.sleep(0.02)
        missing = set(live) - self.torn - set(self.down)
        if missing:
            log(f"teardown: no answer from {', '.join(self.world.describe(k) for k in sorted(missing))}")

    def _finish(self):
        """The one tail of every rank: stop the agent once every other agent's last frame came (no MPI message
        is left unreceived), then remove this rank's segments."""
        self.tearing = True
        if self.agent is not None:
            others = set(range(self.ne)) - {self.k}
            if self.k == 0:
                for k in others:
                    self.ctrl(k, m.LAExit())
            for k in others:
                self.ctrl(k, m.LABye(node=self.k))
            deadline = time.monotonic() + (0 if self.agent_lost else self.bye_wait)
            while not others - set(self.down) <= self.byes and time.monotonic() < deadline:
                self.events()
                time.sleep(0.005)
            self.agent.stop(peers=self.byes)  # (it awaits their agents' LAST frames, not a lost one's)
            self.agent_thread.join(10)
        # its own sends through the transport (node 0's to a GS rank) went with the job: none to await
        remote.close_endpoint(flush=False)
        if self.gw is not None:
            self.chans.append(self.gw)
        self._remove_segments()

    # ---- other nodes ---------------------------------------------------------------------------------
    def _start_serving(self):
        """start() on a rank that then serves until node 0 orders the end (another node, the GS rank).
        -> the list its SIGTERMs are noted in (monotonic times), or None if the start failed."""
        try:
            self.start()
        except Exception as e:
            if not isinstance(e, _StartFailed):
                log(f"{self.where()}: cannot start: {e}")
            self._finish()
            return None
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # node 0's launcher ends the job
        # ... also on SIGTERM, but scancel and a time limit send it to every process of the job at once (this
        # rank's services included) and SIGKILL KillWait seconds later: the loops decide what it means
        sigterm = []
        signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.append(time.monotonic()))
        return sigterm

    def _announce_lost(self, why):
        """Tell node 0 this rank is lost, and every agent that it is down (requests to it fail at once)."""
        self.ctrl(0, m.LANodeDead(node=self.k, why=why))
        self.agent.announce_down(self.k)

    def _service_state(self, pid, sigterm, gone_at):
        """A serving rank's look at its own service (the shepherd, or GS on the GS rank): None while it is
        well, else why it is lost. A service that exits 0 because scancel or the time limit SIGTERMed it too
        is ending with the job, not lost (our own SIGTERM may come a moment after its exit). gone_at: a list
        holding when it was first seen gone with exit code 0."""
        try:
            self.check_services()
            return None
        except ServiceDied as e:
            if pid not in self.dead:  # silent: stopped or hung; it is killed, as the job would be
                self._wait_or_kill(pid, 0)
                return str(e)
        status = status_text(self.dead[pid])
        if status == "exit code 0":
            if sigterm:
                return "ended by SIGTERM with the rest of the job"
            if not gone_at:
                gone_at.append(time.monotonic())
            if time.monotonic() - gone_at[0] <= 1.0:
                return None
        return f"{self.watched[pid].what} of {self.where()} (pid {pid}) died ({status})"

    def _serve_node(self):
        from launcher import cleanup

        sigterm = self._start_serving()
        if sigterm is None:
            return EXIT_SERVICE_FAILED
        exiting = False
        torn = False
        gone_at = []
        while not exiting:
            self.serve(timeout=0.02)  # control messages, pings' answers, the agent's events
            self._reap()
            alone = None
            if 0 in self.down:
                alone = f"{self.world.describe(0)} is gone ({self.down[0]})"
            elif sigterm and time.monotonic() - sigterm[0] > TERM_ALONE_AFTER:
                alone = f"got SIGTERM and no teardown from node 0 within {TERM_ALONE_AFTER:g} s"
            elif self.agent_lost:  # cut off: node 0 hears of it from the silence of the heartbeats
                alone = "lost its transport agent"
            if alone is not None:
                if not torn:
                    log(f"node {self.k}: {alone}: tearing this node down")
                    if 0 not in self.down:  # node 0 learns it now, not from the heartbeats' silence
                        self._announce_lost(f"its launcher {alone}")
                    torn = True
                    self._teardown_services()
                self.bye_wait = 1.0
                break
            if self.lost is None and not torn:
                why = self._service_state(self.shep_pid, sigterm, gone_at)
                if why is not None:
                    self.lost = why
                    if why != "ended by SIGTERM with the rest of the job":
                        log(why)
                        self._announce_lost(why)
                        cleanup.kill_all(cleanup.job_pids(self.job), signal.SIGKILL)
            while self.orders:
                order = self.orders.pop(0)
                if type(order) is m.LATeardown and not torn:
                    torn = True
                    if order.grace is not None:
                        self.grace = order.grace
                    self._teardown_services()
                    self.ctrl(0, m.LATorn(node=self.k))
                elif type(order) is m.LAExit:
                    exiting = True
        self._finish()
        return 0  # (mpiexec would kill every rank at a non-zero exit: node 0 tells the job's end)

    # ---- the global-services rank ----------------------------------------------------------------------
    def _serve_gs(self):
        """Run global services and this rank's agent until node 0 orders the end. GS dying (or hanging) is
        announced like a node dying: node 0's launcher then ends the job at once, naming this rank. A GS that
        exits 0 after the job's SIGTERM (scancel, time limit) is not a loss: node 0 is already ending the
        job."""
        sigterm = self._start_serving()
        if sigterm is None:
            return EXIT_SERVICE_FAILED
        exiting = False
        gone_at = []
        while not exiting:
            self.serve(timeout=0.02)
            self._reap()
            if self.lost is None and not self.tearing:
                why = self._service_state(self.gs_pid, sigterm, gone_at)
                if why is not None:
                    self.lost = why
                    if why != "ended by SIGTERM with the rest of the job":
                        log(f"{self.where()}: {why}")
                        self._announce_lost(why)  # requests to GS fail at once instead of timing out
            if 0 in self.down and not self.tearing:  # node 0's launcher is gone: nobody will order the end
                log(f"{self.where()}: {self.world.describe(0)} is gone: stopping")
                break
            if self.agent_lost and not self.tearing:  # cut off from node 0: it hears of it from the silence
                break
            while self.orders:
                order = self.orders.pop(0)
                if type(order) is m.LATeardown and not self.tearing:
                    self.tearing = True
                    self._stop_gs()
                    self.ctrl(0, m.LATorn(node=self.k))
                elif type(order) is m.LAExit:
                    exiting = True
        self._stop_gs()
        self._finish()
        return 0

    def _stop_gs(self):
        if self._alive(self.gs_pid):
            self.send(self.gs_ch, m.GSHalt())
            self.flush()
            self._wait_or_kill(self.gs_pid, 2.0)


EXIT_BAD_LAYOUT = 2  # like a bad command line: nothing was started


def layout_error(mpi_size, env=None):
    """Why this MPI world cannot be the job's, or None.  srun without a PMI that the MPI library speaks (e.g.
    ``--mpi=none`` where MpiDefault is none) starts N tasks that each see a world of one rank: each would run
    the program on its own, N times.  That is refused, on every task, before anything starts."""
    env = os.environ if env is None else env
    try:
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", ""))
    except ValueError:
        return None
    if mpi_size != 1 or tasks <= 1:
        return None
    return (
        f"srun started {tasks} tasks, but MPI shows each of them a world of 1 rank: srun did not connect "
        f"them through MPI, so each would run the program on its own.  Ask srun for the PMI of your MPI: "
        f"srun --mpi=pmi2 (the mpich wheel) or --mpi=pmix (Open MPI), or set MpiDefault in slurm.conf.  "
        f"The layout dragon-launch wants: srun -N NODES --ntasks-per-node=1 dragon-launch app.py"
    )


def main(exe, args, virtual, grace=GRACE, gs_rank=None, serving=None):
    """The multi-node launcher; returns this rank's exit code.  gs_rank: True (--gs-rank), None (automatic) or
    False (--no-gs-rank): whether global services gets a rank of its own (dragon.transport.world).  serving (a
    launcher.serve.Serving, exe None): node 0 serves clients instead of running a program."""
    from dragon.transport.world import World, init_mpi, node_cpu_binding

    MPI = init_mpi()

    comm = MPI.COMM_WORLD
    wrong = layout_error(comm.Get_size())
    world = None
    if not wrong:
        world = World(comm, virtual, gs_rank=gs_rank)
        wrong = world.error
    if wrong:
        if world is None or world.rank == 0:  # every rank knows; one says it
            log(wrong)
        MPI.Finalize()
        return EXIT_BAD_LAYOUT
    job = comm.bcast(env.new_job_id() if world.rank == 0 else None, root=0)
    serves = world.leader or world.is_gs  # runs a node's launcher and agent, or the GS rank's
    if serves:
        node_cpu_binding(world)
    # the agents' communicator: its rank is the transport index (node k is k, the GS rank is nnodes)
    leaders = comm.Split(0 if serves else MPI.UNDEFINED, world.endpoint if serves else 0)
    code = 0
    if not serves:
        wait_barrier(comm)
    else:
        rt = NodeRuntime(world, leaders, job, grace)
        code = rt.run(exe, args, serving=serving)
        lost = any(k in rt.down for k in range(world.endpoints))
        wait = 3.0 if lost else FINAL_BARRIER
        if (
            rt.agent_lost and world.node != 0
        ):  # node 0 learns of it from the heartbeats' silence, then ends too
            wait = DEAD_AFTER + FINAL_BARRIER
        end_rank(
            comm, wait, code, log, EXIT_SERVICE_FAILED
        )  # (a rank is gone: srun keeps the others running)
    for f in (sys.stdout, sys.stderr):  # (None when the launcher was started with it closed)
        if f is not None:
            f.flush()
    MPI.Finalize()
    return code


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--service":
        sys.exit(service_main(sys.argv[2], json.loads(sys.stdin.read())) or 0)
    sys.exit("usage: dragon-launch (this module is its multi-node part)")
