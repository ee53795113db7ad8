"""dragon-bench runs in quick mode and its JSON holds every figure it should (no timing is asserted)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from benchmarks import report
from benchmarks.channels import measure_size, peer_available
from benchmarks.runtime import runtime_missing
from benchmarks.util import BENCH_EXTRA, NEEDS, beside_python, dragonhpc_root, mpiexec_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM = ("msg_per_s", "gb_per_s")
RTT = ("rtt_median_us", "rtt_p99_us")

# a sitecustomize for the runs that must not find some modules, as on a machine where they are not installed:
# every python the run starts (the harness, its children, its mpiexec ranks) gets it through PYTHONPATH
HIDE = """
import os
import sys

HIDDEN = set(filter(None, os.environ.get("DRAGON_BENCH_TEST_HIDE", "").split(",")))


class Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Hidden())
"""


def env_for(tmp_path, hide=(), env_extra=None):
    """The environment of a run of this tree (first on PYTHONPATH); ``hide``: modules it cannot import."""
    env = dict(os.environ, **(env_extra or {}))
    path = [REPO, env.get("PYTHONPATH")]
    if hide:
        site = tmp_path / "hide"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(HIDE)
        path.insert(0, str(site))
        env["DRAGON_BENCH_TEST_HIDE"] = ",".join(hide)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    return env


def run(tmp_path, *argv, timeout=100, **kw):
    """``python *argv`` in tmp_path, in env_for(tmp_path, **kw): the finished process (text output)."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=str(tmp_path),
        env=env_for(tmp_path, **kw),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bench(tmp_path, *args, timeout=100, **kw):
    out = tmp_path / "bench.json"
    p = run(tmp_path, "-m", "benchmarks", *args, "--json", str(out), timeout=timeout, **kw)
    assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    with open(out) as f:
        return json.load(f), p


def said_once(p, text):
    """The one line of the report that contains text (it must be there exactly once, in stdout only)."""
    lines = [x for x in p.stdout.splitlines() if text in x]
    assert len(lines) == 1, (text, lines, p.stdout[-3000:])
    assert text not in p.stderr, p.stderr[-3000:]
    return lines[0]


def find(doc, group, test, peer, metric, size=None):
    hits = [
        f
        for f in doc["results"]
        if (f["group"], f["test"], f["peer"], f["metric"], f["size"]) == (group, test, peer, metric, size)
    ]
    assert len(hits) == 1, f"missing figure {group}/{test}/{peer}/{metric}/{size}; skipped: {doc['skipped']}"
    f = hits[0]
    for k in ("median", "min", "max", "q1", "q3"):
        assert isinstance(f[k], (int, float)) and f[k] > 0, (k, f)
    assert f["min"] <= f["median"] <= f["max"]
    assert f["n"] == len(f["samples"]) == doc["config"]["repeat"]
    return f


def all_positive(doc):
    for f in doc["results"]:
        assert f["median"] > 0 and all(s > 0 for s in f["samples"]), f


