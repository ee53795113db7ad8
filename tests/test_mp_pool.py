"""Pool and ProcessPoolExecutor of the 'dragon' start method on one node (tests/mpi_apps/mp_pool_app.py; the
same app runs across three virtual nodes in test_mp_multinode.py), and an app that dies with a busy pool."""

import os
import signal
import subprocess
import time

import pytest
from test_runtime_util import launch_cmd, launch_env, run_app

APP = os.path.join(os.path.dirname(__file__), "mpi_apps", "mp_pool_app.py")


def _run(tmp_path, *args, timeout=190):
    mark = os.urandom(6).hex()
    r = subprocess.run(
        launch_cmd(APP, *args),
        cwd=tmp_path,
        env=launch_env({"DRAGON_TEST_MARK": mark}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    from mpi_util import marked

    deadline = time.monotonic() + 5
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not marked(mark), "processes left behind"
    return r


@pytest.mark.timeout(200)
def test_pool_and_executor_on_one_node(tmp_path):
    r = _run(tmp_path)
    assert "ALL OK" in r.stdout and r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"


@pytest.mark.timeout(60)
def test_an_app_that_dies_with_a_busy_pool_leaves_nothing_behind(tmp_path):
    r = _run(tmp_path, "crash", timeout=50)
    assert "crashing" in r.stdout and r.returncode == 3, r.stdout + r.stderr


@pytest.mark.timeout(60)
def test_example_pool_estimates_pi(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(APP)), os.pardir, "examples", "mp_pool_pi.py")
    r = subprocess.run(
        launch_cmd(os.path.abspath(example), "2000000"),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert r.returncode == 0 and "pi ~ 3.14" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(90)
def test_leaving_a_pool_after_a_worker_was_lost_does_not_hang(tmp_path):
    """A task whose argument a worker cannot unpickle ends that worker (WorkerLostError); the scheduler starts
    a replacement, and terminate() (the with block's end) listed the workers before it came: join waited for
    the replacement for good (3 of 3 runs)."""
    app = r"""
import os
import multiprocessing as mp
def boom():
    if os.environ.get("IN_PARENT") != str(os.getpid()):
        raise RuntimeError("cannot unpickle here")
    return 1
class Bad:
    def __reduce__(self):
        return (boom, ())
def f(x):
    return 1
if __name__ == "__main__":
    os.environ["IN_PARENT"] = str(os.getpid())
    ctx = mp.get_context("dragon")
    for _ in range(3):
        with ctx.Pool(2) as p:
            try:
                p.map_async(f, [Bad()]).get(timeout=30)
            except Exception as e:
                print("got", type(e).__name__, flush=True)
    print("left", flush=True)
"""
    r = run_app(tmp_path, "import dragon\n" + app, timeout=80)
    assert r.returncode == 0 and r.stdout.count("got WorkerLostError") == 3 and "left" in r.stdout, (
        r.stdout + r.stderr
    )


CTRL_C_APP = r"""
import os, sys, time
import dragon
import multiprocessing as mp

def work(x):
    time.sleep(0.2)
    return x

if __name__ == "__main__":
    mp.set_start_method("dragon")
    try:
        with mp.Pool(3) as p:
            r = p.map_async(work, range(1000))
            time.sleep(0.5)
            print("MAPPING", flush=True)
            r.get()
            print("FINISHED", flush=True)
    except KeyboardInterrupt:
        print("CAUGHT", [c.exitcode for c in mp.active_children()], flush=True)
        raise
"""


@pytest.mark.timeout(90)
def test_ctrl_c_in_pool_map_reaches_the_program(tmp_path):
    # Ctrl-C (SIGINT to the terminal's foreground group: the launcher) in the middle of Pool.map raises
    # KeyboardInterrupt in the program, as it would in a plain python: its except and finally blocks run (the
    # pool's workers are gone once it left the with block), then the job ends with exit status 130.
    app = tmp_path / "app.py"
    app.write_text(CTRL_C_APP)
    proc = subprocess.Popen(
        launch_cmd(str(app)),
        cwd=tmp_path,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "MAPPING"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "CAUGHT []" in out and "FINISHED" not in out, (out, err)
    assert "KeyboardInterrupt" in err and proc.returncode == 130, (proc.returncode, err)
