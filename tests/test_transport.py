"""The transport (agents + RemoteChannel) between virtual nodes, without the runtime services:
mpiexec -n N python -m dragon.transport.harness --virtual-nodes tests/mpi_apps/transport_app.py CASE."""

import os
import re
import subprocess
import sys
import time

import pytest
from mpi_util import mpiexec
from slurm_util import kill_listed

pytestmark = pytest.mark.mpi

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "transport_app.py")


def harness(n, *args, timeout=90):
    cmd = [
        mpiexec(),
        "-n",
        str(n),
        sys.executable,
        "-m",
        "dragon.transport.harness",
        "--virtual-nodes",
        APP,
        *args,
    ]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{args} hung: {e.stdout}\n{e.stderr}")
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.timeout(100)
def test_every_call_of_the_channel_api_across_nodes():
    assert "api ok" in harness(2, "api")


@pytest.mark.timeout(100)
def test_every_size_both_directions():
    assert "sizes ok" in harness(2, "sizes")


@pytest.mark.timeout(100)
def test_full_remote_channel_gives_backpressure_and_loses_nothing():
    assert "full ok" in harness(2, "full")


@pytest.mark.timeout(150)
def test_several_senders_on_two_nodes_exactly_once_in_order():
    assert "multi ok 8000" in harness(3, "multi", "2000", timeout=140)


@pytest.mark.timeout(100)
def test_idle_agents_do_not_burn_a_core():
    out = harness(2, "idle")
    # mpiexec forwards each rank's lines as they come: two may arrive glued together
    uses = [float(x) for x in re.findall(r"idle node \d+: (\d+\.\d{4})", out)]
    assert len(uses) == 2, out
    assert max(uses) < 0.05, uses  # a busy-polling agent would use ~1.0


@pytest.mark.timeout(100)
def test_zero_copy_api_send_block_recv_message_and_destroy_across_nodes():
    assert "zerocopy ok" in harness(2, "zerocopy")


@pytest.mark.timeout(100)
def test_messages_taken_for_abandoned_receives_go_back_and_a_destroyed_channel_fails_flush():
    assert "abandon ok" in harness(2, "abandon")


@pytest.mark.timeout(100)
def test_malformed_and_forged_gateway_frames_drop_alone_and_act_on_nothing():
    assert "badframes ok" in harness(2, "badframes")


@pytest.mark.timeout(150)
def test_big_messages_from_several_senders_many_in_flight_exactly_once_in_order():
    assert "bigmulti ok 120" in harness(3, "bigmulti", "30", timeout=140)


@pytest.mark.timeout(150)
def test_big_messages_both_ways_more_in_flight_than_mpi_gets_do_not_hang():
    """Six streams of 136 KiB messages each way at once: ~360 big sends to the other node, each waiting for
    that node's agent to post its receive. An agent that waited for its own sends to finish before it read
    again hung with the other doing the same (2 runs of 2, before BIG_INFLIGHT); twice in a row here."""
    for _ in range(2):
        out = harness(2, "bigboth", "120", timeout=60)
        assert out.count("bigboth ok 720") == 2, out


@pytest.mark.timeout(150)
def test_programs_ending_mid_stream_both_ways_end_the_job_without_a_crash(tmp_path):
    """The node programs exit while their senders stream big messages both ways: the agents stop with big
    payloads in MPI's hands. An agent that cancelled its sends (MPI_Cancel) without taking in the other's
    crashed its rank with SIGSEGV in 7 runs of 8 (main before this test hung in 5 of 6); three in a row."""
    pids = tmp_path / "pids"
    try:
        for _ in range(3):
            out = harness(2, "bigquit", "0.6", str(pids), timeout=40)
            assert out.count("bigquit ok") == 2, out
            kill_listed(pids)
    finally:
        kill_listed(pids)


@pytest.mark.timeout(60)
def test_sigterm_to_mpiexec_stops_the_programs_and_removes_the_segments(tmp_path):
    """A time limit or a kill of the job: the harness stops its node's program and still removes its
    segments."""
    prog = tmp_path / "sleeper.py"
    prog.write_text(
        "import os, sys, time\n"
        "open(os.path.join(sys.argv[1], 'ready' + os.environ['DRAGON_NODE']), 'w').write(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "dragon.transport.harness", "--virtual-nodes"]
    proc = subprocess.Popen(
        cmd + [str(prog), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        marks = [tmp_path / "ready0", tmp_path / "ready1"]
        deadline = time.monotonic() + 30
        while not all(m.exists() and m.read_text() for m in marks):  # (both programs run)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        pids = [int(m.read_text()) for m in marks]
        harness_pool = re.compile(r"dragon-(s\d+_)?t[0-9a-f]+n\d+-inf$")  # (E.new_job_id(kind="t"))
        job_segments = [n for n in os.listdir("/dev/shm") if harness_pool.match(n)]
        assert job_segments, os.listdir("/dev/shm")
        proc.terminate()
        out, _ = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    for pid in pids:  # the programs were stopped, not orphaned (gone, or a zombie nobody reaped yet)
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", (pid, state)
    left = [n for n in job_segments if os.path.exists(os.path.join("/dev/shm", n))]
    assert not left, left
