"""Scale (issue 14): how global services and the shepherds hold up as a job grows.

- **GS cost per operation** (process.query, pool create+destroy, channel create+destroy, process
  create+join of /bin/true) with 10^2, 10^3, 10^4 and 10^5 live objects in the job: channels of
  capacity 1 in one pool made for them. What matters is the curve and its ratio largest/smallest
  (the goal: flat within 2x); GS's resident memory is reported at each level too.
- **Managed processes over 8 virtual nodes**: 10,000 /bin/true (``mpiexec -n 8 dragon-launch
  --virtual-nodes``), round-robin over the nodes, ``THREADS`` create+join in flight: processes/s,
  GS's resident memory (VmRSS of its process: at the end and the highest sampled), every exit
  code, and what the job left (processes, segments). Peer: subprocess.Popen from as many threads.
- **100 client processes issuing GS requests at once** (process.query, released together by a
  barrier): throughput, median and p99, and every error or timeout. Peer: a
  multiprocessing.Manager dict lookup from as many processes.
- **Startup wall time with 1, 2, 4, 8 virtual nodes** of an empty program; peer: ``mpiexec -n N
  python`` (the part of the curve that is MPI's own).

The GS curve and the clients run in one single-node dragon-launch job, the processes in an 8-node
one: the harness re-invokes itself as their program (``--inner scale-gs`` / ``--inner
scale-procs``, parameters in ``DRAGON_BENCH_SCALE``) and reads the figures back from
``--inner-out``. Nothing here asserts anything: tests/test_scale.py checks the behaviour at scale.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from benchmarks import runtime, util

LEVELS = (100, 1_000, 10_000, 100_000)
QUICK_LEVELS = (100, 1_000)
STARTUP_NODES = (1, 2, 4, 8)
PROC_NODES = 8
THREADS = 16  # create+join in flight in the 8-node run (one thread each: process.create returns once started)
CLIENTS = 100
OPS = ("query", "pool", "channel", "process")
OP_LABELS = {
    "query": "process.query",
    "pool": "pool create+destroy",
    "channel": "channel create+destroy",
    "process": "process create+join /bin/true",
}
LIVE_BYTES = 1024  # pool bytes per live channel (capacity 1, block 64: header and slot in two 256 B granules)
GROW_THREADS = 8  # requests in flight while the live channels are made
JOIN_TIMEOUT = 60.0  # a process not joined by then counts as lost, not as a hang
ENV = "DRAGON_BENCH_SCALE"  # the inner runs' parameters (JSON)
LABELS = {"mpiexec-n": "mpiexec -n N python"}


def settings(quick):
    """How much of everything: the levels, operations per repeat of each, processes, requests per client."""
    if quick:
        return {
            "levels": QUICK_LEVELS,
            "ops": {"query": 300, "pool": 20, "channel": 50, "process": 10},
            "procs": 1000,
            "threads": THREADS,
            "requests": 50,
            "popen": 300,
        }
    return {
        "levels": LEVELS,
        "ops": {"query": 2000, "pool": 100, "channel": 300, "process": 40},
        "procs": 10_000,
        "threads": THREADS,
        "requests": 200,
        "popen": 2000,
    }


# ----------------------------------------------------------------------------------------------------------
# facts about the running job, read from /proc (a managed process sees its shepherd, its launcher and GS)


def status_mb(pid, field="VmRSS"):
    """A memory figure of /proc/<pid>/status in MB (VmRSS, VmHWM, RssAnon...); None if the process is
    gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def gs_pid():
    """The pid of global services, from a managed process on GS's node: the launcher that started this
    process's shepherd also started GS (forked in a single-node job, ``launcher.multinode --service gs``
    across nodes)."""
    from dragon import env
    from dragon.infrastructure import jobprocs

    shep = int(os.environ[env.SHEP_PID])
    others = [k for k in jobprocs.children(_ppid(shep)) if k != shep]
    for k in others:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"--service\0gs\0" in f.read():
                    return k
        except OSError:
            continue
    return min(others) if others else None  # single node: GS was forked right after the shepherd


def base_job(job):
    """The job id of a node's segment namespace (``<job>n<k>`` across nodes): what every segment name of
    the job starts with after ``dragon-``."""
    found = re.match(r"(?:s\d+_)?j[0-9a-f]{10}", job or "")
    return found.group(0) if found else job


