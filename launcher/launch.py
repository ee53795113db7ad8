"""dragon-launch: start the dragon runtime on this node, run the user's program in it, tear everything down.

The launcher makes the job id, the node's infrastructure pool and the service channels, then forks (after only
the imports the services need) the node's shepherd (local services) and global services concurrently, asks GS
to start the program as the first managed process (p_uid 1), and exits with its exit code. Whatever ends the
job (the program exits or raises, a second Ctrl-C, SIGTERM, a service dying, or SIGKILL of the launcher: the
services get SIGTERM from PR_SET_PDEATHSIG and tear down themselves) every managed process is terminated
(SIGTERM, SIGKILL after a grace period) and every shared-memory segment of the job is unlinked.

Built around ``Runtime`` and ``NodeInfo`` so that the multi-node bootstrap (one shepherd and transport agent
per node from MPI ranks, GS once, the program once on node 0) adds a world but keeps this flow.
"""

import argparse
import os
import sys

from dragon import env
from launcher.runtime import GRACE, SERVICE_TIMEOUT, Runtime, local_world, log


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
  dragon-launch --serve                start the runtime with no program and serve clients: it writes a
                                       connection file (default ~/.dragon/JOB.json, mode 0600), prints
                                       its path and runs until --stop, Ctrl-C, SIGTERM, scancel or the
                                       time limit; dragon.init(connect=FILE) in a python or a notebook
                                       on node 0's host attaches to it
  dragon-launch --stop FILE            end the runtime that wrote FILE (and wait for its end)

inside PROGRAM: dragon.globalservices.process / pool / channel / node (see examples/hello.py)

Ctrl-C: the first goes to PROGRAM and its processes (SIGINT to each, as from a terminal: KeyboardInterrupt);
a second tears the job down.
exit status: PROGRAM's exit code; 128+N if signal N killed it; 130 on a second Ctrl-C and 143 on
SIGTERM (the job is torn down: SIGTERM to every managed process, SIGKILL after --grace);
70 if the runtime failed (a service died, PROGRAM could not start, a node was lost); 2 for a bad
command line or MPI layout.

across nodes (one runtime, PROGRAM runs once, on node 0):
  srun -N NODES --ntasks-per-node=1 dragon-launch app.py      under Slurm (srun must wire MPI: --mpi=pmi2
                                                              for the mpich wheel, --mpi=pmix for Open MPI)
  mpiexec -n N -ppn 1 dragon-launch app.py                    one rank per host
  mpiexec -n N dragon-launch --virtual-nodes app.py           every rank its own node, even on one host
layout: ranks are grouped into nodes by host name; one rank per node is what the runtime uses. Extra ranks on
a node (without --virtual-nodes) are accepted but only wait for the end (one extra rank in all runs global
services: see below). srun tasks that each see an MPI world of one rank (srun --mpi=none) are refused with
exit status 2: each would run PROGRAM on its own.

global services (one per job) runs beside node 0's launcher, unless it gets an MPI rank of its own: a rank
that is no node (no managed processes there, not in node.get_list()), reached through the transport like any
node.
  srun -N 2 -n 3 dragon-launch app.py                  one rank more than hosts: the extra rank runs global
                                                       services (automatic; --no-gs-rank keeps it beside
                                                       node 0)
  mpiexec -n 3 dragon-launch --virtual-nodes --gs-rank app.py     2 virtual nodes, the last rank runs it
--gs-rank asks for it: the highest rank that is not its host's first; if there is none (one rank per host), or
with --virtual-nodes, the last rank (srun -N 3 --ntasks-per-node=1 --gs-rank: 2 nodes and a host for global
services). Refused with exit status 2 in a world of one rank. On its own rank, GS has a core to itself, but
node 0's requests cross the transport too (a round trip ~10x longer than beside node 0; other nodes' about the
same). Node names are the Slurm node names (SLURMD_NODENAME) when srun started the ranks, else the host names.

