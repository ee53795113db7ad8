"""dragon-launch: start the dragon runtime on this node, run the user's program in it, tear everything down.

The launcher makes the job id, the node's infrastructure pool and the service channels, then forks (after only
the imports the services need) the node's shepherd (local services) and global services concurrently, asks GS to
start the program as the first managed process (p_uid 1), and exits with its exit code. Whatever ends the job
(the program exits or raises, Ctrl-C, SIGTERM, a service dying, or SIGKILL of the launcher: the services get
SIGTERM from PR_SET_PDEATHSIG and tear down themselves) every managed process is terminated (SIGTERM, SIGKILL
after a grace period) and every shared-memory segment of the job is unlinked.

Built around ``Runtime`` and ``NodeInfo`` so that the multi-node bootstrap (one shepherd and transport agent per
node from MPI ranks, GS once, the program once on node 0) adds a world but keeps this flow.
"""

import argparse
import os
import signal
import sys
import time

from dragon import env

GRACE = 1.0  # seconds between SIGTERM and SIGKILL at teardown
EXIT_SERVICE_FAILED = 70  # the runtime itself failed (a service died, the program could not start)


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


class _Terminated(BaseException):
    def __init__(self, signum):
        self.signum = signum


class ServiceDied(Exception):
    pass


def _fork(module, *args):
    """Run module.main(*args) in a forked child that gets SIGTERM when this process dies; return its pid.
    The child imports the module itself, so the services load their code in parallel."""
    from dragon._core import core

    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
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


