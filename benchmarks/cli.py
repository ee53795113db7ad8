"""dragon-bench: what dragon does on this machine, beside what you would use instead, measured in one run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import util

SELECTIONS = ["channels", "latency", "launch", "gs", "pool", "startup", "xnode", "mp", "scale"]

DESCRIPTION = """\
Benchmarks dragon against its peers in one run and prints a table of results and ratios.

selections (several may be given; default: all):
  channels  stream msg/s and GB/s and ping-pong round trip, 8 B .. 1 MiB, two processes: dragon channels
            (per-call, batched, zero-copy) vs multiprocessing Queue/Pipe, faster-fifo, mpi4py Send/Recv
  latency   only the ping-pong part of 'channels'
  launch    create+join of /bin/true (serial and 16 in flight) and Python child start+join: dragon (under
            dragon-launch), subprocess.Popen, multiprocessing.Process, DragonHPC
  gs        global-services request round trip (process.query) vs a multiprocessing.Manager lookup,
            DragonHPC
  pool      pool alloc+free rate vs multiprocessing.shared_memory, DragonHPC MemoryPool
  startup   wall time of an empty program: dragon-launch vs python, mpiexec -n 1, DragonHPC; and of
            python -c 'import dragon; dragon.init()' vs 'import dragon' (a runtime started from a plain
            python)
  xnode     cross-node stream and round trip through the transport agents vs mpi4py between the same ranks,
            and the path's floor (a process and a relay per node, in C: 8 B round trip, and streams of 64 KiB
            and up copied in and received zero-copy as dragon's are)
            (mpiexec -n 2 dragon-launch --virtual-nodes on one host, or srun on an allocation)
  mp        multiprocessing on the 'dragon' start method vs the stdlib's fork/forkserver/spawn and DragonHPC:
            Process start+join, Pool.map of 100,000 trivial tasks (chunksize 1 and 64), Queue of small
            objects and of 16 MiB arrays, Pipe round trip; Pool.map across 3 virtual nodes
  scale     global services as the job grows: cost per operation (query, pool and channel create+destroy,
            process create+join) with 10^2..10^5 live objects; 10,000 /bin/true over 8 virtual nodes
            (processes/s, GS resident memory, nothing left); 100 clients at once (throughput, p99); startup
            with 1, 2, 4, 8 virtual nodes. About 1.5 min on 2 cores (--quick: 10^2 and 10^3 objects, 1,000
            processes, ~20 s)
  all       everything above but scale (run it on its own)

Runtime parts (launch, gs) run inside dragon-launch: the harness re-invokes itself under it (or measures in
place when started under dragon-launch). Started by mpiexec or srun, only rank 0 runs; it starts the ranks it
needs itself. Progress goes to stderr, the report to stdout.

The peers come with the bench extra: pip install ".[bench]" (numpy, faster-fifo, mpi4py, the mpich wheel's
mpiexec, matplotlib for --plot). Whatever is missing is skipped and the report names it once, with what to
install; the rest of the run goes on (without matplotlib: no plot). mpiexec is looked for next to python first
(a virtualenv's bin/, where the mpich wheel puts it, need not be on PATH), then on PATH.
"""

EPILOG = """environment:
  DRAGONHPC_VENV         the virtualenv of DragonHPC to compare against (default /opt/dragonhpc-venv); without
                         its bin/dragon the DragonHPC columns are skipped and the report says so. Whatever
                         DragonHPC leaves in /dev/shm or running is removed and reported.
  DRAGON_BENCH_SRUN_MPI  srun's --mpi for the cross-node part in a 2-node Slurm allocation (default pmi2, what
                         the mpich wheel speaks; pmix for an Open MPI build)
