"""Acceptance tests of dragon.globalservices.process (the spec's Process Services), run under dragon-launch.

Many checks share one launch (startup is cheap but not free); each check prints ``ok <name>`` so a failure
shows how far the app got.
"""

import os
import subprocess

import pytest
from test_runtime_util import APP_HELPERS, launch_cmd, launch_env, run_app, write_app

PROCESS_APP = (
    APP_HELPERS
    + r'''
import os, signal, sys, threading, time
from dragon.errors import ProcessError, ProcessTimeout, DragonError
from dragon.globalservices import process as P
from dragon.globalservices.process import ProcessOptions, ProcessDescriptor

me = P.this_process()
assert me.p_uid == 1 and me.is_alive and me.retval is None and me.node == 0, me
assert me.pid == os.getpid() and me.location[0] == 0
ok("this_process")
assert "itself" in raises(ProcessError, P.join, me.p_uid)
assert "itself" in raises(ProcessError, P.join, me.user_name, timeout=1)
assert "itself" in raises(ProcessError, P.multi_join, [me.p_uid])
ok("join self")

# create + join, exit code, unique names, soft
a = P.create(PY, None, ["-c", "import sys; sys.exit(7)"], user_name="seven")
assert isinstance(a, ProcessDescriptor) and a.p_uid > 1 and a.user_name == "seven" and a.pid > 0
assert P.join("seven") == 7
q = P.query("seven")
assert not q.is_alive and q.retval == 7 and q.p_uid == a.p_uid
assert P.query(a.p_uid).retval == 7
ok("create join exit code query by int and name")
a.refresh()
assert a.retval == 7 and not a.is_alive
ok("refresh")
msg = raises(ProcessError, P.create, "/bin/true", None, [], user_name="seven")
assert "seven" in msg, msg
s = P.create("/bin/true", None, [], user_name="seven", soft=True)
assert s.p_uid == a.p_uid
ok("unique name and soft create")
b = P.create("/bin/true", "", [])
c = P.create("/bin/true", "", [])
assert b.user_name and c.user_name and b.user_name != c.user_name and c.p_uid > b.p_uid
assert P.join(b.p_uid) == 0 and P.join(c.user_name) == 0
ok("picked unique names")

# join timeouts measured on the server
sl = P.create("/bin/sleep", None, ["30"], user_name="sleeper")
t0 = time.monotonic()
assert P.join("sleeper", timeout=0.3) is None
dt = time.monotonic() - t0
assert 0.25 < dt < 10, dt
assert P.join("sleeper", timeout=0) is None
d = P.query("sleeper")
assert d.is_alive and d.retval is None
ok("join timeout")
names = dict((n, u) for u, n in P.get_list())
assert names.get("sleeper") == sl.p_uid and 1 in dict(P.get_list()), P.get_list()
assert all(isinstance(u, int) and isinstance(n, str) for u, n in P.get_list())
assert "seven" not in names
ok("get_list")

# multi_join: None on timeout, then a list of (p_uid, code) and a status dict
r = P.multi_join(["sleeper"], timeout=0.2)
assert isinstance(r, tuple) and len(r) == 2 and r[0] is None, r
assert set(r[1]) == {sl.p_uid} and r[1][sl.p_uid].is_alive
q1 = P.create(PY, None, ["-c", "import time; time.sleep(0.3); raise SystemExit(4)"])
exited, status = P.multi_join([sl.p_uid, q1.p_uid], timeout=20)
assert exited == [(q1.p_uid, 4)], exited
assert set(status) == {sl.p_uid, q1.p_uid} and status[q1.p_uid].retval == 4 and status[sl.p_uid].is_alive
exited, status = P.multi_join([q1.user_name, "seven"])
assert sorted(exited) == sorted([(q1.p_uid, 4), (a.p_uid, 7)]), exited
ok("multi_join")

# kill with a chosen signal -> -signum
P.kill("sleeper", signal.SIGTERM)
assert P.join("sleeper", timeout=20) == -signal.SIGTERM
k = P.create("/bin/sleep", None, ["30"])
P.kill(k.p_uid)
assert P.join(k.p_uid, timeout=20) == -signal.SIGKILL
k2 = P.create("/bin/sleep", None, ["30"])
P.kill(k2.p_uid, signal.SIGUSR1)
assert P.join(k2.p_uid, timeout=20) == -signal.SIGUSR1
assert "exited" in raises(ProcessError, P.kill, k2.p_uid)
ok("kill")

# threads: a blocked join does not hold up another thread's requests
blk = P.create("/bin/sleep", None, ["30"])
res = {}
t = threading.Thread(target=lambda: res.setdefault("code", P.join(blk.p_uid, timeout=20)))
t.start()
time.sleep(0.1)
for _ in range(20):
    assert P.query(blk.p_uid).is_alive
P.kill(blk.p_uid, signal.SIGINT)
t.join(20)
assert res["code"] == -signal.SIGINT, res
outs = []
ths = [threading.Thread(target=lambda: outs.append(P.join(P.create("/bin/true", None, []).p_uid)))
       for _ in range(8)]
[x.start() for x in ths]; [x.join(20) for x in ths]
assert outs == [0] * 8, outs
ok("threads")

# env, run_dir, options
os.mkdir("sub")
ENVCHECK = ("import os, sys; print('CWD', os.getcwd()); "
            "print('ENV', os.environ['FOO'], os.environ['DRAGON_PUID'], os.environ['PATH'] != '')")
e = P.create(PY, "sub", ["-c", ENVCHECK], env={"FOO": "bar"}, user_name="envcheck")
assert P.join(e.p_uid) == 0
f = P.create(PY, None, ["-c", "import sys; print('to file'); print('err line', file=sys.stderr)"],
             options=ProcessOptions(stdout="out.txt", stderr=ProcessOptions.STDOUT))
assert P.join(f.p_uid) == 0
assert open("out.txt").read() == "to file\nerr line\n", open("out.txt").read()
g = P.create(PY, None, ["-c", "print('silent')"], options={"stdout": "devnull"})
assert P.join(g.p_uid) == 0
h = P.create(PY, None, ["-c", "print('unlabelled child')"],
             options=ProcessOptions(stdout=ProcessOptions.INHERIT), user_name="inh")
assert P.join(h.p_uid) == 0
UNNAMED = ("import sys; print('line1'); print('line2'); print('to stderr', file=sys.stderr); "
           "sys.stdout.write('partial')")
un = P.create(PY, None, ["-c", UNNAMED])
assert P.join(un.p_uid) == 0
print("UNNAMED", un.p_uid)
ok("env run_dir options")

# a managed Python child uses the API itself (and its own descendants can too)
child = P.create(PY, None, ["-c", """
import os, subprocess, sys
from dragon.globalservices import process as P
me = P.this_process()
print('child', me.p_uid, me.user_name)
gc = P.create('/bin/true', None, [])
assert P.join(gc.p_uid) == 0
GC = ('from dragon.globalservices import process as P; d = P.create("/bin/true", None, []); '
      'print("grandchild joined", P.join(d.p_uid))')
r = subprocess.run([sys.executable, '-c', GC])
sys.exit(r.returncode)
"""], user_name="nested")
assert P.join("nested", timeout=30) == 0
ok("nested use")

# a joiner that dies while waiting: GS forgets what it owed it, and stays healthy
target = P.create("/bin/sleep", None, ["30"], user_name="target")
JOINER = ("from dragon.globalservices import process as P; print('waiting', flush=True); "
          "P.join('target', timeout=25)")
joiner = P.create(PY, None, ["-c", JOINER], user_name="joiner")
time.sleep(0.5)
P.kill("joiner")
assert P.join("joiner", timeout=20) == -signal.SIGKILL
P.kill("target")
assert P.join("target", timeout=20) == -signal.SIGKILL
assert P.query("target").retval == -signal.SIGKILL
ok("dead joiner")

# a managed Python child reaches GS without importing more than it needs
lean = P.create(PY, None, ["-c", """
import sys
before = set(sys.modules)
from dragon.globalservices import process as P
P.this_process()
heavy = {'subprocess', 'numpy', 'mpi4py', 'logging', 'selectors', 'argparse', 'dragon.globalservices.server',
         'dragon.localservices.shepherd', 'launcher'} & (set(sys.modules) - before)
if heavy:
    print('HEAVY', sorted(heavy))
    sys.exit(1)
"""])
assert P.join(lean.p_uid, timeout=20) == 0
ok("lean client")

# processes that cannot start, bad input
assert "nonexistent" in raises(ProcessError, P.create, "/nonexistent/prog", None, [])
assert "nodir" in raises(ProcessError, P.create, "/bin/true", "/nodir/x", [])
for bad in [
    lambda: P.create("", None, []), lambda: P.create(None, None, []), lambda: P.create(3, None, []),
    lambda: P.create("/bin/true", None, "notalist"), lambda: P.create("/bin/true", None, [1, 2]),
    lambda: P.create("/bin/true", None, [], env={"A": 1}), lambda: P.create("/bin/true", None, [], env=["A"]),
    lambda: P.create("/bin/true", None, [], env={"A=B": "c"}),
    lambda: P.create("/bin/true", None, [], user_name=5), lambda: P.create("/bin/true", None, [], soft=True),
    lambda: P.create("/bin/true", None, [], soft="yes", user_name="x"),
    lambda: P.create("/bin/true", None, [], options=5),
    lambda: P.create("/bin/true", None, [], options={"bogus": 1}),
    lambda: P.create("/bin/true", None, [], options=ProcessOptions(node=7)),
    lambda: ProcessOptions(node=-1), lambda: ProcessOptions(stdout=3),
    lambda: P.query(99999), lambda: P.query("no-such-proc"), lambda: P.query(None), lambda: P.query(1.5),
    lambda: P.query(True),
    lambda: P.kill(99999), lambda: P.kill("no-such-proc"), lambda: P.kill(1, 999), lambda: P.kill(1, "TERM"),
    lambda: P.join(99999), lambda: P.join("no-such-proc", timeout=1), lambda: P.join(a.p_uid, timeout=-1),
    lambda: P.join(a.p_uid, timeout="1"),
    lambda: P.multi_join([]), lambda: P.multi_join("seven"), lambda: P.multi_join([a.p_uid, 99999]),
    lambda: P.multi_join([a.p_uid], timeout=-2),
]:
    msg = raises(ProcessError, bad)
    assert msg, bad
assert "99999" in raises(ProcessError, P.query, 99999)
assert "no-such-proc" in raises(ProcessError, P.join, "no-such-proc")
ok("bad input")
print("ALL OK")
sys.exit(3)
'''
)