def job_segments(job):
    return sorted(n for n in util.shm_segments() if n.startswith(f"dragon-{job}"))


# ----------------------------------------------------------------------------------------------------------
# inside a dragon job: the GS curve


def _per_op(fn, n, clock=time.perf_counter):
    """Microseconds per call of fn over n calls (wall time; clock=time.thread_time: this thread's CPU
    time)."""
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n * 1e6


def _warm(fns, n=10):
    """A few calls of each operation first: the first level measured must not pay for imports and caches."""
    for fn in fns.values():
        for _ in range(n):
            fn()


def _in_threads(n, work, threads):
    """Run work(i) for i in range(n) from `threads` threads (so that many requests are in flight); -> the
    exceptions raised, as (i, exception)."""
    lock = threading.Lock()
    it = iter(range(n))
    errors = []

    def loop():
        while True:
            with lock:
                i = next(it, None)
            if i is None:
                return
            try:
                work(i)
            except Exception as e:  # counted, not fatal: the caller reports them
                with lock:
                    errors.append((i, e))

    ts = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors


def measure_gs_curve(levels, ops, repeat):
    """GS's cost per operation at each level of live channels; -> (figures, checks). The levels are visited up
    and then down again (A B C D D C B A: the live channels are made, then destroyed level by level, each time
    with one request), and each figure holds the samples of both visits, so a machine that gets busier or
    quieter during the run does not tilt the curve. checks: what was checked on the way ({"what", "ok",
    "detail"}): every level listed, every operation answered, nothing left after the destroys."""
    from dragon.globalservices import channel as gch
    from dragon.globalservices import pool as gpool
    from dragon.globalservices import process as gp
    from dragon.infrastructure.descriptors import ChannelOptions

    figures, checks = [], []
    me = gp.this_process().p_uid
    gs = gs_pid()
    baseline = set(gch.list())
    pool = gpool.create(levels[-1] * LIVE_BYTES + (16 << 20), user_name="scale-live")
    opts = ChannelOptions(capacity=1, block_size=64)
    true = shutil.which("true") or "/bin/true"

    def fig(test, metric, unit, samples, level, size_unit="live objects", **extra):
        figures.append(
            util.figure(
                "scale",
                test,
                "dragon",
                metric,
                unit,
                "lower",
                samples,
                size=level,
                size_unit=size_unit,
                **extra,
            )
        )

    def pool_cycle():
        gpool.destroy(gpool.create(1 << 20).m_uid)

    def chan_cycle():
        gch.destroy(gch.create(pool.m_uid, channel_options=opts).c_uid)

    def proc_cycle():
        if gp.join(gp.create(true, "", []).p_uid, timeout=JOIN_TIMEOUT) != 0:
            raise RuntimeError("/bin/true did not exit 0")

    fns = {"query": lambda: gp.query(me), "pool": pool_cycle, "channel": chan_cycle, "process": proc_cycle}
    _warm(fns)
    samples = {(level, op): [] for level in levels for op in OPS}
    live, lock = [], threading.Lock()

    def make(_i):
        c = gch.create(pool.m_uid, channel_options=opts).c_uid
        with lock:
            live.append(c)

    def measure(level):
        n = len(gch.list()) - len(baseline)
        checks.append({"what": f"{level:,} live channels listed", "ok": n == level, "detail": f"{n} listed"})
        for op in OPS:
            samples[(level, op)] += [_per_op(fns[op], ops[op]) for _ in range(repeat)]

    try:
        for level in levels:  # up: make the channels
            t0, grow = time.perf_counter(), level - len(live)
            errors = _in_threads(grow, make, GROW_THREADS)
            if errors:
                raise RuntimeError(f"making live channels failed {len(errors)} time(s): {errors[0][1]!r}")
            fig(
                "gs-grow",
                "us_per_op",
                "us",
                [(time.perf_counter() - t0) / max(1, grow) * 1e6],
                level,
                threads=GROW_THREADS,
            )
            measure(level)
            rss = status_mb(gs) if gs else None
            if rss:
                fig("gs-rss", "rss_mb", "MB", [rss], level, anon_mb=status_mb(gs, "RssAnon"))
        for level in reversed(levels):  # down: one destroy of every channel above the level, each time
            if len(live) > level:
                gone = live[level:]
                t0 = time.perf_counter()
                gch.destroy(gone)
                dt = time.perf_counter() - t0
                del live[level:]
                if len(gone) >= 1000:
                    fig(
                        "gs-bulk-destroy",
                        "us_per_op",
                        "us",
                        [dt / len(gone) * 1e6],
                        len(gone),
                        size_unit="channels in the request",
                    )
            measure(level)
        gch.destroy(live)
        live.clear()
        left = set(gch.list()) - baseline
        checks.append(
            {
                "what": "every live channel destroyed (one request per level)",
                "ok": not left,
                "detail": f"{len(left)} left",
            }
        )
        for (level, op), xs in samples.items():
            fig(f"gs-{op}", "us_per_op", "us", xs, level, count=ops[op])
    finally:
        if live:
            try:
                gch.destroy(live)
            except Exception as e:
                checks.append({"what": "cleanup of the live channels", "ok": False, "detail": repr(e)})
        gpool.destroy(pool.m_uid)
    return figures, checks


