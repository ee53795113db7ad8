"""The transport alone between the test cluster's two hosts (``srun -N 2 python -m dragon.transport.harness
tests/mpi_apps/transport_app.py CASE``): MPI over the network (ofi), each agent on a host of its own. Big
payloads both ways at once, bounded in flight (the hang tests/test_transport.py caught showed on virtual
nodes, MPICH's shared-memory path, where a big send waits for the receiver; over ofi the old agent passed this
too).

Not here yet: programs that end mid-stream both ways (``bigquit``). Between the hosts one harness rank still
waits for good in its final barrier about 1 run in 12 (6 runs in 6 before the agents kept receiving while they
finish): the harness stops its agents without the launcher's goodbyes, so an agent can stop receiving while
the other still has big sends for it."""

import os
import sys

import pytest
from slurm_util import ON_NODES, no_leaked_node_segments, slurm_cluster, srun

__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

pytestmark = ON_NODES

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "transport_app.py")


def harness(*args, timeout=90):
    res = srun([sys.executable, "-m", "dragon.transport.harness", APP, *args], nodes=2, timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.timeout(150)
def test_big_messages_both_ways_more_in_flight_than_mpi_gets_do_not_hang(slurm_cluster):
    for _ in range(2):
        out = harness("bigboth", "120", timeout=60)
        assert out.count("bigboth ok 720") == 2, out
