"""Cross-node channel stream and round trip through the transport agents, beside mpi4py between the same ranks.

Layout: the harness re-invokes itself as the app of a two-node dragon job (``mpiexec -n 2 dragon-launch
--virtual-nodes`` on one host, ``srun -N 2 --ntasks-per-node=1 dragon-launch`` on an allocation). The app, on
node 0, makes a channel A in a pool on node 0 and a channel B in a pool on node 1, and starts a Python process on
node 1. Node 1 streams into A (remote send, through the agents) and reads its commands from B (local); node 0 reads
A (local) and sends into B (remote). So every payload crosses the transport once per direction.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

from benchmarks import channels, runtime, util

MARKER = b"D"  # end of a command's output (payloads are at least 8 bytes)


def two_node_launcher():
    """How to start two ranks for this host or allocation: (argv prefix, extra dragon-launch args, where)."""
    nnodes = int(os.environ.get("SLURM_NNODES", "1") or 1)
    if os.environ.get("SLURM_JOB_ID") and nnodes >= 2 and shutil.which("srun"):
        mpi = os.environ.get("DRAGON_BENCH_SRUN_MPI", "pmi2")  # the mpich wheel speaks PMI-2 to Slurm
        return (["srun", f"--mpi={mpi}", "-N", "2", "-n", "2", "--ntasks-per-node=1"], [],
                f"2 Slurm nodes ({os.environ.get('SLURM_JOB_NODELIST', '?')})")
    mpiexec = util.mpiexec_path()
    if mpiexec:
        return [mpiexec, "-n", "2"], ["--virtual-nodes"], "2 virtual nodes on this host"
    return None, None, None


def plan(ctx):
    from benchmarks.channels_run import parse_sizes

    sizes = parse_sizes(ctx.args.sizes)
    launcher, extra, where = two_node_launcher()
    if launcher is None:
        ctx.skip("xnode", "neither srun (in a 2-node allocation) nor mpiexec is available")
        return []
    steps = []
    why = runtime.runtime_missing()
    try:
        import dragon.transport.remote  # noqa: F401
    except Exception as e:
        why = why or f"dragon.transport is not there yet ({type(e).__name__}: {e})"
    if not why and "--virtual-nodes" in extra:
        import subprocess

        h = subprocess.run(runtime.dragon_launch_cmd() + ["--help"], capture_output=True, text=True, timeout=60,
                           env=runtime.child_env())
        if "--virtual-nodes" not in h.stdout + h.stderr:
            why = "dragon-launch has no --virtual-nodes option yet (needed for two nodes on one host)"
    if why:
        ctx.skip("xnode dragon", why)
    else:
        def run():
            tmp = runtime._tmpdir(ctx)
            out = os.path.join(tmp, "xnode.json")
            argv = launcher + runtime.dragon_launch_cmd() + extra + [
                os.path.join(tmp, "inner.py"), "--inner", "xnode", "--inner-out", out,
                "--repeat", str(ctx.repeat), "--sizes", ",".join(str(s) for s in sizes),
                "--target-time", str(ctx.target)]
            res = util.run_marked(argv, timeout=900, env=runtime.child_env(), cwd=tmp, shm_filter=lambda n: False)
            runtime._note_leaks(ctx, "dragon", res)
            if not os.path.exists(out):
                raise RuntimeError(f"cross-node dragon job exited {res['rc']} without figures: "
                                   f"{util.tail(res['stderr'] or res['stdout'])}")
            with open(out) as f:
                data = json.load(f)
            ctx.figures.extend(data["figures"])
            for s in data.get("skipped", []):
                ctx.skip(s["what"], s["why"])
            ctx.note(f"cross-node figures: {where}")

        steps.append((f"xnode: dragon through the agents ({where})", run))

    def run_mpi():
        figs, why = channels.measure_mpi(sizes, ctx.repeat, ctx.target, group="xnode", launcher=launcher)
        ctx.figures.extend(figs)
        if why:
            ctx.skip("xnode mpi4py", why)

    steps.append((f"xnode: mpi4py ({where})", run_mpi))
    return steps


# ---------------------------------------------------------------------------------------------------------------
# inside the dragon job


def _attach(desc):
    """A handle to a channel from its descriptor, wherever it lives."""
    node = getattr(desc, "node", None)
    try:
        from dragon.transport.remote import attach

        if node is not None:
            return attach(desc.sdesc, node)
    except ImportError:
        pass
    from dragon.channels import Channel

    return Channel.attach(desc.sdesc)


def child_main():
    """Node 1's side: commands come on B (local), output goes to A (on node 0)."""
    spec = json.loads(os.environ["DRAGON_BENCH_XNODE"])
    from dragon.globalservices import channel as gch

    a = _attach(gch.query(spec["a"]))
    b = _attach(gch.query(spec["b"]))
    size = spec["size"]
    payload = b"x" * size
    nb = channels.batch_for(size)
    batch = [payload] * nb
    while True:
        cmd = b.recv()
        op, n = cmd[:1], int(cmd[1:])
        if op == b"Q":
            break
        if op == b"S":
            send = a.send
            for _ in range(n):
                send(payload)
        elif op == b"B":
            left = n
            while left > 0:
                k = min(nb, left)
                items = batch if k == nb else batch[:k]
                sent = 0
                while sent < k:
                    sent += a.send_many(items[sent:])
                left -= k
        else:
            send, recv = a.send, b.recv
            for _ in range(n):
                send(recv())
        a.send(MARKER)
    for h in (a, b):
        try:
            h.close()
        except Exception:
            pass
    return 0


