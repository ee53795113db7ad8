"""The steps of the 'channels' and 'latency' selections (one step per peer and size, one for mpi4py)."""

from __future__ import annotations

from benchmarks import channels, util
from benchmarks.channels import ALL_PEERS, LABELS, SIZES


def parse_sizes(text):
    if not text:
        return list(SIZES)
    sizes = [util.parse_size(x) for x in text.split(",") if x.strip()]
    if not sizes or any(s < 8 for s in sizes):
        raise SystemExit("dragon-bench: --sizes must list sizes of at least 8 bytes")
    return sizes


def parse_peers(text):
    if not text:
        return list(ALL_PEERS)
    peers = [x.strip() for x in text.split(",") if x.strip()]
    bad = [p for p in peers if p not in ALL_PEERS + ["dragonhpc"]]
    if bad:
        raise SystemExit(
            f"dragon-bench: unknown peer(s) {', '.join(bad)} "
            f"(choose from {', '.join(ALL_PEERS + ['dragonhpc'])})"
        )
    return peers


def mpmc_configs(p, c):
    """1x1, 2x2, 4x4, ... up to P producers x C consumers (each side capped at its own maximum)."""
    out, k = [], 1
    while True:
        cfg = (min(k, p), min(k, c))
        if cfg not in out:
            out.append(cfg)
        if cfg == (p, c):
            return out
        k *= 2


def plan(ctx, stream=True):
    sizes = parse_sizes(ctx.args.sizes)
    ctx.sizes = sizes
    peers = parse_peers(ctx.args.peers)
    steps = []
    reasons = {}
    for peer in peers:
        if peer == "dragonhpc":
            continue
        why = channels.peer_available(peer)
        if why:
            reasons[peer] = why
            for r in why:
                ctx.skip(f"channels {LABELS[peer]}", **r)
    runnable = [p for p in peers if p not in reasons and p not in ("mpi4py", "dragonhpc")]
    for size in sizes:  # one step per size: its peers interleaved (see channels.measure_size)
        these = [
            p
            for p in runnable
            if not (p == "dragon-zc" and size < channels.ZC_MIN)
            and not (
                p in ("dragon-batch", "ff-batch") and not stream
            )  # batching does not apply to a ping-pong
        ]
        if not these:
            continue

        def run(these=these, size=size):
            def failed(peer, e):
                ctx.skip(
                    f"channels {LABELS[peer]} {util.size_label(size)}", f"failed: {type(e).__name__}: {e}"
                )

            ctx.figures.extend(
                channels.measure_size(these, size, ctx.repeat, ctx.target, do_stream=stream, failed=failed)
            )

        label = ", ".join(LABELS[p] for p in these)
        steps.append((f"channels {util.size_label(size)}: {label}", run))
    if "mpi4py" in peers and "mpi4py" not in reasons:

        def run_mpi():
            figs, why = channels.measure_mpi(sizes, ctx.repeat, ctx.target, do_stream=stream)
            ctx.figures.extend(figs)
            if why:
                ctx.skip("channels mpi4py", why)

        steps.append(("channels mpi4py (mpiexec -n 2)", run_mpi))
    p, c = ctx.args.producers, ctx.args.consumers
    if stream and (p > 1 or c > 1):
        why = reasons.get("dragon") or channels.peer_available("dragon")
        if why:
            for r in why:
                ctx.skip(f"channels {p}x{c} producers/consumers", **r)
        else:
            for pp, cc in mpmc_configs(p, c):
                for size in sizes:

                    def run_mpmc(size=size, pp=pp, cc=cc):
                        ctx.figures.extend(channels.measure_mpmc(pp, cc, size, ctx.repeat, ctx.target))

                    steps.append((f"channels dragon {pp}x{cc} {util.size_label(size)}", run_mpmc))
    if ctx.args.peers is None or "dragonhpc" in peers:
        from benchmarks import runtime

        steps += runtime._dragonhpc_steps(ctx)
    return steps