def _log(text):
    try:
        sys.stderr.write(f"dragon-launch: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # no stderr: nothing must stop the teardown
        pass


class Runtime:
    """The runtime of one job, seen from one launcher (here: the only one, on node 0)."""

    def __init__(self, nodes, node_index, grace=GRACE):
        self.nodes, self.node_index, self.grace = nodes, node_index, grace
        self.job = env.new_job_id()
        self.shep_pid = self.gs_pid = None
        self.dead = {}  # pid -> raw wait status of services that exited
        self.pool = None
        self.chans = []
        self.tag = 0
        self.failed = None

    # ---- start --------------------------------------------------------------------------------------------
    def start(self):
        os.environ["DRAGON_JOB"] = self.job
        from dragon._core import core
        from dragon.channels import Channel
        from dragon.infrastructure import messages  # before the forks: the services inherit it
        from dragon.pools import Pool

        self.m = messages
        core.set_child_subreaper()
        self.pool = Pool.create(env.infra_pool_size(), name="inf")
        # requests are small; bigger ones travel in pool blocks. Every slot is touched at creation: keep rings small.
        self.gs_ch = Channel.create(self.pool, capacity=1024, block_size=512)
        self.sh_ch = Channel.create(self.pool, capacity=512, block_size=512)
        self.la_ch = Channel.create(self.pool, capacity=64, block_size=256)
        self.chans = [self.gs_ch, self.sh_ch, self.la_ch]
        gs_cd, sh_cd, la_cd, pd = (bytes(x.sdesc) for x in (self.gs_ch, self.sh_ch, self.la_ch, self.pool))
        self.shep_pid = _fork("dragon.localservices.shepherd", self.node_index, self.job, sh_cd, gs_cd, pd)
        self.gs_pid = _fork(
            "dragon.globalservices.server", gs_cd, [sh_cd], la_cd, [n.to_wire() for n in self.nodes], [pd]
        )

    # ---- run ----------------------------------------------------------------------------------------------
    def run(self, exe, args):
        """Start the runtime, run exe args as the head process, tear down. -> exit code for the launcher."""
        code = EXIT_SERVICE_FAILED

        def _term(signum, frame):
            raise _Terminated(signum)

        try:
            self.start()
            for sig in (signal.SIGTERM, signal.SIGHUP):  # scancel / time limit, a closed terminal
                signal.signal(sig, _term)
            code = self._run_head(exe, args)
        except KeyboardInterrupt:
            _log("interrupted: tearing the job down")
            code = 128 + signal.SIGINT
        except _Terminated as t:
            _log(f"got signal {t.signum}: tearing the job down")
            code = 128 + t.signum
        except ServiceDied as e:
            _log(str(e))
            self.failed = str(e)
            code = EXIT_SERVICE_FAILED
        except Exception as e:  # e.g. no room in /dev/shm for the infrastructure pool
            _log(f"the runtime failed: {type(e).__name__}: {e}")
            self.failed = str(e)
            code = EXIT_SERVICE_FAILED
        finally:
            # finish the teardown even if a second Ctrl-C or SIGTERM comes
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            self.teardown()
        return code

    def _send(self, ch, msg):
        self.tag += 1
        msg.tag, msg.reply = self.tag, bytes(self.la_ch.sdesc)
        if hasattr(msg, "caller"):
            msg.caller = 0
        ch.send(self.m.encode(msg), timeout=5)
        return self.tag

    POLL_SLICE = 0.25  # seconds between looks at the services (and, multi-node, at the agent's events)

    def _events(self):
        """Hook: handle what arrived besides launcher messages (the multi-node launcher's agent events)."""

    def _where(self):
        """This node, as messages name it."""
        return f"node {self.node_index}"

    def _recv(self, timeout, watch=None):
        """Next message on the launcher channel, or None after timeout; raises ServiceDied if a service in
        watch (default: shepherd and GS) died."""
        from dragon.errors import ChannelEmpty, ChannelTimeout

        deadline = None if timeout is None else time.monotonic() + timeout
        watch = (self.shep_pid, self.gs_pid) if watch is None else watch
        while True:
            self._reap()
            self._events()
            for pid in watch:
                if pid in self.dead:
                    who = "local services (shepherd)" if pid == self.shep_pid else "global services"
                    raise ServiceDied(
                        f"{who} of {self._where()} (pid {pid}) died "
                        f"({self._status_text(self.dead[pid])}): ending the job"
                    )
            slice_ = (
                self.POLL_SLICE if deadline is None else min(self.POLL_SLICE, deadline - time.monotonic())
            )
            if slice_ <= 0:
                return None
            try:
                return self.m.decode(self.la_ch.recv(timeout=slice_))
            except (ChannelTimeout, ChannelEmpty, TimeoutError):
                continue

    @staticmethod
    def _status_text(status):
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit code {os.WEXITSTATUS(status)}"

    def _reap(self):
        """Reap exited children (services, and orphans that came back to us as child subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in (self.shep_pid, self.gs_pid):
                self.dead[pid] = status

    def _run_head(self, exe, args):
        m = self.m
        tag = self._send(
            self.gs_ch,
            m.GSProcessCreate(
                exe=exe,
                run_dir=os.getcwd(),
                args=list(args),
                env=None,
                user_name=None,
                options={},
                soft=False,
                head=True,
            ),
        )
        while True:
            msg = self._recv(None)
            if isinstance(msg, m.Response) and msg.tag == tag:
                if msg.err:
                    _log(f"cannot start the program: {msg.msg}")
                    return EXIT_SERVICE_FAILED
            elif isinstance(msg, m.LAHeadExit):
                code = msg.exit_code
                return code if code >= 0 else 128 - code

    # ---- teardown -----------------------------------------------------------------------------------------
    def _alive(self, pid):
        return pid is not None and pid not in self.dead

    def teardown(self):
        from launcher import cleanup

        m = getattr(self, "m", None)
        abnormal = False
        if self._alive(self.shep_pid) and m is not None:
            try:
                tag = self._send(self.sh_ch, m.SHTeardown(grace=self.grace))
                deadline = time.monotonic() + self.grace + 2.0
                while time.monotonic() < deadline:
                    msg = self._recv(deadline - time.monotonic(), watch=(self.shep_pid,))
                    if msg is None or (isinstance(msg, m.Response) and msg.tag == tag):
                        break
                else:
                    abnormal = True
            except Exception as e:  # ServiceDied, a full channel...
                abnormal = True
                if not isinstance(e, ServiceDied):
                    _log(f"teardown: {e}")
        else:
            abnormal = True
        if self._alive(self.gs_pid) and m is not None:
            try:
                self._send(self.gs_ch, m.GSHalt())
            except Exception:
                pass
        for pid in (self.shep_pid, self.gs_pid):
            self._wait_or_kill(pid, 1.0)
        # anything left: orphans that came back to us, and (if a service failed) whatever still carries the job id
        left = set(cleanup.children())
        if abnormal:
            left.update(cleanup.job_pids(self.job))
        if left:
            cleanup.kill_all(left, signal.SIGTERM)
            deadline = time.monotonic() + self.grace
            while time.monotonic() < deadline and any(_exists(p) for p in left):
                self._reap()
                time.sleep(0.02)
            cleanup.kill_all([p for p in left if _exists(p)], signal.SIGKILL)
            self._reap()
        for ch in self.chans:
            try:
                ch.destroy()
            except Exception:
                pass
        if self.pool is not None:
            try:
                self.pool.destroy()
            except Exception:
                pass
        try:
            from dragon._core import core

            core.unlink_job_segments(self.job)
        except Exception as e:
            _log(f"teardown: could not unlink the job's segments: {e}")

    def _wait_or_kill(self, pid, timeout):
        """Wait (on a pidfd, no polling) up to timeout for a service to exit; SIGKILL it after that."""
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


def _exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def parser():
    p = argparse.ArgumentParser(
        prog="dragon-launch",
        description=(
            "Run PROGRAM inside the dragon runtime on this node: start global services and local services,\n"
            "run PROGRAM as the first managed process (a .py file runs with this Python interpreter), print\n"
            "its output as it comes (other managed processes' lines are labelled [user_name or p_uid]),\n"
            "tear everything down when it ends, and exit with its exit code."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  dragon-launch app.py arg1 arg2       run app.py (p_uid 1) with this interpreter
  dragon-launch /bin/hostname          run any executable as the first managed process
  dragon-launch -m pkg.module args     run a module, like python -m

inside PROGRAM: dragon.globalservices.process / pool / channel / node (see examples/hello.py)

exit status: PROGRAM's exit code; 128+N if signal N killed it; 130 on Ctrl-C and 143 on
SIGTERM (the job is torn down: SIGTERM to every managed process, SIGKILL after --grace);
70 if the runtime failed (a service died, PROGRAM could not start, a node was lost); 2 for a bad
command line or MPI layout.

across nodes (one runtime, PROGRAM runs once, on node 0):
  srun -N NODES --ntasks-per-node=1 dragon-launch app.py      under Slurm (srun must wire MPI: --mpi=pmi2
                                                              for the mpich wheel, --mpi=pmix for Open MPI)
  mpiexec -n N -ppn 1 dragon-launch app.py                    one rank per host
  mpiexec -n N dragon-launch --virtual-nodes app.py           every rank its own node, even on one host
layout: ranks are grouped into nodes by host name; one rank per node is what the runtime uses. Extra ranks on a
node (without --virtual-nodes) are accepted but only wait for the end (one extra rank in all runs global
services: see below). srun tasks that each see an MPI world of one rank (srun --mpi=none) are refused with exit
status 2: each would run PROGRAM on its own.

global services (one per job) runs beside node 0's launcher, unless it gets an MPI rank of its own: a rank that
is no node (no managed processes there, not in node.get_list()), reached through the transport like any node.
  srun -N 2 -n 3 dragon-launch app.py                  one rank more than hosts: the extra rank runs global
                                                       services (automatic; --no-gs-rank keeps it beside node 0)
  mpiexec -n 3 dragon-launch --virtual-nodes --gs-rank app.py     2 virtual nodes, the last rank runs it
--gs-rank asks for it: the highest rank that is not its host's first; if there is none (one rank per host), or
with --virtual-nodes, the last rank (srun -N 3 --ntasks-per-node=1 --gs-rank: 2 nodes and a host for global
services). Refused with exit status 2 in a world of one rank. On its own rank, GS has a core to itself, but
node 0's requests cross the transport too (a round trip ~10x longer than beside node 0; other nodes' about the
same). Node names are the Slurm node names (SLURMD_NODENAME) when srun started the ranks, else the host names.

environment: DRAGON_LOG=debug for verbose service logs on stderr;
DRAGON_REQUEST_TIMEOUT=seconds a call waits for global services (default 60);
DRAGON_INFRA_POOL_SIZE=size of each node's infrastructure pool (default 64M; K, M, G suffixes);
DRAGON_CPU_BINDING=keep keeps the CPU binding srun or mpiexec gave each rank for its node's services and
processes (default node: every CPU the rank's cgroup allows; a binding to one task's core would put the node's
whole job on that core).""",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GRACE,
        metavar="SECONDS",
        help=f"time managed processes get between SIGTERM and SIGKILL at teardown (default {GRACE})",
    )
    p.add_argument(
        "--virtual-nodes",
        action="store_true",
        help="under mpiexec: make every rank its own node (own segments, all traffic between them through the "
        "transport agents), even when several ranks share a host",
    )
    p.add_argument(
        "--gs-rank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="across nodes: run global services on an MPI rank of its own (see below); default: only when the "
        "world has exactly one rank more than hosts",
    )
    p.add_argument(
        "-m", dest="module", metavar="MODULE", help="run a Python module as the program (like python -m)"
    )
    p.add_argument("program", nargs="?", help="the program to run: a .py script, or an executable")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to PROGRAM")
    return p


