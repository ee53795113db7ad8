"""The DragonHPC side of dragon-bench. Run by the harness, from DragonHPC's own virtualenv, as

    /opt/dragonhpc-venv/bin/dragon -s dragonhpc_prog.py --parts launch,gs,pool,channels --repeat 3 [--quick]

It uses only DragonHPC's public API (dragon.globalservices.process, dragon.native.process,
dragon.managed_memory, dragon.channels) and the standard library; it must not import the harness (whose
package shares the name ``dragon``). It prints one line ``DRAGON_BENCH_JSON: {...}`` with figures in the
harness's format.
"""

import argparse
import json
import os
import shutil
import time
import traceback

MARK = "DRAGON_BENCH_JSON:"
IN_FLIGHT = 16
TIMEOUT = 20.0  # a receive that waits this long means the other side died: fail the figure, do not hang


def quantile(xs, q):
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def figure(group, test, metric, unit, better, samples, size=None, **extra):
    samples = [float(x) for x in samples]
    f = {
        "group": group,
        "test": test,
        "peer": "dragonhpc",
        "size": size,
        "metric": metric,
        "unit": unit,
        "better": better,
        "median": quantile(samples, 0.5),
        "min": min(samples),
        "max": max(samples),
        "q1": quantile(samples, 0.25),
        "q3": quantile(samples, 0.75),
        "n": len(samples),
        "samples": samples,
    }
    f.update(extra)
    return f


def counts(quick):
    if quick:
        return {"serial": 20, "flight": 32, "python": 6, "query": 300, "pool": 5000}
    # fewer Python children than the harness's other peers: DragonHPC starts about 3 a second
    return {"serial": 200, "flight": 200, "python": 10, "query": 3000, "pool": 100_000}


def _noop():
    pass


# ----------------------------------------------------------------------------------------------------------
# channels: a standalone pool and two channels; the child is a DragonHPC-managed Python process


def _chan_child(pool_ser, c2p_ser, p2c_ser, size):
    from dragon.channels import Channel
    from dragon.managed_memory import MemoryPool

    pool = MemoryPool.attach(pool_ser)
    c2p = Channel.attach(c2p_ser)
    p2c = Channel.attach(p2c_ser)
    sh = c2p.sendh()
    rh = p2c.recvh()
    sh.open()
    rh.open()
    payload = b"x" * size
    while True:
        cmd = rh.recv_bytes(timeout=600)
        op, n = cmd[:1], int(cmd[1:])
        if op == b"Q":
            break
        if op == b"S":
            for _ in range(n):
                sh.send_bytes(payload)
        else:
            for _ in range(n):
                sh.send_bytes(rh.recv_bytes())
        sh.send_bytes(b"D")
    sh.close()
    rh.close()
    c2p.detach()
    p2c.detach()
    pool.detach()


def channels(sizes, repeat, target):
    """Figures per size; a size that fails is tried once more with a fresh pool, channels and child."""
    figs, skipped = [], []
    uid = 0x7F00_0000 + (os.getpid() % 0xFFFF) * 64
    for size in sizes:
        for attempt in (1, 2):
            uid += 4
            try:
                figs += _channels_one(size, uid, repeat, target)
                break
            except Exception as e:
                traceback.print_exc()
                if attempt == 2:
                    skipped.append(
                        {
                            "what": f"channels {size} B DragonHPC",
                            "why": f"failed twice: {type(e).__name__}: {str(e).splitlines()[0]}",
                        }
                    )
    return figs, skipped