@pytest.mark.timeout(110)
def test_quick_channels_every_figure_and_plot(tmp_path):
    peers = ["dragon", "dragon-batch", "dragon-zc", "mp-pipe", "faster-fifo", "mpi4py"]
    png = tmp_path / "bench.png"
    doc, p = bench(
        tmp_path,
        "channels",
        "--quick",
        "--sizes",
        "8,64K",
        "--peers",
        ",".join(peers),
        "--no-dragonhpc",
        "--plot",
        str(png),
        "--producers",
        "2",
        "--consumers",
        "2",
    )
    expect = [x for x in peers if peer_available(x) is None]
    assert "mp-pipe" in expect and "faster-fifo" in expect  # installed with the test extra
    for peer in expect:
        for size in (8, 65536):
            if peer == "dragon-zc" and size < 65536:
                continue
            cpu = () if peer == "mpi4py" else ("cpu_us_per_msg",)  # (mpi4py's ranks report no CPU figure)
            for m in STREAM + cpu:
                find(doc, "channels", "stream", peer, m, size)
            if peer != "dragon-batch":
                for m in RTT:
                    find(doc, "channels", "rtt", peer, m, size)
    if "dragon" in expect:  # 1x1 and 2x2 producers x consumers on one channel
        for cfg in ("1x1", "2x2"):
            for size in (8, 65536):
                find(doc, "channels", "mpmc", cfg, "msg_per_s", size)
    all_positive(doc)
    # every peer the harness could not run is said so, never silently dropped
    said = " ".join(s["what"] for s in doc["skipped"])
    for peer in set(peers) - set(expect):
        assert peer.split("-")[0] in said or "mpi4py" in said
    # the environment is recorded
    env = doc["env"]
    assert env["cpu_count"] >= 1 and env["python"] and "faster_fifo" in env["versions"]
    # ratios cover dragon against the peers it ran beside
    if "dragon" in expect:
        assert any(r["peer"] == "mp-pipe" and r["size"] == 8 and r["advantage"] > 0 for r in doc["ratios"])
        assert "RATIOS" in p.stdout
    # the plot is a real PNG
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "[" in p.stderr  # the progress bar went to stderr


@pytest.mark.timeout(110)
def test_quick_runtime_parts(tmp_path):
    doc, _ = bench(tmp_path, "pool", "startup", "launch", "gs", "--quick", "--no-dragonhpc")
    all_positive(doc)
    for size in (64, 65536):
        find(doc, "pool", "alloc-free", "shared-memory", "ops_per_s", size)
    find(doc, "startup", "empty", "python", "seconds")
    for test in ("true-serial", "true-16", "python-child"):
        find(doc, "launch", test, "popen", "per_s")
    for test in ("true-serial", "true-16"):  # the floor of a managed start (benchmarks/spawn_floor.py)
        find(doc, "launch", test, "service-floor", "per_s")
    find(doc, "launch", "python-child", "mp-fork", "per_s")
    find(doc, "gs", "query", "mp-manager", "rtt_median_us")
    if peer_available("dragon") is None:
        for size in (64, 65536):
            find(doc, "pool", "alloc-free", "dragon", "ops_per_s", size)
    if runtime_missing() is None:  # dragon's own figures, measured under dragon-launch
        find(doc, "startup", "empty", "dragon", "seconds")
        for test in ("true-serial", "true-16", "python-child"):
            find(doc, "launch", test, "dragon", "per_s")
        find(doc, "gs", "query", "dragon", "rtt_median_us")
        find(doc, "gs", "query", "dragon", "rtt_p99_us")
    else:
        assert any("dragon" in s["what"] for s in doc["skipped"])
    if mpiexec_path():
        find(doc, "startup", "empty", "mpiexec", "seconds")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.skipif(
    runtime_missing() is not None or mpiexec_path() is None, reason="needs dragon and mpiexec"
)
def test_quick_scale_every_figure_its_targets_and_plot(tmp_path):
    """dragon-bench scale --quick: the GS curve at 100 and 1,000 live objects, the 8-node processes, the 100
    clients and the startup curve, each beside its peer; the report counts objects (not bytes), the targets
    say every process exited 0, nothing was left and no client missed an answer (behaviour, not time)."""
    from benchmarks.scale import OPS

    png = tmp_path / "scale.png"
    doc, p = bench(tmp_path, "scale", "--quick", "--plot", str(png), timeout=190)
    for op in OPS:
        for level in (100, 1000):
            find(doc, "scale", f"alone-{op}", "dragon", "us_per_op", level)
            f = [x for x in doc["results"] if (x["test"], x["size"]) == (f"gs-{op}", level)]
            assert len(f) == 1 and f[0]["n"] == 2 and f[0]["median"] > 0, f  # levels visited up, then down
    for peer in ("dragon", "mp-manager"):
        for metric in ("req_per_s", "rtt_median_us", "rtt_p99_us"):
            find(doc, "scale", "clients", peer, metric, 100)
    find(doc, "scale", "procs", "dragon", "per_s")
    find(doc, "scale", "procs", "popen", "per_s")
    find(doc, "scale", "procs-gs-rss", "dragon", "rss_max_mb")
    for n in (1, 2, 4, 8):
        for peer in ("dragon", "mpiexec-n"):
            find(doc, "scale", "startup", peer, "seconds", n)
    t = {x["target"]: x for x in doc["targets"] if x["group"] == "scale"}
    assert len(t) == 13 and all(x["value"] is not None for x in t.values()), t
    for name, x in t.items():
        if x["how"] == "count":
            assert x["value"] == 0 and x["met"], (name, x, doc["notes"])
    assert "live objects" in p.stdout and "1,000" in p.stdout and "1000 B" not in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not doc["skipped"], doc["skipped"]