def _split(argv):
    """dragon-launch's own options come first; everything from PROGRAM (or -m MODULE) on is the program's."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--grace":
            i += 2
        elif a.startswith("--grace=") or a in (
            "-h",
            "--help",
            "--virtual-nodes",
            "--gs-rank",
            "--no-gs-rank",
        ):
            i += 1
        else:
            break
    return argv[:i], argv[i:]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, rest = _split(argv)
    p = parser()
    ns = p.parse_args(own)
    if ns.grace < 0:
        p.error("--grace must be >= 0")
    if rest[:1] == ["-m"]:
        if len(rest) < 2:
            p.error("-m needs a module name")
        exe, args = sys.executable, ["-m", *rest[1:]]
    elif not rest:
        p.error("a program to run is required (or -m MODULE)")
    elif rest[0].startswith("-"):
        p.error(f"unknown option {rest[0]} (dragon-launch's options come before the program)")
    elif rest[0].endswith(".py"):
        if not os.path.isfile(rest[0]):
            p.error(f"no such file: {rest[0]}")
        exe, args = sys.executable, rest
    else:
        exe, args = rest[0], rest[1:]
    from launcher import multinode

    if os.environ.get("SLURM_JOB_ID"):  # segments that SIGKILLed jobs left on this node, where no epilog runs
        from launcher import cleanup

        gone = cleanup.remove_stale_slurm_segments()
        if gone:
            _log(f"removed {len(gone)} segment(s) that ended Slurm jobs left in /dev/shm: {' '.join(gone[:5])}")
    if ns.virtual_nodes or ns.gs_rank or multinode.under_mpi():
        # one runtime across the MPI job's nodes; a normal exit: after MPI, os._exit can lose the exit status
        # on its way through mpiexec
        sys.exit(multinode.main(exe, args, ns.virtual_nodes, grace=ns.grace, gs_rank=ns.gs_rank))
    nodes, me = local_world()
    code = Runtime(nodes, me, grace=ns.grace).run(exe, args)
    # everything is torn down: skip the interpreter's finalization
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