environment: DRAGON_LOG=debug for verbose service logs on stderr;
DRAGON_REQUEST_TIMEOUT=seconds a call waits for global services (default 60);
DRAGON_SERVICE_TIMEOUT=seconds a service of the runtime (global services, a node's shepherd) may leave the
launcher's pings unanswered before the job is ended as hung, naming it (default 30);
DRAGON_EXIT_FLUSH_TIMEOUT=seconds a process ending waits for its sends to channels on other nodes to land
there, so that whoever joins it finds them (default 60; the transport delivers the rest later);
DRAGON_INFRA_POOL_SIZE=size of each node's infrastructure pool (default 64M; K, M, G suffixes);
DRAGON_CPU_BINDING=keep keeps the CPU binding srun or mpiexec gave each rank for its node's services and
processes (default node: every CPU the rank's cgroup allows, a binding to one task's core would put the node's
whole job on that core; with --virtual-nodes each node its even share of the host's CPUs, as separate nodes
have their own, where they divide evenly; host: every CPU for every virtual node too);
DRAGON_ZYGOTE_PRELOAD=mod1,mod2 modules each node's zygote imports before it forks Python children (e.g. what
multiprocessing children of the 'dragon' start method import);
DRAGON_MP_HEAP_SIZE=size of the pool each process makes for its multiprocessing objects (default 1G,
sparse).""",
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
        help="under mpiexec: make every rank its own node (own segments, all traffic between them through "
        "the transport agents), even when several ranks share a host",
    )
    p.add_argument(
        "--gs-rank",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="across nodes: run global services on an MPI rank of its own (see below); default: only when "
        "the world has exactly one rank more than hosts",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="run no program: serve clients (dragon.init(connect=FILE)) until stopped (then exit status 0)",
    )
    p.add_argument(
        "--connect-file",
        metavar="PATH",
        help="with --serve: where to write the connection file (default ~/.dragon/JOB.json)",
    )
    p.add_argument("--stop", metavar="FILE", help="end the runtime that wrote the connection file FILE")
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
        if a in ("--grace", "--connect-file", "--stop"):
            i += 2
        elif a.startswith(("--grace=", "--connect-file=", "--stop=")) or a in (
            "-h",
            "--help",
            "--virtual-nodes",
            "--gs-rank",
            "--no-gs-rank",
            "--serve",
        ):
            i += 1
        else:
            break
    return argv[:i], argv[i:]


def _std_fds_open():
    """A closed stdin, stdout or stderr (``dragon-launch app.py >&-``) becomes /dev/null: else the first
    file the runtime opens takes its number, and the program's or the shepherd's output goes into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv=None):
    _std_fds_open()
    argv = sys.argv[1:] if argv is None else list(argv)
    own, rest = _split(argv)
    p = parser()
    ns = p.parse_args(own)
    if not 0 <= ns.grace < float("inf"):  # (also refuses nan)
        p.error(f"--grace must be a number of seconds >= 0, not {ns.grace}")
    if ns.stop is not None:
        if ns.serve or rest:
            p.error("--stop FILE takes no program and no --serve")
        from launcher import serve

        sys.exit(serve.stop(ns.stop))
    if ns.connect_file is not None and not ns.serve:
        p.error("--connect-file goes with --serve")
    serving = None
    if ns.serve:
        if rest:
            p.error(f"--serve runs no program (got {' '.join(rest)})")
        from launcher.serve import Serving

        serving = Serving(connect_file=ns.connect_file)
        exe, args = None, ()
    elif rest[:1] == ["-m"]:
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
    try:  # the settings of the environment, checked before anything starts
        env.seconds(env.SERVICE_TIMEOUT, SERVICE_TIMEOUT)
        env.infra_pool_size()
    except ValueError as e:
        p.error(str(e))
    from launcher import multinode

    if os.environ.get("SLURM_JOB_ID"):  # segments that SIGKILLed jobs left on this node, where no epilog runs
        from launcher import cleanup

        gone = cleanup.remove_stale_slurm_segments()
        if gone:
            log(
                f"removed {len(gone)} segment(s) that ended Slurm jobs left in /dev/shm: {' '.join(gone[:5])}"
            )
    if ns.virtual_nodes or ns.gs_rank or multinode.under_mpi():
        # one runtime across the MPI job's nodes; a normal exit: after MPI, os._exit can lose the exit status
        # on its way through mpiexec
        sys.exit(
            multinode.main(exe, args, ns.virtual_nodes, grace=ns.grace, gs_rank=ns.gs_rank, serving=serving)
        )
    if serving is not None:
        from launcher import serve

        code = serve.run(ns.grace, serving)
    else:
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
