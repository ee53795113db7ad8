"""Estimate pi with a multiprocessing Pool whose workers run on every node of the allocation.

    dragon-launch examples/mp_pool_pi.py [SAMPLES]                    # this machine
    mpiexec -n 3 dragon-launch --virtual-nodes examples/mp_pool_pi.py # three nodes on this machine
    sbatch slurm/dragon.sbatch examples/mp_pool_pi.py 100000000       # a Slurm allocation

Plain multiprocessing code: ``import dragon`` and ``set_start_method("dragon")`` are the only dragon lines.
The Pool's size defaults to every CPU of the runtime (``mp.cpu_count()``), its workers go round-robin over
the nodes, and each batch of random points is counted by whichever worker is free (so a node whose workers
started last may count none of a small run). The program prints where the workers run, the estimate and how
many batches each node counted.
"""

import collections
import math
import multiprocessing as mp
import os
import random
import sys
import time

import dragon  # noqa: F401  (registers the 'dragon' start method)

BATCH = 200_000


def count_inside(seed):
    """Points of one batch inside the quarter circle, and the node that counted them."""
    rng = random.Random(seed)
    inside = 0
    for _ in range(BATCH):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside, int(os.environ.get("DRAGON_NODE", "0"))


def per_node_text(counts):
    return ", ".join(f"node {k}: {v}" for k, v in sorted(counts.items()))


def main(samples):
    mp.set_start_method("dragon")
    batches = max(1, samples // BATCH)
    t0 = time.perf_counter()
    inside, per_node = 0, collections.Counter()
    with mp.Pool() as pool:
        print(f"{len(pool._pool)} workers ({mp.cpu_count()} CPUs) for {batches} batches of {BATCH} points")
        print("workers per node: " + per_node_text(collections.Counter(p.node for p in pool._pool)))
        for n, node in pool.imap_unordered(count_inside, range(batches), chunksize=4):
            inside += n
            per_node[node] += 1
    pi = 4 * inside / (batches * BATCH)
    dt = time.perf_counter() - t0
    print(f"pi ~ {pi:.6f} (error {abs(pi - math.pi):.2e}) from {batches * BATCH} points in {dt:.1f} s")
    print("batches per node: " + per_node_text(per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000_000))