def measure_gs_alone(levels, ops, repeat):
    """GS's own work per operation at each level, without the IPC: global services run in this process and are
    fed requests, the shepherd's part played here (as tests/test_gs_server.py does): decode, handle, encode
    and send of every message on GS's side (and the bench's side of them), and nothing else, in CPU time of
    this thread, so that other programs on the machine do not move it. Beside the job's curve it tells GS's
    scaling from that of the IPC, the shepherd and the scheduler. -> figures."""
    from dragon.channels import Channel
    from dragon.globalservices.server import GlobalServices
    from dragon.infrastructure import messages as m
    from dragon.pools import Pool

    key, tags = os.urandom(8), itertools.count(1)
    pool = Pool.create(16 << 20, name=f"scale{os.getpid()}")
    chans = [Channel.create(pool, capacity=1024, block_size=512) for _ in range(3)]
    inbox, shep, client = chans
    g = GlobalServices(
        inbox, [shep.sdesc], None, [{"index": 0, "hostname": "h", "cpus": 1}], [pool.sdesc], key
    )
    reply = bytes(client.sdesc)

    def request(cls, **fields):  # a client's request, and GS's answer to it
        g.handle(m.encode(cls(tag=next(tags), reply=reply, caller=0, **fields)))

    def answer():
        r = m.decode(client.recv(timeout=5))
        if r.err:
            raise RuntimeError(f"GS answered an error: {r.msg}")
        return r.result

    def shepherd(result=None):  # the shepherd's answer to what GS asked it
        asked = m.decode(shep.recv(timeout=5))
        g.handle(m.encode(m.ControlResponse(key, asked.tag, 0, None, result)))
        return asked

    def chan_create():
        request(m.GSChannelCreate, m_uid=None, user_name=None, options={"capacity": 1}, soft=False)
        shepherd({"sdesc": b"sd"})
        return answer()[0]  # (a descriptor's fields in __slots__ order: c_uid first)

    def chan_cycle():
        request(m.GSChannelDestroy, idents=[chan_create()])
        shepherd()
        answer()

    def pool_cycle():
        request(m.GSPoolCreate, size=1 << 20, user_name=None, options={}, soft=False)
        shepherd({"sdesc": b"pd"})
        request(m.GSPoolDestroy, ident=answer()[0])  # (m_uid)
        shepherd()
        answer()

    def proc_create():
        request(
            m.GSProcessCreate,
            exe="/bin/true",
            run_dir="/",
            args=[],
            env=None,
            user_name=None,
            options={},
            soft=False,
            head=False,
        )
        asked = shepherd({"pid": 1, "reply_cd": b"rc"})
        return answer()[0], asked  # (p_uid)

    def proc_cycle():
        p_uid, _ = proc_create()
        g.handle(m.encode(m.SHProcessExit(key, 0, p_uid, 0)))
        g._flush_reaped()  # (the loop's timer would send it)
        shep.recv(timeout=5)  # SHProcessReaped
        request(m.GSProcessJoin, ident=p_uid, timeout=None)
        answer()

    me = proc_create()[0]

    def query():
        request(m.GSProcessQuery, ident=me)
        answer()

    fns = {"query": query, "pool": pool_cycle, "channel": chan_cycle, "process": proc_cycle}
    _warm(fns)
    figures, live = [], 0
    try:
        for level in levels:
            while live < level:
                chan_create()
                live += 1
            for op in OPS:
                samples = [_per_op(fns[op], ops[op], time.thread_time) for _ in range(repeat)]
                figures.append(
                    util.figure(
                        "scale",
                        f"alone-{op}",
                        "dragon",
                        "us_per_op",
                        "us",
                        "lower",
                        samples,
                        size=level,
                        size_unit="live objects",
                        count=ops[op],
                    )
                )
    finally:
        for ch in chans:
            ch.destroy()
        pool.destroy()
    return figures


