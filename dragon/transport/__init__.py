"""dragon.transport: channels across nodes.

- ``world``: the job's world from MPI (ranks grouped into nodes by host, or one node per rank with
  ``--virtual-nodes``; the lowest rank of a node is its leader).
- ``agent``: the transport agent, one per node, a thread of the node's launcher rank: the only code that
  speaks MPI (mpi4py point-to-point, non-blocking, never a busy-polling blocking call except to receive a
  packet that has already arrived).
- processes reach the agent through ``dragon._core.remote`` (``RemoteChannel``, the Channel API for a channel
  on another node, which ``Channel.attach`` returns) in the frames of ``dragon._core.frames``; both live in
  ``dragon._core`` because every process uses them, and nothing but the launcher imports this package.
- ``harness``: run one program per node with the transport only (tests, benchmark); ``bench``: the cross-node
  benchmark against mpi4py Send/Recv.

The multi-node launcher that puts these together with the services is ``launcher.multinode``.
"""
