"""The floor of a managed create+join: the runtime's path of a process start without its work.

A client asks a relay process (global services' place) which asks a spawner process (the shepherd's place) to
start ``/bin/true``; the spawner answers with the pid once ``posix_spawn`` returned, watches the child's
pidfd, reaps it and reports its exit code, and the relay carries both answers back. Blocking pipes, fixed
records, no messages to decode, no output captured, no table of processes: what is left is two processes
between the caller and its child and their wake-ups, on the machine's cores beside the child. ``dragon-bench
launch`` measures it beside ``subprocess.Popen`` and dragon (the ``service-floor`` peer): dragon's create+join
is not expected to beat it, and dragon / floor says how much of the gap to Popen is the runtime's own work.

    python -m benchmarks.spawn_floor spawner IN OUT      (run by Floor)
    python -m benchmarks.spawn_floor relay CIN COUT SIN SOUT
"""

from __future__ import annotations

import os
import selectors
import struct
import subprocess
import sys
import time

REC = struct.Struct("=cii")  # kind (b"p": started, b"x": exited), pid, exit code
REQ = b"c"  # start one /bin/true


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def spawner(rfd, wfd, exe):
    """Serve start requests from rfd until EOF; records to wfd."""
    sel = selectors.DefaultSelector()
    sel.register(rfd, selectors.EVENT_READ, None)
    env = dict(os.environ)
    live = 0
    open_ = True
    while open_ or live:
        for key, _ in sel.select():
            if key.data is None:
                n = len(os.read(rfd, 64))  # one byte per request
                if n == 0:
                    sel.unregister(rfd)
                    open_ = False
                for _ in range(n):
                    pid = os.posix_spawn(exe, [exe], env)
                    pidfd = os.pidfd_open(pid)
                    sel.register(pidfd, selectors.EVENT_READ, pid)
                    live += 1
                    os.write(wfd, REC.pack(b"p", pid, 0))
            else:
                sel.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(key.data, 0)
                live -= 1
                os.write(wfd, REC.pack(b"x", key.data, os.waitstatus_to_exitcode(status)))


def relay(cin, cout, sin, sout):
    """Carry requests cin -> sout and answers sin -> cout until the client's EOF and the spawner's."""
    sel = selectors.DefaultSelector()
    sel.register(cin, selectors.EVENT_READ, sout)
    sel.register(sin, selectors.EVENT_READ, cout)
    left = 2
    while left:
        for key, _ in sel.select():
            data = os.read(key.fd, 4096)
            if not data:
                sel.unregister(key.fd)
                left -= 1
                if key.fd == cin:
                    os.close(sout)  # the spawner ends once its children did
                continue
            os.write(key.data, data)


class Floor:
    """The relay and the spawner, started beside this process (use as a context manager)."""

    def __init__(self, exe="/bin/true"):
        c2r, self._to = os.pipe()  # client -> relay
        self._from, r2c = os.pipe()  # relay -> client
        r2s_r, r2s_w = os.pipe()  # relay -> spawner
        s2r_r, s2r_w = os.pipe()  # spawner -> relay
        me = [sys.executable, "-m", "benchmarks.spawn_floor"]
        self.procs = [
            subprocess.Popen([*me, "spawner", str(r2s_r), str(s2r_w), exe], pass_fds=(r2s_r, s2r_w)),
            subprocess.Popen(
                [*me, "relay", str(c2r), str(r2c), str(s2r_r), str(r2s_w)], pass_fds=(c2r, r2c, s2r_r, r2s_w)
            ),
        ]
        for fd in (c2r, r2c, r2s_r, r2s_w, s2r_r, s2r_w):
            os.close(fd)

    def _rec(self):
        data = _read_exact(self._from, REC.size)
        if data is None:
            raise RuntimeError("the spawn floor's relay ended")
        return REC.unpack(data)

    def serial(self, n):
        """n create+join one at a time -> per second."""
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(self._to, REQ)
            kind, pid, _ = self._rec()
            kind2, pid2, code = self._rec()
            if kind != b"p" or kind2 != b"x" or pid2 != pid or code != 0:
                raise RuntimeError(f"spawn floor: unexpected records {kind!r} {kind2!r} {code}")
        return n / (time.perf_counter() - t0)

    def in_flight(self, n, width):
        """n create+join with up to width started and not yet joined -> per second (joined in start order,
        as the other peers do)."""
        t0 = time.perf_counter()
        started = joined = 0
        window, exited = [], set()
        while joined < n:
            while started < n and len(window) < width:
                os.write(self._to, REQ)
                while True:  # the create returns with its pid; exits that come first are kept
                    kind, pid, code = self._rec()
                    if kind == b"p":
                        break
                    exited.add(pid)
                window.append(pid)
                started += 1
            first = window.pop(0)
            while first not in exited:
                kind, pid, code = self._rec()
                if kind == b"x":
                    exited.add(pid)
            exited.discard(first)
            joined += 1
        return n / (time.perf_counter() - t0)

    def close(self):
        os.close(self._to)
        try:
            while os.read(self._from, 4096):
                pass
        finally:
            os.close(self._from)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv):
    role, *fds = argv
    if role == "spawner":
        spawner(int(fds[0]), int(fds[1]), fds[2])
    elif role == "relay":
        relay(*(int(x) for x in fds))
    else:
        raise SystemExit(f"usage: python -m benchmarks.spawn_floor spawner|relay FDS... (not {role!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
