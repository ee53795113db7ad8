"""The 'mp' selection: multiprocessing on the dragon start method beside the stdlib's fork, forkserver and
spawn (and DragonHPC's, when installed), in one run.

Every runtime runs the same program, benchmarks/mp_prog.py: plain python for the stdlib's methods, under
dragon-launch for dragon, with ``dragon -s`` from DragonHPC's virtualenv for DragonHPC. The repeats are
interleaved (fork, forkserver, spawn, dragon, ..., then again), so that a busy machine weighs on every peer
alike; a figure's samples are its repeats. Figures: Process start+join of a trivial target, Pool.map of
100,000 trivial tasks (chunksize 1 and 64, as many workers as this node has CPUs), a Queue of small objects
and of 16 MiB arrays between two processes, a Pipe round trip, a Queue round trip, a Queue(1000) stream, Lock
acquire+release and Value increments in a child, an Event set/wait round trip, ProcessPoolExecutor.map.
Across three virtual nodes (mpiexec -n 3 dragon-launch --virtual-nodes), dragon's Pool.map is measured with
workers on every node; across two (peer dragon-2vn), every child and worker runs on node 1 and the measuring
process on node 0: each object used across nodes, with its ratio to the stdlib's start methods on one node.
"""

from __future__ import annotations

import os
import sys

from benchmarks import runtime, util

PROG = os.path.join(runtime.HERE, "mp_prog.py")
STDLIB = ("fork", "forkserver", "spawn")
LABELS = {
    "mp-forkserver": "mp.Process (forkserver)",
    "dragon-3vn": "dragon, 3 virtual nodes",
    "dragon-2vn": "dragon, children on another node",
}
XNODE_PARTS = "pool,queue,array,pipe,queue-rtt,bounded,lock,value,event,executor"
TESTS = {  # test -> (metric, unit, better, size)
    "process-start-join": ("per_s", "proc/s", "higher", None),
    "pool-map-c1": ("tasks_per_s", "tasks/s", "higher", None),
    "pool-map-c64": ("tasks_per_s", "tasks/s", "higher", None),
    "pool-map-c1-3nodes": ("tasks_per_s", "tasks/s", "higher", None),
    "pool-map-c64-3nodes": ("tasks_per_s", "tasks/s", "higher", None),
    "queue-stream": ("msg_per_s", "msg/s", "higher", None),
    "queue-array": ("gb_per_s", "GB/s", "higher", 16 << 20),
    "pipe-rtt": ("rtt_median_us", "us", "lower", None),
    "queue-rtt": ("rtt_median_us", "us", "lower", None),
    "queue-bounded-stream": ("msg_per_s", "msg/s", "higher", None),
    "lock-acquire-release": ("per_s", "op/s", "higher", None),
    "value-increment": ("per_s", "op/s", "higher", None),
    "event-rtt": ("rtt_median_us", "us", "lower", None),
    "executor-map-c1": ("tasks_per_s", "tasks/s", "higher", None),
}


def plan(ctx):
    samples = {}  # (test, peer) -> [sample per repeat]
    q = ["--quick"] if ctx.quick else []
    tmp = runtime._tmpdir(ctx)

    def collect(name, res):
        data = util.parse_json_line(res["stdout"])
        if res["rc"] != 0 or not data:
            raise RuntimeError(f"{name} exited {res['rc']}: {util.tail(res['stderr'] or res['stdout'])}")
        for f in data["figures"]:
            samples.setdefault((f["test"], f["peer"]), []).extend(f["samples"])
        for s in data.get("skipped", []):
            ctx.skip(s["what"], s["why"])

    def stdlib(method):
        def run():
            res = util.run_marked(
                [sys.executable, PROG, "--method", method, "--repeat", "1", *q],
                timeout=600,
                env=runtime.child_env(),
                cwd=tmp,
            )
            collect(f"mp_prog --method {method}", res)

        return run

    def dragon():
        res = util.run_marked(
            runtime.dragon_launch_cmd() + [PROG, "--method", "dragon", "--repeat", "1", *q],
            timeout=600,
            env=runtime.child_env(),
            cwd=tmp,
            shm_filter=lambda n: False,
        )
        runtime._note_leaks(ctx, "dragon", res)
        collect("dragon-launch mp_prog", res)

    def on_virtual_nodes(n, extra, what):
        argv = (
            util.local_mpiexec(n)
            + runtime.dragon_launch_cmd()
            + ["--virtual-nodes", PROG, "--method", "dragon", *extra, "--repeat", "1", *q]
        )
        res = util.run_marked(argv, timeout=600, env=runtime.child_env(), cwd=tmp, shm_filter=lambda n: False)
        runtime._note_leaks(ctx, "dragon", res)
        collect(f"mpiexec -n {n} dragon-launch --virtual-nodes mp_prog{what}", res)

    def nodes3():
        workers = str(3 * len(os.sched_getaffinity(0)))
        extra = ["--parts", "pool", "--peer", "dragon-3vn", "--test-suffix=-3nodes", "--workers", workers]
        on_virtual_nodes(3, extra, "")

    def nodes2():
        on_virtual_nodes(
            2, ["--parts", XNODE_PARTS, "--peer", "dragon-2vn", "--peer-node", "1"], " --peer-node 1"
        )

    def dragonhpc():
        res = util.run_marked(
            [
                os.path.join(ctx.dragonhpc, "bin", "dragon"),
                "-s",
                PROG,
                "--method",
                "dragon",
                "--peer",
                "dragonhpc",
                "--repeat",
                "1",
                *q,
            ],
            timeout=900,
            env=runtime.dhpc_env(ctx),
            cwd=tmp,
            shm_filter=runtime.dhpc_segment,
        )
        runtime._note_leaks(ctx, "dragonhpc", res)
        collect("DragonHPC mp_prog", res)

    why = runtime.runtime_missing()
    if why:
        ctx.skip("mp dragon", f"dragon runtime not available: {why}")
    if not ctx.dragonhpc:
        for r in runtime.dhpc_absent(ctx):
            ctx.skip("mp DragonHPC", **r)
    lacking = util.missing("mpiexec")
    for r in lacking:
        ctx.skip("mp dragon across 3 and 2 virtual nodes", **r)
    multi = not lacking and why is None
    steps = []
    for r in range(ctx.repeat):
        tag = f" ({r + 1}/{ctx.repeat})"
        steps += [(f"mp: multiprocessing {m}{tag}", stdlib(m)) for m in STDLIB]
        if why is None:
            steps.append((f"mp: dragon{tag}", dragon))
        if multi:
            steps.append((f"mp: dragon on 3 virtual nodes{tag}", nodes3))
            steps.append((f"mp: dragon, children on another node{tag}", nodes2))
        if ctx.dragonhpc:
            steps.append((f"mp: DragonHPC{tag}", dragonhpc))

    def figures():
        for (test, peer), s in sorted(samples.items()):
            metric, unit, better, size = TESTS[test]
            ctx.figures.append(util.figure("mp", test, peer, metric, unit, better, s, size=size))

    steps.append(("mp: figures", figures))
    return steps
