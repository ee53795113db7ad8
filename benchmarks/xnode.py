"""Cross-node channel stream and round trip through the transport agents, beside mpi4py between the same
ranks.

Layout: the harness re-invokes itself as the app of a two-node dragon job (``mpiexec -n 2 dragon-launch
--virtual-nodes`` on one host, ``srun -N 2 --ntasks-per-node=1 dragon-launch`` on an allocation). The app, on
node 0, makes a channel A in a pool on node 0 and a channel B in a pool on node 1, and starts a Python process
on node 1. Node 1 streams into A (remote send, through the agents) and reads its commands from B (local); node
0 reads A (local) and sends into B (remote). So every payload crosses the transport once per direction.
"""

from __future__ import annotations

import json
import os
import sys
import time

from benchmarks import channels, runtime, util

MARKER = b"D"  # end of a command's output (payloads are at least 8 bytes)


def two_node_launcher():
    """How to start two ranks for this host or allocation: (argv prefix, extra dragon-launch args, where)."""
    if util.slurm_hosts():
        mpi = os.environ.get("DRAGON_BENCH_SRUN_MPI", "pmi2")  # the mpich wheel speaks PMI-2 to Slurm
        return (
            ["srun", f"--mpi={mpi}", "-N", "2", "-n", "2", "--ntasks-per-node=1"],
            [],
            f"2 Slurm nodes ({os.environ.get('SLURM_JOB_NODELIST', '?')})",
        )
    if util.mpiexec_path():
        return util.local_mpiexec(2), ["--virtual-nodes"], "2 virtual nodes on this host"
    return None, None, None


