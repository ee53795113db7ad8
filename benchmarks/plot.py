"""--plot: one PNG a person reads at a glance. Left: message size vs stream throughput (GB/s), right: message size vs
median round trip; log axes, one line per peer, dragon drawn bold. Cross-node figures, when present, get a row of
their own."""
from __future__ import annotations

from benchmarks.util import size_label

STYLE = {
    "dragon": dict(color="#c0392b", lw=2.6, marker="o"),
    "dragon-batch": dict(color="#e67e22", lw=2.2, marker="s"),
    "dragon-zc": dict(color="#8e44ad", lw=2.2, marker="D"),
    "dragonhpc": dict(color="#7f8c8d", lw=1.6, marker="v", ls="--"),
    "mpi4py": dict(color="#2c3e50", lw=1.6, marker="^"),
    "mp-queue": dict(color="#27ae60", lw=1.4, marker="x"),
    "mp-pipe": dict(color="#16a085", lw=1.4, marker="+"),
    "faster-fifo": dict(color="#2980b9", lw=1.4, marker="*"),
    "ff-batch": dict(color="#5dade2", lw=1.4, marker="*", ls=":"),
}


def plot(doc, path, labels=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    figs = doc["results"]
    groups = [g for g in ("channels", "xnode") if any(f["group"] == g and f["test"] == "stream" for f in figs)]
    if not groups:
        raise ValueError("nothing to plot: run the channels (or xnode) benchmark")
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 5 * len(groups)), squeeze=False)
    env = doc.get("env", {})
    for row, group in enumerate(groups):
        for col, (test, metric, ylabel) in enumerate((("stream", "gb_per_s", "stream throughput (GB/s)"),
                                                       ("rtt", "rtt_median_us", "round trip, median (µs)"))):
            ax = axes[row][col]
            peers = []
            for f in figs:
                if f["group"] == group and f["metric"] == metric and f["peer"] not in peers:
                    peers.append(f["peer"])
            for p in peers:
                pts = sorted((f["size"], f["median"], f["min"], f["max"]) for f in figs
                             if f["group"] == group and f["metric"] == metric and f["peer"] == p)
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
            ax.set_title(f"{'Stream' if test == 'stream' else 'Ping-pong'} {where}"
                         f" ({'higher' if test == 'stream' else 'lower'} is better)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"dragon-bench: {env.get('hostname', '')}, {env.get('cpu_count')} cpus, "
                 f"median of {doc.get('config', {}).get('repeat')} (bars: min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
