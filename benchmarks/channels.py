"""Channel throughput and round trip between two processes on one node, for dragon and its peers.

Every peer runs through the same driver: the parent process is the consumer (stream) or the pinger (round
trip); one forked child is the producer or the echoer. Commands go to the child over a separate control pipe,
so the measured path carries only the payload. The number of messages of a measurement is calibrated by a
short probe so each one takes about the same time whatever the peer's speed.

Peers (name: what it measures):
  dragon        dragon Channel.send / Channel.recv, one message per call
  dragon-batch  dragon Channel.send_many / recv_many (BATCH messages per call)
  dragon-zc     dragon zero-copy for large messages: the producer writes the payload into a pool block it got
                from pool.alloc and sends the block (send_block); the consumer reads it in place
                (recv_message) and releases it.  One copy in total instead of two.
  mp-queue      multiprocessing.Queue put/get
  mp-pipe       multiprocessing.Pipe send_bytes/recv_bytes
  faster-fifo   faster_fifo.Queue put/get, one message per call
  ff-batch      faster_fifo.Queue put_many/get_many
  mpi4py        mpi4py Comm.Send/Recv with buffers between two ranks (benchmarks/mpi_peer.py under mpiexec)
  mpi4py-fresh  (reported with mpi4py, streams of 64 KiB and up) the same, the sender writing each message
                into its buffer before it sends it: new data, as dragon's copying send() moves, where the
                plain figure re-sends one unchanged buffer that both ends keep in their caches
  relay-floor   (xnode: 8 B round trip, streams of 64 KiB and up) the agents' path without their protocol, in
                C: per node a process and a relay on the same CPUs, the relays speaking MPI; a streamed
                message is copied into a shared slot, sent from it and received into one, as dragon's send
                and zero-copy receive do (benchmarks/relay_floor.c): the floor of any transport agent on
                this machine
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback

from benchmarks import util

SIZES = [8, 1024, 64 * 1024, 1024 * 1024]
BATCH = 64  # messages per batched call, capped at BATCH_BYTES per call for large messages
BATCH_BYTES = 4 << 20


def batch_for(size):
    return max(2, min(BATCH, BATCH_BYTES // max(1, size)))


ZC_MIN = 64 * 1024  # zero-copy only makes sense for large messages


def queue_depth(size):
    """How many messages of ``size`` bytes a bounded queue peer holds: dragon's channel capacity, and
    faster-fifo's ring is sized for as many (the same bytes in flight: a deeper queue streams from DRAM
    instead of the cache, so unequal depths would compare the memory hierarchy, not the queues). The channel
    default (1024) up to 64 KiB; 64 for larger messages, so a pool does not ask /dev/shm for gigabytes."""
    return 1024 if size <= 64 * 1024 else 64


ALL_PEERS = util.CHANNEL_PEERS
DRAGON_PEERS = {"dragon", "dragon-batch", "dragon-zc"}
LABELS = {
    "dragon": "dragon",
    "dragon-batch": "dragon batched",
    "dragon-zc": "dragon zero-copy",
    "mp-queue": "mp.Queue",
    "mp-pipe": "mp.Pipe",
    "faster-fifo": "faster-fifo",
    "ff-batch": "faster-fifo batched",
    "mpi4py": "mpi4py Send/Recv",
    "mpi4py-fresh": "mpi4py, fresh data",
    "relay-floor": "the path in C (floor)",
}
RECV_TIMEOUT = 60.0  # a wedged peer fails its measurement instead of hanging the harness


# ----------------------------------------------------------------------------------------------------------
# transports: each one gives both ends send/recv (and send_many/recv_many where batching is natural)


class _Transport:
    batched = False

    def setup(self, size):
        """Make the objects in the parent, before the fork."""

    def parent_end(self):
        raise NotImplementedError

    def child_end(self):
        raise NotImplementedError

    def teardown(self):
        pass


class _End:
    """One side of a transport: send(payload), recv() -> bytes-like; batched ends add
    send_batch/recv_batch."""

    def send(self, data):
        raise NotImplementedError

    def recv(self):
        raise NotImplementedError

    def close(self):
        pass


class PipeTransport(_Transport):
    def setup(self, size):
        self.a, self.b = mp.Pipe(duplex=True)

    def parent_end(self):
        return _PipeEnd(self.a)

    def child_end(self):
        return _PipeEnd(self.b)

    def teardown(self):
        self.a.close()
        self.b.close()


class _PipeEnd(_End):
    # plain blocking calls, as a user would write them (a poll() with a timeout would add a syscall per
    # message); the driver's watchdog ends a measurement whose other side died
    def __init__(self, conn):
        self.send = conn.send_bytes
        self.recv = conn.recv_bytes


class QueueTransport(_Transport):
    def setup(self, size):
        self.q1 = mp.Queue()  # child -> parent
        self.q2 = mp.Queue()  # parent -> child

    def parent_end(self):
        return _QueueEnd(self.q2, self.q1)

    def child_end(self):
        return _QueueEnd(self.q1, self.q2)

    def teardown(self):
        for q in (self.q1, self.q2):
            q.close()
            q.cancel_join_thread()


class _QueueEnd(_End):
    def __init__(self, out_q, in_q):
        self.send = out_q.put
        self.recv = in_q.get  # blocking, no timeout: see _PipeEnd


class FasterFifoTransport(_Transport):
    def __init__(self, batched=False):
        self.batched = batched

    def setup(self, size):
        import faster_fifo

        # a byte ring with room for as many messages as dragon's channel holds (queue_depth; 64 B each for the
        # pickle and ring headers), and at least faster-fifo's usual 1 MiB
        cap = max(1 << 20, queue_depth(size) * (size + 64))
        self.q1 = faster_fifo.Queue(max_size_bytes=cap)
        self.q2 = faster_fifo.Queue(max_size_bytes=cap)

    def parent_end(self):
        return _FFEnd(self.q2, self.q1)

    def child_end(self):
        return _FFEnd(self.q1, self.q2)

    def teardown(self):
        for q in (self.q1, self.q2):
            q.close()


class _FFEnd(_End):
    def __init__(self, out_q, in_q):
        self.out_q, self.in_q = out_q, in_q

    def send(self, data):
        self.out_q.put(data, timeout=RECV_TIMEOUT)

    def recv(self):
        return self.in_q.get(timeout=RECV_TIMEOUT)

    def send_batch(self, items):
        self.out_q.put_many(items, timeout=RECV_TIMEOUT)

    def recv_batch(self, max_n):
        return self.in_q.get_many(timeout=RECV_TIMEOUT, max_messages_to_get=max_n)


class DragonTransport(_Transport):
    """dragon channels: one channel each way in one pool made for this message size."""

    def __init__(self, mode="call"):
        self.mode = mode
        self.batched = mode == "batch"
        self.pool = None
        self.chans = []

    def setup(self, size):
        from dragon.channels import Channel
        from dragon.pools import Pool

        capacity = queue_depth(size)
        pool_bytes = max(64 << 20, min(1 << 30, 2 * 2 * capacity * (size + 4096) + (16 << 20)))
        self.pool = Pool.create(pool_bytes)
        try:
            self.c2p = Channel.create(self.pool, capacity=capacity, block_size=1024)
            self.chans.append(self.c2p)
            self.p2c = Channel.create(self.pool, capacity=capacity, block_size=1024)
            self.chans.append(self.p2c)
        except BaseException:
            self.teardown()
            raise
        self.sdescs = (self.pool.sdesc, self.c2p.sdesc, self.p2c.sdesc)

    def parent_end(self):
        return _DragonEnd(self.mode, self.pool, self.p2c, self.c2p, own=False)

    def child_end(self):
        from dragon.channels import Channel
        from dragon.pools import Pool

        psd, c2p, p2c = self.sdescs
        pool = Pool.attach(psd)
        return _DragonEnd(self.mode, pool, Channel.attach(c2p), Channel.attach(p2c), own=True)

    def teardown(self):
        for ch in self.chans:
            try:
                ch.destroy()
            except Exception:
                pass
        self.chans = []
        if self.pool is not None:
            try:
                self.pool.destroy()
            except Exception:
                pass
            self.pool = None


class _DragonEnd(_End):
    def __init__(self, mode, pool, out_ch, in_ch, own):
        self.mode, self.pool, self.out_ch, self.in_ch, self.own = mode, pool, out_ch, in_ch, own
        if mode == "zc":
            self.send = self._send_zc
            self.recv = self._recv_zc
        else:
            self.send = out_ch.send
            self.recv = self._recv

    def _recv(self):
        return self.in_ch.recv(timeout=RECV_TIMEOUT)

    def _send_zc(self, data):
        blk = self.pool.alloc(len(data))
        memoryview(blk)[: len(data)] = data  # the one copy: the payload is produced into shared memory
        self.out_ch.send_block(blk)

    def _recv_zc(self):
        m = self.in_ch.recv_message()
        # the consumer reads in place; hand back something the echo side can send on
        return _ZCMsg(m)

    def send_batch(self, items):
        sent = 0
        while sent < len(items):
            sent += self.out_ch.send_many(items[sent:] if sent else items)

    def recv_batch(self, max_n):
        return self.in_ch.recv_many(max_n)

    def close(self):
        if self.own:
            for ch in (self.out_ch, self.in_ch):
                try:
                    ch.close()
                except Exception:
                    pass
            try:
                self.pool.close()
            except Exception:
                pass


class _ZCMsg:
    """A received zero-copy message: a readable buffer until release()."""

    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def __len__(self):
        return memoryview(self.m).nbytes

    def release(self):
        self.m.release()


def make_transport(peer):
    return {
        "dragon": lambda: DragonTransport("call"),
        "dragon-batch": lambda: DragonTransport("batch"),
        "dragon-zc": lambda: DragonTransport("zc"),
        "mp-queue": QueueTransport,
        "mp-pipe": PipeTransport,
        "faster-fifo": lambda: FasterFifoTransport(False),
        "ff-batch": lambda: FasterFifoTransport(True),
    }[peer]()


# what each peer needs beyond the standard library and dragon (keys of util.NEEDS)
PEER_NEEDS = {
    "faster-fifo": ("faster-fifo",),
    "ff-batch": ("faster-fifo",),
    "mpi4py": ("mpi4py", "numpy", "mpiexec"),
}  # benchmarks/mpi_peer.py sends numpy buffers


def peer_available(peer):
    """None if the peer can run here, else why not: skip reasons [{"why": ...}], each with "need" for a piece
    that is not installed (see util.missing)."""
    lacking = util.missing(*PEER_NEEDS.get(peer, ()))
    if lacking:
        return lacking
    if peer not in DRAGON_PEERS:
        return None
    try:
        from dragon.channels import Channel
        from dragon.pools import Pool
    except Exception as e:  # ImportError, or a half-built extension
        return [{"why": f"cannot import dragon: {type(e).__name__}: {e}"}]
    need = {"send_many", "recv_many"} if peer == "dragon-batch" else set()
    if peer == "dragon-zc":
        need = {"send_block", "recv_message"}
    missing = sorted(n for n in need if not hasattr(Channel, n))
    if missing or not hasattr(Pool, "create"):
        return [{"why": f"dragon.channels.Channel lacks {', '.join(missing) or 'Pool.create'}"}]
    return None


# ----------------------------------------------------------------------------------------------------------
# the two-process driver


def _child_loop(transport, ctrl, size):
    """Producer / echo side. Runs in the forked child until told to stop."""
    end = None
    try:
        end = transport.child_end()
        payload = b"x" * size
        nb = batch_for(size)
        batch = [payload] * nb
        ctrl.send("ready")
        while True:
            cmd = ctrl.recv()
            if cmd[0] == "stop":
                break
            op, n = cmd
            cpu0 = time.process_time()
            if op == "stream":
                if transport.batched:
                    left = n
                    while left > 0:
                        k = min(nb, left)
                        end.send_batch(batch if k == nb else batch[:k])
                        left -= k
                else:
                    send = end.send
                    for _ in range(n):
                        send(payload)
            elif op == "echo":
                send, recv = end.send, end.recv
                for _ in range(n):
                    m = recv()
                    if isinstance(m, _ZCMsg):
                        m.release()
                        send(payload)
                    else:
                        send(m)
            ctrl.send(("done", op, time.process_time() - cpu0))
    except BaseException as e:  # tell the parent instead of leaving it waiting
        try:
            ctrl.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        except Exception:
            pass
    finally:
        if end is not None:
            end.close()
        os._exit(0)


class PairError(RuntimeError):
    pass


WATCHDOG_S = 120.0  # a measurement still running after this long has a dead or wedged other side


class _watchdog:
    """Interrupt the main thread's blocking receive (SIGALRM) if a measurement runs past WATCHDOG_S."""

    def __init__(self, what):
        self.what = what

    def _fire(self, signum, frame):
        raise PairError(f"{self.what}: not done after {WATCHDOG_S:.0f} s (the other side died or is stuck)")

    def __enter__(self):
        import signal
        import threading

        self.on = threading.current_thread() is threading.main_thread()
        if self.on:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S)
        return self

    def __exit__(self, *exc):
        if self.on:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)
        return False


