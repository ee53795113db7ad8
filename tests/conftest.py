"""Shared fixtures. Every test is checked for what it leaves behind: a new dragon segment in /dev/shm fails
it.

Only dragon's own segments (``dragon-*``) count, and only those that no other process still maps: programs
outside this test run (another job on the host, another test session) may create and hold segments while a
test runs, and they are neither this test's fault nor ours to delete. A segment mapped only by this pytest
process (a handle a test forgot to destroy) or by nobody is a leak.
"""

import os
import signal
import time

import pytest

# A test run that a script started in the background (bash ignores SIGINT in its background jobs, and a
# program keeps an ignored SIGINT: Python then installs no KeyboardInterrupt) would pass that on to every
# runtime it starts, and the tests that send one SIGINT (Ctrl-C) would wait for good: give them the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHM = "/dev/shm"
PREFIX = "dragon-"


def _segments():
    try:
        return {n for n in os.listdir(SHM) if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def _mapped_by_others(names):
    """The names among ``names`` that some live process other than this one maps."""
    me = str(os.getpid())
    held = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue
        held.update(n for n in names if f"{SHM}/{n}" in maps)
    return held


@pytest.fixture(autouse=True)
def no_leaked_segments(request):
    """Fail any test that leaves a new dragon segment behind (after a short grace for teardown)."""
    before = _segments()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    deadline = time.monotonic() + 5.0
    new = _segments() - before
    while new and time.monotonic() < deadline:
        time.sleep(0.05)
        new = _segments() - before
    new -= _mapped_by_others(new)
    if new:
        for name in new:  # do not let one leak fail every later test
            try:
                os.unlink(os.path.join(SHM, name))
            except OSError:
                pass
        pytest.fail(f"test left shared-memory segments behind: {sorted(new)}")


@pytest.fixture
def pool():
    """A 4 MiB pool of this process, destroyed after the test (a module may define its own size)."""
    from dragon.pools import Pool

    with Pool.create(1 << 22) as p:
        yield p
