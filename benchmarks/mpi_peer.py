"""The mpi4py peer: Comm.Send/Recv with preallocated buffers between two ranks.

Run by the harness as ``mpiexec -n 2 python -m benchmarks.mpi_peer --sizes 8,1024 --repeat 3 --target 0.3``.
Rank 1 produces (stream) or echoes (round trip); rank 0 consumes and times, exactly like the channel driver,
and prints one line ``DRAGON_BENCH_JSON: {...}``. Counts are calibrated by a probe, as for the other peers.

The stream is measured twice from ``FRESH_MIN`` bytes up: as every MPI bandwidth benchmark does it (rank 1
sends one buffer that never changes, so from the second message on both ends' copies of it stay in the CPU
caches), and with fresh data (rank 1 writes each message into its buffer before it sends it, as a producer of
new data does, and as dragon's copying send does by itself into its staging block).
"""

from __future__ import annotations

import argparse
import json
import time

STREAM, ECHO, STOP, FRESH = 1, 2, 3, 4
FRESH_MIN = 65536  # (below, a message's lines are written and read within the caches either way)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="8,1024,65536,1048576")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--no-stream", action="store_true")
    a = ap.parse_args(argv)

    import numpy as np

    from dragon.transport.world import init_mpi

    MPI = init_mpi()

    from benchmarks.channels import calibrate, probe_count
    from benchmarks.util import JSON_MARK, quantile

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if comm.Get_size() != 2:
        raise SystemExit("mpi_peer needs exactly 2 ranks")
    sizes = [int(s) for s in a.sizes.split(",") if s]
    results = []
    for size in sizes:
        buf = np.zeros(size, dtype=np.uint8)
        if rank == 1:
            src = np.full(size, 1, dtype=np.uint8) if size >= FRESH_MIN else None  # a fresh message's data
            while True:
                op, n = comm.bcast(None, root=0)
                if op == STOP:
                    break
                if op == STREAM:
                    for _ in range(n):
                        comm.Send(buf, dest=0, tag=7)
                elif op == FRESH:
                    for _ in range(n):
                        np.copyto(buf, src)
                        comm.Send(buf, dest=0, tag=7)
                else:
                    for _ in range(n):
                        comm.Recv(buf, source=0, tag=8)
                        comm.Send(buf, dest=0, tag=9)
                comm.Barrier()
            continue

        def stream(n, buf=buf, op=STREAM):
            t0 = time.perf_counter()
            comm.bcast((op, n), root=0)
            for _ in range(n):
                comm.Recv(buf, source=1, tag=7)
            dt = time.perf_counter() - t0
            comm.Barrier()
            return dt

        def pingpong(n, buf=buf):
            comm.bcast((ECHO, n), root=0)
            lat = []
            clock = time.perf_counter
            for _ in range(n):
                t = clock()
                comm.Send(buf, dest=1, tag=8)
                comm.Recv(buf, source=1, tag=9)
                lat.append(clock() - t)
            comm.Barrier()
            return lat

        n0 = probe_count(size)
        n, rates = 0, []
        if not a.no_stream:
            n = calibrate(n0 / stream(n0), a.target, n0, 5_000_000)
            rates = [n / stream(n) for _ in range(a.repeat)]
        fresh = []
        if not a.no_stream and size >= FRESH_MIN:
            stream(n, op=FRESH)  # (warm: the same count as the plain stream, calibrated the same way)
            fresh = [n / stream(n, op=FRESH) for _ in range(a.repeat)]
        lat = pingpong(max(20, n0 // 20))
        m = calibrate(1.0 / quantile(lat, 0.5), a.target, 50, 200_000)
        meds, p99s = [], []
        for _ in range(a.repeat):
            lat = pingpong(m)
            meds.append(quantile(lat, 0.5) * 1e6)
            p99s.append(quantile(lat, 0.99) * 1e6)
        comm.bcast((STOP, 0), root=0)
        results.append(
            {
                "size": size,
                "rates": rates,
                "rates_fresh": fresh,
                "rtt_median_us": meds,
                "rtt_p99_us": p99s,
                "n_stream": n,
                "n_rtt": m,
            }
        )
    if rank == 0:
        print(
            JSON_MARK,
            json.dumps({"results": results, "library": MPI.Get_library_version().splitlines()[0]}),
            flush=True,
        )


if __name__ == "__main__":
    main()
