"""multiprocessing objects used across nodes, with the CPU time each operation costs (the figures of the
"multiprocessing across nodes" section of benchmarks/README.md; the mp selection of dragon-bench has the same
cases as rates and ratios). One line per figure: rate, wall time per operation, CPU time per operation of the
measuring process (of the child for Lock and Value) and of every process of the job (agents, services and
children: what runs under mpiexec), from /proc.

    mpiexec -n 2 dragon-launch --virtual-nodes benchmarks/mp_xnode.py dragon NODE [parts]
    python benchmarks/mp_xnode.py spawn 0 [parts]

NODE: where the child and the workers run (0: the measuring process's node, 1: the other one, -1: Pool and
executor workers round-robin over the nodes). parts (comma-separated): pool, queue, pipe, lock, value, event,
ppe (all by default). XMP_SCALE=k multiplies every count.
"""

import os
import sys
import time

METHOD = sys.argv[1] if len(sys.argv) > 1 else "spawn"
if METHOD == "dragon":
    import dragon  # noqa: F401
import multiprocessing as mp  # noqa: E402 (after dragon: it registers the start method)

TICK = os.sysconf("SC_CLK_TCK")


def _placed(node):
    """Where workers made in the block start: node (-1: spread over the nodes) for dragon, here otherwise."""
    if METHOD != "dragon":
        import contextlib

        return contextlib.nullcontext()
    import dragon.mp

    return dragon.mp.placement(node if node >= 0 else None)