def plan(ctx):
    from benchmarks.channels_run import parse_sizes

    sizes = parse_sizes(ctx.args.sizes)
    launcher, extra, where = two_node_launcher()
    if launcher is None:  # outside a 2-node Slurm allocation, mpiexec starts the two ranks
        for r in util.missing("mpiexec"):
            ctx.skip("xnode", **r)
        return []
    steps = []
    lacking = util.missing("mpi4py")  # the transport agents speak MPI
    why = None if lacking else runtime.runtime_missing()
    try:
        import dragon._core.remote  # noqa: F401
    except Exception as e:
        why = why or f"dragon.transport is not there yet ({type(e).__name__}: {e})"
    job = launcher + runtime.dragon_launch_cmd() + extra
    inner_mode = "xnode"
    if not why and "--virtual-nodes" in extra:
        import subprocess

        h = subprocess.run(
            runtime.dragon_launch_cmd() + ["--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=runtime.child_env(),
        )
        if "--virtual-nodes" not in h.stdout + h.stderr:
            # until dragon-launch can make virtual nodes: the transport agents alone, through their harness
            job = launcher + [sys.executable, "-m", "dragon.transport.harness", "--virtual-nodes"]
            inner_mode = "xnode-harness"
            ctx.note(
                "xnode: dragon-launch has no --virtual-nodes yet; the dragon cross-node figures come from "
                "the transport agents run by dragon.transport.harness (same agents, no GS)"
            )
    reasons = lacking or ([{"why": why}] if why else [])
    for r in reasons:
        ctx.skip("xnode dragon", **r)
    if not reasons:

        def run():
            tmp = runtime._tmpdir(ctx)
            out = os.path.join(tmp, "xnode.json")
            argv = job + [
                os.path.join(tmp, "inner.py"),
                "--inner",
                inner_mode,
                "--inner-out",
                out,
                "--repeat",
                str(ctx.repeat),
                "--sizes",
                ",".join(str(s) for s in sizes),
                "--target-time",
                str(ctx.target),
            ]
            if ctx.quick:
                argv.append("--quick")
            res = util.run_marked(
                argv, timeout=900, env=runtime.child_env(), cwd=tmp, shm_filter=lambda n: False
            )
            runtime._note_leaks(ctx, "dragon", res)
            if not os.path.exists(out):
                raise RuntimeError(
                    f"cross-node dragon job exited {res['rc']} without figures: "
                    f"{util.tail(res['stderr'] or res['stdout'])}"
                )
            with open(out) as f:
                data = json.load(f)
            ctx.figures.extend(data["figures"])
            for s in data.get("skipped", []):
                ctx.skip(s["what"], s["why"])
            handles = sorted({f["handles"] for f in data["figures"] if f.get("handles")})
            ctx.note(f"cross-node figures: {where}" + (f" ({'; '.join(handles)})" if handles else ""))

        steps.append((f"xnode: dragon through the agents ({where})", run))

    def run_mpi():
        figs, why = channels.measure_mpi(sizes, ctx.repeat, ctx.target, group="xnode", launcher=launcher)
        ctx.figures.extend(figs)
        if why:
            ctx.skip("xnode mpi4py", why)

    lacking = util.missing("mpi4py", "numpy")  # benchmarks/mpi_peer.py, with numpy buffers
    for r in lacking:
        ctx.skip("xnode mpi4py", **r)
    if not lacking:
        steps.append((f"xnode: mpi4py ({where})", run_mpi))
    if floor_sizes(sizes):
        lacking = util.missing("mpicc")  # (C and MPI only: no mpi4py, no dragon)
        for r in lacking:
            ctx.skip("xnode relay floor", **r)
        if not lacking:
            steps.append(
                (
                    f"xnode: the same path in C, the floor ({where})",
                    lambda: run_floor(ctx, launcher, extra, sizes),
                )
            )
    return steps


# ----------------------------------------------------------------------------------------------------------
# the floor of the path: benchmarks/relay_floor.c (a process and a relay per node, in C): the 8 B round trip,
# and the stream of the sizes mpi4py also streams with fresh data (what dragon's copying send does)

FLOOR_ROUND_TRIPS = 20_000
FLOOR_STREAM_BYTES = 2_000_000_000  # per repeat (1 MiB: 1,907 messages, ~0.2 s)
FLOOR_STREAM_MIN = 65536  # (benchmarks/mpi_peer.py's FRESH_MIN)


def floor_sizes(sizes):
    """The sizes relay_floor measures: 8 B (round trip) and the streamed sizes from FLOOR_STREAM_MIN up."""
    return [s for s in sizes if s == 8 or s >= FLOOR_STREAM_MIN]


def floor_cpus(virtual):
    """The CPU lists the two ranks of relay_floor bind to: each virtual node's share of this host's CPUs, as
    dragon-launch --virtual-nodes binds them (dragon.transport.world.cpu_share); "-" (no binding) across
    hosts, or where the CPUs do not split evenly."""
    from dragon.transport.world import cpu_share

    cpus = sorted(os.sched_getaffinity(0))
    shares = [cpu_share(cpus, 2, k) if virtual else None for k in (0, 1)]
    return [",".join(map(str, s)) if s else "-" for s in shares]


def run_floor(ctx, launcher, extra, sizes):
    import subprocess

    tmp = runtime._tmpdir(ctx)
    exe = os.path.join(tmp, "relay_floor")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay_floor.c")
    cc = subprocess.run(
        [util.mpicc_path(), "-O2", "-o", exe, src], capture_output=True, text=True, timeout=120, check=False
    )
    if cc.returncode != 0:
        ctx.skip(
            "xnode relay floor", f"mpicc could not build relay_floor.c: {util.tail(cc.stderr or cc.stdout)}"
        )
        return
    env = util.clean_env()
    if launcher[0] == "srun":  # the netmod a dragon rank takes under srun (dragon.transport.world)
        from dragon.transport.world import NETMOD_VAR, srun_netmod

        lib = subprocess.run([exe, "--library"], capture_output=True, text=True, timeout=60, check=False)
        netmod = srun_netmod(lib.stdout)
        if netmod and NETMOD_VAR not in env:
            env[NETMOD_VAR] = netmod
    cpus = floor_cpus("--virtual-nodes" in extra)
    library = None
    for size in floor_sizes(sizes):
        if size == 8:
            n = FLOOR_ROUND_TRIPS // (4 if ctx.quick else 1)
            mode = []
        else:
            n = max(50, FLOOR_STREAM_BYTES // size // (4 if ctx.quick else 1))
            mode = ["--stream", str(size)]
        argv = launcher + [exe] + mode + [str(n), str(ctx.repeat)] + cpus
        res = util.run_marked(argv, timeout=300, env=env, cwd=tmp, shm_filter=lambda name: False)
        data = util.parse_json_line(res["stdout"])
        if res["timed_out"] or res["rc"] != 0 or not data:
            why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
            ctx.skip(
                f"xnode relay floor {util.size_label(size)}",
                f"relay_floor failed ({why}): {util.tail(res['stderr'] or res['stdout'])}",
            )
            continue
        library = data["library"]
        if size == 8:
            figs = channels.stream_and_rtt_figures(
                "xnode", "relay-floor", 8, [], data["rtt_median_us"], data["rtt_p99_us"], 0, data["n"]
            )
        else:
            figs = channels.stream_and_rtt_figures(
                "xnode", "relay-floor", size, data["msg_per_s"], [], [], n, 0
            )
        ctx.figures.extend(figs)
    if library:
        ctx.note(f"xnode relay floor: benchmarks/relay_floor.c built with {util.mpicc_path()} ({library})")


# ----------------------------------------------------------------------------------------------------------
# inside the dragon job: node 1 serves, node 0 drives. Commands are b"<op><n>:<size>", op S (stream),
# B (stream with send_many), E (echo n messages), Q (quit); the server ends each command's output with MARKER.


def _attach(desc):
    """A handle to a channel from its descriptor, wherever it lives: Channel.attach, as a user writes it (it
    returns the transport's RemoteChannel for a channel on another node)."""
    from dragon.channels import Channel

    return Channel.attach(desc.sdesc)


def serve(out_ch, cmd_ch):
    """Node 1's side: commands come on cmd_ch (local), output goes to out_ch (on node 0)."""
    payloads = {}
    while True:
        cmd = bytes(cmd_ch.recv())
        op = cmd[:1]
        if op == b"Q":
            break
        n, size = (int(x) for x in cmd[1:].split(b":"))
        payload = payloads.setdefault(size, b"x" * size)
        if op == b"S":
            send = out_ch.send
            for _ in range(n):
                send(payload)
        elif op == b"B":
            nb = channels.batch_for(size)
            batch = [payload] * nb
            left = n
            while left > 0:
                k = min(nb, left)
                items = batch if k == nb else batch[:k]
                sent = 0
                while sent < k:
                    sent += out_ch.send_many(items[sent:] if sent else items)
                left -= k
        else:
            send, recv = out_ch.send, cmd_ch.recv
            for _ in range(n):
                send(recv())
        out_ch.send(MARKER)


def drive(in_ch, cmd_ch, size, repeat, target):
    """Node 0's side for one size: returns the figures (group xnode)."""
    payload = b"x" * size
    buf = bytearray(size)  # node 0 receives into a preallocated buffer or zero copy, like mpi4py's Recv
    T = channels.RECV_TIMEOUT

    def stream(n, op=b"S"):
        t0 = time.perf_counter()
        cmd_ch.send(b"%s%d:%d" % (op, n, size))
        got = 0
        if op == b"B":
            nb = channels.batch_for(size)
            while got < n:
                got += len(in_ch.recv_many(min(nb, n - got), timeout=T))
        elif (
            size > 8192
        ):  # zero copy, as mpi4py's Recv leaves the data in place: a Message over the pool block
            recv = in_ch.recv_message
            for _ in range(n):
                recv(timeout=T).release()
        else:  # into a preallocated buffer, as mpi4py's Recv
            recv = in_ch.recv_into
            for _ in range(n):
                recv(buf, timeout=T)
        dt = time.perf_counter() - t0
        if bytes(in_ch.recv(timeout=T)) != MARKER:
            raise RuntimeError("cross-node stream out of step")
        return dt

    def pingpong(n):
        cmd_ch.send(b"E%d:%d" % (n, size))
        lat = []
        send, recv, clock = cmd_ch.send, in_ch.recv_into, time.perf_counter
        for _ in range(n):
            t = clock()
            send(payload)
            recv(buf, timeout=T)
            lat.append(clock() - t)
        if bytes(in_ch.recv(timeout=T)) != MARKER:
            raise RuntimeError("cross-node ping-pong out of step")
        return lat

    figures = []
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
    return figures + channels.stream_and_rtt_figures("xnode", "dragon", size, [], meds, p99s, 0, m)


def _settings(args):
    repeat = args.repeat or (1 if args.quick else 3)
    target = args.target_time or (0.08 if args.quick else 0.4)
    sizes = [int(s) for s in (args.sizes or "8,1024,65536,1048576").split(",")]
    return repeat, target, sizes


def _write(path, figures, skipped):
    with open(path, "w") as f:
        json.dump({"figures": figures, "skipped": skipped}, f)


def child_main():
    """Node 1's process of a dragon-launch job (started by inner_main through GS)."""
    spec = json.loads(os.environ["DRAGON_BENCH_XNODE"])
    from dragon.globalservices import channel as gch

    a = _attach(gch.query(spec["a"]))
    b = _attach(gch.query(spec["b"]))
    try:
        serve(a, b)
    finally:
        for h in (a, b):
            try:
                h.close()
            except Exception:
                pass
    return 0


def harness_main(args):
    """Both nodes' program under ``mpiexec -n 2 python -m dragon.transport.harness --virtual-nodes``: the
    harness gives every node a channel "a"; node 0 reads its own and commands node 1's."""
    from dragon.channels import Channel

    node = int(os.environ["DRAGON_NODE"])
    chans = json.loads(os.environ["DRAGON_TEST_CHANS"])
    a0 = Channel.attach(bytes.fromhex(chans["0"]["a"]))
    a1 = Channel.attach(bytes.fromhex(chans["1"]["a"]))
    repeat, target, sizes = _settings(args)
    figures, skipped = [], []
    try:
        if node == 1:
            serve(a0, a1)
        elif node == 0:
            try:
                for size in sizes:
                    try:
                        figures += drive(a0, a1, size, repeat, target)
                    except Exception as e:
                        skipped.append(
                            {
                                "what": f"xnode dragon {util.size_label(size)}",
                                "why": f"{type(e).__name__}: {e}",
                            }
                        )
                        break
            finally:
                a1.send(b"Q", timeout=10)
                if hasattr(a1, "flush"):
                    a1.flush(timeout=10)
            _write(args.inner_out, figures, skipped)
    finally:
        for h in (a0, a1):
            try:
                h.close()
            except Exception:
                pass
    return 0


def inner_main(args):
    """Node 0's side: the app of a two-node dragon-launch job. Writes its figures to --inner-out."""
    from dragon.globalservices import channel as gch
    from dragon.globalservices import node as gnode
    from dragon.globalservices import pool as gpool
    from dragon.globalservices import process as gp
    from dragon.infrastructure.descriptors import ChannelOptions, PoolOptions, ProcessOptions

    repeat, target, sizes = _settings(args)
    figures, skipped = [], []
    nodes = gnode.get_list()
    if len(nodes) < 2:
        skipped.append({"what": "xnode dragon", "why": f"the job has {len(nodes)} node(s); need 2"})
    for size in sizes if len(nodes) >= 2 else []:
        capacity = 1024 if size <= 65536 else 64
        pool_bytes = max(64 << 20, 2 * capacity * (size + 4096) + (16 << 20))
        made = []
        ra = rb = child = None
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
            env = {"DRAGON_BENCH_XNODE": json.dumps({"a": a.c_uid, "b": b.c_uid})}
            inner = os.path.abspath(sys.argv[0])
            child = gp.create(
                sys.executable,
                os.getcwd(),
                [inner, "--inner", "xnode-child"],
                env=env,
                options=ProcessOptions(node=1),
            )
            ra, rb = _attach(a), _attach(b)
            handles = f"node 0 reads a {type(ra).__name__}, sends into a {type(rb).__name__}"
            figures += [dict(f, handles=handles) for f in drive(ra, rb, size, repeat, target)]
        except Exception as e:
            skipped.append(
                {"what": f"xnode dragon {util.size_label(size)}", "why": f"{type(e).__name__}: {e}"}
            )
        finally:
            if rb is not None:
                try:
                    rb.send(b"Q", timeout=5)
                except Exception:
                    pass
            if child is not None:
                try:
                    gp.join(child.p_uid, timeout=30)
                except Exception:
                    pass
            for h in (ra, rb):
                try:
                    h is not None and h.close()
                except Exception:
                    pass
            for kind, uid in reversed(made):
                try:
                    (gch if kind == "chan" else gpool).destroy(uid)
                except Exception:
                    pass
    _write(args.inner_out, figures, skipped)
    return 0
