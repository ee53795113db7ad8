"""OS helpers of dragon._core the runtime uses: prctl wrappers, job naming, cleanup of a job's segments."""

import os
import signal

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
