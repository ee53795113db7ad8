"""Helpers for the tests of ``dragon-launch --serve`` and its clients (``dragon.init(connect=FILE)``).

``serving(...)`` starts a server (alone, or under ``mpiexec -n N --virtual-nodes``) with a marker in its
environment, waits for its connection file, and at the end stops it with ``dragon-launch --stop`` and
checks that nothing of it is left (no process with the marker, no segment of its job). ``client(path,
code)`` runs a client script in a fresh interpreter; ``CLIENT_HELPERS`` are the names a client script has.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

from slurm_util import pids_with_marker
from test_runtime_util import APP_HELPERS, REPO, job_segments, launch_cmd, launch_env

CLIENT_HELPERS = (
    APP_HELPERS
    + r"""
import os, time
import dragon
from dragon.channels import Channel
from dragon.globalservices import channel, node, pool, process


def names():
    return sorted(n for _, n in process.get_list())


def pool_names():
    return sorted(pool.query(u).name for u in pool.get_list() if not pool.query(u).name.startswith("dragon_infra"))


def wait_for(path, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)
"""
)


def wait_gone(mark, job, within=10.0):
    """Wait until no process carries mark and no segment of job is left; fail naming what is left."""
    deadline = time.monotonic() + within
    while (pids_with_marker(mark) or job_segments(job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids_with_marker(mark), f"processes left: {pids_with_marker(mark)}"
    assert not job_segments(job), f"segments left: {job_segments(job)}"


class Server:
    def __init__(self, proc, path, mark, info):
        self.proc, self.path, self.mark, self.info = proc, path, mark, info
        self.job = info["job"]

    def stop(self):
        res = subprocess.run(
            [*launch_cmd("--stop", self.path)], env=launch_env(), capture_output=True, text=True, timeout=90
        )
        out, err = self.proc.communicate(timeout=60)
        return res, out, err


def mpiexec_cmd(n):
    from mpi_util import mpiexec

    return [mpiexec(), "-n", str(n)]


@contextlib.contextmanager
def serving(tmp_path, nodes=1, flags=(), stop=True):
    """A running server: yields Server; stops it (unless the test did) and checks nothing is left."""
    mark = "dragon-serve-test-" + os.urandom(6).hex()
    path = str(tmp_path / "connect.json")
    cmd = launch_cmd(*(["--virtual-nodes"] if nodes > 1 else []), *flags, "--serve", "--connect-file", path)
    if nodes > 1:
        cmd = [*mpiexec_cmd(nodes), *cmd]
    proc = subprocess.Popen(
        cmd,
        env=launch_env({"DRAGON_TEST_MARK": mark}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
                raise AssertionError(f"the server did not come up: {proc.returncode}\n{out}\n{err}")
            time.sleep(0.05)
        with open(path) as f:
            info = json.load(f)
        assert os.stat(path).st_mode & 0o777 == 0o600
        srv = Server(proc, path, mark, info)
        yield srv
        if stop and proc.poll() is None:
            res, out, err = srv.stop()
            assert res.returncode == 0, res.stderr
            assert proc.returncode == 0, f"{proc.returncode}\n{out}\n{err}"
            assert not os.path.exists(path)
        wait_gone(mark, srv.job)
    finally:
        if proc.poll() is None:
            for pid in pids_with_marker(mark):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            proc.kill()
        proc.communicate(timeout=30)


def client_env(path, extra=None):
    env = launch_env(extra)
    env["DRAGON_CONNECT"] = path
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def client(tmp_path, path, code, args=(), timeout=90, name="client.py"):
    """Run a client script (CLIENT_HELPERS + code) with DRAGON_CONNECT=path; -> CompletedProcess (text)."""
    app = tmp_path / name
    app.write_text(CLIENT_HELPERS + code)
    return subprocess.run(
        [sys.executable, str(app), *args],
        env=client_env(path),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


def start_client(tmp_path, path, code, args=(), name="client.py"):
    app = tmp_path / name
    app.write_text(CLIENT_HELPERS + code)
    return subprocess.Popen(
        [sys.executable, str(app), *args],
        env=client_env(path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
