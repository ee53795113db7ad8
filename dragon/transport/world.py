"""The job's world as MPI gives it: which rank is which node, who runs the node's services and agent, and
which rank (if any) runs global services on its own.

``World(comm, virtual, gs_rank)``: every rank calls it (collective). Ranks are grouped into nodes by their
real host (``uname``; first appearance order, so rank 0 is on node 0), or, with ``virtual=True``, each rank is
its own node. The lowest rank of a node is its *leader*: it runs the node's transport agent (and the
launcher's work for the node); other ranks of the node only wait for the end of the job.

**The global-services rank** (``gs_rank_of``): global services runs on a rank of its own, which is no node (no
shepherd, no managed process, not in ``node.get_list()``) but has a transport agent, at transport index
``nnodes`` (``DRAGON_GS_NODE``), when

- ``gs_rank=True`` (``dragon-launch --gs-rank``): the highest-numbered rank that is not its host's lowest
  rank; if every host has one rank, or with ``--virtual-nodes``, the last rank (a host of its own then runs no
  node); refused in a world of one rank;
- ``gs_rank=None`` (the default) and, without ``--virtual-nodes``, the world has exactly one rank more than
  hosts (``srun -N 2 -n 3``): that extra rank;
- never with ``gs_rank=False`` (``--no-gs-rank``).

Otherwise global services runs beside node 0's launcher, on node 0 (``DRAGON_GS_NODE=0``).

**Node names** (``node_name``): the Slurm node name (``SLURMD_NODENAME``) when srun itself started this rank,
else ``uname``. They only name nodes; grouping is always by real host.
"""

import os
import sys
import time

from dragon import env

NETMOD_VAR = "MPIR_CVAR_CH4_NETMOD"


def mpi_netmod_workaround(library_version, environ):
    """The MPICH netmod to force before MPI_Init, or None. The ``mpich`` wheel (MPICH 5.0.2, ch4:ucx and ofi)
    under srun's PMI-2 fails in MPI_Init now and then (``mpi/pmi2: value not properly terminated``, UCX
    ``failed to unpack address``) in a way that depends on the process's heap layout (a longer program path
    was enough to trigger it, every time); the ofi netmod never did in the same runs. A user's own choice is
    kept."""
    if NETMOD_VAR in environ or "PMI_FD" not in environ or "SLURM_STEP_ID" not in environ:
        return None
    return srun_netmod(library_version)


def srun_netmod(library_version):
    """The netmod mpi_netmod_workaround() forces for a rank of this MPI library under srun, or None (also
    what dragon-bench gives the programs it starts with srun itself)."""
    if "MPICH" in library_version and "ch4:ucx" in library_version and "ofi" in library_version:
        return "ofi"
    return None


def init_mpi():
    """Initialize MPI (thread-multiple) for a dragon rank, with mpi_netmod_workaround(); -> mpi4py's MPI
    module."""
    import mpi4py

    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = True  # at exit, unless the caller finalized already
    from mpi4py import MPI

    if not MPI.Is_initialized():
        netmod = mpi_netmod_workaround(MPI.Get_library_version(), os.environ)
        if netmod is not None:
            os.environ[NETMOD_VAR] = netmod
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    return MPI