class Pair:
    """A parent end and a forked child end of one transport, for one message size."""

    def __init__(self, peer, size):
        self.peer, self.size = peer, size
        self.transport = make_transport(peer)
        self.transport.setup(size)
        ctx = mp.get_context("fork")
        self.ctrl, child_ctrl = ctx.Pipe()
        self.proc = ctx.Process(target=_child_loop, args=(self.transport, child_ctrl, size), daemon=True)
        try:
            self.proc.start()
            child_ctrl.close()
            self._expect("ready")
            self.end = self.transport.parent_end()
        except BaseException:
            self.close()
            raise

    def _expect(self, what, timeout=RECV_TIMEOUT):
        if not self.ctrl.poll(timeout):
            raise PairError(f"{self.peer}: child did not answer in {timeout:.0f} s")
        msg = self.ctrl.recv()
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise PairError(f"{self.peer} child failed: {msg[1]}")
        if what == "ready" and msg != "ready":
            raise PairError(f"{self.peer}: unexpected {msg!r}")
        return msg

    def stream(self, n):
        """Receive n messages the child streams; returns seconds from the command to the last message. Sets
        ``cpu``: the CPU seconds (user and system, every thread) both processes spent on the stream."""
        with _watchdog(f"{self.peer} stream"):
            return self._stream(n)

    def pingpong(self, n):
        """n round trips; returns a list of round-trip times in seconds."""
        with _watchdog(f"{self.peer} ping-pong"):
            return self._pingpong(n)

    def _stream(self, n):
        end = self.end
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        self.ctrl.send(("stream", n))
        if self.transport.batched:
            got, nb = 0, batch_for(self.size)
            while got < n:
                got += len(end.recv_batch(min(nb, n - got)))
        else:
            recv = end.recv
            for _ in range(n):
                m = recv()
                if isinstance(m, _ZCMsg):
                    m.release()
        dt = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        self.cpu = cpu + self._expect("done")[2]
        return dt

    def _pingpong(self, n):
        end = self.end
        send, recv = end.send, end.recv
        payload = b"x" * self.size
        self.ctrl.send(("echo", n))
        lat = []
        clock = time.perf_counter
        for _ in range(n):
            t = clock()
            send(payload)
            m = recv()
            lat.append(clock() - t)
            if isinstance(m, _ZCMsg):
                m.release()
        self._expect("done")
        return lat

    def close(self):
        try:
            if self.proc.is_alive():
                try:
                    self.ctrl.send(("stop",))
                except Exception:
                    pass
                self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        except Exception:
            pass
        end = getattr(self, "end", None)
        if end is not None:
            end.close()
        self.transport.teardown()
        self.ctrl.close()


