"""The transport alone between the test cluster's two hosts (``srun -N 2 python -m dragon.transport.harness
tests/mpi_apps/transport_app.py CASE``): MPI over the network (ofi), each agent on a host of its own. Big
payloads both ways at once, bounded in flight (the hang tests/test_transport.py caught showed on virtual
nodes, MPICH's shared-memory path, where a big send waits for the receiver; over ofi the old agent passed this
too), and programs that end mid-stream both ways: between the hosts one harness rank waited for good in its
final barrier in 1 run of 12-30 while an agent could stop before the other had sent it everything (6 runs in 6
before the agents kept receiving while they finish), none in 120 since they stop in step (LAST frames)."""

import os
import sys

import pytest
from slurm_util import ON_NODES, kill_listed, no_leaked_node_segments, slurm_cluster, srun

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


@pytest.mark.timeout(200)
def test_programs_ending_mid_stream_both_ways_end_the_job_between_the_hosts(slurm_cluster, tmp_path):
    """Each node's program exits while its senders still stream big messages to the other host: the agents
    stop with big payloads in flight both ways, and every rank must still end (no rank left in its final
    barrier, no crash); four in a row."""
    pids = tmp_path / "pids"
    try:
        for _ in range(4):
            out = harness("bigquit", "0.6", str(pids), timeout=45)
            assert out.count("bigquit ok") == 2, out
            kill_listed(pids)
    finally:
        kill_listed(pids)


@pytest.mark.timeout(120)
@pytest.mark.mpi_leftovers_ok  # (the killed rank's own MPICH segments go with the job's epilog)
def test_a_harness_rank_that_dies_ends_the_job_naming_its_node(slurm_cluster):
    """Node 1's harness rank is SIGKILLed while node 0's program would run for 60 s more: node 0's agent
    finds node 1 unreachable (MPI refuses the send; else the heartbeats' silence, 15 s), stops its program
    and ends at once without waiting for a final barrier that node 1 never reaches (it waited for good)."""
    res = srun([sys.executable, "-m", "dragon.transport.harness", APP, "rankdies", "60"], nodes=2, timeout=90)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "node 1 is lost" in res.stderr and "this node's program is stopped" in res.stderr, out
    assert "never stopped" not in out, out  # (it would print after its 60 s)
