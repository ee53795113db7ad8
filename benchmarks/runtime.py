"""Runtime benchmarks: process launch, GS request round trip, pool alloc/free, startup.

The dragon figures of 'launch' and 'gs' need a running runtime, so the harness re-invokes itself under
``dragon-launch`` (``--inner launch,gs --inner-out FILE``) and reads the figures back from FILE. The peers
(subprocess.Popen, multiprocessing) run in the harness process itself. DragonHPC figures come from
benchmarks/dragonhpc_prog.py run with ``dragon -s`` from its own virtualenv.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import util

LABELS = {
    "popen": "subprocess.Popen",
    "service-floor": "2 services, no work (floor)",
    "mp-fork": "mp.Process (fork)",
    "mp-spawn": "mp.Process (spawn)",
    "mp-manager": "mp.Manager dict lookup",
    "shared-memory": "shared_memory create+unlink",
    "python": "python (no runtime)",
    "mpiexec": "mpiexec -n 1 python",
    "dragonhpc": "DragonHPC",
}
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
IN_FLIGHT = 16
POOL_SIZES = [64, 64 * 1024]


def counts(quick):
    """How many operations per repeat for each runtime figure."""
    if quick:
        return {"serial": 20, "flight": 32, "python": 6, "query": 300, "pool": 5000}
    return {"serial": 200, "flight": 200, "python": 30, "query": 3000, "pool": 100_000}


# ----------------------------------------------------------------------------------------------------------
# how to start dragon


def runtime_missing():
    """None if dragon-launch and the process API are there, else why not."""
    for mod in ("launcher.launch", "dragon.globalservices.process"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not there yet"
        except Exception as e:
            return f"cannot import {mod}: {type(e).__name__}: {e}"
    return None


def dragon_launch_cmd():
    """dragon-launch of this python: its console script (next to python; PATH's may be another install's), or
    the same entry point through the interpreter when the script is not installed (no pip install)."""
    exe = util.beside_python("dragon-launch")
    if exe:
        return [exe]
    return [
        sys.executable,
        "-c",
        "import sys; from launcher.launch import main; sys.argv[0] = 'dragon-launch'; sys.exit(main())",
    ]


def in_runtime():
    """True when this process is itself a managed process of a dragon job (started under dragon-launch)."""
    return bool(os.environ.get("DRAGON_GS_CD"))


clean_env = util.clean_env


def child_env():
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------------------
# peers measured in this process


def _rate(n, dt):
    return n / dt


def popen_serial(n, argv):
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.Popen(argv).wait()
    return _rate(n, time.perf_counter() - t0)


def popen_in_flight(n, argv, width=IN_FLIGHT):
    t0 = time.perf_counter()
    window = []
    started = 0
    while started < n or window:
        while started < n and len(window) < width:
            window.append(subprocess.Popen(argv))
            started += 1
        window.pop(0).wait()
    return _rate(n, time.perf_counter() - t0)


def _noop():
    pass


def mp_serial(n, method):
    ctx = mp.get_context(method)
    t0 = time.perf_counter()
    for _ in range(n):
        p = ctx.Process(target=_noop)
        p.start()
        p.join()
    return _rate(n, time.perf_counter() - t0)


def manager_query(n):
    """Round trip of a request to a server process the stdlib way: a multiprocessing.Manager dict lookup."""
    with mp.get_context("fork").Manager() as m:
        d = m.dict({"k": 1})
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            d.get("k")
            lat.append(time.perf_counter() - t)
    return lat


def shm_alloc_free(n, size):
    from multiprocessing import shared_memory

    t0 = time.perf_counter()
    for _ in range(n):
        s = shared_memory.SharedMemory(create=True, size=size)
        s.close()
        s.unlink()
    return _rate(n, time.perf_counter() - t0)


def dragon_pool_alloc_free(n, size):
    from dragon.pools import Pool

    pool = Pool.create(64 << 20)
    try:
        for _ in range(min(1000, n)):  # warm
            pool.free(pool.alloc(size))
        alloc, free = pool.alloc, pool.free
        t0 = time.perf_counter()
        for _ in range(n):
            free(alloc(size))
        return _rate(n, time.perf_counter() - t0)
    finally:
        pool.destroy()


# ----------------------------------------------------------------------------------------------------------
# plans (lists of (label, fn[, shared-key]) steps)


def _rep(ctx, fn):
    return [fn() for _ in range(ctx.repeat)]


def plan_launch(ctx):
    c = counts(ctx.quick)
    F = util.figure
    true = shutil.which("true") or "/bin/true"
    py = [sys.executable, "-c", "pass"]

    def peers():
        ctx.figures.append(
            F(
                "launch",
                "true-serial",
                "popen",
                "per_s",
                "proc/s",
                "higher",
                _rep(ctx, lambda: popen_serial(c["serial"], [true])),
            )
        )
        ctx.figures.append(
            F(
                "launch",
                "true-16",
                "popen",
                "per_s",
                "proc/s",
                "higher",
                _rep(ctx, lambda: popen_in_flight(c["flight"], [true])),
            )
        )
        ctx.figures.append(
            F(
                "launch",
                "python-child",
                "popen",
                "per_s",
                "proc/s",
                "higher",
                _rep(ctx, lambda: popen_serial(c["python"], py)),
            )
        )
        ctx.figures.append(
            F(
                "launch",
                "python-child",
                "mp-fork",
                "per_s",
                "proc/s",
                "higher",
                _rep(ctx, lambda: mp_serial(c["python"] * 4, "fork")),
            )
        )
        ctx.figures.append(
            F(
                "launch",
                "python-child",
                "mp-spawn",
                "per_s",
                "proc/s",
                "higher",
                _rep(ctx, lambda: mp_serial(c["python"], "spawn")),
            )
        )

    def floor():
        # the runtime's path without its work (benchmarks/spawn_floor.py): what dragon's create+join can reach
        from benchmarks.spawn_floor import Floor

        with Floor(true) as f:
            f.serial(10)  # (warm: its two processes' first starts)
            for test, run in (
                ("true-serial", lambda: f.serial(c["serial"])),
                ("true-16", lambda: f.in_flight(c["flight"], IN_FLIGHT)),
            ):
                ctx.figures.append(
                    F("launch", test, "service-floor", "per_s", "proc/s", "higher", _rep(ctx, run))
                )

    steps = [("launch: Popen, multiprocessing", peers), ("launch: the floor of a managed start", floor)]
    steps += _dragon_runtime_steps(ctx)
    steps += _dragonhpc_steps(ctx)
    return steps


def plan_gs(ctx):
    c = counts(ctx.quick)

    def peer():
        meds, p99s = [], []
        for _ in range(ctx.repeat):
            lat = manager_query(c["query"])
            meds.append(util.quantile(lat, 0.5) * 1e6)
            p99s.append(util.quantile(lat, 0.99) * 1e6)
        ctx.figures.append(util.figure("gs", "query", "mp-manager", "rtt_median_us", "us", "lower", meds))
        ctx.figures.append(util.figure("gs", "query", "mp-manager", "rtt_p99_us", "us", "lower", p99s))

    return [("gs: multiprocessing.Manager", peer)] + _dragon_runtime_steps(ctx) + _dragonhpc_steps(ctx)


def plan_pool(ctx):
    c = counts(ctx.quick)
    steps = []
    why = None
    try:
        from dragon.pools import Pool  # noqa: F401
    except Exception as e:
        why = f"cannot import dragon.pools: {type(e).__name__}: {e}"
    for size in POOL_SIZES:
        if why is None:

            def run(size=size):
                ctx.figures.append(
                    util.figure(
                        "pool",
                        "alloc-free",
                        "dragon",
                        "ops_per_s",
                        "op/s",
                        "higher",
                        _rep(ctx, lambda: dragon_pool_alloc_free(c["pool"], size)),
                        size=size,
                    )
                )

            steps.append((f"pool: dragon alloc+free {util.size_label(size)}", run))

        def peer(size=size):
            n = max(200, c["pool"] // 50)  # each one is two syscalls and an mmap
            ctx.figures.append(
                util.figure(
                    "pool",
                    "alloc-free",
                    "shared-memory",
                    "ops_per_s",
                    "op/s",
                    "higher",
                    _rep(ctx, lambda: shm_alloc_free(n, size)),
                    size=size,
                )
            )

        steps.append((f"pool: shared_memory {util.size_label(size)}", peer))
    if why:
        ctx.skip("pool dragon", why)
    return steps + _dragonhpc_steps(ctx)


def plan_startup(ctx):
    steps = []
    tmp = _tmpdir(ctx)
    empty = os.path.join(tmp, "empty.py")

    def timed(name, argv, cwd=None, env=None, shm_filter=None):
        def run():
            walls = []
            for _ in range(ctx.repeat):
                res = util.run_marked(argv, timeout=120, env=env, cwd=cwd, shm_filter=shm_filter)
                if res["rc"] != 0:
                    raise RuntimeError(f"{' '.join(argv[:2])} exited {res['rc']}: {util.tail(res['stderr'])}")
                walls.append(res["wall"])
                _note_leaks(ctx, name, res)
            ctx.figures.append(util.figure("startup", "empty", name, "seconds", "s", "lower", walls))

        return run

    steps.append(("startup: python empty.py", timed("python", [sys.executable, empty], env=clean_env())))
    lacking = util.missing("mpiexec")
    for r in lacking:
        ctx.skip("startup mpiexec -n 1", **r)
    if not lacking:
        steps.append(
            (
                "startup: mpiexec -n 1 python empty.py",
                timed("mpiexec", util.local_mpiexec(1) + [sys.executable, empty], env=clean_env()),
            )
        )
    why = runtime_missing()
    if why:
        ctx.skip("startup dragon-launch", why)
    else:
        steps.append(
            (
                "startup: dragon-launch empty.py",
                timed(
                    "dragon",
                    dragon_launch_cmd() + [empty],
                    env=child_env(),
                    cwd=tmp,
                    shm_filter=lambda n: False,
                ),
            )
        )
        steps.append(
            ("startup: python -c 'import dragon; dragon.init()' vs 'import dragon'", init_vs_import(ctx))
        )
    if ctx.dragonhpc:
        steps.append(
            (
                "startup: DragonHPC dragon -s empty.py",
                timed(
                    "dragonhpc",
                    [os.path.join(ctx.dragonhpc, "bin", "dragon"), "-s", empty],
                    cwd=tmp,
                    env=dhpc_env(ctx),
                    shm_filter=dhpc_segment,
                ),
            )
        )
    else:
        for r in dhpc_absent(ctx):
            ctx.skip("startup DragonHPC", **r)
    return steps


def init_vs_import(ctx):
    """What dragon.init() costs a plain python (issue 13: at most 0.2 s more than ``import dragon``): the two
    one-liners run alternately, so that both see the same machine load; figures "import-dragon" and
    "dragon-init" (whole runs: the runtime's start and its teardown at exit), their ratio in the report."""

    def run():
        walls = {"import-dragon": [], "dragon-init": []}
        codes = {"import-dragon": "import dragon", "dragon-init": "import dragon; dragon.init()"}
        for _ in range(ctx.repeat):
            for peer, code in codes.items():
                res = util.run_marked(
                    [sys.executable, "-c", code], timeout=120, env=child_env(), shm_filter=lambda n: False
                )
                if res["rc"] != 0:
                    raise RuntimeError(f"python -c {code!r} exited {res['rc']}: {util.tail(res['stderr'])}")
                walls[peer].append(res["wall"])
                _note_leaks(ctx, peer, res)
        for peer, w in walls.items():
            ctx.figures.append(util.figure("startup", "init", peer, "seconds", "s", "lower", w))

    return run


# ----------------------------------------------------------------------------------------------------------
# dragon under dragon-launch


def _tmpdir(ctx):
    if getattr(ctx, "tmpdir", None) is None:
        ctx.tmpdir = tempfile.mkdtemp(prefix="dragon-bench-")
        with open(os.path.join(ctx.tmpdir, "empty.py"), "w") as f:
            f.write("")
        with open(os.path.join(ctx.tmpdir, "inner.py"), "w") as f:
            f.write("import sys\nfrom benchmarks.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    return ctx.tmpdir


def _note_leaks(ctx, name, res):
    """Count what each runtime's runs left behind (ctx.cleanup, in the JSON and the report)."""
    c = ctx.cleanup.setdefault(
        name, {"runs": 0, "shm_removed": [], "procs_killed": 0, "shm_checked": name == "dragonhpc"}
    )
    c["runs"] += 1
    c["shm_removed"] += res["leaked_shm"]
    c["procs_killed"] += len(res["leaked_procs"])
    if res["leaked_shm"] or res["leaked_procs"]:
        ctx.note(
            f"{LABELS.get(name, name)} left {len(res['leaked_shm'])} /dev/shm segment(s) "
            f"({', '.join(res['leaked_shm'][:4])}{'...' if len(res['leaked_shm']) > 4 else ''}) and "
            f"{len(res['leaked_procs'])} process(es) behind; dragon-bench removed them"
        )


def _dragon_runtime_steps(ctx):
    parts = [p for p in ("launch", "gs") if p in ctx.sel]
    why = runtime_missing()
    if why:
        for p in parts:
            ctx.skip(f"{p} dragon", f"dragon runtime not available: {why}")
        return []

    if in_runtime():  # started under dragon-launch already: measure right here

        def here():
            data = measure_runtime(parts, ctx.quick, ctx.repeat)
            ctx.figures.extend(data["figures"])
            for s in data["skipped"]:
                ctx.skip(s["what"], s["why"])
            ctx.note("launch/gs measured in the dragon job dragon-bench was started in")

        return [(f"{'+'.join(parts)}: dragon (this job)", here, "dragon-runtime")]

    def run():
        tmp = _tmpdir(ctx)
        out = os.path.join(tmp, "inner.json")
        argv = dragon_launch_cmd() + [
            os.path.join(tmp, "inner.py"),
            "--inner",
            ",".join(parts),
            "--inner-out",
            out,
            "--repeat",
            str(ctx.repeat),
        ]
        if ctx.quick:
            argv.append("--quick")
        res = util.run_marked(argv, timeout=600, env=child_env(), cwd=tmp, shm_filter=lambda n: False)
        _note_leaks(ctx, "dragon", res)
        if res["rc"] != 0 or not os.path.exists(out):
            raise RuntimeError(
                f"dragon-launch run exited {res['rc']}: {util.tail(res['stderr'] or res['stdout'])}"
            )
        with open(out) as f:
            data = json.load(f)
        ctx.figures.extend(data["figures"])
        for s in data.get("skipped", []):
            ctx.skip(s["what"], s["why"])

    return [(f"{'+'.join(parts)}: dragon (under dragon-launch)", run, "dragon-runtime")]


def inner_main(args):
    """Runs under dragon-launch: the dragon side of 'launch' and 'gs'. Writes its figures to --inner-out."""
    data = measure_runtime(args.inner.split(","), args.quick, args.repeat or (1 if args.quick else 3))
    with open(args.inner_out, "w") as f:
        json.dump(data, f)
    return 0


def measure_runtime(parts, quick, repeat):
    """The dragon figures of 'launch' and 'gs'; needs to run inside a dragon job."""
    c = counts(quick)
    figures, skipped = [], []
    F = util.figure
    from dragon.globalservices import process as gp

    cwd = os.getcwd()
    true = shutil.which("true") or "/bin/true"

    def create_join_serial(n, exe, argv):
        t0 = time.perf_counter()
        for _ in range(n):
            d = gp.create(exe, cwd, argv)
            gp.join(d.p_uid)
        return n / (time.perf_counter() - t0)

    def create_join_flight(n, exe, argv, width=IN_FLIGHT):
        t0 = time.perf_counter()
        window, started = [], 0
        while started < n or window:
            while started < n and len(window) < width:
                window.append(gp.create(exe, cwd, argv).p_uid)
                started += 1
            gp.join(window.pop(0))
        return n / (time.perf_counter() - t0)

    def attempt(what, fn):
        try:
            fn()
        except Exception as e:
            skipped.append({"what": what, "why": f"failed: {type(e).__name__}: {e}"})

    if "launch" in parts:
        attempt(
            "launch dragon /bin/true serial",
            lambda: figures.append(
                F(
                    "launch",
                    "true-serial",
                    "dragon",
                    "per_s",
                    "proc/s",
                    "higher",
                    [create_join_serial(c["serial"], true, []) for _ in range(repeat)],
                )
            ),
        )
        attempt(
            "launch dragon /bin/true 16 in flight",
            lambda: figures.append(
                F(
                    "launch",
                    "true-16",
                    "dragon",
                    "per_s",
                    "proc/s",
                    "higher",
                    [create_join_flight(c["flight"], true, []) for _ in range(repeat)],
                )
            ),
        )
        code = "from dragon.globalservices import process; process.this_process()"
        attempt(
            "launch dragon managed Python child",
            lambda: figures.append(
                F(
                    "launch",
                    "python-child",
                    "dragon",
                    "per_s",
                    "proc/s",
                    "higher",
                    [create_join_serial(c["python"], sys.executable, ["-c", code]) for _ in range(repeat)],
                )
            ),
        )
    if "gs" in parts:

        def query():
            me = gp.this_process().p_uid
            meds, p99s = [], []
            for _ in range(repeat):
                lat = []
                for _ in range(c["query"]):
                    t = time.perf_counter()
                    gp.query(me)
                    lat.append(time.perf_counter() - t)
                meds.append(util.quantile(lat, 0.5) * 1e6)
                p99s.append(util.quantile(lat, 0.99) * 1e6)
            figures.append(F("gs", "query", "dragon", "rtt_median_us", "us", "lower", meds))
            figures.append(F("gs", "query", "dragon", "rtt_p99_us", "us", "lower", p99s))

        attempt("gs dragon process.query", query)
    return {"figures": figures, "skipped": skipped}


# ----------------------------------------------------------------------------------------------------------
# DragonHPC


def dhpc_segment(name):
    """DragonHPC names its pool segments D<...> (manifest and data); ours never start with a capital D.
    (run_marked removes only those that appeared during the run and that no live process still maps.)"""
    return name.startswith(("D", "_dragon"))


def dhpc_absent(ctx):
    """Why DragonHPC is not measured, as skip reasons (see util.missing)."""
    if ctx.args.no_dragonhpc:
        return [{"why": "--no-dragonhpc given"}]
    return util.missing("DragonHPC")


def dhpc_env(ctx):
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.path.join(ctx.dragonhpc, "bin") + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = ctx.dragonhpc
    return env


def _dragonhpc_steps(ctx):
    parts = [p for p in ("launch", "gs", "pool", "channels") if p in ctx.sel]
    if "latency" in ctx.sel and "channels" not in parts:
        parts.append("channels")
    if not ctx.dragonhpc:
        for p in parts:
            for r in dhpc_absent(ctx):
                ctx.skip(f"{p} DragonHPC", **r)
        return []
    if not parts:
        return []

    def run(parts):
        tmp = _tmpdir(ctx)  # never run it from the repo: its package is also called dragon
        prog = os.path.join(HERE, "dragonhpc_prog.py")
        argv = (
            [
                os.path.join(ctx.dragonhpc, "bin", "dragon"),
                "-s",
                prog,
                "--parts",
                ",".join(parts),
                "--repeat",
                str(ctx.repeat),
            ]
            + (["--quick"] if ctx.quick else [])
            + [
                "--sizes",
                ",".join(str(s) for s in getattr(ctx, "sizes", []) or [8, 1024, 65536, 1048576]),
                "--target",
                str(ctx.target),
            ]
        )
        res = util.run_marked(
            argv, timeout=240 if ctx.quick else 600, env=dhpc_env(ctx), cwd=tmp, shm_filter=dhpc_segment
        )
        if res["timed_out"]:
            ctx.note(
                f"the DragonHPC run ({','.join(parts)}) timed out and was killed; its figures are missing"
            )
        _note_leaks(ctx, "dragonhpc", res)
        data = util.parse_json_line(res["stdout"])
        if not data:
            raise RuntimeError(
                f"DragonHPC run exited {res['rc']} without figures: "
                f"{util.tail(res['stderr'] or res['stdout'])}"
            )
        for f in data["figures"]:
            if f["group"] == "channels" and f["test"] == "stream" and "channels" not in ctx.sel:
                continue  # 'latency' alone
            if f["group"] in parts:
                ctx.figures.append(f)
        for s in data.get("skipped", []):
            ctx.skip(s["what"], s["why"])
        if data.get("skipped"):
            ctx.note(
                f"DragonHPC ({','.join(parts)}) output tail: {util.tail(res['stderr'] or res['stdout'], 4)}"
            )

    # the channel part in a runtime of its own: after hundreds of launches in the same DragonHPC runtime its
    # channel child sometimes never answers
    rt = [p for p in parts if p != "channels"]
    steps = []
    if rt:
        steps.append((f"{'+'.join(rt)}: DragonHPC (dragon -s)", lambda: run(rt), "dragonhpc-runtime"))
    if "channels" in parts:
        steps.append(("channels: DragonHPC (dragon -s)", lambda: run(["channels"]), "dragonhpc-channels"))
    return steps