# ----------------------------------------------------------------------------------------------------------
# calibration


def probe_count(size):
    return {8: 2000, 1024: 2000}.get(size, 400 if size <= 64 * 1024 else 40)


def calibrate(rate, target_s, lo, hi):
    return int(max(lo, min(hi, rate * target_s)))


def measure_size(peers, size, repeat, target_s, do_stream=True, failed=None):
    """Stream and round-trip figures of several peers at one size, interleaved: every peer's pair is set up
    and calibrated first, then each repeat measures every peer in turn, so a change in the machine's load (a
    shared host) falls on all of them alike instead of on whichever peer ran at that moment. A peer that fails
    is dropped (``failed(peer, exc)`` is told) and the others go on. Returns a list of figures."""
    n0 = probe_count(size)
    pairs, state = {}, {}

    def attempt(peer, what, n):
        """pairs[peer].stream(n) or .pingpong(n); None if it failed (the peer is dropped)."""
        try:
            return getattr(pairs[peer], what)(n)
        except Exception as e:  # one broken peer must not lose the others' figures
            pairs.pop(peer).close()
            if failed is None:
                raise
            failed(peer, e)

    try:
        for peer in peers:
            try:
                pairs[peer] = Pair(peer, size)
            except Exception as e:
                if failed is None:
                    raise
                failed(peer, e)
                continue
            state[peer] = dict(n=0, rates=[], cpus=[], m=0, meds=[], p99s=[])
        if do_stream:  # stream: probe, then `repeat` calibrated runs
            for peer in list(pairs):
                dt = attempt(peer, "stream", n0)
                if dt is not None:
                    state[peer]["n"] = calibrate(n0 / dt, target_s, n0, 5_000_000)
            for _ in range(repeat):
                for peer in list(pairs):
                    st = state[peer]
                    dt = attempt(peer, "stream", st["n"])
                    if dt is not None:
                        st["rates"].append(st["n"] / dt)
                        st["cpus"].append(pairs[peer].cpu / st["n"] * 1e6)
        # round trip (not for the batched peers: a ping-pong has nothing to batch)
        rtt = [p for p in pairs if not pairs[p].transport.batched]
        for peer in rtt:
            lat = attempt(peer, "pingpong", max(20, n0 // 20))
            if lat is not None:
                state[peer]["m"] = calibrate(1.0 / util.quantile(lat, 0.5), target_s, 50, 200_000)
        for _ in range(repeat):
            for peer in [p for p in rtt if p in pairs]:
                st = state[peer]
                lat = attempt(peer, "pingpong", st["m"])
                if lat is not None:
                    st["meds"].append(util.quantile(lat, 0.5) * 1e6)
                    st["p99s"].append(util.quantile(lat, 0.99) * 1e6)
    finally:
        for pair in pairs.values():
            pair.close()
    out = []
    for peer in peers:
        if peer in pairs:
            st = state[peer]
            out += stream_and_rtt_figures(
                "channels", peer, size, st["rates"], st["meds"], st["p99s"], st["n"], st["m"], st["cpus"]
            )
    return out


def stream_and_rtt_figures(group, peer, size, rates, meds, p99s, n_stream, n_rtt, cpus=None):
    """The figures of one peer at one size; ``cpus``: CPU microseconds both ends spent per streamed
    message (what a message costs the machine, waiting included: a shared host's load moves it less than the
    rates)."""
    f = util.figure
    out = []
    if rates:
        out += [
            f(group, "stream", peer, "msg_per_s", "msg/s", "higher", rates, size=size, count=n_stream),
            f(
                group,
                "stream",
                peer,
                "gb_per_s",
                "GB/s",
                "higher",
                [r * size / 1e9 for r in rates],
                size=size,
                count=n_stream,
            ),
        ]
    if cpus:
        out.append(f(group, "stream", peer, "cpu_us_per_msg", "us", "lower", cpus, size=size, count=n_stream))
    if meds:
        out += [
            f(group, "rtt", peer, "rtt_median_us", "us", "lower", meds, size=size, count=n_rtt),
            f(group, "rtt", peer, "rtt_p99_us", "us", "lower", p99s, size=size, count=n_rtt),
        ]
    return out


# ----------------------------------------------------------------------------------------------------------
# mpi4py peer: a subprocess under mpiexec that prints its figures as JSON


def measure_mpi(sizes, repeat, target_s, do_stream=True, group="channels", launcher=None, timeout=300):
    """Run benchmarks/mpi_peer.py on two ranks. Returns (figures, note_or_None).

    ``launcher`` is the command that starts two ranks (default: this host's ``mpiexec -n 2``; across nodes the
    caller passes e.g. ``srun -N 2 --ntasks-per-node=1``)."""
    launcher = launcher or util.local_mpiexec(2)
    cmd = launcher + [
        sys.executable,
        "-m",
        "benchmarks.mpi_peer",
        "--sizes",
        ",".join(str(s) for s in sizes),
        "--repeat",
        str(repeat),
        "--target",
        str(target_s),
    ]
    if not do_stream:
        cmd.append("--no-stream")
    env = util.clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_repo_root(), env.get("PYTHONPATH")]))
    res = util.run_marked(cmd, timeout=timeout, env=env, shm_filter=lambda name: False)
    data = util.parse_json_line(res["stdout"])
    if res["timed_out"] or res["rc"] != 0 or not data:
        why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
        return [], f"mpi4py peer failed ({why}): {util.tail(res['stderr'] or res['stdout'])}"
    figs = []
    for row in data["results"]:
        figs += stream_and_rtt_figures(
            group,
            "mpi4py",
            row["size"],
            row["rates"],
            row["rtt_median_us"],
            row["rtt_p99_us"],
            row["n_stream"],
            row["n_rtt"],
        )
        if row.get("rates_fresh"):  # the sender writes each message first (benchmarks/mpi_peer.py)
            figs += stream_and_rtt_figures(
                group, "mpi4py-fresh", row["size"], row["rates_fresh"], [], [], row["n_stream"], 0
            )
    return figs, None


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# many producers / consumers on one dragon channel