def _channels_one(size, uid, repeat, target):
    from dragon.channels import Channel
    from dragon.managed_memory import MemoryPool
    from dragon.native.process import Process

    figs = []
    capacity = 1024 if size <= 65536 else 64
    # room for both channels full, so a fast producer never finds the pool empty
    pool = MemoryPool(
        max(64 << 20, 2 * capacity * (size + 4096) + (16 << 20)), f"dbench_{os.getpid()}_{uid % 1000}", uid
    )
    c2p = Channel(pool, uid + 1, capacity=capacity, block_size=1024)
    p2c = Channel(pool, uid + 2, capacity=capacity, block_size=1024)
    proc = Process(_chan_child, args=(pool.serialize(), c2p.serialize(), p2c.serialize(), size))
    proc.start()
    sh = p2c.sendh()
    rh = c2p.recvh()
    sh.open()
    rh.open()
    payload = b"x" * size

    def stream(n):
        t0 = time.perf_counter()
        sh.send_bytes(b"S%d" % n, timeout=TIMEOUT)
        for _ in range(n):
            rh.recv_bytes(timeout=TIMEOUT)
        dt = time.perf_counter() - t0
        assert rh.recv_bytes(timeout=TIMEOUT) == b"D"
        return dt

    def pingpong(n):
        sh.send_bytes(b"E%d" % n, timeout=TIMEOUT)
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            sh.send_bytes(payload, timeout=TIMEOUT)
            rh.recv_bytes(timeout=TIMEOUT)
            lat.append(time.perf_counter() - t)
        assert rh.recv_bytes(timeout=TIMEOUT) == b"D"
        return lat

    try:
        n0 = {8: 2000, 1024: 2000}.get(size, 400 if size <= 65536 else 40)
        n = int(max(n0, min(5_000_000, n0 / stream(n0) * target)))
        rates = [n / stream(n) for _ in range(repeat)]
        lat = pingpong(max(20, n0 // 20))
        m = int(max(50, min(200_000, target / quantile(lat, 0.5))))
        meds, p99s = [], []
        for _ in range(repeat):
            lat = pingpong(m)
            meds.append(quantile(lat, 0.5) * 1e6)
            p99s.append(quantile(lat, 0.99) * 1e6)
        figs += [
            figure("channels", "stream", "msg_per_s", "msg/s", "higher", rates, size=size, count=n),
            figure(
                "channels",
                "stream",
                "gb_per_s",
                "GB/s",
                "higher",
                [r * size / 1e9 for r in rates],
                size=size,
                count=n,
            ),
            figure("channels", "rtt", "rtt_median_us", "us", "lower", meds, size=size, count=m),
            figure("channels", "rtt", "rtt_p99_us", "us", "lower", p99s, size=size, count=m),
        ]
    finally:
        try:
            sh.send_bytes(b"Q0", timeout=5)
        except Exception:
            pass
        try:
            proc.join(30)
            if proc.is_alive:
                proc.kill()
        except Exception:
            pass
        sh.close()
        rh.close()
        c2p.destroy()
        p2c.destroy()
        pool.destroy()
    return figs


# ----------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="launch,gs,pool")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="8,1024,65536,1048576")
    ap.add_argument("--target", type=float, default=0.4)
    a = ap.parse_args()
    parts = a.parts.split(",")
    c = counts(a.quick)
    figs, skipped = [], []
    cwd = os.getcwd()
    true = shutil.which("true") or "/bin/true"

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:
            skipped.append({"what": f"{what} DragonHPC", "why": f"failed: {type(e).__name__}: {e}"})
            traceback.print_exc()

    if "launch" in parts:
        from dragon.globalservices import process as gp
        from dragon.native.process import Process

        def serial(n):
            t0 = time.perf_counter()
            for _ in range(n):
                d = gp.create(true, cwd, [], None)
                gp.join(d.p_uid)
            return n / (time.perf_counter() - t0)

        def flight(n):
            t0 = time.perf_counter()
            window, started = [], 0
            while started < n or window:
                while started < n and len(window) < IN_FLIGHT:
                    window.append(gp.create(true, cwd, [], None).p_uid)
                    started += 1
                gp.join(window.pop(0))
            return n / (time.perf_counter() - t0)

        def python_child(n):
            t0 = time.perf_counter()
            for _ in range(n):
                p = Process(_noop)
                p.start()
                p.join()
            return n / (time.perf_counter() - t0)

        attempt(
            "launch /bin/true serial",
            lambda: figs.append(
                figure(
                    "launch",
                    "true-serial",
                    "per_s",
                    "proc/s",
                    "higher",
                    [serial(c["serial"]) for _ in range(a.repeat)],
                )
            ),
        )
        attempt(
            "launch /bin/true 16 in flight",
            lambda: figs.append(
                figure(
                    "launch",
                    "true-16",
                    "per_s",
                    "proc/s",
                    "higher",
                    [flight(c["flight"]) for _ in range(a.repeat)],
                )
            ),
        )
        attempt(
            "launch Python child",
            lambda: figs.append(
                figure(
                    "launch",
                    "python-child",
                    "per_s",
                    "proc/s",
                    "higher",
                    [python_child(c["python"]) for _ in range(a.repeat)],
                )
            ),
        )
    if "gs" in parts:

        def query():
            from dragon.globalservices import process as gp
            from dragon.native.process import current

            me = current().puid
            meds, p99s = [], []
            for _ in range(a.repeat):
                lat = []
                for _ in range(c["query"]):
                    t = time.perf_counter()
                    gp.query(me)
                    lat.append(time.perf_counter() - t)
                meds.append(quantile(lat, 0.5) * 1e6)
                p99s.append(quantile(lat, 0.99) * 1e6)
            figs.append(figure("gs", "query", "rtt_median_us", "us", "lower", meds))
            figs.append(figure("gs", "query", "rtt_p99_us", "us", "lower", p99s))

        attempt("gs process.query", query)
    if "pool" in parts:

        def pool():
            from dragon.managed_memory import MemoryPool

            for i, size in enumerate((64, 65536)):
                mp_ = MemoryPool(
                    64 << 20, f"dbench_pool_{os.getpid()}_{i}", 0x7E00_0000 + os.getpid() % 0xFFFF * 4 + i
                )
                try:
                    for _ in range(1000):
                        mp_.alloc(size).free()
                    rates = []
                    for _ in range(a.repeat):
                        t0 = time.perf_counter()
                        for _ in range(c["pool"]):
                            mp_.alloc(size).free()
                        rates.append(c["pool"] / (time.perf_counter() - t0))
                    figs.append(figure("pool", "alloc-free", "ops_per_s", "op/s", "higher", rates, size=size))
                finally:
                    mp_.destroy()

        attempt("pool alloc+free", pool)
    if "channels" in parts:

        def chans():
            f, s = channels([int(s) for s in a.sizes.split(",") if s], a.repeat, a.target)
            figs.extend(f)
            skipped.extend(s)

        attempt("channels", chans)
    print(MARK, json.dumps({"figures": figs, "skipped": skipped}), flush=True)


if __name__ == "__main__":
    main()
