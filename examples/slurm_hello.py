"""Hello from every node of a Slurm allocation: processes on each node, channels between the nodes.

    sbatch slurm/dragon.sbatch examples/slurm_hello.py            # on 2 (or more) nodes
    srun -N 2 --ntasks-per-node=1 dragon-launch examples/slurm_hello.py [EXIT_CODE]
    mpiexec -n 3 dragon-launch --virtual-nodes examples/slurm_hello.py   # without Slurm, 3 nodes on one host

The program runs once, on node 0.  It makes, on every node k, a pool and an inbox channel, and starts one
worker process there (ProcessOptions(node=k), i.e. options={"node": k}).  It sends each worker a number
through that worker's inbox (node 0 -> node k); the worker adds up the numbers below it and sends the sum,
with where it runs (host name, Slurm's node name and node id), back through a channel on node 0 (node k ->
node 0).  The workers' own prints reach this program's output labelled with their names ([worker0] ...),
whatever node they ran on. The program checks every answer, destroys what it made and exits with EXIT_CODE
(default 0), or 1 when a check failed.
"""

import os
import socket
import sys

from dragon.channels import Channel
from dragon.globalservices import channel, node, pool, process


def where():
    """This process's node as the OS, Slurm and dragon see it."""
    return {
        "host": socket.gethostname(),
        "slurm_node": os.environ.get("SLURMD_NODENAME", "-"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID", "-"),
        "dragon_node": process.this_process().node,
    }


def worker(k):
    me = where()
    inbox = Channel.attach(channel.query(f"inbox{k}").sdesc)  # lives on this node
    # "answers" lives on node 0: from another node, sends go through the transport agents
    answers = Channel.attach(channel.query("answers").sdesc)
    n = int(inbox.recv(timeout=60).decode())
    total = sum(range(n))
    print(
        f"worker {k} on host {me['host']} (Slurm node {me['slurm_node']}, SLURM_NODEID {me['slurm_nodeid']},"
        f" dragon node {me['dragon_node']}): sum(range({n})) = {total}",
        flush=True,
    )
    answers.send(repr((k, n, total, me)).encode(), timeout=60)
    return 0


def main(exit_code):
    import ast

    nodes = node.get_list()
    hosts = {k: node.query(k).hostname for k in nodes}
    print(f"{len(nodes)} node(s): " + ", ".join(f"{k}={h}" for k, h in hosts.items()), flush=True)
    home = pool.create(4 << 20, user_name="answers-pool", pool_options={"node": 0})
    answers_d = channel.create(home.m_uid, user_name="answers", channel_options={"capacity": 64})
    answers = Channel.attach(answers_d.sdesc)
    made, workers, inboxes = [], [], {}
    for k in nodes:
        pd = pool.create(4 << 20, user_name=f"pool{k}", pool_options={"node": k})
        cd = channel.create(pd.m_uid, user_name=f"inbox{k}", channel_options={"capacity": 8})
        made.append((cd.c_uid, pd.m_uid))
        inboxes[k] = Channel.attach(cd.sdesc)  # on node k: the head's sends go through the transport
        w = process.create(
            sys.executable, None, [__file__, "worker", str(k)], user_name=f"worker{k}", options={"node": k}
        )
        assert w.node == k, w
        workers.append(w)
    for k in nodes:
        inboxes[k].send(str(1000 * (k + 1)).encode(), timeout=60)
    ok = True
    seen = set()
    for _ in nodes:
        k, n, total, there = ast.literal_eval(answers.recv(timeout=60).decode())
        seen.add(k)
        good = (
            total == sum(range(n))
            and there["dragon_node"] == k
            and there["host"] == hosts[k]
            and there["slurm_node"] in ("-", hosts[k])
        )
        ok &= good
        print(f"answer from node {k} ({there['host']}): {total} {'ok' if good else 'WRONG'}", flush=True)
    codes = [process.join(w.p_uid, timeout=60) for w in workers]
    ok &= seen == set(nodes) and codes == [0] * len(nodes)
    for ch in (answers, *inboxes.values()):
        ch.close()
    for c_uid, m_uid in made:
        channel.destroy(c_uid)
        pool.destroy(m_uid)
    channel.destroy(answers_d.c_uid)
    pool.destroy(home.m_uid)
    print(
        f"workers exited with {codes}; hello from {len(nodes)} node(s) {'done' if ok else 'FAILED'}",
        flush=True,
    )
    return exit_code if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        sys.exit(worker(int(sys.argv[2])))
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
