"""Pool (and concurrent.futures.ProcessPoolExecutor) of the 'dragon' start method. Run under dragon-launch, on
one node or several (workers go round-robin over the nodes). Prints ``ok <check>``; exits non-zero on a
failure. With ``crash`` as argument it makes a pool, starts tasks, and dies (the launcher must leave nothing
behind)."""

import multiprocessing as mp
import os
import signal
import sys
import threading
import time

import dragon  # noqa: F401


def ok(name):
    print("ok", name, flush=True)


def sq(x):
    return x * x


def where(_):
    time.sleep(0.05)
    return (int(os.environ["DRAGON_NODE"]), os.getpid())


def slow(x):
    time.sleep(0.05)
    return x


def raiser(x):
    raise KeyError(f"key {x}")  # some comment


def unpicklable(_):
    return lambda: 42


class TwoArgError(Exception):  # pickles, but its __init__ cannot be called with its args: not unpicklable
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def raise_two_arg(_):
    raise TwoArgError("a", "b")


def bad_callback(_):
    raise RuntimeError("the callback's own bug")


def die_on(x):
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x


def init(marker):
    global MARK
    MARK = marker


def get_mark(_):
    return MARK


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def gen(n):
    yield from range(n)


def bad_gen():
    yield 1
    raise ValueError("the iterable failed")


