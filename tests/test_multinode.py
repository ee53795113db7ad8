"""Multi-node dragon on one host: ``mpiexec -n 3 dragon-launch --virtual-nodes tests/mpi_apps/multinode_app.py
CASE`` (each rank is its own node, with its own segments; everything between nodes goes through the transport
agents).

Every run carries a unique marker in its environment; after it, no process may carry the marker (a rank, a
service or a managed process left behind) and no segment may be left (the autouse fixture of conftest.py)."""

import os
import subprocess
import sys
import time

import mpi_util
import pytest
from mpi_util import marked, mpiexec

pytestmark = pytest.mark.mpi

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "multinode_app.py")


def launch(n, *args, program=APP, **kw):
    return mpi_util.launch(n, program, *args, **kw)


@pytest.mark.timeout(120)
def test_processes_on_every_node_create_join_kill_and_their_output():
    res = launch(3, "processes")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "processes ok" in res.stdout
    for k in range(3):  # other nodes' output reaches the terminal, labelled
        assert f"[hello{k}@{k}] hello from node {k}" in res.stdout, res.stdout


@pytest.mark.timeout(150)
def test_pools_and_channels_on_remote_nodes_every_size_several_senders_and_join():
    res = launch(3, "channels", timeout=140)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "channels ok" in res.stdout


@pytest.mark.timeout(120)
def test_a_killed_node_is_noticed_and_the_job_ends_naming_it():
    res = launch(3, "killnode")
    assert "killnode ok" in res.stdout, res.stdout + res.stderr
    assert res.returncode != 0, res.stdout + res.stderr
    assert "node 1" in res.stderr and "died" in res.stderr, res.stderr


def _on_a_channel_of_node_1(tmp_path, name, body, pool_size, capacity):
    """Run body (a program) under 2 virtual nodes with ``ch``, a channel in a pool of node 1, made for it."""
    prog = tmp_path / f"{name}.py"
    prog.write_text(
        "from dragon.channels import Channel\n"
        "from dragon.globalservices import channel, pool\n"
        f"p1 = pool.create({pool_size}, pool_options={{'node': 1}})\n"
        f"ch = Channel.attach(channel.create(p1.m_uid, channel_options={{'capacity': {capacity}}}).sdesc)\n"
        + body
    )
    return launch(2, program=str(prog))