# ----------------------------------------------------------------------------------------------------------
# many clients at once (dragon inside a job, and the Manager peer in the harness): forked processes, each
# makes its connection and one request, waits at a barrier with the others, then times `requests` requests


def _client(make_call, requests, barrier, out):
    """One client process: its results go back on `out` as (start, end, latencies, error samples, errors,
    timeouts). It waits at the barrier whatever happens before, so that one failing client never holds up the
    start of the others."""
    lat, errors, timeouts = [], [], 0
    start = end = None
    close = None
    try:
        try:
            call, close = make_call()
            call()  # the connection is made before the start, like a client that has been running a while
        except Exception as e:
            call = None
            errors.append(f"{type(e).__name__}: {e}")
        barrier.wait(timeout=120)
        if call is not None:
            start = time.monotonic()
            clock = time.perf_counter
            for _ in range(requests):
                t = clock()
                try:
                    call()
                except TimeoutError:
                    timeouts += 1
                    continue
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                lat.append(clock() - t)
            end = time.monotonic()
    except Exception as e:  # the barrier broke
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        try:
            if close is not None:
                close()
        finally:
            out.send((start, end, lat, errors[:5], len(errors), timeouts))
            out.close()


def concurrent_clients(n, requests, make_call, timeout=300):
    """n forked client processes, released together, each timing `requests` calls of make_call()'s call;
    -> dict: req_per_s, median and p99 (us), errors, timeouts, answered, lost (clients that sent nothing
    back)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n + 1)
    pipes, procs = [], []
    try:
        for _ in range(n):
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_client, args=(make_call, requests, barrier, w), daemon=True)
            p.start()
            w.close()
            pipes.append(r)
            procs.append(p)
        barrier.wait(timeout=timeout)
        results = []
        deadline = time.monotonic() + timeout
        for r in pipes:
            if r.poll(max(0.0, deadline - time.monotonic())):
                try:
                    results.append(r.recv())
                except EOFError:
                    pass
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    lat = [x for res in results for x in res[2]]
    starts = [res[0] for res in results if res[0] is not None]
    ends = [res[1] for res in results if res[1] is not None]
    out = {
        "clients": n,
        "requests": n * requests,
        "answered": len(lat),
        "lost": n - len(results),
        "errors": sum(res[4] for res in results),
        "timeouts": sum(res[5] for res in results),
        "error_samples": [e for res in results for e in res[3]][:5],
    }
    if lat and starts and ends:
        out["req_per_s"] = len(lat) / (max(ends) - min(starts))
        out["median_us"] = util.quantile(lat, 0.5) * 1e6
        out["p99_us"] = util.quantile(lat, 0.99) * 1e6
    return out


def _dragon_query_call():
    """In a forked child of a managed process: a process.query of its parent (its own connection to GS: a
    reply channel of its own, destroyed by close)."""
    from dragon.globalservices import process as gp
    from dragon.infrastructure import client

    parent = client.my_puid()
    return (lambda: gp.query(parent)), (lambda: client.connection().close())


def client_figures(peer, runs):
    """The figures of `runs` (results of concurrent_clients, one per repeat) for one peer."""
    F = util.figure
    n = runs[0]["clients"]
    extra = {
        "size": n,
        "size_unit": "clients",
        "requests": runs[0]["requests"],
        "errors": sum(r["errors"] for r in runs),
        "timeouts": sum(r["timeouts"] for r in runs),
        "lost": sum(r["lost"] for r in runs),
        "error_samples": [e for r in runs for e in r["error_samples"]][:5],
    }
    good = [r for r in runs if "req_per_s" in r]
    if not good:
        return []
    return [
        F("scale", "clients", peer, "req_per_s", "req/s", "higher", [r["req_per_s"] for r in good], **extra),
        F("scale", "clients", peer, "rtt_median_us", "us", "lower", [r["median_us"] for r in good], **extra),
        F("scale", "clients", peer, "rtt_p99_us", "us", "lower", [r["p99_us"] for r in good], **extra),
    ]


# ----------------------------------------------------------------------------------------------------------
# inside the 8-node job: many managed processes


def measure_procs(total, threads):
    """`total` /bin/true round-robin over the job's nodes, `threads` create+join in flight; -> dict of what
    happened: rate, exit codes, GS's memory, what the job still lists."""
    from dragon.globalservices import node as gnode
    from dragon.globalservices import process as gp
    from dragon.infrastructure.descriptors import ProcessOptions

    nodes = gnode.get_list()
    gs = gs_pid()
    true = shutil.which("true") or "/bin/true"
    me = gp.this_process().p_uid
    codes = {}
    rss = {"start": status_mb(gs) if gs else None, "max": 0.0}
    stop = threading.Event()

    def sample():  # GS's resident memory through the run
        while not stop.wait(0.2):
            v = status_mb(gs)
            if v is not None:
                rss["max"] = max(rss["max"], v)

    def work(i):
        d = gp.create(true, "", [], options=ProcessOptions(node=nodes[i % len(nodes)]))
        codes[i] = gp.join(d.p_uid, timeout=JOIN_TIMEOUT)

    sampler = threading.Thread(target=sample, daemon=True)
    if gs:
        sampler.start()
    t0 = time.perf_counter()
    errors = _in_threads(total, work, threads)
    wall = time.perf_counter() - t0
    stop.set()
    if gs:
        sampler.join()
    rss["end"] = status_mb(gs) if gs else None
    rss["hwm"] = status_mb(gs, "VmHWM") if gs else None
    rss["max"] = max(rss["max"], rss["end"] or 0.0)
    still = [u for u, _ in gp.get_list() if u != me]
    return {
        "nodes": len(nodes),
        "total": total,
        "threads": threads,
        "wall": wall,
        "per_s": total / wall,
        "exit0": sum(1 for c in codes.values() if c == 0),
        "bad_exits": sum(1 for c in codes.values() if c not in (0, None)),
        "not_joined": sum(1 for c in codes.values() if c is None),
        "errors": len(errors),
        "error_samples": [f"{type(e).__name__}: {e}" for _, e in errors[:5]],
        "listed_after": len(still),
        "gs_rss_mb": rss,
        "job": base_job(os.environ.get("DRAGON_JOB", "")),
    }