def main():
    mp.set_start_method("dragon")
    from dragon.globalservices import node, process

    nnodes = len(node.get_list())
    if sys.argv[1:] == ["crash"]:
        p = mp.Pool(4)
        p.map_async(slow, range(1000), chunksize=1)
        time.sleep(0.5)
        print("crashing", flush=True)
        os._exit(3)

    with mp.Pool(4) as pool:
        assert len(pool._pool) == 4
        assert pool.map(sq, range(100)) == [x * x for x in range(100)]
        assert pool.map(sq, range(100), chunksize=7) == [x * x for x in range(100)]
        assert pool.map(sq, []) == []
        assert list(pool.imap(sq, gen(50))) == [x * x for x in range(50)]
        assert list(pool.imap(sq, range(50), chunksize=4)) == [x * x for x in range(50)]
        assert sorted(pool.imap_unordered(sq, range(50))) == [x * x for x in range(50)]
        assert sorted(pool.imap_unordered(sq, range(50), chunksize=8)) == [x * x for x in range(50)]
        assert pool.starmap(pow, [(2, 5), (3, 3)]) == [32, 27]
        assert pool.starmap_async(pow, [(2, 2)]).get(30) == [4]
        assert pool.apply(sq, (9,)) == 81 and pool.apply(sq, (), {"x": 3}) == 9
        got = []
        r = pool.map_async(sq, range(10), callback=got.append)
        r.wait(30)
        assert r.ready() and r.successful() and got == [[x * x for x in range(10)]]
        errs = []
        r = pool.apply_async(raiser, (1,), error_callback=errs.append)
        try:
            r.get(30)
            raise AssertionError("no error")
        except KeyError as e:
            assert "some comment" in str(e.__cause__), e.__cause__  # the remote traceback
        assert isinstance(errs[0], KeyError) and not r.successful()
        it = pool.imap(sq, bad_gen())
        assert next(it) == 1
        try:
            next(it)
            raise AssertionError("the iterable's error was lost")
        except ValueError:
            pass
        try:
            pool.apply(unpicklable, (0,))
            raise AssertionError("an unpicklable result arrived")
        except mp.pool.MaybeEncodingError:
            pass
        # an exception that cannot be rebuilt, and a callback that raises: that task says so, the pool goes on
        # (the scheduler thread died on either and every later call hung)
        try:
            pool.apply(raise_two_arg, (0,))
            raise AssertionError("no error")
        except mp.pool.MaybeEncodingError as e:
            assert "TwoArgError" in str(e), e
        r = pool.apply_async(sq, (3,), callback=bad_callback)
        assert r.get(timeout=30) == 9
        assert pool.map(sq, range(5)) == [0, 1, 4, 9, 16] and pool.apply(abs, (-1,)) == 1
        try:
            pool.apply_async(sq, (1,)).get(timeout=0) if False else None
            pool.apply_async(slow, (1,)).get(timeout=0.001)
        except mp.TimeoutError:
            pass
        assert {p._popen.node for p in pool._pool} == set(range(nnodes))  # round-robin
        nodes_used = {n for n, _ in pool.map(where, range(80), chunksize=1)}
        if nnodes > 1:
            assert nodes_used == set(range(nnodes)), nodes_used
    ok(f"map, imap, starmap, apply, async, callbacks, errors (workers on nodes {sorted(nodes_used)})")

    # a worker killed mid-task: its task fails naming the exit, the others complete, the worker is replaced
    pool = mp.Pool(3)
    results = [pool.apply_async(die_on, (i,)) for i in range(20)]
    outcome = []
    for r in results:
        try:
            outcome.append(r.get(60))
        except Exception as e:
            outcome.append(e)
    lost = [e for e in outcome if isinstance(e, Exception)]
    assert len(lost) == 1 and "SIGKILL" in str(lost[0]) and "pool worker" in str(lost[0]), outcome
    assert [x for x in outcome if not isinstance(x, Exception)] == [i for i in range(20) if i != 5]
    assert pool.map(sq, range(30)) == [x * x for x in range(30)]
    deadline = time.monotonic() + 30
    while len(pool._pool) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(pool._pool) == 3
    ok("killed worker: its task raises WorkerLostError, the pool goes on")

    # terminate(): workers end at once, pending results fail, nothing is left running
    pids = [p.pid for p in pool._pool]
    uids = {p._popen.p_uid for p in pool._pool}
    r = pool.map_async(time.sleep, [30] * 20, chunksize=1)
    time.sleep(0.3)
    pool.terminate()
    pool.join()
    try:
        r.get(30)
        raise AssertionError("a terminated task returned")
    except Exception as e:
        assert "terminated" in str(e), e
    assert not uids & {u for u, _ in process.get_list()}
    if nnodes == 1:
        assert not any(alive(pid) for pid in pids)
    # terminate() in a result callback (the scheduler's thread): it raised 'cannot join current thread'
    pool = mp.Pool(2)
    uids = {p._popen.p_uid for p in pool._pool}
    ended = threading.Event()

    def end_pool(_):
        pool.terminate()
        ended.set()

    pool.apply_async(sq, (3,), callback=end_pool)
    assert ended.wait(30)
    pool.join()
    assert not uids & {u for u, _ in process.get_list()}
    # the stdlib's Pool class on this context (what its subclasses do): its terminate() takes the task
    # queue's _rlock, which our SimpleQueue did not have (AttributeError)
    from multiprocessing import pool as mpool

    with mpool.Pool(2, context=mp.get_context("dragon")) as spool:
        assert spool.map(sq, range(5)) == [0, 1, 4, 9, 16]
    spool.join()
    ok("terminate")

    # initializer, maxtasksperchild, close/join, default size
    pool = mp.Pool(2, initializer=init, initargs=("marked",), maxtasksperchild=3)
    first = {p.pid for p in pool._pool}
    assert pool.map(get_mark, range(20), chunksize=1) == ["marked"] * 20
    deadline = time.monotonic() + 30
    while {p.pid for p in pool._pool} & first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not {p.pid for p in pool._pool} & first  # every worker was replaced after 3 tasks
    pool.close()
    try:
        pool.apply(sq, (1,))
        raise AssertionError("a closed pool took a task")
    except ValueError:
        pass
    pool.join()
    r, w = os.pipe()  # (the lowest free numbers: those of the pool's own wake-up pipe, closed by join())
    pool.terminate()  # joins the pool's threads again: the pipe it closed is not closed again (it is r, w)
    os.fstat(r), os.fstat(w)
    os.close(r), os.close(w)
    bads = (lambda: mp.Pool(0), lambda: mp.Pool(2, maxtasksperchild=0), lambda: mp.Pool(2, initializer=3))
    for bad in bads:
        try:
            bad()
            raise AssertionError("accepted")
        except (ValueError, TypeError):
            pass
    with mp.Pool() as p:
        assert len(p._pool) == mp.cpu_count()
    ok("initializer, maxtasksperchild, close/join, bad arguments, default size")

    # concurrent.futures on this start method, including a broken pool
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(3, mp_context=mp.get_context("dragon")) as ex:
        assert list(ex.map(sq, range(40))) == [x * x for x in range(40)]
        assert list(ex.map(sq, range(40), chunksize=8)) == [x * x for x in range(40)]
        f = ex.submit(raiser, 2)
        try:
            f.result(60)
            raise AssertionError("no error")
        except KeyError:
            pass
        nodes_used = {n for n, _ in ex.map(where, range(60))}
        assert len(nodes_used) == min(3, nnodes), nodes_used
    with ProcessPoolExecutor(2, mp_context=mp.get_context("dragon")) as ex:
        f = ex.submit(os.kill, 0, 0) if False else ex.submit(die_on, 5)
        try:
            f.result(60)
            raise AssertionError("a killed worker's future succeeded")
        except BrokenProcessPool:
            pass
    ok(f"ProcessPoolExecutor, BrokenProcessPool (workers on nodes {sorted(nodes_used)})")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    main()
