"""The job's world as MPI gives it: which rank is which node, who runs the node's services and agent.

``World(comm, virtual)``: every rank calls it (collective). Ranks are grouped into nodes by host name (first
appearance order, so rank 0 is on node 0), or, with ``virtual=True``, each rank is its own node. The lowest rank
of a node is its *leader*: it runs the node's transport agent (and the launcher's work for the node); other
ranks of the node only wait for the end of the job.
"""

import os


class World:
    def __init__(self, comm, virtual=False):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.virtual = bool(virtual)
        me = (os.uname().nodename, len(os.sched_getaffinity(0)))
        everyone = comm.allgather(me)
        if self.virtual:
            node_of_rank = list(range(self.size))
        else:
            index = {}
            node_of_rank = [index.setdefault(h, len(index)) for h, _ in everyone]
        self.node_of_rank = node_of_rank
        self.nnodes = max(node_of_rank) + 1
        self.node = node_of_rank[self.rank]
        self.node_ranks = [node_of_rank.index(k) for k in range(self.nnodes)]  # leader rank of each node
        self.leader = self.node_ranks[self.node] == self.rank
        self.hostnames = [everyone[r][0] for r in self.node_ranks]
        self.cpus = [everyone[r][1] for r in self.node_ranks]

    def nodes(self):
        """[{index, hostname, cpus}] of every node (what global services lists)."""
        return [{"index": k, "hostname": self.hostnames[k], "cpus": self.cpus[k]} for k in range(self.nnodes)]

    def job_of_node(self, job, node=None):
        """The segment namespace (DRAGON_JOB) of a node: every node has its own, so that virtual nodes on one
        host never share a segment, and cleanup of one node never touches another's."""
        return f"{job}n{self.node if node is None else node}"