@pytest.mark.timeout(90)
def test_process_api(tmp_path):
    r = run_app(tmp_path, PROCESS_APP, timeout=80)
    out = r.stdout
    assert "ALL OK" in out, f"stdout:\n{out}\nstderr:\n{r.stderr}"
    assert r.returncode == 3, r.stderr  # the program's exit code is the launcher's
    # labelled output: named processes by name, unnamed ones by p_uid, stderr too; the head unlabelled
    unnamed = next(line.split()[1] for line in out.splitlines() if line.startswith("UNNAMED"))
    assert f"[{unnamed}] line1\n[{unnamed}] line2\n" in out
    assert f"[{unnamed}] partial\n" in out
    assert f"[{unnamed}] to stderr\n" in r.stderr
    assert f"[envcheck] CWD {tmp_path / 'sub'}\n" in out
    assert "[envcheck] ENV bar" in out
    assert "silent" not in out
    assert "\nunlabelled child\n" in out
    assert "[nested] child" in out and "[nested] grandchild joined 0" in out
    assert "ok this_process" in out


START_APP = (
    APP_HELPERS
    + r'''
import json, os, signal, subprocess, sys
from dragon.errors import ProcessError
from dragon.globalservices import process as P
from dragon.globalservices.process import ProcessOptions as O

# what a child sees of how it was started, written to the file named by its argument
PROBE = """
import json, os, sys
fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))
with open(sys.argv[1], 'w') as f:
    json.dump({'fds': fds, 'own_group': os.getpgid(0) == os.getpid(),
               'launchers_session': os.getsid(0) == os.getsid(int(os.environ['DRAGON_SHEP_PID'])),
               'stdin': os.readlink('/proc/self/fd/0'), 'cwd': os.getcwd()}, f)
print('to stdout'); print('to stderr', file=sys.stderr)
"""
here = os.getcwd()
os.mkdir("sub")
shep = int(os.environ["DRAGON_SHEP_PID"])
before = len(os.listdir(f"/proc/{shep}/fd"))
python_by_name = os.path.basename(PY)  # (found on PATH: started with Popen, as a path is not given)
os.environ["PATH"] = os.path.dirname(PY) + os.pathsep + os.environ["PATH"]
routes = [("path", PY, None), ("run_dir", PY, os.path.join(here, "sub")), ("name", python_by_name, None)]
outputs = [
    ("fwd", O()),
    ("merged", O(stderr=O.STDOUT)),
    ("files", O(stdout="out.txt", stderr=O.DEVNULL)),
]
for route, exe, run_dir in routes:
    for how, opts in outputs:
        report = os.path.join(here, f"report-{route}-{how}.json")
        d = P.create(exe, run_dir, ["-c", PROBE, report], user_name=f"{route}-{how}", options=opts,
                     env={"PATH": os.environ["PATH"]})
        assert P.join(d.p_uid, timeout=30) == 0, (route, how)
        r = json.load(open(report))
        # (the listing itself holds one more descriptor, the highest)
        assert r["fds"][:3] == [0, 1, 2] and len(r["fds"]) == 4, (route, how, r)
        # its own process group, in the shepherd's session (autogroup scheduling: spawn.own_group)
        assert r["own_group"] and r["launchers_session"] and r["stdin"] == "/dev/null", (route, how, r)
        assert r["cwd"] == (run_dir or here), (route, how, r)
        print("started", route, how, flush=True)
    # SIGPIPE is back at its default (Python ignores it, in the services and in a Python child: ask a shell)
    sh = "/bin/sh" if route != "name" else "sh"
    report = os.path.join(here, f"sigign-{route}")
    d = P.create(
        sh, run_dir, ["-c", f"grep ^SigIgn: /proc/$$/status > {report}"], env={"PATH": os.environ["PATH"]}
    )
    assert P.join(d.p_uid, timeout=30) == 0, route
    ignored = int(open(report).read().split()[1], 16)
    assert not ignored >> (signal.SIGPIPE - 1) & 1, (route, hex(ignored))
ok("what a child gets")

with open("notexec", "w") as f:
    f.write("#!/bin/sh\n")
for _ in range(20):
    assert "notexec" in raises(ProcessError, P.create, os.path.join(here, "notexec"), None, [])
    assert "cannot start" in raises(ProcessError, P.create, here, None, [])  # a directory
    assert "cannot start" in raises(ProcessError, P.create, "/nonexistent/prog", None, [])
assert P.join(P.create("/bin/true", None, []).p_uid, timeout=30) == 0  # and the shepherd is fine
after = len(os.listdir(f"/proc/{shep}/fd"))
assert after <= before + 2, (before, after)  # nothing left open by the failed starts (+2: the pidfds' noise)
ok("cannot start")
print("ALL OK")
'''
)


