"""The multiprocessing measurements of dragon-bench's 'mp' selection, for one start method.

Self-contained (the standard library, numpy, and ``import dragon`` for the dragon method), so that the same
program measures the stdlib's start methods (plain python), dragon's (under dragon-launch, also across virtual
nodes) and DragonHPC's (its own ``dragon`` package, run with ``dragon -s``). Prints one JSON line:
``{"figures": [...], "skipped": [...]}``, figures in dragon-bench's format (group "mp").

    python benchmarks/mp_prog.py --method fork --parts start,pool,queue,array,pipe [--quick] [--repeat 3]

With ``--peer-node K`` (dragon), every child and worker runs on node K of the runtime, the measuring process
on node 0: ``mpiexec -n 2 dragon-launch --virtual-nodes mp_prog.py --method dragon --peer-node 1`` measures
each object across nodes.
"""

import os
import sys
import time

# the children import this module (as __mp_main__): what only the parent needs is imported in main()

if "--method" in sys.argv and sys.argv[sys.argv.index("--method") + 1] == "dragon":
    import dragon  # noqa: F401  (before multiprocessing: it registers the start method)

import multiprocessing as mp

PARTS = (
    "start",
    "pool",
    "queue",
    "array",
    "pipe",
    "queue-rtt",
    "bounded",
    "lock",
    "value",
    "event",
    "executor",
)
JSON_MARK = (
    "DRAGON_BENCH_JSON:"  # as benchmarks.util.JSON_MARK (this program imports nothing of the repository)
)


def noop():
    pass


def identity(x):
    return x


def producer(q, n):
    item = (1, "abc")
    q.put(time.perf_counter())  # the stream's start (CLOCK_MONOTONIC: the same clock in every process here)
    for _ in range(n):
        q.put(item)


