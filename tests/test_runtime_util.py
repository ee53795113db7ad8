"""Helpers for the runtime tests: run a small app under dragon-launch and look for what a job left behind."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# what the acceptance apps share: `ok(name)` marks a passed check, `raises(exc, fn, ...)` returns the message
APP_HELPERS = r"""import sys

def ok(name):
    print("ok", name, flush=True)

def raises(exc, fn, *a, **kw):
    try:
        fn(*a, **kw)
    except exc as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}{a} did not raise {exc.__name__}")

PY = sys.executable
"""


def launch_env(extra=None):
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("DRAGON_")]:
        del env[k]
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def launch_cmd(*args):
    return [sys.executable, "-m", "launcher.launch", *args]


def write_app(tmp_path, code, name="app.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


@contextlib.contextmanager
def launched(tmp_path, *args):
    """dragon-launch *args in a session of its own (so that a test can signal its process group as a terminal
    would), stdout and stderr piped (text); -> the Popen. Whatever still runs at the end is SIGKILLed."""
    proc = subprocess.Popen(
        launch_cmd(*args),
        cwd=tmp_path,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_app(tmp_path, code, args=(), timeout=60, launcher_args=(), env=None):
    """Write code to tmp_path/app.py, run it under dragon-launch; -> CompletedProcess (text)."""
    app = write_app(tmp_path, code)
    return subprocess.run(
        launch_cmd(*launcher_args, str(app), *args),
        cwd=tmp_path,
        env=launch_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def job_pids(job):
    sys.path.insert(0, REPO)
    from launcher.cleanup import job_pids as jp

    return jp(job)


def job_segments(job):
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"dragon-{job}-")]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def run_app_ok(tmp_path, code, marker, timeout=110):
    """run_app, then assert that it printed marker and exited 0 (its output in the message); -> the result."""
    r = run_app(tmp_path, code, timeout=timeout)
    assert marker in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r