"""


def build_parser():
    ap = argparse.ArgumentParser(
        prog="dragon-bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "what",
        nargs="*",
        default=["all"],
        metavar="SELECTION",
        help="channels, latency, launch, gs, pool, startup, xnode, mp, scale or all (default all)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="short measurements, one repeat: the whole run < 1 min"
    )
    ap.add_argument("--repeat", type=int, default=None, help="repeats per figure (default 3, 1 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="write every figure and the environment to FILE")
    ap.add_argument(
        "--plot",
        metavar="FILE.png",
        help="write a PNG: size vs throughput and round trip; scale: cost vs live objects, "
        "startup vs nodes (needs matplotlib)",
    )
    ap.add_argument(
        "--sizes", default=None, type=_sizes_arg, help="message sizes, e.g. 8,1K,64K,1M (default: all four)"
    )
    ap.add_argument(
        "--peers",
        default=None,
        help="channel peers to run (default all): " + ",".join([*util.CHANNEL_PEERS, "dragonhpc"]),
    )
    ap.add_argument(
        "--producers", type=int, default=1, help="channels: also run 1x1, 2x2, 4x4 ... up to P producers ..."
    )
    ap.add_argument(
        "--consumers",
        type=int,
        default=1,
        help="... and C consumers sharing one dragon channel (aggregate msg/s)",
    )
    ap.add_argument(
        "--target-time",
        type=_seconds_arg,
        default=None,
        help="seconds per measurement (default 0.4, 0.08 with --quick)",
    )
    ap.add_argument(
        "--no-dragonhpc",
        action="store_true",
        help="do not run DragonHPC even if it is installed ($DRAGONHPC_VENV)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--inner", help=argparse.SUPPRESS)  # internal: the part run under dragon-launch
    ap.add_argument("--inner-out", help=argparse.SUPPRESS)
    return ap


class Context:
    """What every benchmark gets: the options, the progress bar, and where to put figures, skips and notes."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.repeat = args.repeat or (1 if args.quick else 3)
        self.target = args.target_time or (0.08 if args.quick else 0.4)
        self.progress = util.Progress(1, enabled=not args.no_progress)
        self.figures, self.skipped, self.notes = [], [], []
        self.cleanup = {}  # per runtime: runs, segments removed, processes killed after its runs
        self.dragonhpc = None if args.no_dragonhpc else util.dragonhpc_root()

    def skip(self, what, why, need=None):
        """Record that ``what`` was not measured and why; ``need``: the missing piece (a key of util.NEEDS),
        so the report says once what to install for everything it kept out."""
        entry = {"what": what, "why": why}
        if need:
            entry["need"] = need
        if entry not in self.skipped:
            self.skipped.append(entry)

    def note(self, text):
        self.notes.append(text)


def _selection(what):
    sel = []
    for w in what:
        for x in w.split(","):
            x = x.strip()
            if not x:
                continue
            if x == "all":
                sel += [s for s in SELECTIONS if s not in ("latency", "scale")]
            elif x in SELECTIONS:
                sel.append(x)
            else:
                raise SystemExit(
                    f"dragon-bench: unknown selection {x!r} (choose from {', '.join(SELECTIONS + ['all'])})"
                )
    if "channels" in sel and "latency" in sel:
        sel.remove("latency")
    return list(dict.fromkeys(sel))


