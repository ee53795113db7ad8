"""Shared fixtures. Every test is checked for what it leaves behind: a new dragon segment in /dev/shm fails it.

Only dragon's own segments (``dragon-*``) count: other programs on the host (MPI libraries, other jobs) may come and
go during a test, and they are neither this test's fault nor ours to delete.
"""
import os
import time

import pytest

SHM = "/dev/shm"
PREFIX = "dragon-"


def _segments():
    try:
        return {n for n in os.listdir(SHM) if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments(request):
    """Fail any test that leaves a new shared-memory segment behind (after a short grace for teardown)."""
    before = _segments()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 5.0
    new = _segments() - before
    while new and time.monotonic() < deadline:
        time.sleep(0.05)
        new = _segments() - before
    if new:
        for name in new:  # do not let one leak fail every later test
            try:
                os.unlink(os.path.join(SHM, name))
            except OSError:
                pass
        pytest.fail(f"test left shared-memory segments behind: {sorted(new)}")