def popen_threads(n, threads):
    """subprocess.Popen of /bin/true from `threads` threads (the peer of the processes part): processes/s."""
    true = shutil.which("true") or "/bin/true"
    t0 = time.perf_counter()
    errors = _in_threads(n, lambda i: subprocess.Popen([true]).wait(), threads)
    if errors:
        raise errors[0][1]
    return n / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# the inner programs (run by dragon-launch; see cli.main)


def inner_main(args):
    params = json.loads(os.environ.get(ENV, "{}"))
    quick = args.quick
    s = settings(quick)
    repeat = args.repeat or (1 if quick else 3)
    out = {"figures": [], "skipped": [], "checks": []}
    if args.inner == "scale-gs":
        try:
            figs, checks = measure_gs_curve(tuple(params.get("levels", s["levels"])), s["ops"], repeat)
            out["figures"] += figs
            out["checks"] += checks
        except Exception as e:
            out["skipped"].append({"what": "scale GS curve", "why": f"failed: {type(e).__name__}: {e}"})
        try:
            runs = [concurrent_clients(CLIENTS, s["requests"], _dragon_query_call) for _ in range(repeat)]
            out["figures"] += client_figures("dragon", runs)
            out["clients"] = runs
        except Exception as e:
            out["skipped"].append({"what": "scale clients dragon", "why": f"failed: {type(e).__name__}: {e}"})
    elif args.inner == "scale-procs":
        out["procs"] = measure_procs(params.get("procs", s["procs"]), params.get("threads", s["threads"]))
    else:
        raise SystemExit(f"dragon-bench: unknown inner part {args.inner!r}")
    with open(args.inner_out, "w") as f:
        json.dump(out, f)
    return 0