def wait_barrier(comm, timeout=None):
    """A barrier that sleeps instead of busy-polling (MPICH's blocking calls spin); False after timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    req = comm.Ibarrier()
    while not req.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def mpi_segments():
    """Names of the /dev/shm segments the MPI library of this process has mapped (MPICH: mpich_shm_*); a
    shepherd whose launcher rank was killed unlinks them, which MPICH would have done at MPI_Finalize."""
    names = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if path.startswith("/dev/shm/") and not path.startswith("/dev/shm/dragon-"):
                    names.add(path[len("/dev/shm/") :].replace(" (deleted)", ""))
    except OSError:
        pass
    return sorted(n for n in names if "/" not in n)


def end_rank(comm, timeout, code, say, failed=1):
    """The last step of a rank: the final barrier, for at most timeout seconds. If a rank does not come (it
    died, or hangs: srun keeps the others running), MPI_Finalize could wait for it for good: this rank says so
    (say(text)), removes what MPI_Finalize would have (its MPI library's /dev/shm segments) and exits at once
    with code, or failed if code is 0. Returns when every rank came (the caller finalizes as usual)."""
    if wait_barrier(comm, timeout):
        return
    rank = comm.Get_rank()
    say(f"rank {rank}: not every rank reached the end within {timeout:g} s; leaving without MPI_Finalize")
    for name in mpi_segments():
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or failed)


def node_name(environ, rank, size, uname=None):
    """The name of this rank's node as users know it: ``SLURMD_NODENAME`` if srun started this very rank (a
    job step, ``SLURM_PROCID`` equal to the MPI rank, ``SLURM_STEP_NUM_TASKS`` equal to the MPI world's size),
    else ``uname``.  mpiexec copies its own environment to every rank, so inside an sbatch script every rank
    of an ``mpiexec`` would see the batch host's SLURMD_NODENAME: those checks refuse it (``World`` also drops
    the Slurm names if they disagree with the real hosts)."""
    uname = os.uname().nodename if uname is None else uname
    name = environ.get("SLURMD_NODENAME", "")
    if not name or not environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "")).isdigit():
        return uname
    if environ.get("SLURM_PROCID") != str(rank) or environ.get("SLURM_STEP_NUM_TASKS") != str(size):
        return uname
    return name


def consistent_names(hosts, names):
    """names (one per rank) if they map one-to-one onto the real hosts, else the hosts themselves."""
    fwd, back = {}, {}
    for h, n in zip(hosts, names):
        if fwd.setdefault(h, n) != n or back.setdefault(n, h) != h:
            return list(hosts)
    return list(names)


def gs_rank_of(hosts, virtual, want):
    """(GS rank or None, error text or None) for a world whose rank r runs on real host hosts[r]; want: True
    (--gs-rank), None (automatic) or False (--no-gs-rank).  See the module doc."""
    size = len(hosts)
    if want is False:
        return None, None
    if virtual:
        if not want:
            return None, None
        return (size - 1, None) if size >= 2 else _one_rank()
    first = {}
    extras = [r for r, h in enumerate(hosts) if first.setdefault(h, r) != r]
    if want is None:
        return (extras[0], None) if len(extras) == 1 else (None, None)
    if extras:
        return extras[-1], None
    # one rank per host: the last host is given to global services alone
    return (size - 1, None) if size >= 2 else _one_rank()


def _one_rank():
    return None, (
        "--gs-rank: global services needs a rank of its own besides at least one node, and the MPI world has "
        "1 rank: start one rank more than nodes, e.g. srun -N 2 -n 3 dragon-launch app.py, or "
        "mpiexec -n 3 dragon-launch --virtual-nodes --gs-rank app.py on one host"
    )


class World:
    def __init__(self, comm, virtual=False, gs_rank=None):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.virtual = bool(virtual)
        uname = os.uname().nodename
        me = (uname, node_name(os.environ, self.rank, self.size, uname), len(os.sched_getaffinity(0)))
        everyone = comm.allgather(me)
        hosts = [e[0] for e in everyone]
        names = consistent_names(hosts, [e[1] for e in everyone])
        self.gs_rank, self.error = gs_rank_of(hosts, self.virtual, gs_rank)
        node_ranks = [r for r in range(self.size) if r != self.gs_rank]
        if self.virtual:
            node_of_rank = {r: k for k, r in enumerate(node_ranks)}
        else:
            index = {}
            node_of_rank = {r: index.setdefault(hosts[r], len(index)) for r in node_ranks}
        self.node_of_rank = [node_of_rank.get(r) for r in range(self.size)]  # None: the GS rank
        self.nnodes = max(node_of_rank.values()) + 1 if node_of_rank else 0
        leaders = {}
        for r in node_ranks:  # in rank order: the first rank seen on a node leads it
            leaders.setdefault(node_of_rank[r], r)
        self.node_ranks = [leaders[n] for n in range(self.nnodes)]  # leader rank of each node
        self.is_gs = self.rank == self.gs_rank
        self.node = self.node_of_rank[self.rank]
        self.leader = not self.is_gs and self.node_ranks[self.node] == self.rank
        self.hostnames = [names[r] for r in self.node_ranks]
        self.cpus = [everyone[r][2] for r in self.node_ranks]
        self.host_nodes = [k for k in range(self.nnodes) if hosts[self.node_ranks[k]] == uname]  # (in order)
        # transport endpoints: node k is endpoint k; the GS rank (if any) is endpoint nnodes
        self.gs_node = self.nnodes if self.gs_rank is not None else 0
        self.endpoints = self.nnodes + (self.gs_rank is not None)
        self.gs_host = names[self.gs_rank] if self.gs_rank is not None else None
        self.endpoint = self.gs_node if self.is_gs else self.node  # this rank's index among the endpoints

    def nodes(self):
        """[{index, hostname, cpus}] of every node (what global services lists; never the GS rank)."""
        return [{"index": k, "hostname": self.hostnames[k], "cpus": self.cpus[k]} for k in range(self.nnodes)]

    def describe(self, k):
        """Endpoint k as messages name it: ``node 1 (host)`` or ``the global-services rank 2 (host)``."""
        if self.gs_rank is not None and k == self.gs_node:
            return f"the global-services rank {self.gs_rank} ({self.gs_host})"
        host = self.hostnames[k] if 0 <= k < len(self.hostnames) else "?"
        return f"node {k} ({host})"

    def job_of_node(self, job, node=None):
        """The segment namespace (DRAGON_JOB) of a node: every node has its own, so that virtual nodes on one
        host never share a segment, and cleanup of one node never touches another's; the GS rank's is
        ``<job>gs``."""
        if node is None and self.is_gs:
            return f"{job}gs"
        return f"{job}n{self.node if node is None else node}"


CPU_BINDING = env.CPU_BINDING


def cpu_share(cpus, nodes_here, index):
    """The CPUs of the ``index``-th of ``nodes_here`` virtual nodes on one host with ``cpus`` (a sorted list):
    an even share, as separate nodes would have CPUs of their own, or None (no share: all of them) when the
    CPUs do not split evenly between the nodes (nor the nodes between the CPUs: then nodes share a CPU)."""
    n = len(cpus)
    if nodes_here < 2 or n < 2 or (n % nodes_here and nodes_here % n):
        return None
    if nodes_here <= n:
        return cpus[index * n // nodes_here : (index + 1) * n // nodes_here]
    return [cpus[index * n // nodes_here]]


def node_cpu_binding(world, environ=os.environ):
    """The CPUs a serving rank takes for its node before it starts anything (its services, agent and managed
    processes inherit them). srun (--cpu-bind, task/affinity) and mpiexec (-bind-to) bind a rank to the CPUs
    of one task, so by default (DRAGON_CPU_BINDING=node) it takes every CPU its cgroup allows (the kernel
    keeps sched_setaffinity inside the cpuset); a virtual node takes its even share of them, as a node of its
    own would have its own CPUs (see cpu_share: on 2 CPUs, two virtual nodes get one each). host: every
    CPU, also for a virtual node; keep: the binding as given. -> the CPU set now."""
    mode = environ.get(CPU_BINDING, "node").strip().lower() or "node"
    if mode not in ("node", "host", "keep"):
        print(
            f"dragon: {CPU_BINDING}={mode!r}: expected 'node', 'host' or 'keep'; using 'node'",
            file=sys.stderr,
        )
        mode = "node"
    if mode != "keep":
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:  # (no CPU of the range allowed: keep what we have)
            pass
    if mode == "node" and world.virtual and world.leader:
        share = cpu_share(
            sorted(os.sched_getaffinity(0)), len(world.host_nodes), world.host_nodes.index(world.node)
        )
        if share:
            os.sched_setaffinity(0, share)
    return os.sched_getaffinity(0)
