"""--plot: one PNG a person reads at a glance. Left: message size vs stream throughput (GB/s), right: message
size vs median round trip; log axes, one line per peer, dragon drawn bold. Cross-node figures, when present,
get a row of their own; so do the scale figures (GS cost per operation vs live objects in the job, startup vs
nodes)."""

from __future__ import annotations

from benchmarks.util import size_label

STYLE = {
    "dragon": dict(color="#c0392b", lw=2.6, marker="o"),
    "dragon-batch": dict(color="#e67e22", lw=2.2, marker="s"),
    "dragon-zc": dict(color="#8e44ad", lw=2.2, marker="D"),
    "dragonhpc": dict(color="#7f8c8d", lw=1.6, marker="v", ls="--"),
    "mpi4py": dict(color="#2c3e50", lw=1.6, marker="^"),
    "mpi4py-fresh": dict(color="#2c3e50", lw=1.2, ls="--", marker="v"),
    "relay-floor": dict(color="#95a5a6", lw=1.2, ls=":", marker="_"),
    "mp-queue": dict(color="#27ae60", lw=1.4, marker="x"),
    "mp-pipe": dict(color="#16a085", lw=1.4, marker="+"),
    "faster-fifo": dict(color="#2980b9", lw=1.4, marker="*"),
    "ff-batch": dict(color="#5dade2", lw=1.4, marker="*", ls=":"),
}


SCALE_OPS = {
    "gs-query": dict(color="#c0392b", marker="o"),
    "gs-pool": dict(color="#2980b9", marker="s"),
    "gs-channel": dict(color="#27ae60", marker="D"),
    "gs-process": dict(color="#8e44ad", marker="^"),
}


def _groups(figs):
    return [g for g in ("channels", "xnode") if any(f["group"] == g and f["test"] == "stream" for f in figs)]


def _has_scale(figs):
    return any(f["group"] == "scale" and (f["test"] in SCALE_OPS or f["test"] == "startup") for f in figs)


def has_figures(figs):
    """Whether this run has anything --plot draws."""
    return bool(_groups(figs)) or _has_scale(figs)


def _scale_row(ax_cost, ax_start, figs, labels):
    """GS's cost per operation vs live objects (log-log: flat is the goal), and startup wall time vs nodes."""
    from benchmarks.scale import OP_LABELS

    for test, style in SCALE_OPS.items():
        op = test[3:]
        for where, how in ((test, dict(lw=2)), (f"alone-{op}", dict(lw=1.2, ls="--"))):
            pts = sorted(
                (f["size"], f["median"], f["min"], f["max"])
                for f in figs
                if f["group"] == "scale" and f["test"] == where and f["peer"] == "dragon"
            )
            if pts:
                what = OP_LABELS[op] + (", GS alone" if where != test else "")
                ax_cost.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    capsize=2,
                    yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    label=f"{what} (x{pts[-1][1] / pts[0][1]:.2f})",
                    **style,
                    **how,
                )
    ax_cost.set_xscale("log")
    ax_cost.set_yscale("log")
    ax_cost.set_xlabel("live objects in the job (channels)")
    ax_cost.set_ylabel("cost per operation (µs)")
    ax_cost.set_title(
        "GS cost per operation vs live objects: flat is the goal\n(legend: largest/smallest; "
        "dashed: GS's own work, no IPC)",
        fontsize=9,
    )
    ax_cost.grid(True, which="both", alpha=0.3)
    ax_cost.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    for peer in ("dragon", "mpiexec-n"):
        pts = sorted(
            (f["size"], f["median"], f["min"], f["max"])
            for f in figs
            if f["group"] == "scale" and f["test"] == "startup" and f["peer"] == peer
        )
        if pts:
            ax_start.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                capsize=2,
                label=labels.get(peer, peer),
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                **STYLE.get(peer, dict(color="#2c3e50", lw=1.6, marker="^")),
            )
    ax_start.set_xticks(sorted({f["size"] for f in figs if f["group"] == "scale" and f["test"] == "startup"}))
    ax_start.set_xlim(left=0)
    ax_start.set_xlabel("virtual nodes")
    ax_start.set_ylabel("wall time of an empty program (s)")
    ax_start.set_title(
        "Startup vs virtual nodes (lower is better)\n(proportional growth: a line through 0)", fontsize=9
    )
    ax_start.set_ylim(bottom=0)
    ax_start.grid(True, which="both", alpha=0.3)
    ax_start.legend(fontsize=8)


def plot(doc, path, labels=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    figs = doc["results"]
    groups = _groups(figs)
    scale = _has_scale(figs)
    if not groups and not scale:
        raise ValueError("nothing to plot: run the channels, xnode or scale benchmark")
    rows = len(groups) + scale
    fig, axes = plt.subplots(rows, 2, figsize=(13, 5 * rows), squeeze=False)
    env = doc.get("env", {})
    if scale:
        _scale_row(axes[-1][0], axes[-1][1], figs, labels)
    for row, group in enumerate(groups):
        for col, (test, metric, ylabel) in enumerate(
            (
                ("stream", "gb_per_s", "stream throughput (GB/s)"),
                ("rtt", "rtt_median_us", "round trip, median (µs)"),
            )
        ):
            ax = axes[row][col]
            peers = []
            for f in figs:
                if f["group"] == group and f["metric"] == metric and f["peer"] not in peers:
                    peers.append(f["peer"])
            for p in peers:
                pts = sorted(
                    (f["size"], f["median"], f["min"], f["max"])
                    for f in figs
                    if f["group"] == group and f["metric"] == metric and f["peer"] == p
                )
                if not pts:
                    continue
                xs = [x[0] for x in pts]
                ys = [x[1] for x in pts]
                lo = [x[1] - x[2] for x in pts]
                hi = [x[3] - x[1] for x in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], label=labels.get(p, p), capsize=2, **STYLE.get(p, {}))
            sizes = sorted({f["size"] for f in figs if f["group"] == group and f["metric"] == metric})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels([size_label(s) for s in sizes])
            ax.set_xlabel("message size")
            ax.set_ylabel(ylabel)
            where = "on one node" if group == "channels" else "across nodes"
            ax.set_title(
                f"{'Stream' if test == 'stream' else 'Ping-pong'} {where}"
                f" ({'higher' if test == 'stream' else 'lower'} is better)"
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"dragon-bench: {env.get('hostname', '')}, {env.get('cpu_count')} cpus, "
        f"median of {doc.get('config', {}).get('repeat')} (bars: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
