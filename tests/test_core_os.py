"""OS helpers of dragon._core the runtime uses: prctl wrappers, job naming, cleanup of a job's segments."""

import os
import signal
import time

import pytest

from dragon._core import core


def test_os_helpers():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            core.set_pdeathsig(signal.SIGTERM)
            core.set_child_subreaper()
            os.write(w, b"ok")
        except OSError:
            os.write(w, b"no")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 2) == b"ok"
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        core.set_pdeathsig(9999)


def test_claim_ids_detect_dead_zombie_and_reused_pids():
    me = core._claim_id()
    assert me & 0x3FFFFF == os.getpid() and not core._claim_dead(me)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, core._claim_id().to_bytes(4, "little"))  # a forked child gets its own id
        time.sleep(60)
        os._exit(0)
    try:
        child = int.from_bytes(os.read(r, 4), "little")
        assert child & 0x3FFFFF == pid and child != me
        assert not core._claim_dead(child)
        # the same pid with another start-time tag: a dead claimer whose pid was reused
        assert core._claim_dead(child ^ (1 << 22))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not core._claim_dead(child) and time.monotonic() < deadline:  # a zombie counts as dead
            time.sleep(0.01)
        assert core._claim_dead(child)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    assert core._claim_dead(child)