def inner_main(args):
    """Node 0's side: the app of the two-node job. Writes its figures to --inner-out."""
    from dragon.globalservices import channel as gch
    from dragon.globalservices import node as gnode
    from dragon.globalservices import pool as gpool
    from dragon.globalservices import process as gp
    from dragon.infrastructure.descriptors import ChannelOptions, PoolOptions, ProcessOptions

    repeat = args.repeat or (1 if args.quick else 3)
    target = args.target_time or (0.08 if args.quick else 0.4)
    sizes = [int(s) for s in (args.sizes or "8,1024,65536,1048576").split(",")]
    figures, skipped = [], []
    nodes = gnode.get_list()
    if len(nodes) < 2:
        skipped.append({"what": "xnode dragon", "why": f"the job has {len(nodes)} node(s); need 2"})
    for size in sizes if len(nodes) >= 2 else []:
        capacity = 1024 if size <= 65536 else 64
        pool_bytes = max(64 << 20, 2 * capacity * (size + 4096) + (16 << 20))
        made = []
        try:
            p0 = gpool.create(pool_bytes, pool_options=PoolOptions(node=0))
            made.append(("pool", p0.m_uid))
            p1 = gpool.create(pool_bytes, pool_options=PoolOptions(node=1))
            made.append(("pool", p1.m_uid))
            opts = ChannelOptions(capacity=capacity, block_size=1024)
            a = gch.create(p0.m_uid, channel_options=opts)
            made.append(("chan", a.c_uid))
            b = gch.create(p1.m_uid, channel_options=opts)
            made.append(("chan", b.c_uid))
            env = {"DRAGON_BENCH_XNODE": json.dumps({"a": a.c_uid, "b": b.c_uid, "size": size})}
            inner = os.path.abspath(sys.argv[0])
            child = gp.create(sys.executable, os.getcwd(), [inner, "--inner", "xnode-child"], env=env,
                              options=ProcessOptions(node=1))
            ra, rb = _attach(a), _attach(b)
            payload = b"x" * size

            def stream(n, op=b"S"):
                t0 = time.perf_counter()
                rb.send(b"%s%d" % (op, n))
                got = 0
                if op == b"B":
                    while got < n:
                        got += len(ra.recv_many(channels.batch_for(size), timeout=channels.RECV_TIMEOUT))
                else:
                    for _ in range(n):
                        ra.recv(timeout=channels.RECV_TIMEOUT)
                dt = time.perf_counter() - t0
                end = ra.recv(timeout=channels.RECV_TIMEOUT)
                assert bytes(end) == MARKER, "cross-node stream out of step"
                return dt

            def pingpong(n):
                rb.send(b"E%d" % n)
                lat = []
                for _ in range(n):
                    t = time.perf_counter()
                    rb.send(payload)
                    ra.recv(timeout=channels.RECV_TIMEOUT)
                    lat.append(time.perf_counter() - t)
                assert bytes(ra.recv(timeout=channels.RECV_TIMEOUT)) == MARKER
                return lat

            try:
                n0 = channels.probe_count(size)
                for peer, op in (("dragon", b"S"), ("dragon-batch", b"B")):
                    n = channels.calibrate(n0 / stream(n0, op), target, n0, 5_000_000)
                    rates = [n / stream(n, op) for _ in range(repeat)]
                    figures += channels.stream_and_rtt_figures("xnode", peer, size, rates, [], [], n, 0)
                lat = pingpong(max(20, n0 // 20))
                m = channels.calibrate(1.0 / util.quantile(lat, 0.5), target, 50, 200_000)
                meds, p99s = [], []
                for _ in range(repeat):
                    lat = pingpong(m)
                    meds.append(util.quantile(lat, 0.5) * 1e6)
                    p99s.append(util.quantile(lat, 0.99) * 1e6)
                figures += channels.stream_and_rtt_figures("xnode", "dragon", size, [], meds, p99s, 0, m)
            finally:
                try:
                    rb.send(b"Q0", timeout=5)
                    gp.join(child.p_uid, timeout=30)
                except Exception:
                    pass
                for h in (ra, rb):
                    try:
                        h.close()
                    except Exception:
                        pass
        except Exception as e:
            skipped.append({"what": f"xnode dragon {util.size_label(size)}", "why": f"{type(e).__name__}: {e}"})
        finally:
            for kind, uid in reversed(made):
                try:
                    (gch if kind == "chan" else gpool).destroy(uid)
                except Exception:
                    pass
    with open(args.inner_out, "w") as f:
        json.dump({"figures": figures, "skipped": skipped}, f)
    return 0
