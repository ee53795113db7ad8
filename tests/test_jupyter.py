"""dragon.init() in a real Jupyter kernel (ipykernel, driven by jupyter_client as a notebook server drives
it): the local mode, and a client of ``dragon-launch --serve`` across three virtual nodes; processes and
channels used from cells; a kernel restart (graceful: atexit; and forced: SIGKILL) leaves nothing behind."""

import os
import time

import pytest
from serve_util import client, serving
from slurm_util import pids_with_marker
from test_runtime_util import job_segments, launch_env

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.timeout(240)

USE = r"""
import sys
from dragon.channels import Channel
from dragon.globalservices import channel, node, pool, process
last = max(node.get_list())
pd = pool.create(1 << 20, pool_options={"node": last})
cd = channel.create(pd.m_uid, user_name="from_kid", channel_options={"capacity": 8, "block_size": 256})
code = (
    "from dragon.channels import Channel; from dragon.globalservices import channel, process; "
    "me = process.this_process().node; "
    "Channel.attach(channel.join('from_kid', timeout=30).sdesc).send(b'kid on node %d' % me)"
)
kid = process.create(sys.executable, None, ["-c", code], options={"node": last})
print(Channel.attach(cd.sdesc).recv(timeout=60).decode(), process.join(kid.p_uid, timeout=60))
"""


MP_IN_CELLS = r"""
import multiprocessing as mp
def square(x):
    return x * x
with mp.get_context("dragon").Pool(3) as pool:
    print(pool.map(square, [1, 2, 3], chunksize=1))
"""


class Kernel:
    def __init__(self, env):
        self.km = jupyter_client.KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code, timeout=90):
        """Execute a cell; -> its stdout. Fails the test on an error in the cell."""
        out = []

        def hook(msg):
            if msg["header"]["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["header"]["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        text = "".join(out)
        assert reply["content"]["status"] == "ok", text
        return text

    def pid(self):
        return int(self.run("import os; print(os.getpid())"))

    def restart(self, now):
        self.km.restart_kernel(now=now)
        self.kc.wait_for_ready(timeout=60)

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def others(mark, kernel_pid):
    return [p for p in pids_with_marker(mark) if p != kernel_pid]


def wait_nothing_but(mark, kernel_pid, job, within=10.0):
    deadline = time.monotonic() + within
    while (others(mark, kernel_pid) or job_segments(job)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not others(mark, kernel_pid), others(mark, kernel_pid)
    assert not job_segments(job), job_segments(job)


@pytest.fixture
def kernel(tmp_path):
    mark = "dragon-jupyter-test-" + os.urandom(6).hex()
    k = Kernel(launch_env({"DRAGON_TEST_MARK": mark}))
    k.mark = mark
    try:
        yield k
    finally:
        k.close()


def test_local_runtime_in_a_kernel(kernel):
    for now in (False, True):  # restart: the kernel's own exit (atexit), then a SIGKILL
        job = kernel.run("import dragon; h = dragon.init(); print(h.job)").strip()
        assert "kid on node 0 0" in kernel.run(USE)
        assert "[1, 4, 9]" in kernel.run(MP_IN_CELLS)  # (a function defined in a cell)
        assert len(others(kernel.mark, kernel.pid())) >= 3  # the runtime: launcher, GS, shepherd
        kernel.restart(now)
        wait_nothing_but(kernel.mark, kernel.pid(), job)


@pytest.mark.mpi
def test_client_of_a_served_runtime_in_a_kernel(kernel, tmp_path):
    with serving(tmp_path, nodes=3) as srv:
        for now in (False, True):
            out = kernel.run(f"import dragon; h = dragon.init(connect={srv.path!r}); print(h.mode)")
            assert out.strip() == "connected"
            assert "kid on node 2 0" in kernel.run(USE)
            assert "[1, 4, 9]" in kernel.run(MP_IN_CELLS)  # (workers on every node, a cell's function)
            kernel.restart(now)
            check = client(
                tmp_path,
                srv.path,
                "dragon.init()\ndeadline = time.monotonic() + 10\n"
                "while pool_names() or channel.list():\n"
                "    assert time.monotonic() < deadline, (pool_names(), channel.list())\n"
                "    time.sleep(0.05)\nok('released')",
            )
            assert "ok released" in check.stdout, check.stdout + check.stderr
        assert srv.proc.poll() is None
