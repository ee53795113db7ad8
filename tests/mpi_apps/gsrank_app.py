"""Programs for the global-services-rank tests of tests/test_multinode.py (and the Slurm one), run as
``mpiexec -n 3 dragon-launch --virtual-nodes --gs-rank gsrank_app.py CASE``: nodes 0 and 1, and rank 2 running
global services alone (transport index 2). Prints "<case> ok" when its checks pass."""

import os
import signal
import sys
import time

from multinode_app import PY, SIZES, attach, payload

from dragon.errors import DragonError, PoolError, ProcessError
from dragon.globalservices import channel, node, pool, process

HERE = os.path.abspath(__file__)


def _base_job():
    job = os.environ["DRAGON_JOB"]  # <job>n0 on node 0
    assert job.endswith("n0"), job
    return job[:-2]


def _service(job, kind):
    """pid of the service KIND ("gs", "shepherd") that runs with DRAGON_JOB=job, or None."""
    needle = f"DRAGON_JOB={job}\0".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read() + b"\0"
        except OSError:
            continue
        if b"--service" in cmd and kind.encode() in cmd and needle in env:
            return int(d)
    return None


def _gs_process(job):
    """pid of the global-services process of the job (on the GS rank: DRAGON_JOB=<job>gs)."""
    return _service(f"{job}gs", "gs")


def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def case_gsrank(nnodes="2"):
    nn = int(nnodes)
    gs_node = int(os.environ["DRAGON_GS_NODE"])
    assert gs_node == nn, (gs_node, nn)  # GS is the transport endpoint after the nodes
    assert node.get_list() == list(range(nn)), node.get_list()  # the GS rank is not a node
    try:
        node.query(gs_node)
        raise AssertionError("node.query found the GS rank")
    except DragonError:
        pass
    hosts = [node.query(k).hostname for k in range(nn)]
    for k in range(nn):  # a process on every node, that itself asks GS (through the transport)
        d = process.create(PY, None, [HERE, "child", str(k)], user_name=f"child{k}", options={"node": k})
        assert d.node == k and d.hostname == hosts[k], d
        assert process.join(d.p_uid, timeout=60) == 0, process.query(d.p_uid)
    for bad in (gs_node, nn + 1):
        try:
            process.create(PY, None, ["-c", "pass"], options={"node": bad})
            raise AssertionError(f"a process was placed on node {bad}")
        except ProcessError as e:
            assert f"no node {bad}" in str(e), e
        try:
            pool.create(1 << 20, pool_options={"node": bad})
            raise AssertionError(f"a pool was placed on node {bad}")
        except PoolError:
            pass
    # a pool and a channel on the last node, used from here
    pd = pool.create(16 << 20, user_name="far", pool_options={"node": nn - 1})
    cd = channel.create(pd.m_uid, user_name="farch", channel_options={"capacity": 16})
    assert cd.node == nn - 1, cd
    ch = attach(cd)
    for i, n in enumerate(SIZES):
        ch.send(payload(i, n))
        assert ch.recv(timeout=30) == payload(i, n)
    ch.close()
    channel.destroy(cd.c_uid)
    pool.destroy(pd.m_uid)
    # channel.join across nodes, arbitrated by GS on its rank
    waiter = process.create(PY, None, [HERE, "join_waiter"], options={"node": 0})
    maker = process.create(PY, None, [HERE, "join_maker", str(nn - 1)], options={"node": nn - 1})
    assert process.join(maker.p_uid, timeout=60) == 0
    assert process.join(waiter.p_uid, timeout=60) == 0
    if "DRAGON_TEST_VIRTUAL" in os.environ:  # one host: nothing of the job runs a shepherd on the GS rank
        job = _base_job()
        assert _service(f"{job}gs", "shepherd") is None
        assert _gs_process(job) is not None
        assert _service(f"{job}n0", "shepherd") is not None and _service(f"{job}n0", "gs") is None
    print("gsrank ok", hosts, flush=True)


def child(k):
    me = process.this_process()
    assert me.node == int(k) == int(os.environ["DRAGON_NODE"]), me
    assert os.environ["DRAGON_GS_NODE"] != os.environ["DRAGON_NODE"]
    assert process.query(me.p_uid).p_uid == me.p_uid
    print("child on node", k, "nodes", node.get_list(), flush=True)


def join_waiter():
    d = channel.join("meet", timeout=60)
    assert attach(d).recv(timeout=30) == b"hello"


def join_maker(k):
    d = channel.create(None, user_name="meet")
    assert d.node == int(k), d
    attach(d).send(b"hello")


def case_killgs():
    """SIGKILL the global-services process on its rank: the job ends at once, non-zero, naming that rank."""
    d = process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": 1})
    pid = _gs_process(_base_job())
    assert pid, "no global-services process found"
    print(f"killing global services (pid {pid})", flush=True)
    os.kill(pid, signal.SIGKILL)
    try:
        process.join(d.p_uid, timeout=60)
    except DragonError:
        pass
    time.sleep(60)  # the launcher ends the job long before this
    print("killgs: still alive", flush=True)


def case_killgsrank():
    """SIGKILL the GS rank's launcher (its agent): mpiexec ends every rank; nothing may be left behind."""
    process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": 1})
    rank = _ppid(_gs_process(_base_job()))
    print(f"killing the global-services rank's launcher (pid {rank})", flush=True)
    os.kill(rank, signal.SIGKILL)
    time.sleep(60)
    print("killgsrank: still alive", flush=True)


def case_forever():
    """A sleeping process on every node, then wait to be cancelled."""
    for k in node.get_list():
        process.create(PY, None, ["-c", "import time; time.sleep(120)"], options={"node": k})
    print("ready", flush=True)
    time.sleep(120)
    print("forever: still alive", flush=True)


def case_rtt(count="300"):
    """Round trips of a GS query (node.get_list) from node 0 and from a process on node 1: min and median
    us."""
    here = _rtt(int(count))
    d = process.create(PY, None, [HERE, "rtt_child", count], user_name="rtt", options={"node": 1})
    assert process.join(d.p_uid, timeout=120) == 0
    print(f"rtt node0 {here[0]:.1f} {here[1]:.1f} us (GS on node {os.environ['DRAGON_GS_NODE']})", flush=True)


def _rtt(n):
    node.get_list()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        node.get_list()
        t.append(time.perf_counter() - t0)
    t.sort()
    return t[0] * 1e6, t[len(t) // 2] * 1e6


def rtt_child(count):
    lo, med = _rtt(int(count))
    print(f"rtt node1 {lo:.1f} {med:.1f} us", flush=True)


if __name__ == "__main__":
    what = sys.argv[1]
    fn = globals().get("case_" + what) or globals()[what]
    fn(*sys.argv[2:])