def array_producer(q, n, nbytes):
    import numpy as np

    a = np.ones(nbytes // 8, dtype=np.float64)
    q.put(time.perf_counter())
    for _ in range(n):
        q.put(a)


def echo(conn, n):
    for _ in range(n):
        conn.send(conn.recv())


def queue_echo(qa, qb, n):
    for _ in range(n):
        qb.put(qa.get())


def locker(lock, n, out):
    """n acquire+release of a lock made by the parent; says its rate."""
    lock.acquire()
    lock.release()
    t0 = time.perf_counter()
    for _ in range(n):
        lock.acquire()
        lock.release()
    out.put(n / (time.perf_counter() - t0))


def incrementer(v, n, out):
    with v.get_lock():
        v.value += 1
    t0 = time.perf_counter()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    out.put(n / (time.perf_counter() - t0))


def event_echo(e1, e2, n):
    for _ in range(n):
        e1.wait()
        e1.clear()
        e2.set()


def figure(test, peer, metric, unit, better, samples, size=None):
    import statistics

    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return {
        "group": "mp",
        "test": test,
        "peer": peer,
        "metric": metric,
        "unit": unit,
        "better": better,
        "size": size,
        "n": len(s),
        "samples": s,
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "q1": q[0],
        "q3": q[2],
    }


def start_join(ctx, seconds, max_n):
    """Process start+join of a trivial target, one at a time, for about `seconds`."""
    n, t0 = 0, time.perf_counter()
    while n < max_n and (n < 3 or time.perf_counter() - t0 < seconds):
        p = ctx.Process(target=noop)
        p.start()
        p.join()
        n += 1
    return n / (time.perf_counter() - t0)


def pool_map(pool, n, chunksize):
    t0 = time.perf_counter()
    out = pool.map(identity, range(n), chunksize=chunksize)
    dt = time.perf_counter() - t0
    assert len(out) == n and out[-1] == n - 1
    return n / dt


def queue_stream(ctx, n, maxsize=0):
    """Items per second from the producer's first put to the consumer's last get (a queue that buffers much
    cannot make it look faster than the two ends together are)."""
    q = ctx.Queue(maxsize)
    p = ctx.Process(target=producer, args=(q, n))
    p.start()
    t0 = q.get()
    for _ in range(n):
        q.get()
    dt = time.perf_counter() - t0
    p.join()
    return n / dt


def array_stream(ctx, n, nbytes):
    q = ctx.Queue()
    p = ctx.Process(target=array_producer, args=(q, n, nbytes))
    p.start()
    t0 = q.get()
    for _ in range(n):
        a = q.get()
        assert a.nbytes == nbytes and a[0] == 1.0 and a[-1] == 1.0
        del a
    dt = time.perf_counter() - t0
    p.join()
    return n * nbytes / dt / 1e9


def pipe_rtt(ctx, n):
    a, b = ctx.Pipe()
    p = ctx.Process(target=echo, args=(b, n))
    p.start()
    obj = (1, "abc")
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        a.send(obj)
        a.recv()
        lat.append(time.perf_counter() - t)
    p.join()
    lat = sorted(lat[n // 10 :])
    return lat[len(lat) // 2] * 1e6


def queue_rtt(ctx, n):
    """Median round trip of a small object through two queues (the child echoes), in us."""
    qa, qb = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=queue_echo, args=(qa, qb, n))
    p.start()
    obj = (1, "abc")
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        qa.put(obj)
        qb.get()
        lat.append(time.perf_counter() - t)
    p.join()
    lat = sorted(lat[n // 10 :])
    return lat[len(lat) // 2] * 1e6


def in_child(ctx, target, obj, n):
    """The rate a child measures of n operations on obj (made here)."""
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(obj, n, out))
    p.start()
    rate = out.get()
    p.join()
    return rate


def event_rtt(ctx, n):
    """Median of set -> the child's wait returns, it clears and sets the other -> our wait returns, in us."""
    e1, e2 = ctx.Event(), ctx.Event()
    p = ctx.Process(target=event_echo, args=(e1, e2, n))
    p.start()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        e1.set()
        e2.wait()
        e2.clear()
        lat.append(time.perf_counter() - t)
    p.join()
    lat = sorted(lat[n // 10 :])
    return lat[len(lat) // 2] * 1e6


def executor_map(ctx, workers, n):
    """concurrent.futures.ProcessPoolExecutor.map of n trivial tasks (chunksize 1), tasks/s."""
    import concurrent.futures as cf

    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
        list(ex.map(identity, range(min(n, 200))))  # every worker up
        t0 = time.perf_counter()
        out = list(ex.map(identity, range(n)))
        dt = time.perf_counter() - t0
    assert len(out) == n
    return n / dt


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True, help="fork, forkserver, spawn or dragon")
    ap.add_argument("--peer", help="the name of the figures' peer (default: dragon, or mp-<method>)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: this node's CPUs)")
    ap.add_argument("--test-suffix", default="", help="appended to the pool tests' names (e.g. -3nodes)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-node", type=int, default=None, help="dragon: run every child and worker there")
    args = ap.parse_args()
    if args.peer_node is not None:
        import dragon.mp

        with dragon.mp.placement(args.peer_node):
            return measure(args)
    return measure(args)


def measure(args):
    import json

    ctx = mp.get_context(args.method)
    peer = args.peer or ("dragon" if args.method == "dragon" else f"mp-{args.method}")
    parts = [p for p in args.parts.split(",") if p]
    workers = args.workers or len(os.sched_getaffinity(0))
    q = args.quick
    figures, skipped = [], []

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:
            skipped.append({"what": f"mp {what} {peer}", "why": f"failed: {type(e).__name__}: {e}"})

    rep = range(args.repeat)
    if "start" in parts:
        slow = args.method == "spawn"
        start_join(
            ctx, 1.0, 10**6
        )  # warm: forkserver's server, dragon's zygote (started at the first request)
        attempt(
            "process start+join",
            lambda: figures.append(
                figure(
                    "process-start-join",
                    peer,
                    "per_s",
                    "proc/s",
                    "higher",
                    [start_join(ctx, 0.3 if q else 1.5, 5 if slow else 10**6) for _ in rep],
                )
            ),
        )
    if "pool" in parts:

        def pools():
            n = 10_000 if q else 100_000
            with ctx.Pool(workers) as pool:
                pool_map(pool, 1000, 1)  # every worker up and warm
                for cs in (1, 64):
                    figures.append(
                        figure(
                            f"pool-map-c{cs}{args.test_suffix}",
                            peer,
                            "tasks_per_s",
                            "tasks/s",
                            "higher",
                            [pool_map(pool, n, cs) for _ in rep],
                            size=None,
                        )
                    )

        attempt("Pool.map", pools)
    if "queue" in parts:
        attempt(
            "Queue stream",
            lambda: figures.append(
                figure(
                    "queue-stream",
                    peer,
                    "msg_per_s",
                    "msg/s",
                    "higher",
                    [queue_stream(ctx, 20_000 if q else 200_000) for _ in rep],
                )
            ),
        )
    if "array" in parts:
        nbytes = 16 << 20
        attempt(
            "16 MiB array",
            lambda: figures.append(
                figure(
                    "queue-array",
                    peer,
                    "gb_per_s",
                    "GB/s",
                    "higher",
                    [array_stream(ctx, 4 if q else 20, nbytes) for _ in rep],
                    size=nbytes,
                )
            ),
        )
    if "pipe" in parts:
        attempt(
            "Pipe round trip",
            lambda: figures.append(
                figure(
                    "pipe-rtt",
                    peer,
                    "rtt_median_us",
                    "us",
                    "lower",
                    [pipe_rtt(ctx, 2000 if q else 20_000) for _ in rep],
                )
            ),
        )
    small = [
        # part, test, metric, unit, better, one sample
        (
            "queue-rtt",
            "queue-rtt",
            "rtt_median_us",
            "us",
            "lower",
            lambda: queue_rtt(ctx, 300 if q else 3000),
        ),
        (
            "bounded",
            "queue-bounded-stream",
            "msg_per_s",
            "msg/s",
            "higher",
            lambda: queue_stream(ctx, 5000 if q else 50_000, 1000),
        ),
        (
            "lock",
            "lock-acquire-release",
            "per_s",
            "op/s",
            "higher",
            lambda: in_child(ctx, locker, ctx.Lock(), 2000),
        ),
        (
            "value",
            "value-increment",
            "per_s",
            "op/s",
            "higher",
            lambda: in_child(ctx, incrementer, ctx.Value("i", 0), 300),
        ),
        ("event", "event-rtt", "rtt_median_us", "us", "lower", lambda: event_rtt(ctx, 100 if q else 1000)),
        (
            "executor",
            "executor-map-c1",
            "tasks_per_s",
            "tasks/s",
            "higher",
            lambda: executor_map(ctx, workers, 500 if q else 3000),
        ),
    ]
    for part, test, metric, unit, better, one in small:
        if part in parts:
            attempt(
                test,
                lambda: figures.append(
                    figure(test, peer, metric, unit, better, [one() for _ in rep])  # noqa: B023 (called at once)
                ),
            )
    print(JSON_MARK + json.dumps({"figures": figures, "skipped": skipped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
