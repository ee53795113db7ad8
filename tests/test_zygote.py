"""The node's zygote (dragon.localservices.zygote): ``ProcessOptions(zygote=True)`` forks a Python child from
a pre-imported interpreter; the child must be the same managed process a fresh ``python -c/-m`` would have
been. Run under dragon-launch; each check prints ``ok <name>``."""

import pytest
from test_runtime_util import APP_HELPERS, run_app

ZYGOTE_APP = (
    APP_HELPERS
    + r'''
import os, signal, sys, time
from dragon.globalservices import process as P
from dragon.globalservices.process import ProcessOptions as PO

Z = PO(zygote=True)

def zygote_of(d):
    """The cmdline of the process's parent (the zygote's cmdline names its module)."""
    with open(f"/proc/{d.pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()

# the first request starts the zygote (and is served by Popen meanwhile); wait until it serves
deadline = time.monotonic() + 30
while True:
    d = P.create(PY, None, ["-c", "import time; time.sleep(0.5)"], options=Z)
    parent = zygote_of(d)
    P.join(d.p_uid)
    if "dragon.localservices.zygote" in parent:
        break
    assert time.monotonic() < deadline, "the zygote never served a request"
    time.sleep(0.2)
ok("zygote up")

os.mkdir("sub")
code = ("import os, sys; print('ARGV', sys.argv); print('CWD', os.getcwd()); "
        "print('FOO', os.environ['FOO']); "
        "print('PATH0', repr(sys.path[0])); print('MAIN', __name__); "
        "print('SHEP', os.environ['DRAGON_SHEP_PID'] == str(os.getppid())); sys.exit(5)")
d = P.create(PY, "sub", ["-c", code, "a", "b"], env={"FOO": "bar"}, options=Z, user_name="zc")
assert P.join(d.p_uid, timeout=20) == 5
ok("-c: argv, cwd, env, exit code")

d = P.create(PY, None, ["-m", "json.tool", "--help"], options=PO(zygote=True, stdout="mod.txt"))
assert P.join(d.p_uid, timeout=20) == 0
assert "usage" in open("mod.txt").read()
ok("-m module, stdout to a file")

d = P.create(PY, None, ["-c", "import time; print('sleeping', flush=True); time.sleep(60)"], options=Z)
time.sleep(0.3)
P.kill(d.p_uid, signal.SIGTERM)
assert P.join(d.p_uid, timeout=20) == -signal.SIGTERM
ok("signal exit")

d = P.create(PY, None, ["-c", "raise ValueError('boom')"], options=Z, user_name="raiser")
assert P.join(d.p_uid, timeout=20) == 1
ok("uncaught exception")

d = P.create(PY, None, ["-c", "import atexit, threading, time\n"
                         "atexit.register(lambda: print('atexit ran', flush=True))\n"
                         "threading.Thread(target=lambda: (time.sleep(0.3), "
                         "print('thread done', flush=True))).start()"],
             options=Z, user_name="ender")
assert P.join(d.p_uid, timeout=20) == 0
ok("normal interpreter exit")

d = P.create(PY, None, ["-c", "import sys; sys.exit(sys.stdin.read() == '' and 4)"], options=Z)
assert P.join(d.p_uid, timeout=20) == 4
ok("stdin is /dev/null")

# not eligible: another program, interpreter options the zygote does not have, a different PYTHONPATH
SLEEP = "import time; time.sleep(0.5)"
for args, env in ((["-X", "importtime", "-c", SLEEP], None), (["-c", SLEEP], {"PYTHONPATH": "/nowhere"})):
    d = P.create(PY, None, args, env=env, options=PO(zygote=True, stderr="devnull"))
    assert "dragon.localservices.zygote" not in zygote_of(d), args
    assert P.join(d.p_uid, timeout=30) == 0
d = P.create("/bin/sh", None, ["-c", "exit 6"], options=Z)
assert P.join(d.p_uid, timeout=20) == 6
ok("not eligible: started as usual")

t = time.monotonic()
ds = [P.create(PY, None, ["-c", f"import sys; sys.exit({i})"], options=Z) for i in range(20)]
assert [P.join(x.p_uid, timeout=30) for x in ds] == list(range(20))
ok("many")

# a signal that comes after a child ended, before its shepherd heard of the end (the zygote reaps at once:
# its pidfd then says ESRCH), has nothing left to act on: no error but "ended" once that is known
refused = 0
for _ in range(30):
    d = P.create(PY, None, ["-c", "pass"], options=Z)
    while P.join(d.p_uid, timeout=0) is None:
        try:
            P.kill(d.p_uid, signal.SIGTERM)
        except P.ProcessError as e:
            assert "has already exited" in str(e) or "is not running" in str(e), str(e)
            refused += 1
ok(f"signals racing the end ({refused} refused as ended)")
print("ALL OK")
'''
)


@pytest.mark.timeout(120)
def test_zygote_children_are_the_programs_they_were_asked_to_be(tmp_path):
    r = run_app(tmp_path, ZYGOTE_APP, timeout=110)
    out, err = r.stdout, r.stderr
    assert "ALL OK" in out and r.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "[zc] ARGV ['-c', 'a', 'b']" in out
    assert f"[zc] CWD {tmp_path / 'sub'}" in out
    assert "[zc] FOO bar" in out and "[zc] PATH0 ''" in out and "[zc] MAIN __main__" in out
    assert "[zc] SHEP True" in out  # a zygote child knows its parent as the process that started it
    assert "[raiser] ValueError: boom" in err
    assert "[ender] thread done" in out and "[ender] atexit ran" in out
