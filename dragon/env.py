"""The environment contract between the runtime and every managed process: every ``DRAGON_*`` variable.

A leaf module (it imports nothing of the project), like ``dragon.errors``: every layer, ``dragon._core``
included, reads and writes the runtime's environment variables through the names defined here.

The shepherd puts these variables into the environment of each process it starts (on top of the inherited
environment and the user's ``env``). Serialized descriptors are hex strings. A process with no
``DRAGON_GS_CD`` is not running under ``dragon-launch``.
"""

import os

JOB = "DRAGON_JOB"  # job id: prefix of every shared-memory segment of the job
PUID = "DRAGON_PUID"  # this process's p_uid
NODE = "DRAGON_NODE"  # index of the node this process runs on
GS_CD = "DRAGON_GS_CD"  # global services input channel
REPLY_CD = "DRAGON_REPLY_CD"  # this process's own reply channel (made by the shepherd before spawn)
INF_PD = "DRAGON_INF_PD"  # the node's infrastructure pool
SHEP_PID = "DRAGON_SHEP_PID"  # pid of the shepherd that started this process (to tell a descendant from it)
INFRA_POOL_SIZE = (
    "DRAGON_INFRA_POOL_SIZE"  # bytes of each node's infrastructure pool (suffix K, M or G; default 64M)
)
LOG = "DRAGON_LOG"  # "debug" for verbose service logs (default: warnings and errors only)
REQUEST_TIMEOUT = "DRAGON_REQUEST_TIMEOUT"  # seconds a client waits for a reply (default 60)
SERVICE_TIMEOUT = "DRAGON_SERVICE_TIMEOUT"  # seconds a service may leave its launcher's pings unanswered (30)
# seconds a process ending waits for its sends to channels on other nodes to land there (default 60)
EXIT_FLUSH = "DRAGON_EXIT_FLUSH_TIMEOUT"
# multi-node jobs (set by the launcher of each node, inherited by its services and managed processes) where
# global services runs, as a transport index (default 0): node 0, or the number of nodes when GS has an MPI
# rank of its own, which is no node (dragon-launch --gs-rank; see dragon.transport.world)
GS_NODE = "DRAGON_GS_NODE"
GW_CD = "DRAGON_GW_CD"  # this node's transport gateway channel (the transport agent's input)
CPU_BINDING = (
    # node (default): a serving rank takes its node's CPUs (every CPU it may use; a virtual node its even
    # share of the host's); host: every CPU, also for a virtual node; keep: as bound
    "DRAGON_CPU_BINDING"
)
AGENT_PROFILE = (
    "DRAGON_AGENT_PROFILE"  # a path: profile each transport agent's loop into path.<node> (cProfile)
)
NNODES = "DRAGON_NNODES"  # (dragon.transport.harness) how many nodes the harness runs its program on
TEST_CHANS = (
    "DRAGON_TEST_CHANS"  # (dragon.transport.harness) json {node: {name: hex sdesc}} of its test channels
)
BENCH_MPI = "DRAGON_BENCH_MPI"  # (dragon.transport.bench, between its processes) mpi4py's figures, json
BENCH_JSON = "DRAGON_BENCH_JSON"  # (dragon.transport.bench, between its processes) where --json writes
SPIN_NS = (
    "DRAGON_SPIN_NS"  # how long blocking receives of the services and clients spin before they sleep (ns)
)
# "0": leave glibc's malloc settings of a process alone (by default a process that receives batches of big
# messages keeps freed memory in its heap: dragon._core.core.keep_freed_memory)
KEEP_FREED_MEMORY = "DRAGON_KEEP_FREED_MEMORY"
# clients: processes outside the job that dragon.init() attached (dragon.attach)
CONNECT = "DRAGON_CONNECT"  # the connection file dragon.init() attaches to (dragon-launch --serve writes it)
# multiprocessing's 'dragon' start method (dragon.mp) and each node's zygote
ZYGOTE_PRELOAD = "DRAGON_ZYGOTE_PRELOAD"  # modules (comma-separated) the zygote imports before forking
MP_HEAP_SIZE = "DRAGON_MP_HEAP_SIZE"  # bytes of the pool a process makes for its mp objects (default 1G)
MP_BOOT = "DRAGON_MP_BOOT"  # (parent -> child) the pickled Process, base64
MP_BOOT_CD = "DRAGON_MP_BOOT_CD"  # (parent -> child) or the sdesc (hex) of a channel holding it
MP_PARENT = "DRAGON_MP_PARENT"  # (parent -> child) "p_uid:node:pid" of the parent
MP_TRACKER = "DRAGON_MP_TRACKER"  # (parent -> child) "pid:fd" of the parent's resource tracker (same node)
MP_STATUS_CD = "DRAGON_MP_STATUS_CD"  # (parent -> child) sdesc (hex) of the channel a child says its exit in
# (parent -> child) what a spawned child inherits of its parent and a zygote's fork does not: umask, niceness,
# resource limits, CPU affinity (same node), ignored signals (see dragon.mp.popen.inherited)
MP_INHERIT = "DRAGON_MP_INHERIT"

