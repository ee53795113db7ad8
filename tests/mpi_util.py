"""Running dragon under mpiexec on this host (the MPICH wheel's mpiexec), for the tests of several nodes.

``launch(n, app, *args)`` runs ``mpiexec -n n dragon-launch --virtual-nodes app args`` (every rank a node of
its own, with its own segments: all traffic between them goes through the transport agents) with a unique
marker in its environment, and fails the test if any process still carries the marker a few seconds after it
ended.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
from slurm_util import pids_with_marker, slurm_required


def mpiexec():
    """The mpiexec of the MPICH wheel next to this python (a venv's bin/ need not be on PATH), else PATH's.
    Without one the test skips, or fails under CI / the README's test command (which install the mpi extra:
    its absence is a bug there)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    path = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if path is None:
        if slurm_required():
            pytest.fail("no mpiexec: the mpich wheel is not installed (pip install '.[mpi]')", pytrace=False)
        pytest.skip("no mpiexec: pip install '.[mpi]' brings mpi4py and the mpich wheel")
    return path


def marked(mark):
    """Pids of the processes that carry DRAGON_TEST_MARK=mark."""
    return pids_with_marker(f"DRAGON_TEST_MARK={mark}")


def launch(n, program, *args, timeout=100, virtual=True, flags=(), env_extra=None, mpiexec_flags=()):
    """``mpiexec [mpiexec_flags] -n n dragon-launch [--virtual-nodes] [flags] program args``: the finished
    process (text output). A hang kills the run's processes and fails the test; so does a process left
    behind."""
    mark = os.urandom(6).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAGON_")}
    env["DRAGON_TEST_MARK"] = mark
    env.update(env_extra or {})
    cmd = [
        mpiexec(),
        *mpiexec_flags,
        "-n",
        str(n),
        sys.executable,
        "-m",
        "launcher.launch",
        *(["--virtual-nodes"] if virtual else []),
        *flags,
        program,
        *args,
    ]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        for pid in marked(mark):
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"dragon-launch {args} hung:\n{e.stdout}\n{e.stderr}")
    deadline = time.monotonic() + 5
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = marked(mark)
    assert not left, f"processes left behind: {left}"
    return res