@pytest.mark.timeout(110)
@pytest.mark.skipif(dragonhpc_root() is None, reason="DragonHPC is not installed")
def test_dragonhpc_side_by_side_leaves_nothing(tmp_path):
    doc, _ = bench(tmp_path, "startup", "pool", "--quick")
    find(doc, "startup", "empty", "dragonhpc", "seconds")
    find(doc, "pool", "alloc-free", "dragonhpc", "ops_per_s", 64)
    assert doc["env"]["versions"]["dragonhpc"]
    assert doc["cleanup"]["dragonhpc"]["runs"] >= 2 and doc["cleanup"]["dragonhpc"]["shm_checked"]
    # whatever it left (segments, processes) was removed by the harness; the conftest fixture checks /dev/shm


@pytest.mark.mpi
@pytest.mark.timeout(110)
@pytest.mark.skipif(mpiexec_path() is None, reason="needs mpiexec (the mpich wheel)")
def test_quick_xnode_through_the_agents(tmp_path):
    doc, _ = bench(tmp_path, "xnode", "--quick", "--sizes", "8,64K", "--plot", str(tmp_path / "x.png"))
    all_positive(doc)
    for size in (8, 65536):
        for m in STREAM:
            find(doc, "xnode", "stream", "mpi4py", m, size)
        for m in RTT:
            find(doc, "xnode", "rtt", "mpi4py", m, size)
    for m in STREAM:  # (from 64 KiB: the sender writes each message first, benchmarks/mpi_peer.py)
        find(doc, "xnode", "stream", "mpi4py-fresh", m, 65536)
    assert not [f for f in doc["results"] if f["peer"] == "mpi4py-fresh" and f["size"] == 8]
    from benchmarks.util import mpicc_path

    if mpicc_path() is None:  # (the mpich wheel brings it: the test extra has it)
        assert any(s["what"] == "xnode relay floor" for s in doc["skipped"]), doc["skipped"]
    else:
        for m in RTT:  # the path in C (benchmarks/relay_floor.c): 8 B round trips, streams from 64 KiB
            find(doc, "xnode", "rtt", "relay-floor", m, 8)
        for m in STREAM:
            find(doc, "xnode", "stream", "relay-floor", m, 65536)
        assert not [f for f in doc["results"] if f["peer"] == "relay-floor" and f["size"] not in (8, 65536)]
        assert not [
            f
            for f in doc["results"]
            if f["peer"] == "relay-floor" and (f["test"], f["size"]) in (("stream", 8), ("rtt", 65536))
        ]
        assert any("relay_floor.c built with" in n for n in doc["notes"]), doc["notes"]
    try:
        import dragon._core.remote  # noqa: F401
    except ImportError:
        assert any("xnode dragon" in s["what"] for s in doc["skipped"])
        return
    for size in (8, 65536):
        for peer in ("dragon", "dragon-batch"):
            for m in STREAM:
                find(doc, "xnode", "stream", peer, m, size)
        for m in RTT:
            find(doc, "xnode", "rtt", "dragon", m, size)
    assert (tmp_path / "x.png").stat().st_size > 10_000


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(mpiexec_path() is None, reason="needs mpiexec (the mpich wheel)")
def test_relay_floor_binds_like_virtual_nodes_and_refuses_bad_arguments(tmp_path):
    """relay_floor.c (the floor of the cross-node path): each rank on its virtual node's CPUs, none across
    hosts; a wrong rank count or argument is a usage error (exit 2), not a hang."""
    from benchmarks import util, xnode
    from dragon.transport.world import cpu_share

    cpus = sorted(os.sched_getaffinity(0))
    want = [",".join(map(str, s)) if s else "-" for s in (cpu_share(cpus, 2, k) for k in (0, 1))]
    assert xnode.floor_cpus(True) == want and xnode.floor_cpus(False) == ["-", "-"]
    if len(cpus) == 2:
        assert want == [str(cpus[0]), str(cpus[1])]
    if util.mpicc_path() is None:
        pytest.skip("needs mpicc (the mpich wheel)")
    src = os.path.join(os.path.dirname(xnode.__file__), "relay_floor.c")
    exe = str(tmp_path / "relay_floor")
    subprocess.run([util.mpicc_path(), "-O2", "-o", exe, src], check=True, timeout=100)
    bad = [(1, ["100", "1"]), (2, ["5", "1"]), (2, ["100", "0"]), (2, [])]
    bad += [(2, ["--stream", x, "100", "1"]) for x in ("0", "-5", "nan", str(1 << 40))] + [(2, ["--stream"])]
    for ranks, args in bad:
        r = subprocess.run(
            util.local_mpiexec(ranks) + [exe, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode == 2 and "usage" in r.stderr, (ranks, args, r.returncode, r.stderr)
    r = subprocess.run(
        util.local_mpiexec(2) + [exe, "200", "2", *want],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    data = util.parse_json_line(r.stdout)
    assert r.returncode == 0 and data["n"] == 200, r.stdout + r.stderr
    assert len(data["rtt_median_us"]) == 2 and all(
        0 < m <= p for m, p in zip(data["rtt_median_us"], data["rtt_p99_us"])
    )
    # a stream of 64 KiB messages copied into and received into shared slots: every one arrives, on time
    r = subprocess.run(
        util.local_mpiexec(2) + [exe, "--stream", "65536", "300", "2", *want],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    stream = util.parse_json_line(r.stdout)
    assert r.returncode == 0 and stream["n"] == 300 and stream["size"] == 65536, r.stdout + r.stderr
    assert len(stream["msg_per_s"]) == 2 and all(x > 0 for x in stream["msg_per_s"])
    assert stream["library"] == data["library"]
    # --library: the same library, reported without MPI_Init (what the bench reads before it uses srun)
    lib = subprocess.run([exe, "--library"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert data["library"] and lib.splitlines()[0] == data["library"]


@pytest.mark.timeout(60)
def test_plot_without_channel_figures_says_so(tmp_path):
    png = tmp_path / "none.png"
    doc, p = bench(tmp_path, "startup", "--quick", "--no-dragonhpc", "--plot", str(png))
    assert "no plot written" in p.stderr and not png.exists()
    find(doc, "startup", "empty", "python", "seconds")


def test_ratio_direction_and_targets(monkeypatch):
    """Throughput ratios are dragon/peer, latency and time ratios peer/dragon; targets read the right
    figures."""
    from benchmarks.util import figure

    figs = [
        figure("channels", "stream", "dragon", "msg_per_s", "msg/s", "higher", [100.0], size=8),
        figure("channels", "stream", "mpi4py", "msg_per_s", "msg/s", "higher", [20.0], size=8),
        figure("channels", "rtt", "dragon", "rtt_median_us", "us", "lower", [2.0], size=8),
        figure("channels", "rtt", "mpi4py", "rtt_median_us", "us", "lower", [8.0], size=8),
    ]
    r = {(x["test"], x["peer"]): x["advantage"] for x in report.ratios(figs)}
    assert r[("stream", "mpi4py")] == pytest.approx(5.0)
    assert r[("rtt", "mpi4py")] == pytest.approx(4.0)
    t = {x["target"]: x for x in report.targets(figs)}
    s = t["8 B stream, dragon per-call / mpi4py"]
    assert s["value"] == pytest.approx(5.0) and s["met"] is False
    rt = t["8 B round trip, dragon / mpi4py"]
    assert rt["value"] == pytest.approx(0.25) and rt["met"] is False
    assert t["1 MiB stream, best dragon variant / mpi4py"]["value"] is None
    # issue 14: the copying send()/recv() at 64 KiB against faster-fifo and mp.Pipe (1 MiB was not measured)
    k = 64 << 10
    figs += [
        figure("channels", "stream", "dragon", "msg_per_s", "msg/s", "higher", [50.0], size=k),
        figure("channels", "stream", "faster-fifo", "msg_per_s", "msg/s", "higher", [20.0], size=k),
        figure("channels", "stream", "mp-pipe", "msg_per_s", "msg/s", "higher", [30.0], size=k),
    ]
    t = {x["target"]: x for x in report.targets(figs)}
    ff, pipe = (
        t["64 KiB stream, dragon per-call / faster-fifo"],
        t["64 KiB stream, dragon per-call / mp.Pipe"],
    )
    assert ff["value"] == pytest.approx(2.5) and ff["met"] is True and ff["issue"] == 14
    assert pipe["value"] == pytest.approx(50 / 30) and pipe["met"] is False
    assert t["1 MiB stream, dragon per-call / mp.Pipe"]["met"] is None
    # issue 14's cross-node goals: round trip within 2x mpi4py's; 1 MiB stream >= 0.8x on virtual nodes
    M = 1 << 20
    figs += [
        figure("xnode", "rtt", "dragon", "rtt_median_us", "us", "lower", [60.0], size=8),
        figure("xnode", "rtt", "mpi4py", "rtt_median_us", "us", "lower", [5.0], size=8),
        figure("xnode", "stream", "dragon", "gb_per_s", "GB/s", "higher", [4.0], size=M),
        figure("xnode", "stream", "mpi4py", "gb_per_s", "GB/s", "higher", [16.0], size=M),
    ]
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    t = {x["target"]: x for x in report.targets(figs)}
    x8 = t["cross-node 8 B round trip, dragon / mpi4py"]
    assert (
        x8["value"] == pytest.approx(12.0) and x8["bound"] == 2 and x8["met"] is False and x8["issue"] == 14
    )
    xm = t["cross-node 1 MiB stream, dragon / mpi4py (virtual nodes)"]
    assert xm["value"] == pytest.approx(0.25) and xm["bound"] == 0.8 and xm["group"] == "xnode"
    assert t["create+join /bin/true serial, dragon / Popen"]["bound"] == 0.85
    # issue 13: dragon.init() at most 0.2 s more than 'import dragon', whatever the import itself takes
    figs += [
        figure("startup", "init", "import-dragon", "seconds", "s", "lower", [0.03]),
        figure("startup", "init", "dragon-init", "seconds", "s", "lower", [0.13]),
    ]
    i13 = {x["target"]: x for x in report.targets(figs)}[
        "python -c 'import dragon; dragon.init()' - 'import dragon'"
    ]
    assert i13["value"] == pytest.approx(0.1) and i13["met"] is True and i13["group"] == "startup"


@pytest.mark.parametrize(
    "args, msg",
    [
        (["nonsense"], "unknown selection"),
        (["channels", "--repeat", "0"], "--repeat"),
        (["channels", "--peers", "carrier-pigeon"], "unknown peer"),
        (
            ["startup", "--plot", "/nonexistent-dragon-dir/x.png"],
            "there is no directory /nonexistent-dragon-dir",
        ),
        (["startup", "--json", "/"], "is a directory"),
        (["latency", "--sizes", "abc"], "not a list of sizes"),
        (["launch", "--sizes", "1X"], "not a list of sizes"),
        (["latency", "--sizes", "4"], "at least 8 bytes"),
        (["latency", "--target-time", "-1"], "--target-time"),
        (["latency", "--target-time", "nan"], "--target-time"),
    ],
)
def test_bad_arguments_are_refused_clearly(tmp_path, args, msg):
    p = run(tmp_path, "-m", "benchmarks", *args, timeout=60)
    assert p.returncode != 0
    assert msg in p.stderr + p.stdout and "Traceback" not in p.stderr


@pytest.mark.timeout(10)
def test_transport_bench_flags_a_run_whose_mpi4py_ranks_shared_a_core():
    """Figures measured on this machine (1 MiB, mpi4py): 15300 msg/s with a 242 us round trip when the ranks
    had a core each, 1013 us when they shared one; between the Slurm hosts 2304 msg/s and 797 us."""
    from dragon.transport.bench import placement_warning

    small = {8: {"stream_msgs": 8e5, "rtt_us": 3.0}}
    assert placement_warning({**small, 1 << 20: {"stream_msgs": 15300, "rtt_us": 242.0}}) is None
    assert placement_warning({**small, 1 << 20: {"stream_msgs": 2304, "rtt_us": 797.0}}) is None
    note = placement_warning({**small, 1 << 20: {"stream_msgs": 15300, "rtt_us": 1013.0}})
    assert note and "shared a core" in note and "1048576-byte" in note
    assert placement_warning(small) is None  # no big size measured: nothing to judge by


@pytest.mark.timeout(60)
def test_plot_without_matplotlib_runs_and_says_what_to_install(tmp_path):
    """--plot on a machine without matplotlib: the run goes on to its report and JSON, no plot, no traceback,
    and the report says once that matplotlib is missing and how to get it."""
    png = tmp_path / "bench.png"
    doc, p = bench(
        tmp_path,
        "channels",
        "--quick",
        "--sizes",
        "8",
        "--peers",
        "dragon,mp-pipe",
        "--no-dragonhpc",
        "--plot",
        str(png),
        hide=["matplotlib"],
    )
    assert not png.exists()
    find(doc, "channels", "stream", "mp-pipe", "msg_per_s", 8)  # the measurements were taken all the same
    line = said_once(p, "matplotlib is not installed")
    assert f"--plot {png}" in line and NEEDS["matplotlib"][1] in line
    said_once(p, BENCH_EXTRA)
    assert [s["what"] for s in doc["skipped"] if s.get("need") == "matplotlib"] == [f"--plot {png}"]
    assert doc["env"]["versions"]["matplotlib"] is None


@pytest.mark.mpi
@pytest.mark.timeout(90)
@pytest.mark.skipif(mpiexec_path() is None, reason="needs mpiexec (the mpich wheel)")
@pytest.mark.parametrize(
    "module, need, kept_out",
    [
        ("faster_fifo", "faster-fifo", ["channels faster-fifo", "channels faster-fifo batched"]),
        ("numpy", "numpy", ["channels mpi4py Send/Recv", "xnode mpi4py"]),
        ("mpi4py", "mpi4py", ["channels mpi4py Send/Recv", "xnode dragon", "xnode mpi4py"]),
    ],
)
def test_a_missing_peer_module_is_named_once_with_what_to_install(tmp_path, module, need, kept_out):
    """Without faster-fifo, numpy or mpi4py the peers that need it are skipped, the report names them in one
    line with what to install (and, once, the extra that brings them all), and every other figure is taken."""
    doc, p = bench(
        tmp_path,
        "channels",
        "xnode",
        "--quick",
        "--sizes",
        "8",
        "--no-dragonhpc",
        "--peers",
        "dragon,mp-pipe,faster-fifo,ff-batch,mpi4py",
        hide=[module],
    )
    line = said_once(p, f"{need} is not installed")
    assert line.startswith(f"skipped {', '.join(kept_out)}: ") and NEEDS[need][1] in line
    said_once(p, BENCH_EXTRA)
    assert [s["what"] for s in doc["skipped"] if s.get("need") == need] == kept_out
    find(doc, "channels", "stream", "mp-pipe", "msg_per_s", 8)
    assert find(doc, "channels", "stream", "dragon", "msg_per_s", 8)
    ran = {(f["group"], f["peer"]) for f in doc["results"]}
    assert (("channels", "faster-fifo") in ran) == (need != "faster-fifo")
    assert (("channels", "mpi4py") in ran) == (need == "faster-fifo")
    assert (("xnode", "dragon") in ran) == (need != "mpi4py")  # the agents need mpi4py, not numpy


@pytest.mark.timeout(60)
def test_dragonhpc_not_found_says_where_it_looked_once(tmp_path):
    nowhere = tmp_path / "no-dragonhpc"
    doc, p = bench(tmp_path, "pool", "startup", "--quick", env_extra={"DRAGONHPC_VENV": str(nowhere)})
    line = said_once(p, "DragonHPC not found")
    assert line.startswith("skipped pool DragonHPC, startup DragonHPC: ")
    assert str(nowhere / "bin" / "dragon") in line and "DRAGONHPC_VENV" in line
    assert BENCH_EXTRA not in p.stdout  # nothing the extra installs is missing
    find(doc, "startup", "empty", "python", "seconds")


def test_help_names_the_extra_and_DRAGONHPC_VENV(tmp_path):
    p = run(tmp_path, "-m", "benchmarks", "--help", timeout=60)
    assert p.returncode == 0
    assert "DRAGONHPC_VENV" in p.stdout and BENCH_EXTRA in p.stdout and "next to python" in p.stdout


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.skipif(beside_python("mpiexec") is None, reason="no mpiexec next to python (the mpich wheel)")
def test_mpiexec_next_to_python_is_used_when_not_on_path(tmp_path):
    """A virtualenv that is not activated: its bin/ (with the mpich wheel's mpiexec) is not on PATH. The
    mpi4py peer and the mpiexec startup figure are measured all the same, with the mpiexec next to python."""
    here = os.path.dirname(sys.executable)
    path = os.pathsep.join(
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if d and d != here and not os.path.exists(os.path.join(d, "mpiexec"))
    )
    assert shutil.which("mpiexec", path=path) is None
    doc, p = bench(
        tmp_path,
        "channels",
        "startup",
        "--quick",
        "--sizes",
        "8",
        "--peers",
        "mpi4py",
        "--no-dragonhpc",
        env_extra={"PATH": path},
    )
    assert doc["env"]["mpiexec"] == os.path.join(here, "mpiexec")
    find(doc, "channels", "stream", "mpi4py", "msg_per_s", 8)
    find(doc, "channels", "rtt", "mpi4py", "rtt_median_us", 8)
    find(doc, "startup", "empty", "mpiexec", "seconds")
    assert "mpiexec" not in " ".join(s["why"] for s in doc["skipped"])


@pytest.mark.timeout(60)
def test_transport_bench_help_and_clear_errors(tmp_path):
    """python -m dragon.transport.bench: --help and -h print its usage and exit 0; started without the two
    nodes it needs (no mpiexec), or without mpi4py or numpy, it says so in one line, no traceback."""
    for flag in ("--help", "-h"):
        p = run(tmp_path, "-m", "dragon.transport.bench", flag, timeout=30)
        assert p.returncode == 0, p.stderr
        assert "mpiexec -n 2 python -m dragon.transport.bench --virtual-nodes" in p.stdout
        assert "--repeat" in p.stdout
    cases = [
        ((), 2, "needs two nodes; this run has 1 rank(s) on 1 node(s): start it with mpiexec -n 2"),
        (("mpi4py",), 1, "needs mpi4py"),
        (("numpy",), 1, "needs numpy"),
    ]
    for hide, rc, msg in cases:
        p = run(tmp_path, "-m", "dragon.transport.bench", "--quick", hide=hide, timeout=30)
        assert p.returncode == rc, (p.returncode, p.stderr)
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "Traceback" not in p.stderr, p.stderr
    p = run(tmp_path, "-m", "dragon.transport.bench", "--sizes", "lots", timeout=30)
    assert p.returncode == 2 and "--sizes" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.skipif(mpiexec_path() is None, reason="needs mpiexec (the mpich wheel)")
def test_transport_bench_on_one_host_without_virtual_nodes_says_what_to_add(tmp_path):
    p = subprocess.run(
        [mpiexec_path(), "-n", "2", sys.executable, "-m", "dragon.transport.bench", "--quick"],
        cwd=str(tmp_path),
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert p.returncode != 0
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "2 rank(s) on 1 node(s): add --virtual-nodes" in err[0], p.stderr


@pytest.mark.timeout(200)
def test_quick_mp_every_figure_and_target(tmp_path):
    if runtime_missing():
        pytest.skip(runtime_missing())
    doc, p = bench(tmp_path, "mp", "--quick", "--no-dragonhpc", timeout=190)
    peers = ["dragon", "mp-fork", "mp-forkserver", "mp-spawn"]
    tests = {
        "process-start-join": "per_s",
        "pool-map-c1": "tasks_per_s",
        "pool-map-c64": "tasks_per_s",
        "queue-stream": "msg_per_s",
        "pipe-rtt": "rtt_median_us",
    }
    for test, metric in tests.items():
        for peer in peers:
            find(doc, "mp", test, peer, metric)
    for peer in peers:
        find(doc, "mp", "queue-array", peer, "gb_per_s", 16 << 20)
    if mpiexec_path():
        for test in ("pool-map-c1-3nodes", "pool-map-c64-3nodes"):
            find(doc, "mp", test, "dragon-3vn", "tasks_per_s")
    all_positive(doc)
    issue12 = [t for t in doc["targets"] if t["issue"] == 12]
    assert len(issue12) == 8 and all(
        t["value"] is not None for t in issue12 if "DragonHPC" not in t["target"]
    )
    assert any(r["group"] == "mp" and r["peer"] == "mp-forkserver" for r in doc["ratios"])
    assert "Pool.map of 100,000 trivial tasks" in p.stdout


@pytest.mark.timeout(60)
def test_peers_of_one_size_are_measured_together_and_a_broken_one_is_dropped():
    """measure_size interleaves the peers of one size (each repeat measures every peer in turn) and a peer
    that fails is reported through ``failed`` while the others keep every figure and every repeat."""
    failures = []
    figs = measure_size(
        ["dragon", "no-such-peer", "mp-pipe"], 1024, 2, 0.01, failed=lambda p, e: failures.append((p, e))
    )
    assert [p for p, _ in failures] == ["no-such-peer"] and isinstance(failures[0][1], KeyError)
    got = {(f["test"], f["peer"], f["metric"]): f for f in figs}
    for peer in ("dragon", "mp-pipe"):
        for test, metrics in (("stream", STREAM + ("cpu_us_per_msg",)), ("rtt", RTT)):
            for m in metrics:
                f = got[(test, peer, m)]
                assert f["size"] == 1024 and len(f["samples"]) == 2 and all(s > 0 for s in f["samples"])
    assert {p for _, p, _ in got} == {"dragon", "mp-pipe"}
