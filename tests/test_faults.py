"""Faults and bad input on one node (issue 17): bulk work between the services, a hung service, control
messages forged by a managed process, bad bytes, and what the client refuses before it sends."""

import os
import re
import time

import pytest
from test_runtime_util import alive, job_pids, job_segments, run_app

# the pids of global services and the shepherd, as an app sees them (the shepherd is its parent; GS is the
# launcher's other child)
FIND_SERVICES = r"""
import os
def services():
    shep = os.getppid()
    with open(f"/proc/{shep}/stat") as f:
        launcher = int(f.read().split(") ")[1].split()[1])
    kids = []
    for tid in os.listdir(f"/proc/{launcher}/task"):
        with open(f"/proc/{launcher}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return {"shepherd": shep, "gs": [k for k in kids if k != shep][0], "launcher": launcher}
"""


def _job_of(out):
    m = re.search(r"job (\S+)", out)
    assert m, out
    return m.group(1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("service", ["shepherd", "gs"])
def test_a_stopped_service_is_named_and_the_job_torn_down(tmp_path, service):
    """SIGSTOP of the shepherd or of global services: the launcher notices the silence
    (DRAGON_SERVICE_TIMEOUT), names the service, its node and pid in one line, tears everything down and exits
    70."""
    app = (
        FIND_SERVICES
        + f"""
import signal, time
print("job", os.environ["DRAGON_JOB"], flush=True)
pids = services()
print("pid", pids[{service!r}], flush=True)
os.kill(pids[{service!r}], signal.SIGSTOP)
time.sleep(60)
"""
    )
    t = time.monotonic()
    r = run_app(tmp_path, app, env={"DRAGON_SERVICE_TIMEOUT": "2"}, timeout=60)
    took = time.monotonic() - t
    assert r.returncode == 70, r.stdout + r.stderr
    pid = re.search(r"pid (\d+)", r.stdout).group(1)
    what = "local services (shepherd)" if service == "shepherd" else "global services"
    line = [x for x in r.stderr.splitlines() if "has not answered" in x]
    assert len(line) == 1 and what in line[0] and f"pid {pid}" in line[0] and "node 0" in line[0], r.stderr
    assert took < 40, took  # (a hang would be cut by the timeout of run_app)
    job = _job_of(r.stdout)
    time.sleep(0.5)
    assert not job_pids(job) and not job_segments(job)
    assert not alive(int(pid))


FORGE = r"""
import os, time, msgpack
from dragon.channels import Channel
from dragon.globalservices import process
from dragon.infrastructure import messages as m

assert "DRAGON_LS_CD" not in os.environ  # the shepherd's inbox is not given to managed processes
gs = Channel.attach(bytes.fromhex(os.environ["DRAGON_GS_CD"]))
me = process.this_process().p_uid
for key in (None, b"", b"\0" * 8, os.urandom(8)):
    for msg in (m.SHProcessExit(key, 0, me, 0), m.GSHalt(key), m.GSNodeDown(key, 0, None, "forged"),
                m.LAHeadExit(key, me, 0), m.ControlResponse(key, 1, 0, None, {"pid": 1, "reply_cd": b""})):
        gs.send(m.encode(msg))
for data in (b"\x84\x00B\x01\x00\x02\x00\x03\x00", b"\xc1", msgpack.packb([66, 1, 2, 3]), os.urandom(64)):
    gs.send(data)
for i in range(2000):  # garbage in bulk: logged a few times, never stops global services
    gs.send(os.urandom(i % 50))
time.sleep(0.5)
assert process.query(me).state == "running"  # no forged exit counted
d = process.create("/bin/true", None, [])
assert process.join(d.p_uid, timeout=30) == 0
print("still served", flush=True)
raise SystemExit(5)
"""


@pytest.mark.timeout(60)
def test_a_managed_process_cannot_forge_the_runtimes_control_messages(tmp_path):
    """The runtime's own messages written into global services' inbox by a managed process (an exit of itself,
    halt, node down, the launcher's head exit, answers to the shepherd's requests), with no key, a wrong key
    or garbage around them: nothing happens, GS keeps serving, the job's exit code is the program's own."""
    r = run_app(tmp_path, FORGE, timeout=50)
    assert r.returncode == 5 and "still served" in r.stdout, r.stdout + r.stderr
    assert "without the job's key" in r.stderr and r.stderr.count("bad message (undecodable") < 40


BULK = r"""
import os, signal, threading
from dragon.globalservices import channel, pool, process

pd = pool.create(64 << 20)
cds = [channel.create(pd.m_uid, channel_options={"capacity": 2, "block_size": 64}) for _ in range(3000)]
channel.destroy([c.c_uid for c in cds])  # one request: 3000 shepherd requests in flight at once
assert channel.list() == []
print("destroyed 3000 in one call", flush=True)

errors = []
def churn(k):
    try:
        for _ in range(300):
            c = channel.create(pd.m_uid, channel_options={"capacity": 2, "block_size": 64})
            channel.destroy(c.c_uid)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=churn, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join(120)
assert not errors and not any(t.is_alive() for t in threads), errors
assert channel.list() == []
print("8 threads x 300 create+destroy", flush=True)

ps = [process.create("/bin/sleep", None, ["60"], options={"stdout": "devnull"}) for _ in range(1000)]
for p in ps:
    process.kill(p.p_uid, signal.SIGKILL)
left = [p.p_uid for p in ps]
while left:
    exited, _ = process.multi_join(left, timeout=60)
    assert exited, "no exit in 60 s"
    for u, code in exited:
        assert code == -signal.SIGKILL, (u, code)
    gone = {u for u, _ in exited}
    left = [u for u in left if u not in gone]
print("killed and joined 1000", flush=True)
pool.destroy(pd.m_uid)
"""


@pytest.mark.timeout(200)
def test_bulk_work_between_the_services_never_deadlocks(tmp_path):
    """Global services and the shepherd send each other bulk work (issue 17.1: a destroy of 3,000 channels in
    one call used to leave each blocked sending to the other, for ever)."""
    r = run_app(tmp_path, BULK, timeout=190)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("destroyed 3000 in one call", "8 threads x 300 create+destroy", "killed and joined 1000"):
        assert line in r.stdout, r.stdout + r.stderr


CLIENT = r"""
from dragon.errors import ChannelError, PoolError, ProcessError
from dragon.globalservices import channel, pool, process

def refused(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc as e:
        return str(e)
    raise AssertionError(f"{fn.__name__} did not raise {exc.__name__}")

text = refused(ProcessError, process.create, "/bin/true", None, [], user_name="x" * (100 << 20))
assert "too large" in text and "limit" in text, text
assert "cannot be sent" in refused(ProcessError, process.query, 2**70)
assert "cannot be sent" in refused(ProcessError, process.create, "/bin/true", None, [], user_name="a\ud800b")
assert "cannot be sent" in refused(ProcessError, process.create, "/bin/true", None, ["\udcff"])
assert "cannot be sent" in refused(PoolError, pool.create, 2**65)
assert "cannot be sent" in refused(ChannelError, channel.query, "\ud800")
d = process.create("/bin/true", None, [])  # the connection is as good as before
assert process.join(d.p_uid, timeout=30) == 0
print("refused before sending", flush=True)
"""


@pytest.mark.timeout(60)
def test_what_cannot_be_sent_is_refused_with_the_apis_error_and_the_connection_stays_usable(tmp_path):
    r = run_app(tmp_path, CLIENT, timeout=50)
    assert r.returncode == 0 and "refused before sending" in r.stdout, r.stdout + r.stderr


LABELS = r"""
from dragon.globalservices import process
d = process.create(PY, None, ["-c", "print('hello')"], user_name="a\x1b[31mb\ncd\x07")
assert process.join(d.p_uid, timeout=30) == 0
"""


@pytest.mark.timeout(60)
def test_control_characters_in_a_name_are_escaped_in_the_label_of_its_output(tmp_path):
    r = run_app(tmp_path, "import sys\nPY = sys.executable\n" + LABELS, timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[a\\x1b[31mb\\ncd\\x07] hello" in r.stdout, repr(r.stdout)
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout


FAILED_STARTS = r"""
import os
from dragon.errors import ProcessError
from dragon.globalservices import process
from dragon.pools import Pool

infra = Pool.attach(bytes.fromhex(os.environ["DRAGON_INF_PD"]))
before = infra.stats()["allocated_blocks"]
for i in range(60):
    exe = ["/no/such/exe", "/", "/etc/passwd"][i % 3]  # not found, a directory, not executable
    try:
        process.create(exe, None, [])
        raise AssertionError("started")
    except ProcessError:
        pass
assert infra.stats()["allocated_blocks"] == before, (before, infra.stats())
print("no reply channel left", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_process_that_cannot_start_leaves_no_reply_channel(tmp_path):
    r = run_app(tmp_path, FAILED_STARTS, timeout=50)
    assert r.returncode == 0 and "no reply channel left" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(30)
def test_a_bad_service_timeout_setting_is_refused_clearly(tmp_path):
    r = run_app(tmp_path, "print('ran')", env={"DRAGON_SERVICE_TIMEOUT": "soon"}, timeout=20)
    assert r.returncode != 0 and "ran" not in r.stdout
    assert "DRAGON_SERVICE_TIMEOUT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.path.isdir(tmp_path)


@pytest.mark.timeout(60)
def test_a_clean_run_logs_nothing(tmp_path):
    """Every request is answered once: a second answer (the shepherd answered process creates twice) shows as
    GS's 'answer with unknown tag' warning; a clean job has no service log line at all."""
    app = """
from dragon.globalservices import channel, pool, process
for _ in range(10):
    d = process.create("/bin/true", None, [])
    assert process.join(d.p_uid, timeout=30) == 0
pd = pool.create(4 << 20)
channel.destroy(channel.create(pd.m_uid).c_uid)
pool.destroy(pd.m_uid)
print("done", flush=True)
"""
    r = run_app(tmp_path, app, timeout=50)
    assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr
    assert "dragon " not in r.stderr and "unknown tag" not in r.stderr, r.stderr


@pytest.mark.timeout(90)
def test_a_stopped_lock_holder_fails_the_services_requests_on_its_pool_not_the_node(tmp_path):
    """A process stopped (SIGSTOP, a debugger) while it holds a pool's lock: channel.create in that pool, and
    process.create while it holds the infrastructure pool's (where the shepherd makes reply channels), fail
    with the API's error within seconds, and the node goes on serving (DESIGN's failure model; the shepherd
    used to wait for the lock for good, and the launcher ended the job 30 s later)."""
    app = r"""
import os, signal, sys, time
from dragon.errors import ChannelError, ProcessError
from dragon.globalservices import channel, pool, process
# (the holder keeps its handle: a lock whose holder unmapped the pool before dying is not handed over)
HOLD = "import sys,time\nfrom dragon.pools import Pool\np = Pool.attach(bytes.fromhex(sys.argv[1]))\n" \
       "p._debug_lock(True)\nopen(sys.argv[2], 'w').close()\ntime.sleep(600)"
def stopped_holder(pd):
    flag = os.path.abspath(f"holding-{time.monotonic_ns()}")
    args = ["-c", HOLD, pd.sdesc.hex(), flag]
    h = process.create(sys.executable, None, args, options={"stdout": "devnull"})
    deadline = time.monotonic() + 30
    while not os.path.exists(flag):  # (it has the lock)
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.02)
    os.kill(h.pid, signal.SIGSTOP)  # (not process.query: a long answer needs a block of the locked pool)
    return h
def release(h):
    process.kill(h.p_uid, signal.SIGKILL)  # (SIGKILL ends a stopped process; the lock is handed over)
    process.join(h.p_uid, timeout=10)
user = pool.create(4 << 20)
h = stopped_holder(user)
t = time.monotonic()
try:
    channel.create(user.m_uid, channel_options={"capacity": 2, "block_size": 8})
    print("created?!")
except ChannelError as e:
    print(f"channel refused after {time.monotonic() - t:.1f} s: {type(e).__name__}: {e}", flush=True)
other = process.create("/bin/true", None, [])  # the node serves others meanwhile
print("other exited", process.join(other.p_uid, timeout=10), flush=True)
release(h)
infra = pool.query(1)  # node 0's infrastructure pool
h = stopped_holder(infra)
t = time.monotonic()
try:
    process.create("/bin/true", None, [])
    print("started?!")
except ProcessError as e:
    print(f"process refused after {time.monotonic() - t:.1f} s: {e}", flush=True)
release(h)
p = process.create("/bin/true", None, [])
print("after exited", process.join(p.p_uid, timeout=10), flush=True)
"""
    r = run_app(tmp_path, app, timeout=80)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    m1 = re.search(r"channel refused after ([\d.]+) s: ChannelError: .*pool", r.stdout)
    m2 = re.search(r"process refused after ([\d.]+) s: ", r.stdout)
    assert m1 and m2, out
    assert float(m1.group(1)) < 10 and float(m2.group(1)) < 10, out
    assert "other exited 0" in r.stdout and "after exited 0" in r.stdout, out
    assert "has not answered" not in out, out
