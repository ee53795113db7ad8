"""Pool and ProcessPoolExecutor of the 'dragon' start method on one node (tests/mpi_apps/mp_pool_app.py; the
same app runs across three virtual nodes in test_mp_multinode.py), and an app that dies with a busy pool."""

import os
import signal
import subprocess
import time

import pytest
from test_runtime_util import launch_cmd, launch_env, launched, run_app, run_app_ok

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


# a stdlib (descriptor) queue or pipe end sent to dragon processes is relayed through a channel by a thread of
# this process; concurrent.futures' call queue is one. The relay of a write end held the pipe's write end
# open for good, so the relay of its read end never saw the end of file: two threads and two descriptors per
# executor ever made stayed, and a write end sent to a child kept its reader here from its end of file
RELAYS_APP = r"""
import os, threading
import dragon
import multiprocessing as mp
import concurrent.futures as cf
from multiprocessing import connection

def double(x):
    return 2 * x

def write(w):
    w.send("from the child")

def relays():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("dragon-mp-relay"))

def executors(ctx, n):
    for _ in range(n):
        with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
            assert list(ex.map(double, range(4))) == [0, 2, 4, 6]

def counts():
    import gc, time
    gc.collect()
    deadline = time.monotonic() + 10
    # (a relay ends once the other side said goodbye; a readiness watcher, with its eventfd, once its
    # connection is closed)
    while threading.active_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(os.listdir("/proc/self/fd")), relays()

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    executors(ctx, 3)
    first = counts()
    executors(ctx, 6)
    again = counts()
    assert again[0] <= first[0] and not first[1] and not again[1], (first, again)
    r, w = connection.Pipe(duplex=False)
    p = ctx.Process(target=write, args=(w,))
    p.start()
    p.join(30)
    w.close()
    assert r.recv() == "from the child"
    assert r.poll(20), "no end of file: the relay of the write end still holds it"
    try:
        r.recv()
        raise AssertionError("no EOFError")
    except EOFError:
        pass
    print("BOUNDED", first)
"""


@pytest.mark.timeout(120)
def test_relays_of_descriptor_connections_end(tmp_path):
    run_app_ok(tmp_path, RELAYS_APP, "BOUNDED")


# a worker's "ready" (its inbox's sdesc) handled after the worker ended and its heap went (seen twice in 300
# `with Pool(4)` rounds beside process kills): the scheduler thread died on the attach, and every later call
# of the pool would have waited for good. The stale "ready" goes here straight into the pool's result
# channel, as a worker sends it.
STALE_READY_APP = r"""
import dragon
import multiprocessing as mp
from dragon.channels import Channel
from dragon.mp import heap, serial
from dragon.pools import Pool

if __name__ == "__main__":
    ctx = mp.get_context("dragon")
    gone = Pool.create(1 << 20)
    stale = bytes(Channel.create(gone, capacity=4, block_size=64).sdesc)
    gone.destroy()
    with ctx.Pool(2) as pool:
        assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
        st = pool._st
        wid = next(iter(st.workers))
        serial.send_obj(heap.attach(st.results_sd), ("ready", wid, stale))
        assert pool.map_async(abs, range(-20, 0)).get(timeout=30) == list(range(20, 0, -1))
        assert st.scheduler.is_alive()
    print("STILL SCHEDULING")
"""


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
def test_a_ready_from_a_worker_whose_heap_is_gone_does_not_stop_the_pool(tmp_path):
    r = run_app_ok(tmp_path, STALE_READY_APP, "STILL SCHEDULING", timeout=80)
    assert "Exception in thread" not in r.stderr, r.stderr


@pytest.mark.timeout(90)
def test_ctrl_c_in_pool_map_reaches_the_program(tmp_path):
    # Ctrl-C (SIGINT to the terminal's foreground group: the launcher) in the middle of Pool.map raises
    # KeyboardInterrupt in the program, as it would in a plain python: its except and finally blocks run (the
    # pool's workers are gone once it left the with block), then the job ends with exit status 130.
    app = tmp_path / "app.py"
    app.write_text(CTRL_C_APP)
    with launched(tmp_path, str(app)) as proc:
        assert proc.stdout.readline().strip() == "MAPPING"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert "CAUGHT []" in out and "FINISHED" not in out, (out, err)
    assert "KeyboardInterrupt" in err and proc.returncode == 130, (proc.returncode, err)
