"""Teardown: whatever ends a job (the program exits or raises, SIGTERM/SIGINT/SIGKILL of the launcher, SIGKILL
of the shepherd or of global services), within 5 s no process of the job and no /dev/shm/dragon-<job>-*
survives."""

import os
import queue
import signal
import subprocess
import threading
import time

import pytest
from test_runtime_util import alive, job_pids, job_segments, launch_cmd, launch_env, launched, write_app

APP = r"""
import os, sys, time
from dragon.globalservices import process as P
PY = sys.executable
P.create("/bin/sleep", None, ["60"])
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open('stubborn.ready', 'w').close(); time.sleep(60)")
P.create(PY, None, ["-c", STUBBORN], user_name="stubborn")
P.create("/bin/sh", None, ["-c", "sleep 60 & sleep 61 & touch sh1.ready; wait"])  # grandchildren too
P.create("/bin/sh", None, ["-c", "setsid sleep 62 & touch sh2.ready; sleep 63"])  # one leaves the group
while not all(os.path.exists(f) for f in ("stubborn.ready", "sh1.ready", "sh2.ready")):
    time.sleep(0.01)
print("READY", os.environ["DRAGON_JOB"], os.getppid(), flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(0)
if mode == "raise":
    raise RuntimeError("boom")
time.sleep(60)
"""

EXPECTED = {
    "exit": 0,
    "raise": 1,
    "sigterm_launcher": 128 + 15,
    "sigint_launcher": 128 + 2,
    "sigkill_launcher": -9,
    "sigkill_shepherd": 70,
    "sigkill_gs": 70,
}


def _children(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


@pytest.mark.timeout(40)
@pytest.mark.parametrize("action", list(EXPECTED))
def test_teardown(tmp_path, action):
    app = write_app(tmp_path, APP)
    mode = action if action in ("exit", "raise") else "sleep"
    proc = subprocess.Popen(
        launch_cmd(str(app), mode),
        cwd=tmp_path,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    job = None
    try:
        line = lines.get(timeout=20)
        assert line.startswith("READY"), line
        _, job, shep = line.split()
        shep = int(shep)
        services = _children(proc.pid)
        assert shep in services and len(services) == 2, services
        gs = next(p for p in services if p != shep)
        managed = job_pids(job)
        assert len(managed) >= 8, managed  # app, sleep, stubborn, 2 sh, their 3 sleeps
        assert job_segments(job)
        t0 = time.monotonic()
        if action == "sigkill_launcher":
            proc.kill()
        elif action == "sigterm_launcher":
            proc.send_signal(signal.SIGTERM)
        elif action == "sigint_launcher":
            proc.send_signal(signal.SIGINT)
        elif action == "sigkill_shepherd":
            os.kill(shep, signal.SIGKILL)
        elif action == "sigkill_gs":
            os.kill(gs, signal.SIGKILL)
        left = []
        while time.monotonic() - t0 < 5.0:
            left = (
                [p for p in job_pids(job) if alive(p)]
                + [p for p in (shep, gs) if alive(p)]
                + job_segments(job)
                + ([proc.pid] if proc.poll() is None else [])
            )
            if not left:
                break
            time.sleep(0.05)
        assert not left, f"{action}: still there after 5 s: {left}"
        code = proc.wait(timeout=5)
        err = proc.stderr.read()
        assert code == EXPECTED[action], (code, err)
        if action == "raise":
            assert "RuntimeError: boom" in err
        if action == "sigkill_shepherd":
            assert "shepherd" in err and "node 0" in err, err
        if action == "sigkill_gs":
            assert "global services" in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if job:
            for p in job_pids(job):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            for n in job_segments(job):
                os.unlink(os.path.join("/dev/shm", n))


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_tears_down_a_program_that_ignores_the_first(tmp_path):
    # the first Ctrl-C goes to the program (as SIGINT); one that ignores it is ended by the second
    app = write_app(
        tmp_path,
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "print('UP', flush=True)\ntime.sleep(60)\n",
    )
    with launched(tmp_path, str(app)) as proc:
        assert proc.stdout.readline().strip() == "UP"
        os.killpg(proc.pid, signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)  # (the program ignores it: the job goes on)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
        err = proc.stderr.read()
    assert code == 130 and "SIGINT to the program" in err and "tearing the job down" in err, (code, err)