@pytest.mark.timeout(60)
def test_a_remote_recv_many_of_big_messages_is_answered_without_a_refused_frame(tmp_path):
    """recv_many on a channel of another node whose messages add up to more than a packet's inline limit:
    the answer comes back as a pool block, which the agent once tried to index after handing it over (the
    messages arrived, and the agent logged a bogus "refused a frame ... TypeError")."""
    body = (
        "for i in range(4):\n"
        "    ch.send(bytes([i]) * (100 << 10))\n"
        "got = ch.recv_many(4, timeout=10)\n"
        "assert [bytes(x) for x in got] == [bytes([i]) * (100 << 10) for i in range(4)]\n"
        "print('bigmany ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "bigmany", body, 64 << 20, 64)
    assert res.returncode == 0 and "bigmany ok" in res.stdout, res.stdout + res.stderr
    assert "refused a frame" not in res.stderr, res.stderr


@pytest.mark.timeout(90)
def test_a_remote_channel_refuses_bad_input_as_a_local_one_does(tmp_path):
    """Through the transport as on the node: a message more than the staging pool could ever hold is a
    ChannelError at once (not a ChannelTimeout a retry loop would repeat for good), a bool or str timeout a
    TypeError, an int timeout beyond a double waits as forever does, and recv_many's max_n a TypeError
    (float) or ChannelError (out of range), not struct.error; the channel stays usable after each."""
    body = (
        "import time\n"
        "from dragon.errors import ChannelError, ChannelTimeout\n"
        "def refused(call, cls, *not_cls):\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        call()\n"
        "    except not_cls as e:\n"
        "        raise AssertionError(f'{type(e).__name__}: {e}')\n"
        "    except cls as e:\n"
        "        assert time.monotonic() - t < 5, e\n"
        "        return e\n"
        "    raise AssertionError('no error')\n"
        "for t in (None, 0, 1.0):\n"
        "    refused(lambda: ch.send(b'x' * (200 << 20), timeout=t), ChannelError, ChannelTimeout)\n"
        "for bad in (True, '1'):\n"
        "    refused(lambda: ch.send(b'x', timeout=bad), TypeError)\n"
        "    refused(lambda: ch.recv(timeout=bad), TypeError)\n"
        "refused(lambda: ch.recv_many(1.5), TypeError)\n"
        "refused(lambda: ch.recv_many(2**80), ChannelError)\n"
        "ch.send(b'ok', timeout=10**400)\n"
        "assert ch.recv_many(2**40, timeout=10**400) == [b'ok']\n"
        "print('remotebad ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "remotebad", body, 8 << 20, 8)
    assert res.returncode == 0 and "remotebad ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(90)
def test_a_message_the_remote_pool_can_never_hold_is_refused_by_its_send_and_the_handle_goes_on(tmp_path):
    """As on a local channel: a send (or send_block) more than the channel's pool could ever hold (but not
    more than this node's staging pool) raises ChannelError itself and the handle stays usable. It used to be
    accepted into the window, and the remote agent's failure then broke the stream: every later call on the
    handle (send, recv, len, capacity) raised that error for good."""
    body = (
        "from dragon.errors import ChannelError\n"
        "big = b'z' * (9 << 20)\n"
        "for t in (None, 0, 1.0):\n"
        "    try:\n"
        "        ch.send(big, timeout=t)\n"
        "        raise AssertionError('a message bigger than the pool was sent')\n"
        "    except ChannelError as e:\n"
        "        assert 'could ever hold' in str(e), e\n"
        "blk = ch.pool.alloc(9 << 20)\n"
        "try:\n"
        "    ch.send_block(blk)\n"
        "    raise AssertionError('a block bigger than the pool was sent')\n"
        "except ChannelError as e:\n"
        "    assert 'could ever hold' in str(e), e\n"
        "ch.pool.free(blk)\n"
        "ch.send(b'x' * (1 << 20))\n"
        "ch.send(b'after')\n"
        "assert ch.flush(10)\n"
        "assert len(ch) == 2 and ch.capacity == 8\n"
        "assert ch.recv(timeout=10) == b'x' * (1 << 20) and ch.recv(timeout=10) == b'after'\n"
        "print('toobig ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "toobig", body, 8 << 20, 8)
    assert res.returncode == 0 and "toobig ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(150)
def test_a_send_with_a_timeout_keeps_it_while_another_thread_waits_for_room_on_the_same_handle(tmp_path):
    """Two threads send on one handle of a full remote channel: one waits for room (timeout None); the
    other's send with timeout 0 raises ChannelFull and with timeout 0.5 ChannelTimeout, as on a local
    channel. They used to wait for the handle's lock, held by the first thread for as long as it waited
    (for ever); nothing is lost or sent twice, and the waiting thread goes on once there is room."""
    body = (
        "import threading\n"
        "from dragon._core.remote import WINDOW\n"
        "from dragon.errors import ChannelFull, ChannelTimeout\n"
        "total = WINDOW + 8 + 1\n"
        "def fill():\n"
        "    for i in range(total):\n"
        "        ch.send(b'%d' % i)\n"
        "th = threading.Thread(target=fill, daemon=True)\n"
        "th.start()\n"
        "while ch._st.sent < WINDOW + 8 or ch._st.acked < 8:  # the last send waits for room\n"
        "    time.sleep(0.05)\n"
        "for t, cls in ((0, ChannelFull), (0.5, ChannelTimeout)):\n"
        "    try:\n"
        "        ch.send(b'other', timeout=t)\n"
        "        print('a send into a full window went through', flush=True)\n"
        "        os._exit(1)\n"
        "    except cls:\n"
        "        pass\n"
        "got = [ch.recv(timeout=10) for _ in range(total)]\n"
        "th.join(30)\n"
        "assert not th.is_alive()\n"
        "assert got == [b'%d' % i for i in range(total)], got\n"
        "assert ch.poll(timeout=0.5) is False\n"
        "print('twothreads ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "twothreads", "import os, time\n" + body, 8 << 20, 8)
    assert res.returncode == 0 and "twothreads ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(120)
def test_a_receive_waiting_on_a_remote_handle_holds_up_no_other_threads_call_on_it(tmp_path):
    """One thread waits in recv() on a remote handle of an empty channel; another thread's recv(timeout=0),
    poll(timeout=0), len() and recv(timeout=0.3) on the same handle answer at once (ChannelEmpty, False, 0,
    ChannelTimeout), as on a local channel. The remote agent served a stream's requests strictly in order, so
    they waited behind the blocked receive and failed after 30 s with "no answer from the node's transport
    agent". The waiting receive still gets the next message."""
    body = (
        "import threading\n"
        "from dragon.errors import ChannelEmpty, ChannelTimeout\n"
        "got = []\n"
        "th = threading.Thread(target=lambda: got.append(ch.recv()), daemon=True)\n"
        "th.start()\n"
        "time.sleep(0.5)  # (its request is at the remote agent; the checks hold whether or not it is)\n"
        "for call, cls in ((lambda: ch.recv(timeout=0), ChannelEmpty), (lambda: ch.recv(timeout=0.3), "
        "ChannelTimeout)):\n"
        "    try:\n"
        "        call()\n"
        "        raise AssertionError('a message came from an empty channel')\n"
        "    except cls as e:\n"
        "        assert 'no answer' not in str(e), e\n"
        "assert ch.poll(timeout=0) is False and len(ch) == 0\n"
        "ch.send(b'for the waiting one')\n"
        "th.join(10)\n"
        "assert got == [b'for the waiting one'], got\n"
        "print('waitingrecv ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "waitingrecv", "import time\n" + body, 8 << 20, 8)
    assert res.returncode == 0 and "waitingrecv ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(90)
def test_a_forged_receive_request_that_raises_is_answered_and_stops_neither_its_stream_nor_the_agent(
    tmp_path,
):
    """A process forges a recv_into request for 2**62 bytes on its own stream while that stream has a send
    waiting at the remote agent (its channel is full). The request used to raise MemoryError at every agent
    step (it stayed first in the stream's queue): after 100 steps in a row the agent stopped and node 1 was
    lost. Now the buffer the agent receives into is bounded by the channel's pool (no message is bigger), and
    a request that raises anyway is answered with an error and dropped: the forged request takes the first
    message as any receive would, the others all arrive, other handles work, and a real recv_into with a
    buffer bigger than the channel's pool receives as usual."""
    body = (
        "from dragon._core import frames as W\n"
        "from dragon._core.remote import endpoint\n"
        "for i in range(9):  # the 9th waits at node 1's agent for room\n"
        "    ch.send(b'%d' % i)\n"
        "ep = endpoint()\n"
        "forged = W.REQ.pack(W.M_INTO, 1, 2**62, 0.0)\n"
        "ep.gw.send(W.HDR.pack(W.RECV, 0, 1, W.REQ.size, ch._st.sid, 10**6) + forged)\n"
        "time.sleep(1)  # (the agent steps many times meanwhile)\n"
        "other = Channel.attach(channel.create(p1.m_uid, channel_options={'capacity': 8}).sdesc)\n"
        "other.send(b'still there')\n"
        "assert other.recv(timeout=10) == b'still there'\n"
        "assert [ch.recv(timeout=10) for _ in range(8)] == [b'%d' % i for i in range(1, 9)]\n"
        "assert ch.poll(timeout=0.2) is False\n"
        "ch.send(b'into')\n"
        "buf = bytearray(64 << 20)\n"
        "assert ch.recv_into(buf, timeout=10) == 4 and buf[:4] == b'into'\n"
        "print('forgedrecv ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "forgedrecv", "import time\n" + body, 8 << 20, 8)
    assert res.returncode == 0 and "forgedrecv ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(90)
def test_forged_frames_naming_a_channel_of_another_node_than_their_destination_stall_no_agent(tmp_path):
    """A process writes into its gateway an OPEN to node 1 for a channel of node 0, a receive on that stream
    and a PUTBACK to node 1 carrying a node-0 sdesc. Node 1's agent must refuse them: it used to attach the
    channel with Channel.attach, i.e. through its own transport agent (itself), and its receive waited for an
    answer only it could give, so node 1 fell silent and was declared down (the job lost it)."""
    body = (
        "from dragon._core import frames as W\n"
        "from dragon._core.remote import endpoint\n"
        "from dragon.errors import ChannelEmpty\n"
        "p0 = pool.create(1 << 20, pool_options={'node': 0})\n"
        "c0 = Channel.attach(channel.create(p0.m_uid, channel_options={'capacity': 8}).sdesc)\n"
        "ch.send(b'warm')\n"
        "assert ch.recv(timeout=10) == b'warm'\n"
        "ep = endpoint()\n"
        "sid = 0x5EED | 1\n"
        "opening = W.prefix_sdesc(c0.sdesc, ep.opener + ep.reply_sdesc)\n"
        "ep.gw.send(W.HDR.pack(W.OPEN, 0, 1, len(opening), sid, 0) + opening)\n"
        "ep.gw.send(W.HDR.pack(W.RECV, 0, 1, W.REQ.size, sid, 1) + W.REQ.pack(W.M_RECV, 1, -1, 0.0))\n"
        "back = W.prefix_sdesc(c0.sdesc, b'forged')\n"
        "ep.gw.send(W.HDR.pack(W.PUTBACK, 0, 1, len(back), 0, 0) + back)\n"
        "for i in range(3):\n"
        "    ch.send(b'after %d' % i)\n"
        "    assert ch.recv(timeout=5) == b'after %d' % i\n"
        "try:\n"
        "    c0.recv(timeout=0)\n"
        "    raise AssertionError('the forged PUTBACK was relayed into a channel of node 0')\n"
        "except ChannelEmpty:\n"
        "    pass\n"
        "print('misrouted ok', flush=True)\n"
    )
    res = _on_a_channel_of_node_1(tmp_path, "misrouted", body, 8 << 20, 8)
    assert res.returncode == 0 and "misrouted ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.timeout(60)
def test_exit_code_is_the_programs(tmp_path):
    prog = tmp_path / "fail.py"
    prog.write_text("import sys\nprint('bye', flush=True)\nsys.exit(3)\n")
    res = launch(3, program=str(prog))
    assert res.returncode == 3, res.stdout + res.stderr
    assert "bye" in res.stdout


@pytest.mark.timeout(60)
def test_ranks_on_one_host_make_one_node_without_virtual_nodes(tmp_path):
    prog = tmp_path / "one.py"
    prog.write_text("from dragon.globalservices import node\nprint('nodes', node.get_list(), flush=True)\n")
    res = launch(2, program=str(prog), virtual=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nodes [0]" in res.stdout


@pytest.mark.timeout(120)
def test_a_killed_agent_ends_the_job_and_leaves_nothing():
    res = launch(3, "killagent")
    assert "killing node 1's launcher" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode != 0


@pytest.mark.timeout(90)
def test_a_node_whose_agent_stops_tears_itself_down_and_the_job_ends_naming_it(tmp_path):
    """A process on node 1 destroys its node's gateway channel (a user's bug): node 1's agent stops, its
    launcher says so and tears the node down, node 0 hears of it from the heartbeats' silence and ends the job
    (70)."""
    prog = tmp_path / "gw.py"
    prog.write_text(
        "import os, sys\n"
        "from dragon.globalservices import process\n"
        "code = ('import os; from dragon.channels import Channel; '\n"
        "        'Channel.attach(bytes.fromhex(os.environ[\"DRAGON_GW_CD\"])).destroy()')\n"
        "d = process.create(sys.executable, None, ['-c', code], options={'node': 1})\n"
        "process.join(d.p_uid, timeout=30)\n"
        "print('gateway destroyed', flush=True)\n"
    )
    res = launch(2, program=str(prog), timeout=80)
    assert "gateway destroyed" in res.stdout, res.stdout + res.stderr
    assert res.returncode == 70, res.stdout + res.stderr
    assert "the transport agent of node 1" in res.stderr and "gateway channel is gone" in res.stderr, (
        res.stderr
    )
    assert "the job lost node 1" in res.stderr, res.stderr


@pytest.mark.timeout(120)
def test_sigterm_to_one_node_alone_tears_it_down_and_node_0_hears_of_it():
    res = launch(3, "termrank")
    assert "termrank ok" in res.stdout, res.stdout + res.stderr
    assert "node 1: got SIGTERM" in res.stderr, res.stderr
    assert res.returncode == 70, res.stdout + res.stderr  # the job lost a node
    # node 0 heard it from node 1, not from 15 s of heartbeat silence (DEAD_AFTER)
    assert "stopped answering" not in res.stderr, res.stderr


@pytest.mark.timeout(90)
def test_a_rank_that_cannot_start_fails_the_job_on_every_rank_without_a_hang(tmp_path):
    """Node 1 cannot make its infrastructure pool's channels: every rank still gets past the exchange of
    descriptors (an allgather) and the job ends at once, naming node 1."""
    prog = tmp_path / "never.py"
    prog.write_text("print('the program ran', flush=True)\n")
    mark = os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAGON_")}
    env["DRAGON_TEST_MARK"] = mark
    py = [sys.executable, "-m", "launcher.launch", "--virtual-nodes", str(prog)]
    cmd = [
        mpiexec(),
        "-n",
        "1",
        *py,
        ":",
        "-n",
        "1",
        "env",
        "DRAGON_INFRA_POOL_SIZE=4K",
        *py,
        ":",
        "-n",
        "1",
        *py,
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 70, res.stdout + res.stderr
    assert "the program ran" not in res.stdout
    assert "the job cannot start: node 1" in res.stderr and "ChannelError" in res.stderr, res.stderr
    assert res.stderr.count("the job cannot start") == 1, res.stderr  # said once, by node 0
    deadline = time.monotonic() + 5
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not marked(mark)


# ---- global services on an MPI rank of its own (dragon-launch --gs-rank; see dragon.transport.world)
# ----------
GS_APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "gsrank_app.py")


@pytest.mark.timeout(120)
def test_gs_on_its_own_rank_serves_both_nodes_and_is_not_a_node():
    """mpiexec -n 3 --virtual-nodes --gs-rank: nodes 0 and 1, rank 2 runs GS alone (no shepherd there)."""
    res = launch(3, "gsrank", program=GS_APP, flags=["--gs-rank"], env_extra={"DRAGON_TEST_VIRTUAL": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "gsrank ok" in res.stdout, res.stdout + res.stderr
    for k in (0, 1):
        assert f"[child{k}@{k}] child on node {k} nodes [0, 1]" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_killed_global_services_on_its_rank_ends_the_job_naming_it():
    res = launch(3, "killgs", program=GS_APP, flags=["--gs-rank"])
    assert "killing global services" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode == 70, res.stdout + res.stderr
    assert "global services is gone: the global-services rank 2" in res.stderr, res.stderr
    assert "died (killed by signal 9)" in res.stderr, res.stderr


@pytest.mark.timeout(120)
def test_killed_gs_rank_launcher_ends_the_job_and_leaves_nothing():
    res = launch(3, "killgsrank", program=GS_APP, flags=["--gs-rank"])
    assert "killing the global-services rank's launcher" in res.stdout, res.stdout + res.stderr
    assert "still alive" not in res.stdout
    assert res.returncode != 0


@pytest.mark.timeout(60)
def test_one_rank_more_than_hosts_runs_gs_on_it_unless_told_not_to(tmp_path):
    prog = tmp_path / "where.py"
    prog.write_text(
        "import os\nfrom dragon.globalservices import node\n"
        "print('nodes', node.get_list(), 'gs', os.environ['DRAGON_GS_NODE'], flush=True)\n"
    )
    res = launch(2, program=str(prog), virtual=False)  # one host, two ranks: the extra one runs GS
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nodes [0] gs 1" in res.stdout, res.stdout
    res = launch(2, program=str(prog), virtual=False, flags=["--no-gs-rank"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nodes [0] gs 0" in res.stdout, res.stdout
    res = launch(3, program=str(prog), virtual=False)  # two extra ranks: not automatic
    assert "nodes [0] gs 0" in res.stdout, res.stdout
    res = launch(3, program=str(prog), virtual=False, flags=["--gs-rank"])  # asked: the last extra rank
    assert "nodes [0] gs 1" in res.stdout, res.stdout


@pytest.mark.timeout(60)
def test_gs_rank_without_a_spare_rank_is_refused_on_every_rank(tmp_path):
    prog = tmp_path / "never.py"
    prog.write_text("print('RAN', flush=True)\n")
    for virtual in (True, False):
        res = launch(1, program=str(prog), virtual=virtual, flags=["--gs-rank"])
        assert res.returncode == 2, res.stdout + res.stderr
        assert "RAN" not in res.stdout
        assert "--gs-rank: global services needs a rank of its own" in res.stderr, res.stderr
        assert res.stderr.count("--gs-rank:") == 1, res.stderr


@pytest.mark.timeout(60)
def test_slurm_variables_copied_to_every_rank_do_not_rename_the_nodes(tmp_path):
    """mpiexec inside an sbatch script copies the batch shell's SLURMD_NODENAME to every rank: rank 0's looks
    like its own (SLURM_PROCID 0), the others' do not; the names must then be the hosts', on every node."""
    prog = tmp_path / "names.py"
    prog.write_text(
        "from dragon.globalservices import node\n"
        "print('names', [node.query(k).hostname for k in node.get_list()], flush=True)\n"
    )
    fake = {
        "SLURMD_NODENAME": "batchhost",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    res = launch(2, program=str(prog), env_extra=fake)
    assert res.returncode == 0, res.stdout + res.stderr
    host = os.uname().nodename
    assert f"names [{host!r}, {host!r}]" in res.stdout, res.stdout


@pytest.mark.timeout(120)
def test_a_node_takes_its_cpus_whatever_one_core_the_rank_was_bound_to(tmp_path):
    """mpiexec -bind-to core (like srun's task binding) binds each rank to one core: the node's processes
    would all share it. By default a node takes its CPUs: every CPU it may use, a virtual node its even share
    of them (two on 2 CPUs: one each, as separate hosts would have their own); DRAGON_CPU_BINDING=host gives
    each virtual node every CPU, and keep keeps the binding."""
    from dragon.transport.world import cpu_share

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to widen")
    prog = tmp_path / "aff.py"
    prog.write_text(
        "import os, sys\n"
        "from dragon.globalservices import process\n"
        "print('cpus app', sorted(os.sched_getaffinity(0)), flush=True)\n"
        'code = ("import os; "\n'
        "        \"print('cpus node', os.environ['DRAGON_NODE'], sorted(os.sched_getaffinity(0)))\")\n"
        "for k in (0, 1):\n"
        "    d = process.create(sys.executable, None, ['-c', code], options={'node': k})\n"
        "    assert process.join(d.p_uid, timeout=30) == 0\n"
    )
    bound = ("-bind-to", "core")
    share = [cpu_share(allowed, 2, k) or allowed for k in (0, 1)]
    assert len(allowed) % 2 or (share[0] and not set(share[0]) & set(share[1]))
    res = launch(2, program=str(prog), mpiexec_flags=bound)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"cpus app {share[0]}" in res.stdout, res.stdout
    for k in (0, 1):
        assert f"cpus node {k} {share[k]}" in res.stdout, res.stdout
    res = launch(2, program=str(prog), mpiexec_flags=bound, env_extra={"DRAGON_CPU_BINDING": "host"})
    assert res.returncode == 0, res.stdout + res.stderr
    for k in (0, 1):
        assert f"cpus node {k} {allowed}" in res.stdout, res.stdout
    res = launch(2, program=str(prog), mpiexec_flags=bound, env_extra={"DRAGON_CPU_BINDING": "keep"})
    assert res.returncode == 0, res.stdout + res.stderr
    kept = [line for line in res.stdout.splitlines() if "cpus node" in line]
    assert len(kept) == 2 and all(line.count(",") == 0 for line in kept), res.stdout  # one CPU each


def test_cpu_share_splits_a_hosts_cpus_evenly_between_its_virtual_nodes_or_not_at_all():
    from dragon.transport.world import cpu_share

    assert [cpu_share([0, 1], 2, k) for k in (0, 1)] == [[0], [1]]
    assert [cpu_share(list(range(8)), 4, k) for k in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [cpu_share([0, 1], 8, k) for k in range(8)] == [[0]] * 4 + [[1]] * 4  # 4 nodes a CPU
    assert [cpu_share([2, 5, 7], 3, k) for k in range(3)] == [[2], [5], [7]]  # (the CPUs allowed, in order)
    assert cpu_share([0, 1], 3, 0) is None  # uneven: every node every CPU
    assert cpu_share(list(range(16)), 3, 1) is None
    assert cpu_share([0, 1], 1, 0) is None and cpu_share([0], 2, 1) is None