ALL = (JOB, PUID, NODE, GS_CD, REPLY_CD, INF_PD, SHEP_PID)
# what a client is given (dragon.init() puts it into os.environ): GS's public inbox, node 0's infrastructure
# pool and transport gateway, the job and the node; never a reply channel (it makes its own) nor the job's key
CLIENT = (JOB, NODE, GS_CD, INF_PD, GW_CD, GS_NODE)


def new_job_id(environ=None, kind="j"):
    """A fresh job id: kind ("j" a runtime's job, "t" the transport harness's) and random hex. Inside a Slurm
    job it starts with ``s<SLURM_JOB_ID>_``, so that whatever outlives the job (a segment left by a SIGKILL)
    can be found and removed by the job's id alone, e.g. by a Slurm epilog."""
    environ = os.environ if environ is None else environ
    sid = environ.get("SLURM_JOB_ID", "")
    prefix = f"s{sid}_" if sid.isdigit() else ""
    return f"{prefix}{kind}{os.urandom(5).hex()}"


def size_setting(name, default, environ=None):
    """A size in bytes from environment variable ``name`` (suffix K, M or G allowed); default if unset."""
    environ = os.environ if environ is None else environ
    text = environ.get(name, "").strip()
    if not text:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise ValueError(f"{name}={text!r}: expected a size in bytes such as 67108864, 64M or 1G")
    return int(digits) * scale


def infra_pool_size(environ=None, default=64 << 20):
    """The size of a node's infrastructure pool (service channels, gateway, staging):
    DRAGON_INFRA_POOL_SIZE."""
    return size_setting(INFRA_POOL_SIZE, default, environ)


def spin_ns(environ=None):
    """DRAGON_SPIN_NS as an int (None if unset or not a number: the core's default applies)."""
    text = (os.environ if environ is None else environ).get(SPIN_NS, "")
    return int(text) if text.strip().isdigit() else None


def seconds(name, default, environ=None):
    """A positive number of seconds from the environment variable name (default if unset; ValueError naming
    the variable if it is not a positive number)."""
    text = (os.environ if environ is None else environ).get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def enc(sdesc):
    return bytes(sdesc).hex()


def dec(text):
    return bytes.fromhex(text)


def contract(job, p_uid, node, gs_cd, reply_cd, inf_pd, shep_pid):
    """The variables a managed process gets (sdescs as bytes in, hex strings out). Not among them: the inboxes
    of the shepherds and the launchers, and the job's key (see dragon.infrastructure.messages): a managed
    process reaches the runtime only through global services' public inbox."""
    return {
        JOB: job,
        PUID: str(p_uid),
        NODE: str(node),
        GS_CD: enc(gs_cd),
        REPLY_CD: enc(reply_cd),
        INF_PD: enc(inf_pd),
        SHEP_PID: str(shep_pid),
    }


def in_runtime(environ=None):
    return GS_CD in (os.environ if environ is None else environ)