def _stat(p):
    with open(f"/proc/{p}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _tree():
    """pid -> children, and the root: the mpiexec above us (or ourselves)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                kids.setdefault(int(_stat(d)[1]), []).append(int(d))
            except OSError:
                pass
    root, p = os.getpid(), os.getpid()
    while p > 1:
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip().startswith("mpiexec"):
                    root = p
                    break
            p = int(_stat(p)[1])
        except OSError:
            break
    return kids, root


def job_cpu():
    kids, root = _tree()
    tot, todo = 0, [root]
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/stat", "rb") as f:
                    x = f.read().rsplit(b")", 1)[1].split()
                tot += int(x[11]) + int(x[12])
        except OSError:
            pass
    return tot / TICK


def identity(x):
    return x


def producer(q, n, item):
    for _ in range(n):
        q.put(item)


def echo_q(qa, qb, n):
    for _ in range(n):
        qb.put(qa.get())


def echo_pipe(c, n):
    for _ in range(n):
        c.send(c.recv())


def locker(lock, n, r):
    lock.acquire()
    lock.release()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        lock.acquire()
        lock.release()
    r.put((time.perf_counter() - t0, time.process_time() - c0))


def incr(v, n, r):
    with v.get_lock():
        v.value += 1
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        with v.get_lock():
            v.value += 1
    r.put((time.perf_counter() - t0, time.process_time() - c0))


def waker(e1, e2, n):
    for _ in range(n):
        e1.wait()
        e1.clear()
        e2.set()


def out(name, n, dt, cpu_caller, cpu_job):
    print(
        f"{name:34s} {n / dt:12.1f}/s  wall {dt / n * 1e6:9.1f} us  caller {cpu_caller / n * 1e6:8.1f} us  "
        f"job {cpu_job / n * 1e6:9.1f} us",
        flush=True,
    )


class M:
    def __enter__(self):
        self.c0, self.j0, self.t0 = time.process_time(), job_cpu(), time.perf_counter()
        return self

    def __exit__(self, *a):
        self.dt = time.perf_counter() - self.t0
        self.cc = time.process_time() - self.c0
        self.cj = job_cpu() - self.j0


def proc(ctx, node, target, args):
    if METHOD == "dragon":
        return ctx.Process(target=target, args=args, node=node)
    return ctx.Process(target=target, args=args)


def main():
    node = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    parts = (
        sys.argv[3].split(",")
        if len(sys.argv) > 3
        else ["pool", "queue", "pipe", "lock", "value", "event", "ppe"]
    )
    scale = float(os.environ.get("XMP_SCALE", "1"))
    ctx = mp.get_context(METHOD)
    tag = f"{METHOD}/n{node}"
    if "pool" in parts:
        with _placed(node):
            pool = ctx.Pool(2)
        pool.map(identity, range(200))
        for cs in (1, 64):
            n = int((3000 if cs == 1 else 100000) * scale)
            with M() as m:
                pool.map(identity, range(n), chunksize=cs)
            out(f"{tag} pool.map c{cs}", n, m.dt, m.cc, m.cj)
            with M() as m:
                for _ in pool.imap_unordered(identity, range(n), chunksize=cs):
                    pass
            out(f"{tag} imap_unordered c{cs}", n, m.dt, m.cc, m.cj)
        pool.close()
        pool.join()
    if "queue" in parts:
        try:
            import numpy as np
        except ImportError:
            np = None
        for size in (8, 1024, 65536, 1 << 20):
            for kind in ("bytes", "numpy"):
                if kind == "numpy" and np is None:
                    continue
                item = b"x" * size if kind == "bytes" else np.ones(size // 8)
                n = int(max(50, min(5000, 2e8 // size // 20)) * scale)
                q = ctx.Queue()
                p = proc(ctx, node, producer, (q, n + 1, item))
                p.start()
                q.get()
                with M() as m:
                    for _ in range(n):
                        q.get()
                p.join()
                out(f"{tag} queue stream {kind} {size}", n, m.dt, m.cc, m.cj)
                qa, qb = ctx.Queue(), ctx.Queue()
                n2 = int(max(30, min(1000, 2e7 // size // 5)) * scale)
                p = proc(ctx, node, echo_q, (qa, qb, n2 + 1))
                p.start()
                qa.put(item)
                qb.get()
                with M() as m:
                    for _ in range(n2):
                        qa.put(item)
                        qb.get()
                p.join()
                out(f"{tag} queue rtt {kind} {size}", n2, m.dt, m.cc, m.cj)
    if "pipe" in parts:
        n = int(1000 * scale)
        a, b = ctx.Pipe()
        p = proc(ctx, node, echo_pipe, (b, n + 1))
        p.start()
        a.send((1, "abc"))
        a.recv()
        with M() as m:
            for _ in range(n):
                a.send((1, "abc"))
                a.recv()
        p.join()
        out(f"{tag} pipe rtt", n, m.dt, m.cc, m.cj)
    if "lock" in parts:
        n = int(500 * scale)
        lock = ctx.Lock()
        r = ctx.Queue()
        p = proc(ctx, node, locker, (lock, n, r))
        p.start()
        with M() as m:
            dt, cc = r.get()
        p.join()
        out(f"{tag} lock acq+rel (child)", n, dt, cc, m.cj * dt / m.dt)
    if "value" in parts:
        n = int(300 * scale)
        v = ctx.Value("i", 0)
        r = ctx.Queue()
        p = proc(ctx, node, incr, (v, n, r))
        p.start()
        with M() as m:
            dt, cc = r.get()
        p.join()
        assert v.value == n + 1, v.value
        out(f"{tag} value += 1 (child)", n, dt, cc, m.cj * dt / m.dt)
    if "event" in parts:
        n = int(300 * scale)
        e1, e2 = ctx.Event(), ctx.Event()
        p = proc(ctx, node, waker, (e1, e2, n))
        p.start()
        with M() as m:
            for _ in range(n):
                e1.set()
                e2.wait()
                e2.clear()
        p.join()
        out(f"{tag} event set->wait rtt", n, m.dt, m.cc, m.cj)
    if "ppe" in parts:
        import concurrent.futures as cf

        with _placed(node):
            ex = cf.ProcessPoolExecutor(2, mp_context=ctx)
            list(ex.map(identity, range(50)))
        for cs in (1, 64):
            n = int((1000 if cs == 1 else 20000) * scale)
            with M() as m:
                list(ex.map(identity, range(n), chunksize=cs))
            out(f"{tag} ppe.map c{cs}", n, m.dt, m.cc, m.cj)
        ex.shutdown()


if __name__ == "__main__":
    main()