def _sizes_arg(text):
    """--sizes: each a size of at least 8 bytes (8, 1K, 64KiB, 1M); kept as given (the parts parse it)."""
    try:
        sizes = [util.parse_size(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sizes like 8,1K,64K,1M: {text!r}") from None
    if not sizes or any(n < 8 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be at least 8 bytes: {text!r}")
    return text


def _seconds_arg(text):
    import math

    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not (0 < t < math.inf):
        raise argparse.ArgumentTypeError(f"a number of seconds > 0, not {text!r}")
    return t


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.inner:
        if args.inner == "xnode":
            from benchmarks import xnode

            return xnode.inner_main(args)
        if args.inner == "xnode-child":
            from benchmarks import xnode

            return xnode.child_main()
        if args.inner == "xnode-harness":
            from benchmarks import xnode

            return xnode.harness_main(args)
        if args.inner.startswith("scale-"):
            from benchmarks import scale

            return scale.inner_main(args)
        from benchmarks import runtime

        return runtime.inner_main(args)
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit("dragon-bench: --repeat must be at least 1")
    if args.producers < 1 or args.consumers < 1:
        raise SystemExit("dragon-bench: --producers and --consumers must be at least 1")
    sel = _selection(args.what)
    for path, option in ((args.json, "--json"), (args.plot, "--plot")):
        _check_writable(path, option)
    rank = next(
        (
            os.environ[k]
            for k in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")
            if os.environ.get(k)
        ),
        "0",
    )
    if rank != "0":  # started once per rank by mpiexec/srun: one harness is enough, it starts its own ranks
        print(f"dragon-bench: rank {rank} has nothing to do (rank 0 runs the benchmarks)", file=sys.stderr)
        return 0
    ctx = Context(args)
    ctx.sel = sel
    no_plot = util.missing("matplotlib") if args.plot else []  # known now, said once in the report
    for r in no_plot:
        ctx.skip(f"--plot {args.plot}", **r)
    env = util.environment()  # before the run: the load average then says how busy the machine was
    t0 = time.monotonic()

    from benchmarks import channels_run, mp_bench, runtime, scale, xnode

    plans = {
        "channels": lambda: channels_run.plan(ctx, stream=True),
        "latency": lambda: channels_run.plan(ctx, stream=False),
        "launch": lambda: runtime.plan_launch(ctx),
        "gs": lambda: runtime.plan_gs(ctx),
        "pool": lambda: runtime.plan_pool(ctx),
        "startup": lambda: runtime.plan_startup(ctx),
        "xnode": lambda: xnode.plan(ctx),
        "mp": lambda: mp_bench.plan(ctx),
        "scale": lambda: scale.plan(ctx),
    }
    # each plan is a list of (label, callable) steps; the progress bar counts steps
    steps = []
    for s in sel:
        steps += plans[s]()
    # steps that share an expensive setup (the dragon-launch run for launch+gs) are merged by their key
    merged, seen = [], set()
    for st in steps:
        key = st[2] if len(st) > 2 else None
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        merged.append(st)
    ctx.progress.total = max(1, len(merged))
    try:
        for label, fn, *_ in merged:
            ctx.progress.step(label)
            try:
                fn()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one broken peer must not lose the rest of the run
                ctx.skip(label, f"failed: {type(e).__name__}: {e}")
            ctx.progress.advance()
    finally:
        ctx.progress.close()
        if getattr(ctx, "tmpdir", None):
            import shutil

            shutil.rmtree(ctx.tmpdir, ignore_errors=True)

    from benchmarks import report
    from benchmarks.channels import LABELS

    labels = {**LABELS, **runtime.LABELS, **scale.LABELS, **mp_bench.LABELS}
    doc = {
        "tool": "dragon-bench",
        "env": env,
        "config": {
            "selection": sel,
            "quick": ctx.quick,
            "repeat": ctx.repeat,
            "target_time_s": ctx.target,
            "argv": sys.argv[1:] if argv is None else list(argv),
            "wall_s": None,
        },
        "results": ctx.figures,
        "skipped": ctx.skipped,
        "notes": ctx.notes,
        "cleanup": ctx.cleanup,
    }
    doc["ratios"] = report.ratios(ctx.figures)
    doc["targets"] = report.targets(ctx.figures)
    doc["config"]["wall_s"] = round(time.monotonic() - t0, 2)
    env["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(report.render(doc, labels))
    print(f"\n(run took {doc['config']['wall_s']:.1f} s)")
    rc = 0
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
            print(f"wrote {args.json}")
        except OSError as e:
            print(f"dragon-bench: could not write {args.json}: {e}", file=sys.stderr)
            rc = 1
    if args.plot and not no_plot:
        from benchmarks import plot

        if plot.has_figures(ctx.figures):
            try:
                plot.plot(doc, args.plot, labels)
                print(f"wrote {args.plot}")
            except Exception as e:  # the report and the JSON are out already: a plot error must not hide them
                print(
                    f"dragon-bench: no plot written to {args.plot}: {type(e).__name__}: {e}", file=sys.stderr
                )
                rc = 1
        else:
            print(
                "dragon-bench: no plot written: --plot draws the channels/latency/xnode/scale figures and "
                "this run has none",
                file=sys.stderr,
            )
    return rc


def _check_writable(path, option):
    """Refuse at the start an output file that cannot be written, rather than after minutes of measuring."""
    if not path:
        return
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"dragon-bench: {option} {path} is a directory; give a file name")
    if not os.path.isdir(where):
        raise SystemExit(f"dragon-bench: {option} {path}: there is no directory {where}")
    if not os.access(where, os.W_OK):
        raise SystemExit(f"dragon-bench: {option} {path}: {where} is not writable")


if __name__ == "__main__":
    sys.exit(main())