# ----------------------------------------------------------------------------------------------------------
# the harness side


def _inner(ctx, argv_prefix, part, params, timeout):
    """Run the harness as the program of a dragon job; -> (its JSON, run_marked's result)."""
    tmp = runtime._tmpdir(ctx)
    out = os.path.join(tmp, f"{part}.json")
    argv = (
        argv_prefix
        + [os.path.join(tmp, "inner.py"), "--inner", part, "--inner-out", out, "--repeat", str(ctx.repeat)]
        + (["--quick"] if ctx.quick else [])
    )
    env = runtime.child_env()
    env[ENV] = json.dumps(params)
    res = util.run_marked(argv, timeout=timeout, env=env, cwd=tmp, shm_filter=lambda n: False)
    runtime._note_leaks(ctx, "dragon", res)
    if not os.path.exists(out):
        raise RuntimeError(
            f"the dragon job exited {res['rc']} without figures: {util.tail(res['stderr'] or res['stdout'])}"
        )
    with open(out) as f:
        data = json.load(f)
    os.unlink(out)
    for s in data.get("skipped", []):
        ctx.skip(s["what"], s["why"])
    return data, res


def _check_notes(ctx, checks):
    bad = [c for c in checks if not c["ok"]]
    for c in bad:
        ctx.note(f"scale: FAILED check: {c['what']} ({c['detail']})")
    if checks and not bad:
        ctx.note("scale: " + "; ".join(c["what"] for c in checks) + ": every check passed")