@pytest.mark.timeout(90)
def test_what_a_started_process_gets(tmp_path):
    """However the shepherd starts a program (posix_spawn for a path run in its own directory, Popen for a
    name or another run_dir), the child gets its own session, SIGPIPE at its default, stdin from /dev/null
    and no descriptor but 0-2, not even one the launcher inherited; a start that fails leaves nothing open."""
    app = write_app(tmp_path, START_APP)
    r_fd, w_fd = os.pipe()
    try:
        r = subprocess.run(
            launch_cmd(str(app)),
            cwd=tmp_path,
            env=launch_env(),
            capture_output=True,
            text=True,
            timeout=80,
            pass_fds=(w_fd,),  # an inheritable descriptor the launcher gets from its parent
            input="",  # and a stdin that is not /dev/null (the head's; no other process's)
        )
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert "ALL OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    for route in ("path", "run_dir", "name"):
        assert f"[{route}-fwd] to stdout\n" in r.stdout and f"[{route}-fwd] to stderr\n" in r.stderr
        assert f"[{route}-merged] to stdout\n[{route}-merged] to stderr\n" in r.stdout
        assert f"[{route}-files]" not in r.stdout + r.stderr
    # (a file path is relative to the run_dir)
    assert (tmp_path / "out.txt").read_text() == "to stdout\n" * 2
    assert (tmp_path / "sub" / "out.txt").read_text() == "to stdout\n"


GONE_APP = r"""
import os, sys
from dragon.globalservices import process as P
os.rmdir(os.getcwd())  # the directory the job was started in (and the shepherd works in) is gone
d = P.create("/bin/true", sys.argv[1], [])  # a program by path, in a directory that exists
print("joined", P.join(d.p_uid, timeout=30))
"""


@pytest.mark.timeout(60)
def test_a_start_after_the_jobs_directory_was_removed(tmp_path):
    """A shepherd whose working directory was removed still starts a process in a run_dir that exists (it
    cannot compare the two directories: that process goes to Popen, as before posix_spawn)."""
    app = write_app(tmp_path, GONE_APP)
    gone = tmp_path / "gone"
    gone.mkdir()
    r = subprocess.run(
        launch_cmd(str(app), str(tmp_path)),
        cwd=gone,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert r.returncode == 0 and "joined 0" in r.stdout, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert not gone.exists()
