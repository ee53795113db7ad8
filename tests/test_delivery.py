"""No message lost across nodes (issue 11), on virtual nodes: ``mpiexec -n 3 dragon-launch --virtual-nodes
tests/mpi_apps/soak_app.py CASE`` (tests/test_delivery_slurm.py runs the same cases between the test cluster's
hosts, where the timing differs: that is where the sender-exit race of the old transport showed)."""

import os

import pytest
from mpi_util import launch

pytestmark = pytest.mark.mpi

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "soak_app.py")


def run(case, *args, nodes=3, timeout=150):
    res = launch(nodes, APP, case, *args, timeout=timeout)
    assert res.returncode == 0 and f"{case} ok" in res.stdout, res.stdout + res.stderr
    return res.stdout


@pytest.mark.timeout(160)
def test_senders_that_end_every_way_right_after_their_last_send_lose_nothing():
    """Senders on two nodes, every API and size path, ending by return, sys.exit, os._exit, SIGKILL, close and
    a dropped handle right after their last send: every message arrives once, in order per sender, and their
    nodes' infrastructure pools hold what they held before."""
    out = run("exits", "6", "3", "300")
    assert "exits ok 10800" in out, out


@pytest.mark.timeout(160)
def test_a_joined_sender_has_every_message_in_its_channel():
    """Senders on two nodes end cleanly while their last messages wait for room in a full channel: once
    they are joined, nothing of theirs is still on the way (a producer joined, then a sentinel put into its
    queue, must come after its items; CI once found 493 of 6,000 queue items behind the sentinel)."""
    out = run("joined", "5")
    assert "joined ok 3000" in out, out


@pytest.mark.timeout(100)
def test_an_exit_waits_for_its_sends_to_land_only_as_long_as_the_limit_and_says_so():
    """A sender whose channel stays full ends after DRAGON_EXIT_FLUSH_TIMEOUT: past 5 s it says what it waits
    for, at the limit that it gives up, and its messages arrive afterwards."""
    res = launch(2, APP, "stuck", "20", "6", timeout=90)
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "stuck ok 20" in res.stdout, text
    assert "waits (up to DRAGON_EXIT_FLUSH_TIMEOUT=6 s) for messages it sent" in text, text
    assert "not yet in their channels after 6 s" in text, text
    res = launch(2, APP, "stuck", "20", "1", timeout=90)  # a short limit: no notice, only the end
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "stuck ok 20" in res.stdout, text
    assert "waits (up to" not in text and "not yet in their channels after 1 s" in text, text


@pytest.mark.timeout(100)
def test_handles_closed_with_sends_in_flight_end_their_streams_without_the_process_exiting():
    run("handles", "300", nodes=2, timeout=90)


@pytest.mark.timeout(160)
def test_receivers_that_time_out_or_are_killed_mid_stream_lose_nothing():
    """Receivers on other nodes drain a channel through the transport; one keeps giving up (timeouts of 0 to
    10 ms), one is SIGKILLed with its receive in flight: every message is received exactly once."""
    run("receivers", "3000")


@pytest.mark.timeout(160)
def test_a_receiver_that_dies_between_an_answers_header_and_its_payload_loses_nothing():
    """The narrowest window of a remote receive, hit every time: the message comes back to its channel."""
    run("orphan", "5")


@pytest.mark.timeout(160)
def test_two_hundred_short_lived_senders_each_deliver_their_message():
    run("shortlived", "200")
