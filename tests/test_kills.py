"""Processes SIGKILLed in the middle of cross-node traffic, on virtual nodes (``mpiexec -n 3 dragon-launch
--virtual-nodes tests/mpi_apps/kills_app.py CASE``, and mp_qkill_app.py for the multiprocessing layer): what
docs/DESIGN.md's failure model promises when a receiver or a sender dies mid-stream. tests/test_delivery.py
covers senders that end right after their last send and a receiver killed while it waits with nothing in
hand; these kill while messages flow. mpi_util.launch fails a test that leaves a process behind, conftest one
that leaves a segment."""

import os

import pytest
from mpi_util import launch

pytestmark = pytest.mark.mpi

APPS = os.path.join(os.path.dirname(__file__), "mpi_apps")


def run(app, case, *args, timeout=100):
    res = launch(3, os.path.join(APPS, app), *args, timeout=timeout)
    text = res.stdout + res.stderr
    assert res.returncode == 0 and f"{case} ok" in res.stdout, text
    assert "transport" not in res.stderr or "WARNING" not in res.stderr, text  # no agent complaint
    return res.stdout


@pytest.mark.timeout(110)
def test_a_receiver_killed_while_others_drain_the_same_remote_channel_loses_and_duplicates_nothing():
    """Four receivers on nodes 0 and 2 drain a channel on node 1 fed from nodes 0 and 1; one is SIGKILLed
    mid-stream: nothing twice, at most the message it had in hand missing, the survivors finish."""
    run("kills_app.py", "rkill", "rkill", "2")


@pytest.mark.timeout(110)
def test_a_sender_killed_mid_stream_delivers_exactly_what_its_returned_sends_promised():
    """A sender on node 2 records each send that returned; SIGKILLed mid-stream (send, send_many and
    send_block, payloads up to 600 KiB), node 0 gets every recorded message once, whole, in order, and at most
    the one in flight besides."""
    run("kills_app.py", "skill", "skill", "3")


@pytest.mark.timeout(110)
def test_six_receivers_on_three_nodes_mixing_recv_recv_many_and_poll_with_timeouts_get_each_message_once():
    run("kills_app.py", "many", "many", "1")


@pytest.mark.timeout(110)
def test_a_queue_consumer_on_another_node_killed_mid_stream_costs_at_most_its_item():
    run("mp_qkill_app.py", "qkill", "1")