def _mpmc_producer(csd, psd, n, size, go):
    from dragon.channels import Channel

    ch = Channel.attach(csd)
    payload = b"x" * size
    go.wait()
    for _ in range(n):
        ch.send(payload)
    ch.close()
    os._exit(0)


def _mpmc_consumer(csd, size, go, counts, idx):
    from dragon.channels import Channel

    ch = Channel.attach(csd)
    got = 0
    go.wait()
    while True:
        m = ch.recv(timeout=RECV_TIMEOUT)
        if len(m) != size:  # a 1-byte stop marker
            break
        got += 1
    counts[idx] = got
    ch.close()
    os._exit(0)


def measure_mpmc(producers, consumers, size, repeat, target_s):
    """Aggregate stream rate of P producers and C consumers sharing one dragon channel."""
    from dragon.channels import Channel
    from dragon.pools import Pool

    ctx = mp.get_context("fork")
    pool = Pool.create(max(64 << 20, 4 * 1024 * (size + 4096)))
    rates = []
    try:
        ch = Channel.create(pool, capacity=1024, block_size=1024)
        try:
            n_each = 0
            per = None
            for rep in range(repeat + 1):  # the first round is the calibration probe
                if rep == 0:
                    n_each = max(100, probe_count(size) // producers)
                else:
                    n_each = max(100, int(per * target_s / producers))
                counts = ctx.Array("q", consumers)
                go = ctx.Event()
                procs = [
                    ctx.Process(target=_mpmc_producer, args=(ch.sdesc, pool.sdesc, n_each, size, go))
                    for _ in range(producers)
                ]
                procs += [
                    ctx.Process(target=_mpmc_consumer, args=(ch.sdesc, size, go, counts, i))
                    for i in range(consumers)
                ]
                for p in procs:
                    p.start()
                time.sleep(0.05)
                t0 = time.perf_counter()
                go.set()
                for p in procs[:producers]:
                    p.join(RECV_TIMEOUT)
                for _ in range(consumers):
                    ch.send(b"!")
                for p in procs[producers:]:
                    p.join(RECV_TIMEOUT)
                dt = time.perf_counter() - t0
                for p in procs:
                    if p.is_alive():
                        p.kill()
                        p.join()
                total = sum(counts[:])
                if total != n_each * producers:
                    raise RuntimeError(f"mpmc: received {total} of {n_each * producers} messages")
                rate = total / dt
                if rep == 0:
                    per = rate
                else:
                    rates.append(rate)
        finally:
            ch.destroy()
    finally:
        pool.destroy()
    # one column per configuration: peer "PxC"
    return [
        util.figure(
            "channels",
            "mpmc",
            f"{producers}x{consumers}",
            "msg_per_s",
            "msg/s",
            "higher",
            rates,
            size=size,
            producers=producers,
            consumers=consumers,
        )
    ]