def plan(ctx):
    s = settings(ctx.quick)
    why = runtime.runtime_missing()
    steps = []
    F = util.figure
    if why:
        ctx.skip("scale dragon", f"dragon runtime not available: {why}")
    else:

        def gs_and_clients():
            data, _ = _inner(
                ctx, runtime.dragon_launch_cmd(), "scale-gs", {"levels": list(s["levels"])}, timeout=1800
            )
            ctx.figures.extend(data["figures"])
            _check_notes(ctx, data.get("checks", []))
            for f in data["figures"]:
                if (
                    f["test"] == "clients"
                    and f["metric"] == "req_per_s"
                    and (f["errors"] or f["timeouts"] or f["lost"])
                ):
                    ctx.note(
                        f"scale: {CLIENTS} concurrent clients: {f['errors']} error(s), {f['timeouts']} "
                        f"timeout(s), {f['lost']} client(s) lost: {f['error_samples']}"
                    )
                elif f["test"] == "clients" and f["metric"] == "req_per_s":
                    ctx.note(
                        f"scale: {CLIENTS} concurrent clients, {f['requests']:,} requests per repeat: "
                        "every one answered, no error, no timeout"
                    )

        steps.append(
            (
                f"scale: GS cost at {', '.join(f'{x:,}' for x in s['levels'])} live objects, "
                f"{CLIENTS} concurrent clients (under dragon-launch)",
                gs_and_clients,
            )
        )

    def gs_alone():
        ctx.figures.extend(measure_gs_alone(s["levels"], s["ops"], ctx.repeat))

    steps.append(("scale: GS's own work per operation, in this process (no IPC)", gs_alone))

    def manager_peer():
        with mp.get_context("fork").Manager() as m:
            d = m.dict({"k": 1})
            runs = [
                concurrent_clients(CLIENTS, s["requests"], lambda: (lambda: d.get("k"), lambda: None))
                for _ in range(ctx.repeat)
            ]
        ctx.figures.extend(client_figures("mp-manager", runs))

    steps.append((f"scale: {CLIENTS} concurrent multiprocessing.Manager clients", manager_peer))

    lacking = util.missing("mpiexec") + util.missing("mpi4py")
    for r in lacking:
        ctx.skip("scale processes over 8 virtual nodes, scale startup curve", **r)
    if not lacking and not why:

        def procs():
            prefix = util.local_mpiexec(PROC_NODES) + runtime.dragon_launch_cmd() + ["--virtual-nodes"]
            data, res = _inner(
                ctx, prefix, "scale-procs", {"procs": s["procs"], "threads": s["threads"]}, timeout=1800
            )
            p = data["procs"]
            left = job_segments(p["job"]) if p.get("job") else []
            for name in left:  # what the job left: reported and removed
                try:
                    os.unlink(os.path.join(util.SHM, name))
                except OSError:
                    pass
            rss = p["gs_rss_mb"]
            extra = {
                "processes": p["total"],
                "nodes": p["nodes"],
                "threads": p["threads"],
                "exit0": p["exit0"],
                "bad_exits": p["bad_exits"],
                "not_joined": p["not_joined"],
                "errors": p["errors"],
                "listed_after": p["listed_after"],
                "left_procs": len(res["leaked_procs"]),
                "left_segments": len(left),
                "gs_rss_hwm_mb": rss["hwm"],
            }
            ctx.figures.append(
                F("scale", "procs", "dragon", "per_s", "proc/s", "higher", [p["per_s"]], **extra)
            )
            if rss.get("end"):
                ctx.figures.append(
                    F("scale", "procs-gs-rss", "dragon", "rss_mb", "MB", "lower", [rss["end"]], **extra)
                )
                ctx.figures.append(
                    F("scale", "procs-gs-rss", "dragon", "rss_max_mb", "MB", "lower", [rss["max"]], **extra)
                )
            ok = p["exit0"] == p["total"] and not (
                p["errors"] or p["listed_after"] or res["leaked_procs"] or left
            )
            ctx.note(
                f"scale: {p['total']:,} /bin/true over {p['nodes']} virtual nodes, {p['threads']} in flight: "
                f"{p['exit0']:,} exited 0, {p['bad_exits']} other exit codes, {p['not_joined']} not joined, "
                f"{p['errors']} errors {p['error_samples'] or ''}; still listed after: {p['listed_after']}; "
                f"left after the job: {len(res['leaked_procs'])} processes, {len(left)} segments; GS VmRSS "
                f"{rss['start']:.0f} MB at the start, {rss['end']:.0f} MB at the end (highest sampled "
                f"{rss['max']:.0f}, VmHWM {rss['hwm']:.0f})" + ("" if ok else " -- NOT all well")
            )

        steps.append((f"scale: {s['procs']:,} /bin/true over {PROC_NODES} virtual nodes", procs))

        def startup():
            tmp = runtime._tmpdir(ctx)
            empty = os.path.join(tmp, "empty.py")
            for n in STARTUP_NODES:
                for peer, argv, env in (
                    (
                        "dragon",
                        util.local_mpiexec(n) + runtime.dragon_launch_cmd() + ["--virtual-nodes", empty],
                        runtime.child_env(),
                    ),
                    ("mpiexec-n", util.local_mpiexec(n) + [sys.executable, empty], runtime.clean_env()),
                ):
                    walls = []
                    for _ in range(ctx.repeat):
                        res = util.run_marked(argv, timeout=300, env=env, cwd=tmp, shm_filter=lambda n: False)
                        if res["rc"] != 0:
                            raise RuntimeError(
                                f"{peer} on {n} nodes exited {res['rc']}: {util.tail(res['stderr'])}"
                            )
                        walls.append(res["wall"])
                        if peer == "dragon":
                            runtime._note_leaks(ctx, "dragon", res)
                    ctx.figures.append(
                        F("scale", "startup", peer, "seconds", "s", "lower", walls, size=n, size_unit="nodes")
                    )

        steps.append((f"scale: startup with {', '.join(map(str, STARTUP_NODES))} virtual nodes", startup))

    def popen_peer():
        ctx.figures.append(
            F(
                "scale",
                "procs",
                "popen",
                "per_s",
                "proc/s",
                "higher",
                [popen_threads(s["popen"], s["threads"]) for _ in range(ctx.repeat)],
                processes=s["popen"],
                threads=s["threads"],
            )
        )

    steps.append((f"scale: subprocess.Popen /bin/true, {s['threads']} threads", popen_peer))
    return steps
