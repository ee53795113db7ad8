"""Every request has a timeout: a global services that stops answering gives TimeoutError, not a hang, and a
late answer is dropped instead of being taken for the next request's."""

import pytest
from test_runtime_util import run_app

APP = r"""
import os, signal, time
from dragon.errors import ProcessTimeout, ChannelTimeout
from dragon.globalservices import process as P, channel as C

shep = os.getppid()
with open(f"/proc/{shep}/stat") as f:
    launcher = int(f.read().split(") ")[1].split()[1])
kids = []
for tid in os.listdir(f"/proc/{launcher}/task"):
    with open(f"/proc/{launcher}/task/{tid}/children") as f:
        kids += [int(x) for x in f.read().split()]
gs = [k for k in kids if k != shep][0]
me = P.this_process().p_uid
os.kill(gs, signal.SIGSTOP)
try:
    t0 = time.monotonic()
    try:
        P.query(me)
        raise AssertionError("no timeout")
    except ProcessTimeout as e:
        assert isinstance(e, TimeoutError) and "global services" in str(e)
    assert time.monotonic() - t0 < 10
    try:
        C.query(1)
        raise AssertionError("no timeout")
    except ChannelTimeout:
        pass
finally:
    os.kill(gs, signal.SIGCONT)
# the late answers to the abandoned requests must not be mistaken for these
assert P.query(me).p_uid == me
d = P.create("/bin/true", None, [])
assert P.join(d.p_uid) == 0 and P.query(d.p_uid).retval == 0
print("ALL OK")
"""


@pytest.mark.timeout(60)
def test_request_timeout_and_late_answers(tmp_path):
    r = run_app(tmp_path, APP, env={"DRAGON_REQUEST_TIMEOUT": "0.5"}, timeout=50)
    assert "ALL OK" in r.stdout and r.returncode == 0, r.stdout + r.stderr
